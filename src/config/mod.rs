//! Configuration: the YAML file (`file`), its validation into `Settings` (`validate`), and
//! loading with every problem reported at once.

mod bytes;
mod checker;
mod clients;
mod file;
mod keys;
mod layers;
mod models;
mod seconds;
mod validate;
mod view;

pub use bytes::ByteSize;
pub use clients::{ClientSettings, Clients};
pub use file::{
    AccessSection, AdaptiveSection, AdminSection, ClientSection, FileConfig, KeySection,
    ModelSection, RouteSection, ServerSection, SharedQuotaSection, UpstreamSection,
};
pub use keys::UpstreamKey;
pub use layers::{ConfigLayers, Overrides, LIVE_FIELDS};
pub use seconds::Seconds;
pub use validate::{
    defaults, validate, AccessSettings, AdminSettings, ConfigError, RouteSettings, Secret,
    ServerSettings, Settings, SharedQuotaSettings, UpstreamOptions, UpstreamUrl,
};
pub use view::effective_view;

use serde_yaml::{Mapping, Value};

/// The default configuration, compiled in: the same text as `conf/sidecar.yaml`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../conf/sidecar.yaml");

/// Deepest nesting a config file may have; the real format needs four levels.
const MAX_NESTING: usize = 32;

/// The nesting depth of YAML text when it exceeds `limit`, found without parsing: flow
/// brackets outside quotes, and block indentation. A hostile file nested a hundred thousand
/// levels deep is refused at once instead of being parsed for many seconds.
fn nesting_beyond(text: &str, limit: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => {
                depth += 1;
                if depth > limit {
                    return Some(depth);
                }
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    // Block style: every level indents by at least one space (a list item by "- ").
    let deepest = text
        .lines()
        .map(|l| l.len() - l.trim_start_matches([' ', '-']).len())
        .max()
        .unwrap_or(0);
    (deepest > 4 * limit).then_some(deepest / 2)
}

/// Parses YAML text into the file structs, reporting every unknown key and wrongly typed value
/// at once rather than stopping at the first.
pub fn parse(text: &str) -> Result<FileConfig, Vec<ConfigError>> {
    let (file, errors) = parse_lenient(text)?;
    if errors.is_empty() {
        Ok(file)
    } else {
        Err(errors)
    }
}

/// Parses what can be parsed: the file with its bad entries left out, and the problems with
/// those entries. Fails outright only when the text is not a YAML mapping at all.
fn parse_lenient(text: &str) -> Result<(FileConfig, Vec<ConfigError>), Vec<ConfigError>> {
    if let Some(depth) = nesting_beyond(text, MAX_NESTING) {
        return Err(vec![ConfigError::new(
            "(file)",
            format!("nests deeper than {MAX_NESTING} levels (at least {depth}); the config never needs more than a few"),
        )]);
    }
    let doc: Value =
        serde_yaml::from_str(text).map_err(|e| vec![ConfigError::new("(file)", clean(&e))])?;
    let entries = match doc {
        Value::Null => Mapping::new(),
        Value::Mapping(m) => m,
        _ => {
            return Err(vec![ConfigError::new(
                "(file)",
                "must be a YAML mapping of keys to values",
            )])
        }
    };
    let mut errors = Vec::new();
    let mut good = Mapping::new();
    for (key, value) in entries {
        let Some(name) = key.as_str().map(str::to_string) else {
            errors.push(ConfigError::new(format!("{key:?}"), "keys must be strings"));
            continue;
        };
        let problems = probe(&name, &key, &value);
        if problems.is_empty() {
            good.insert(key, value);
        } else {
            errors.extend(problems);
        }
    }
    let file = serde_yaml::from_value(Value::Mapping(good))
        .map_err(|e| vec![ConfigError::new("(file)", clean(&e))])?;
    Ok((file, errors))
}

/// Tries one top-level entry on its own; for sections and lists, each field and item on its
/// own too, so that every bad field is named.
fn probe(name: &str, key: &Value, value: &Value) -> Vec<ConfigError> {
    let try_entry = |v: Value| -> Result<(), String> {
        let mut single = Mapping::new();
        single.insert(key.clone(), v);
        serde_yaml::from_value::<FileConfig>(Value::Mapping(single))
            .map(|_| ())
            .map_err(|e| clean(&e))
    };
    let Err(whole) = try_entry(value.clone()) else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    match value {
        Value::Mapping(fields) if !fields.is_empty() => {
            for (field, v) in fields {
                let mut one = Mapping::new();
                one.insert(field.clone(), v.clone());
                if let Err(e) = try_entry(Value::Mapping(one)) {
                    let field = field.as_str().unwrap_or("?");
                    errors.push(ConfigError::new(format!("{name}.{field}"), e));
                }
            }
        }
        Value::Sequence(items) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                if let Value::Mapping(fields) = item {
                    for (field, v) in fields {
                        let mut one = Mapping::new();
                        one.insert(field.clone(), v.clone());
                        if let Err(e) = try_entry(Value::Sequence(vec![Value::Mapping(one)])) {
                            let field = field.as_str().unwrap_or("?");
                            errors.push(ConfigError::new(format!("{name}[{i}].{field}"), e));
                        }
                    }
                } else if let Err(e) = try_entry(Value::Sequence(vec![item.clone()])) {
                    errors.push(ConfigError::new(format!("{name}[{i}]"), e));
                }
            }
        }
        _ => {}
    }
    if errors.is_empty() {
        errors.push(ConfigError::new(name, whole));
    }
    errors
}

