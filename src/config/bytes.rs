//! Sizes in the config file: a number of bytes (`65536`) or a size with a unit (`512KiB`,
//! `8MiB`, `1GiB`; `KB`, `MB`, `GB` are read as their binary counterparts too).

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes, written as a number or with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Reads `8MiB`, `512 KiB`, `1GB`, `4096`.
    pub fn parse(text: &str) -> Option<ByteSize> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = number.parse().ok()?;
        let scale = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1u64,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => return None,
        };
        let bytes = number * scale as f64;
        (bytes.is_finite() && bytes >= 0.0 && bytes <= u64::MAX as f64)
            .then(|| ByteSize(bytes.round() as u64))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ByteSizeVisitor;

        impl Visitor<'_> for ByteSizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of bytes or a size such as \"512KiB\" or \"8MiB\"")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("a size cannot be negative, got {v}")))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ByteSize, E> {
                if v.is_finite() && v >= 0.0 && v <= u64::MAX as f64 {
                    Ok(ByteSize(v.round() as u64))
                } else {
                    Err(E::custom(format!("not a size in bytes: {v}")))
                }
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).ok_or_else(|| {
                    E::custom(format!(
                        "not a size: {v:?} (use bytes or e.g. \"512KiB\", \"8MiB\")"
                    ))
                })
            }
        }

        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_and_without_units() {
        assert_eq!(ByteSize::parse("4096"), Some(ByteSize(4096)));
        assert_eq!(ByteSize::parse("8MiB"), Some(ByteSize(8 << 20)));
        assert_eq!(ByteSize::parse("512 KiB"), Some(ByteSize(512 << 10)));
        assert_eq!(ByteSize::parse("1GB"), Some(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("1.5k"), Some(ByteSize(1536)));
        assert_eq!(ByteSize::parse("lots"), None);
        assert_eq!(ByteSize::parse("5 parsecs"), None);
        assert_eq!(ByteSize::parse("1e400"), None);
    }
}
