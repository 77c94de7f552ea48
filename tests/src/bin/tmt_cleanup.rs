//! `tmt-cleanup`: removes what failed test runs left behind (queues, exchanges and Redis keys
//! of namespaces starting with `tmt-`).

#[tokio::main]
async fn main() {
    taskmill_tests::cleanup_namespace(taskmill_tests::TEST_PREFIX).await;
}
