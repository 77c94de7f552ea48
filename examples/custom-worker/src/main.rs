//! A worker with a task of its own: the stock worker's flags, logging, signals and drain,
//! serving the built-in tasks and `word-count`.

mod word_count;

fn main() -> std::process::ExitCode {
    taskmill_worker::main(taskmill_tasks::builtin().with(word_count::WordCount))
}
