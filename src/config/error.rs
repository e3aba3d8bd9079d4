//! `ConfigError`: one problem with the configuration, named by its key.

use std::fmt;

/// One problem with the configuration: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl ConfigError {
    /// The problem as one sentence, e.g. `rate_rpm must be > 0, got 0`.
    pub fn sentence(&self) -> String {
        let joins_as_sentence = ["must", "is ", "has ", "names "]
            .iter()
            .any(|w| self.reason.starts_with(w));
        if joins_as_sentence {
            format!("{} {}", self.key, self.reason)
        } else {
            format!("{}: {}", self.key, self.reason)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}
