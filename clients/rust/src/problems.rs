//! What went wrong while reading records: counted, and the first few described word for word.
//! Shared by every source a front door reads and by the batcher (a record too large to send).

use std::sync::{Arc, Mutex};

use tracing::debug;

/// How many problems are kept word for word; the rest are only counted.
pub const MAX_PROBLEMS: usize = 20;

/// What went wrong while reading, shared by every source.
#[derive(Debug, Default, Clone)]
pub struct Problems {
    /// Records skipped (malformed JSON, a response that is not JSON, a record too large).
    pub records_invalid: u64,
    /// Sources that could not be read at all (unreachable URL, missing file).
    pub sources_failed: u64,
    /// Of those, sources that failed on the network (refused, timed out, 429 or 5xx after
    /// every retry): when every source failed so, the enqueue is a service failure (exit 5),
    /// not a usage error.
    pub sources_unreachable: u64,
    /// The first [`MAX_PROBLEMS`] problems, each with its source (and line).
    pub samples: Vec<String>,
    /// Problems beyond the samples.
    pub more: u64,
}

/// A handle to the shared [`Problems`].
#[derive(Debug, Default, Clone)]
pub struct ProblemLog(Arc<Mutex<Problems>>);

impl ProblemLog {
    fn note(&self, text: String, invalid: u64, failed: u64) {
        debug!("{text}");
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        p.records_invalid += invalid;
        p.sources_failed += failed;
        if p.samples.len() < MAX_PROBLEMS {
            p.samples.push(text);
        } else {
            p.more += 1;
        }
    }
    /// A record was skipped.
    pub fn invalid(&self, text: String) {
        self.note(text, 1, 0);
    }
    /// A whole source failed.
    pub fn failed(&self, text: String) {
        self.note(text, 0, 1);
    }
    /// A whole source failed on the network (after its retries).
    pub fn unreachable(&self, text: String) {
        self.note(text, 0, 1);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sources_unreachable += 1;
    }
    /// A copy of what was noted so far.
    pub fn snapshot(&self) -> Problems {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
