//! taskmill-tasks: the built-in tasks, one a file.

pub mod chaos;
pub mod post_stats;
pub mod similarity;
pub mod text_stats;

use taskmill_task::Registry;

/// The built-in tasks: `post-stats`, `text-stats`, `similarity`, `chaos`.
pub fn builtin() -> Registry {
    Registry::new()
        .with(post_stats::PostStats)
        .with(text_stats::TextStats)
        .with(similarity::Similarity)
        .with(chaos::Chaos)
}
