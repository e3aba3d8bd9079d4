//! `ConfigError`: one problem with the configuration, named by its key.

use std::fmt;

/// What kind of problem a `ConfigError` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// A value breaks one of the sidecar's rules; the reason is said of the key
    /// (`rate_rpm` + `must be > 0, got 0`).
    Rule,
    /// The text could not be read as the format (YAML, JSON, a type); the reason is the
    /// parser's own message.
    Parse,
}

/// One problem with the configuration: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
    pub kind: ConfigErrorKind,
}

impl ConfigError {
    /// A broken rule: `reason` is said of `key`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
            kind: ConfigErrorKind::Rule,
        }
    }

    /// Text the parser could not read: `reason` is its message.
    pub fn parse(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            kind: ConfigErrorKind::Parse,
            ..ConfigError::new(key, reason)
        }
    }

    /// The problem as one sentence, e.g. `rate_rpm must be > 0, got 0`, or
    /// `rate_rpm: invalid type: string "x", expected f64` for a parser's message.
    pub fn sentence(&self) -> String {
        match self.kind {
            ConfigErrorKind::Rule => format!("{} {}", self.key, self.reason),
            ConfigErrorKind::Parse => format!("{}: {}", self.key, self.reason),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}
