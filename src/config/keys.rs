//! `upstream.keys`: the pool of upstream API keys, checked. A configuration without a pool
//! has a pool of one, the key of `upstream.api_key_file` / `api_key_env` (which may be
//! absent: then the client's own credential is forwarded, as before pools existed).

use std::sync::Arc;

use http::header::HeaderValue;

use super::checker::Checker;
use super::file::UpstreamSection;
use super::Secret;

/// The most keys a pool may hold.
const MAX_KEYS: usize = 64;

/// One upstream key as the proxy uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamKey {
    /// The key's name in metrics, `/status` and the log.
    pub name: Arc<str>,
    /// `Bearer <key>`, marked sensitive; `None` only for a pool of one without a key.
    pub authorization: Option<HeaderValue>,
    /// The key's own quota; `None` follows the route's `rate_rpm`.
    pub rate_rpm: Option<f64>,
    /// The key's own token budget; `None` follows the route's `tpm`.
    pub tpm: Option<u64>,
}

/// The `Authorization` value for `key`, or a problem reported under `source`.
pub(super) fn bearer(c: &mut Checker, source: &str, key: &Secret) -> Option<HeaderValue> {
    match HeaderValue::try_from(format!("Bearer {}", key.expose())) {
        Ok(mut value) => {
            value.set_sensitive(true);
            Some(value)
        }
        Err(_) => {
            c.fail(source, "holds a key with characters a header cannot carry");
            None
        }
    }
}

/// The pool: `upstream.keys` when given, else one key named `default` built from `single`.
pub(super) fn validate_keys(
    c: &mut Checker,
    section: &UpstreamSection,
    single: Option<HeaderValue>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<UpstreamKey> {
    if section.keys.is_empty() {
        return vec![UpstreamKey {
            name: Arc::from("default"),
            authorization: single,
            rate_rpm: None,
            tpm: None,
        }];
    }
    if section.api_key_env.is_some() || section.api_key_file.is_some() {
        c.fail(
            "upstream.keys",
            "replaces upstream.api_key_env and upstream.api_key_file: set one or the other",
        );
    }
    if section.keys.len() > MAX_KEYS {
        c.fail(
            "upstream.keys",
            format!("holds at most {MAX_KEYS} keys, got {}", section.keys.len()),
        );
    }
    let mut keys: Vec<UpstreamKey> = Vec::new();
    let mut values: Vec<Secret> = Vec::new();
    for (i, k) in section.keys.iter().enumerate() {
        let at = |field: &str| format!("upstream.keys[{i}].{field}");
        if !valid_name(&k.name) {
            c.fail(
                &at("name"),
                format!(
                    "must be 1-64 letters, digits, '.', '_' or '-', got {:?}",
                    k.name
                ),
            );
        } else if keys.iter().any(|o| *o.name == *k.name) {
            c.fail(&at("name"), format!("{:?} is listed twice", k.name));
        }
        if let Some(rpm) = k.rate_rpm {
            c.rpm(&at("rate_rpm"), rpm);
        }
        let tpm = k.tpm.and_then(|t| c.tpm(&at("tpm"), t));
        let Some(secret) = source(
            c,
            &at("key_file"),
            &at("key_env"),
            k.key_file.as_deref(),
            k.key_env.as_deref(),
            env,
        ) else {
            continue;
        };
        if values.iter().any(|v| v.expose() == secret.expose()) {
            c.fail(&at("name"), "holds the same key as an earlier entry");
        }
        let authorization = bearer(c, &at("key_env"), &secret);
        values.push(secret);
        keys.push(UpstreamKey {
            name: Arc::from(k.name.as_str()),
            authorization,
            rate_rpm: k.rate_rpm,
            tpm,
        });
    }
    keys
}

/// Reads a key named by exactly one of `key_file` and `key_env`; a key that is named but
/// cannot be found is a problem (unlike the optional single key).
pub(super) fn source(
    c: &mut Checker,
    file_key: &str,
    env_key: &str,
    file: Option<&str>,
    env_name: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Secret> {
    match (file, env_name) {
        (Some(_), Some(_)) => {
            c.fail(file_key, format!("use either this or {env_key}, not both"));
            None
        }
        (None, None) => {
            c.fail(env_key, format!("is required (or {file_key})"));
            None
        }
        (Some(_), None) => c.secret(file_key, file, None, env),
        (None, Some(name)) => {
            let secret = c.secret(file_key, None, Some(name), env);
            if secret.is_none() {
                c.fail(
                    env_key,
                    format!("names {name}, which is not set or is empty"),
                );
            }
            secret
        }
    }
}

/// Names of keys and clients: safe as metric labels and log fields.
pub(super) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
