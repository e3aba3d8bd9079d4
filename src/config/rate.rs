//! `rate_rpm`: a number of requests per minute, or `auto` — start at NVIDIA's usual 40 and
//! take the upstream's own stated limits (`x-ratelimit-limit-requests`,
//! `anthropic-ratelimit-requests-limit`) as they come, learning the rest from 429s.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A route's rate as the operator wrote it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateRpm {
    /// This many requests per minute.
    Fixed(f64),
    /// Read from the upstream's headers (see the module doc).
    Auto,
}

impl Serialize for RateRpm {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RateRpm::Fixed(rpm) => serializer.serialize_f64(*rpm),
            RateRpm::Auto => serializer.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for RateRpm {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RateVisitor;

        impl Visitor<'_> for RateVisitor {
            type Value = RateRpm;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of requests per minute, or \"auto\"")
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RateRpm, E> {
                Ok(RateRpm::Fixed(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RateRpm, E> {
                Ok(RateRpm::Fixed(v as f64))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RateRpm, E> {
                Ok(RateRpm::Fixed(v as f64))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RateRpm, E> {
                if v.trim().eq_ignore_ascii_case("auto") {
                    Ok(RateRpm::Auto)
                } else {
                    Err(E::custom(format!(
                        "not a rate: {v:?} (use a number of requests per minute, or \"auto\")"
                    )))
                }
            }
        }

        deserializer.deserialize_any(RateVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_auto_parse_and_anything_else_is_named() {
        let parse = |t: &str| serde_yaml::from_str::<RateRpm>(t);
        assert_eq!(parse("40").unwrap(), RateRpm::Fixed(40.0));
        assert_eq!(parse("12.5").unwrap(), RateRpm::Fixed(12.5));
        assert_eq!(parse("auto").unwrap(), RateRpm::Auto);
        assert_eq!(parse("AUTO").unwrap(), RateRpm::Auto);
        let e = parse("fast").unwrap_err().to_string();
        assert!(e.contains("not a rate"), "{e}");
        assert_eq!(serde_json::to_string(&RateRpm::Auto).unwrap(), "\"auto\"");
    }
}
