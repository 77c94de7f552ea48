//! The `worker` binary: the stock worker with the built-in tasks.

use std::process::ExitCode;

/// mimalloc: batches are many small allocations (JSON values), where it is much faster than
/// the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    taskmill_worker::main(taskmill_common::tasks::builtin())
}