/// A serde message without the position in the synthetic document it was found in.
fn clean(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" at line ") {
        Some(pos) => text[..pos].to_string(),
        None => text,
    };
    // serde_yaml prefixes the path inside the probed document; our key already says it.
    match text.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') && (path.contains('.') || path.contains('[')) => {
            rest.to_string()
        }
        _ => text,
    }
}

/// Reads and parses the file at `path`, or the embedded default when `path` is `None`.
pub fn read_file(path: Option<&str>) -> Result<FileConfig, Vec<ConfigError>> {
    match path {
        None => parse_checked(EMBEDDED_DEFAULT),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                vec![ConfigError::new(
                    "(file)",
                    format!("cannot read {path}: {e}"),
                )]
            })?;
            parse_checked(&text)
        }
    }
}

/// Parses YAML text; when entries fail to parse, the values that did parse are checked too
/// (the bad entries are left out and their defaults are valid), so that every problem is
/// reported in one go.
fn parse_checked(text: &str) -> Result<FileConfig, Vec<ConfigError>> {
    let (file, mut errors) = parse_lenient(text)?;
    if errors.is_empty() {
        return Ok(file);
    }
    if let Err(more) = validate_with_env(&file) {
        errors.extend(more);
    }
    Err(errors)
}

/// Validates a file's contents with the process environment.
pub fn validate_with_env(file: &FileConfig) -> Result<Settings, Vec<ConfigError>> {
    validate(file, &|name| std::env::var(name).ok())
}

/// Loads settings from YAML text with the process environment.
pub fn load_str(text: &str) -> Result<Settings, Vec<ConfigError>> {
    validate_with_env(&parse_checked(text)?)
}

