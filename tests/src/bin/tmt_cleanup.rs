//! `tmt-cleanup`: removes what failed test runs left behind (queues, exchanges and Redis keys
//! of test namespaces, `tmt-...`) made more than two hours ago; a run going on beside this one
//! keeps its namespaces.

#[tokio::main]
async fn main() {
    taskmill_tests::cleanup_stale(std::time::Duration::from_secs(2 * 3600)).await;
}
