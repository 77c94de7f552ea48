//! The built-in tasks, one a file.

pub mod chaos;
pub mod post_stats;
pub mod similarity;
pub mod text_stats;
