//! The states of a job, one type for Rust and (through [`JobState::lua_table`]) for the Redis
//! scripts.

use serde::{Deserialize, Serialize};

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Registered, no batch settled yet.
    Pending,
    /// Some batches settled.
    Running,
    /// Every batch done.
    Completed,
    /// Every batch settled, some dead.
    CompletedWithErrors,
    /// Cancelled by a user.
    Cancelled,
    /// Its enqueue was interrupted; what was published runs.
    Interrupted,
    /// Finished without some batches: they can no longer arrive (their queue was purged or
    /// deleted, say), counted in `batches_lost`. Stored batches that come back after all
    /// still count, and a job whose lost batches all come back finishes as it would have.
    Stalled,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 7] = [
        JobState::Pending,
        JobState::Running,
        JobState::Completed,
        JobState::CompletedWithErrors,
        JobState::Cancelled,
        JobState::Interrupted,
        JobState::Stalled,
    ];

    /// The name stored in Redis and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::CompletedWithErrors => "completed_with_errors",
            JobState::Cancelled => "cancelled",
            JobState::Interrupted => "interrupted",
            JobState::Stalled => "stalled",
        }
    }

    /// Whether the job will not change any more.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed
                | JobState::CompletedWithErrors
                | JobState::Cancelled
                | JobState::Stalled
        )
    }

    /// The states as a Lua table `STATE` (`STATE.completed == 'completed'`, ...), prepended to
    /// the Redis scripts so that they spell states as Rust does.
    pub fn lua_table() -> String {
        let entries: Vec<String> = Self::ALL
            .iter()
            .map(|s| format!("{0} = '{0}'", s.as_str()))
            .collect();
        format!("local STATE = {{ {} }}\n", entries.join(", "))
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not one of [`JobState::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownState(pub String);

impl std::str::FromStr for JobState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

impl PartialEq<&str> for JobState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for JobState {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!("done".parse::<JobState>().is_err());
        assert!(JobState::Completed.is_finished() && !JobState::Running.is_finished());
        let lua = JobState::lua_table();
        assert!(
            lua.contains("completed_with_errors = 'completed_with_errors'"),
            "{lua}"
        );
    }
}
