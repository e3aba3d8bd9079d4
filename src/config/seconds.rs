//! Durations in the config file: a number of seconds (`30`, `0.5`) or a duration string
//! (`30s`, `5m`, `1h30m`, `250ms`).

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limiter::parse_go_duration;

/// A non-negative duration written as seconds or as a duration string.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds(pub f64);

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecondsVisitor;

        impl Visitor<'_> for SecondsVisitor {
            type Value = Seconds;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of seconds or a duration such as \"30s\" or \"5m\"")
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Seconds, E> {
                Ok(Seconds(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                Ok(Seconds(v as f64))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                Ok(Seconds(v as f64))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Seconds, E> {
                parse_go_duration(v)
                    .map(|d| Seconds(d.as_secs_f64()))
                    .ok_or_else(|| {
                        E::custom(format!(
                            "not a duration: {v:?} (use seconds or e.g. \"30s\", \"5m\")"
                        ))
                    })
            }
        }

        deserializer.deserialize_any(SecondsVisitor)
    }
}
