//! Configuration: the YAML file (`file`), its validation into `Settings` (`validate`), and
//! loading with every problem reported at once.

mod bytes;
mod checker;
mod clients;
pub mod defaults;
mod error;
mod file;
mod keys;
mod layers;
mod models;
mod parse;
mod rate;
mod seconds;
mod secret;
mod settings;
mod shared_quota;
mod validate;
mod view;

pub use bytes::ByteSize;
pub use clients::{ClientSettings, Clients};
pub use error::{ConfigError, ConfigErrorKind};
pub use file::{
    AccessSection, AdaptiveSection, AdminSection, ClientSection, FileConfig, KeySection,
    ModelSection, RouteSection, ServerSection, SharedQuotaSection, UpstreamSection,
};
pub use keys::UpstreamKey;
pub use layers::{ConfigLayers, Overrides, LIVE_FIELDS};
pub use parse::{parse, read_file};
pub use rate::RateRpm;
pub use seconds::Seconds;
pub use secret::Secret;
pub use settings::{
    AccessSettings, AdminSettings, RouteSettings, ServerSettings, Settings, SharedQuotaSettings,
    UpstreamOptions, UpstreamUrl, UrlError,
};
pub use validate::validate;
pub use view::effective_view;

use parse::parse_checked;

/// The default configuration, compiled in: the same text as `conf/sidecar.yaml`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../conf/sidecar.yaml");

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

    /// Every default is written once: a file that sets nothing gets what the embedded default
    /// file spells out (but its passthrough route), and the adaptive settings are the
    /// controller's own defaults.
    #[test]
    fn an_empty_file_the_embedded_default_and_the_controller_defaults_agree() {
        let env = |name: &str| (name == "NVIDIA_API_KEY").then(|| "nvapi-test".to_string());
        let empty = validate(&parse("").unwrap(), &env).unwrap();
        let mut embedded = validate(&parse(EMBEDDED_DEFAULT).unwrap(), &env).unwrap();
        assert_eq!(
            embedded.routes.len(),
            1,
            "the embedded default's /v1/models route"
        );
        embedded.routes.clear();
        assert_eq!(empty, embedded);
        assert_eq!(
            empty.default_route.bucket.as_ref().unwrap().retreat,
            crate::limiter::RetreatSettings::default()
        );
        assert!(
            empty.upstream.authorization.is_some(),
            "NVIDIA_API_KEY is read without an upstream: section"
        );
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
