//! The layers a running configuration is made of: the operator's file (or the embedded
//! default) and, over it, the runtime overrides set through the admin API.
//!
//! Only the fields listed in `Overrides` can be changed at run time; they are the ones that
//! take effect for the very next admission without new listeners.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ConfigError, FileConfig, RateRpm, Seconds};

/// Declares the live-changeable fields once: the `Overrides` struct, `LIVE_FIELDS`, and the
/// ways they are laid over the file, merged and named all come from this one list, so a field
/// cannot be added to one and forgotten in another.
macro_rules! live_fields {
    ($($(#[$doc:meta])* $name:ident: $ty:ty,)+) => {
        /// Fields an operator may change while the sidecar runs (`POST /api/admin/config`).
        #[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        pub struct Overrides {
            $(
                $(#[$doc])*
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $name: Option<$ty>,
            )+
        }

        /// The names of the live-changeable fields, in a stable order.
        pub const LIVE_FIELDS: &[&str] = &[$(stringify!($name)),+];

        impl Overrides {
            /// Writes every override into `file`.
            pub fn apply_to(&self, file: &mut FileConfig) {
                $(
                    if let Some(v) = self.$name {
                        file.$name = Some(v);
                    }
                )+
            }

            /// These overrides with `patch` laid over them.
            pub fn merged(&self, patch: &Overrides) -> Overrides {
                Overrides {
                    $($name: patch.$name.or(self.$name),)+
                }
            }

            /// Names of the fields that are set.
            pub fn names(&self) -> Vec<&'static str> {
                let mut names = Vec::new();
                $(
                    if self.$name.is_some() {
                        names.push(stringify!($name));
                    }
                )+
                names
            }
        }
    };
}

live_fields! {
    rate_rpm: RateRpm,
    tpm: u64,
    bucket_capacity: u32,
    queue_max_size: usize,
    low_priority_timeout: Seconds,
    request_timeout: Seconds,
    fallback_enabled_passthrough: bool,
}

impl Overrides {
    /// Parses a JSON patch, naming every unknown field and every value of the wrong type.
    pub fn from_json(patch: &Value) -> Result<Overrides, Vec<ConfigError>> {
        let Value::Object(fields) = patch else {
            return Err(vec![ConfigError::new(
                "(body)",
                "must be a JSON object of fields to change",
            )]);
        };
        if fields.is_empty() {
            return Err(vec![ConfigError::new("(body)", "names no field to change")]);
        }
        let mut errors = Vec::new();
        for (name, value) in fields {
            if !LIVE_FIELDS.contains(&name.as_str()) {
                errors.push(ConfigError::new(
                    name.clone(),
                    format!(
                        "is not a live-changeable field (those are: {})",
                        LIVE_FIELDS.join(", ")
                    ),
                ));
                continue;
            }
            if value.is_null() {
                errors.push(ConfigError::new(name.clone(), "must have a value"));
                continue;
            }
            let single = Value::Object([(name.clone(), value.clone())].into_iter().collect());
            if let Err(e) = serde_json::from_value::<Overrides>(single) {
                errors.push(ConfigError::parse(name.clone(), e.to_string()));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        serde_json::from_value(patch.clone())
            .map_err(|e| vec![ConfigError::parse("(body)", e.to_string())])
    }

    pub fn is_empty(&self) -> bool {
        self.names().is_empty()
    }
}

/// The file in force with the overrides over it.
#[derive(Debug, Clone)]
pub struct ConfigLayers {
    /// `None`: the embedded default.
    pub path: Option<String>,
    pub file: FileConfig,
    pub overrides: Overrides,
}

impl ConfigLayers {
    /// The configuration that results: the file with every override applied.
    pub fn effective(&self) -> FileConfig {
        let mut merged = self.file.clone();
        self.overrides.apply_to(&mut merged);
        merged
    }

    /// The settings these layers make, validated with the process environment: what the start
    /// and every later change put in force.
    pub fn settings(&self) -> Result<super::Settings, Vec<ConfigError>> {
        super::validate_with_env(&self.effective())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patches_name_every_bad_field() {
        let errors =
            Overrides::from_json(&json!({"rate_rpm": "abc", "colour": 1, "queue_max_size": -5}))
                .unwrap_err();
        let text: Vec<_> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{text:?}");
        assert!(text
            .iter()
            .any(|t| t.starts_with("colour: is not a live-changeable field")));
        assert!(
            text.iter().any(|t| t.starts_with("rate_rpm: not a rate")),
            "{text:?}"
        );
        assert!(Overrides::from_json(&json!([1])).is_err());
        assert!(Overrides::from_json(&json!({})).is_err());
    }

    #[test]
    fn overrides_layer_over_the_file() {
        let patch =
            Overrides::from_json(&json!({"rate_rpm": 20, "request_timeout": "2m"})).unwrap();
        assert_eq!(patch.names(), vec!["rate_rpm", "request_timeout"]);
        let layers = ConfigLayers {
            path: None,
            file: FileConfig {
                rate_rpm: Some(RateRpm::Fixed(40.0)),
                queue_max_size: Some(7),
                ..FileConfig::default()
            },
            overrides: Overrides::default().merged(&patch),
        };
        let effective = layers.effective();
        assert_eq!(effective.rate_rpm, Some(RateRpm::Fixed(20.0)));
        assert_eq!(effective.queue_max_size, Some(7));
        assert_eq!(effective.request_timeout.map(|s| s.0), Some(120.0));
    }
}