#[cfg(test)]
mod pool_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn errors_of(text: &str) -> Vec<String> {
        match load_str(text) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_embedded_default_is_valid_and_matches_the_spec_defaults() {
        let s = load_str(EMBEDDED_DEFAULT).expect("embedded default config is valid");
        assert_eq!(s.listen_host.to_string(), "127.0.0.1");
        assert_eq!((s.listen_port, s.metrics_port), (9180, 9191));
        assert_eq!(
            s.default_route.upstream.to_string(),
            "https://integrate.api.nvidia.com"
        );
        let bucket = s.default_route.bucket.as_ref().unwrap();
        assert_eq!(bucket.base_rpm, 40.0);
        assert_eq!(bucket.queue_max, 100);
        assert_eq!(s.request_timeout, Duration::from_secs(300));
        assert_eq!(s.low_priority_timeout, Duration::from_secs(30));
        assert!(!s.fallback_passthrough);
        assert!(s.route_for("/v1/models").is_passthrough());
        assert!(!s.route_for("/v1/chat/completions").is_passthrough());
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let s = load_str("").unwrap();
        assert_eq!(s.listen_port, 9180);
        assert_eq!(s.default_route.bucket.as_ref().unwrap().capacity, 1);
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_key() {
        let errors = errors_of(
            "rate_rpm: -3\nlisten_port: 70000\nbogus: 1\nadaptive:\n  window: abc\n  nope: 2\nqueue_max_size: 0\nroutes:\n  - path_prefix: v1\n  - path_prefix: /x\n    colour: red\n",
        );
        let joined = errors.join("\n");
        for expected in [
            "listen_port:",
            "bogus: unknown field",
            "adaptive.window: not a duration",
            "adaptive.nope: unknown field",
            "routes[1].colour: unknown field",
        ] {
            assert!(
                joined.contains(expected),
                "missing {expected:?} in\n{joined}"
            );
        }
        // Range errors are reported together with the parse errors.
        let errors =
            errors_of("rate_rpm: -3\nqueue_max_size: 0\nbogus: 1\nroutes:\n  - path_prefix: v1\n");
        let joined = errors.join("\n");
        assert!(joined.contains("bogus: unknown field"), "{joined}");
        assert!(joined.contains("rate_rpm: must be > 0, got -3"), "{joined}");
        assert!(
            joined.contains("queue_max_size: must be between 1 and 1000000, got 0"),
            "{joined}"
        );
        assert!(
            joined.contains("routes[0].path_prefix: must start with '/'"),
            "{joined}"
        );
    }

    #[test]
    fn durations_take_seconds_or_strings() {
        let s = load_str("request_timeout: 2m\nlow_priority_timeout: 1.5\n").unwrap();
        assert_eq!(s.request_timeout, Duration::from_secs(120));
        assert_eq!(s.low_priority_timeout, Duration::from_millis(1500));
        assert!(errors_of("request_timeout: -1\n")[0].starts_with("request_timeout: must be > 0"));
    }

    #[test]
    fn routes_are_checked_and_matched_by_longest_prefix() {
        let s = load_str(
            "routes:\n  - {path_prefix: /v1, rate_rpm: 10}\n  - {path_prefix: /v1/models, passthrough: true}\n  - {path_prefix: /other, upstream_url: 'http://127.0.0.1:8080', rate_rpm: 5}\n",
        )
        .unwrap();
        assert!(s.route_for("/v1/models/x").is_passthrough());
        assert_eq!(s.route_for("/v1/chat").name, "/v1");
        assert_eq!(s.route_for("/other/a").upstream.authority, "127.0.0.1:8080");
        assert_eq!(s.route_for("/elsewhere").name, "default");
        let errors = errors_of("routes:\n  - {path_prefix: /a}\n  - {path_prefix: /b, passthrough: true, rate_rpm: 3}\n");
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    #[test]
    fn upstream_urls_are_checked() {
        assert!(UpstreamUrl::parse("ftp://x").is_err());
        assert!(UpstreamUrl::parse("https://x/v1").is_err());
        let u = UpstreamUrl::parse("https://api.example.com:8443").unwrap();
        assert_eq!(
            (u.tls, u.port, u.authority.as_str()),
            (true, 8443, "api.example.com:8443")
        );
        let u = UpstreamUrl::parse("http://[::1]:80/").unwrap();
        assert_eq!((u.host.as_str(), u.authority.as_str()), ("::1", "[::1]"));
    }

    #[test]
    fn secrets_come_from_env_or_file_and_are_never_printed() {
        let file = parse("upstream: {api_key_env: TEST_KEY_VAR}\n").unwrap();
        let s = validate(&file, &|name| {
            (name == "TEST_KEY_VAR").then(|| "nvapi-secret".to_string())
        })
        .unwrap();
        let key = s.upstream.api_key.as_ref().unwrap();
        assert_eq!(key.expose(), "nvapi-secret");
        assert_eq!(
            s.upstream.authorization.as_ref().unwrap(),
            "Bearer nvapi-secret"
        );
        assert!(!format!("{s:?}").contains("nvapi-secret"));
        let s = validate(&file, &|_| None).unwrap();
        assert!(
            s.upstream.api_key.is_none(),
            "an unset variable means no injection"
        );
        let errors = errors_of("upstream: {api_key_file: /nonexistent/key}\n");
        assert!(
            errors[0].starts_with("upstream.api_key_file: cannot read"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_shared_quota_needs_a_redis_url_without_a_password() {
        let s = load_str("shared_quota:\n  url: redis://127.0.0.1:6379/2\n").unwrap();
        let q = s.shared_quota.expect("shared_quota is set");
        assert_eq!(q.key, "nvidia-sidecar");
        assert_eq!(q.lease_ahead, Duration::from_secs(1));
        assert_eq!(q.max_lease, 4);
        assert!(load_str("shared_quota: {url: 'rediss://redis.example:6380'}").is_ok());
        assert!(load_str("shared_quota: {url: 'unix:///run/redis/redis.sock'}").is_ok());
        assert!(load_str("{}").unwrap().shared_quota.is_none());

        let errors = errors_of(
            "shared_quota:\n  backend: memcached\n  url: redis://:hunter2@127.0.0.1\n  key: 'two words'\n  instances: 0\n  lease_ahead: 0\n  max_lease: 0\n  timeout: -1\n",
        );
        for key in [
            "shared_quota.backend",
            "shared_quota.url",
            "shared_quota.key",
            "shared_quota.instances",
            "shared_quota.lease_ahead",
            "shared_quota.max_lease",
            "shared_quota.timeout",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(&format!("{key}:"))),
                "{key} not reported in {errors:?}"
            );
        }
        assert!(
            errors.iter().all(|e| !e.contains("hunter2")),
            "the password leaked into {errors:?}"
        );
        assert!(
            errors_of("shared_quota: {url: 'redis://127.0.0.1', key: 'a}b'}")
                .iter()
                .any(|e| e.starts_with("shared_quota.key:"))
        );
        assert!(errors_of(
            "shared_quota: {url: 'redis://127.0.0.1', ca_file: /nonexistent/ca.pem}"
        )
        .iter()
        .any(|e| e.starts_with("shared_quota.ca_file: cannot read")));
        assert!(
            errors_of("shared_quota: {url: 'redis://127.0.0.1', ca_file: Cargo.toml}")
                .iter()
                .any(|e| e.starts_with("shared_quota.ca_file: is only used with a rediss://"))
        );
        assert!(errors_of("shared_quota: {}")
            .iter()
            .any(|e| e.starts_with("shared_quota.url: is required")));
        assert!(errors_of("shared_quota: {url: 'http://127.0.0.1'}")
            .iter()
            .any(|e| e.starts_with("shared_quota.url:")));
    }

    #[test]
    fn sentinels_replace_the_url_and_are_checked() {
        let q = load_str("shared_quota: {sentinels: ['10.0.0.1:26379', 'sentinel-b:26380']}")
            .unwrap()
            .shared_quota
            .unwrap();
        assert_eq!(
            q.sentinels,
            ["redis://10.0.0.1:26379", "redis://sentinel-b:26380"]
        );
        assert_eq!(q.sentinel_master, "mymaster");
        assert!(q.url.is_empty());
        let errors_for = |yaml: &str, key: &str| {
            let errors = errors_of(yaml);
            assert!(
                errors.iter().any(|e| e.starts_with(&format!("{key}:"))),
                "{key} not reported for {yaml}: {errors:?}"
            );
        };
        errors_for(
            "shared_quota: {url: 'redis://h', sentinels: ['h:26379']}",
            "shared_quota.url",
        );
        errors_for("shared_quota: {sentinels: []}", "shared_quota.sentinels");
        for bad in ["h", ":26379", "h:0", "h:port", "redis://h:26379", "u@h:1"] {
            errors_for(
                &format!("shared_quota: {{sentinels: ['{bad}']}}"),
                "shared_quota.sentinels",
            );
        }
        errors_for(
            "shared_quota: {sentinels: ['h:1'], sentinel_master: 'two words'}",
            "shared_quota.sentinel_master",
        );
        errors_for(
            "shared_quota: {url: 'redis://h', sentinel_master: m}",
            "shared_quota.sentinel_master",
        );
        errors_for(
            "shared_quota: {sentinels: ['h:1'], ca_file: Cargo.toml}",
            "shared_quota.ca_file",
        );
    }

    #[test]
    fn the_redis_password_comes_from_a_file_and_is_masked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("redis-password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let text = format!(
            "shared_quota:\n  url: redis://127.0.0.1:6379\n  password_file: {}\n",
            file.display()
        );
        let s = load_str(&text).unwrap();
        let q = s.shared_quota.as_ref().unwrap();
        assert_eq!(q.password.as_ref().unwrap().expose(), "s3cret");
        let view = effective_view(&s).to_string();
        assert!(!view.contains("s3cret"), "{view}");
        assert!(view.contains("\"password\":\"***\""), "{view}");
    }
}
