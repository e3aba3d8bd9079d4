//! `shared_quota:`, checked: where the shared bucket lives, how to reach it and how this
//! sidecar uses it.

use std::time::Duration;

use super::checker::Checker;
use super::defaults;
use super::file::SharedQuotaSection;
use super::SharedQuotaSettings;

pub(super) fn validate_shared_quota(
    c: &mut Checker,
    section: &SharedQuotaSection,
    env: &dyn Fn(&str) -> Option<String>,
) -> SharedQuotaSettings {
    let backend = section.backend.as_deref().unwrap_or("redis");
    if backend != "redis" {
        c.fail(
            "shared_quota.backend",
            format!("must be redis, got {backend:?}"),
        );
    }
    let sentinels = validate_sentinels(c, section);
    let url = match (&section.url, sentinels.is_empty()) {
        (Some(_), false) => {
            c.fail(
                "shared_quota.url",
                "cannot be used with shared_quota.sentinels: the Sentinels name the primary",
            );
            String::new()
        }
        (url, _) => url.clone().unwrap_or_default(),
    };
    if url.is_empty() && section.sentinels.is_none() {
        c.fail(
            "shared_quota.url",
            "is required (or shared_quota.sentinels), e.g. redis://127.0.0.1:6379",
        );
    } else if !url.is_empty() {
        use redis::IntoConnectionInfo;
        match url.as_str().into_connection_info() {
            Ok(info) if info.redis.password.is_some() => c.fail(
                "shared_quota.url",
                "has a password in it: put the password in the file named by shared_quota.password_file or the variable named by shared_quota.password_env",
            ),
            Ok(info) => {
                if let Err(e) = redis::Client::open(info) {
                    c.fail("shared_quota.url", format!("cannot be used: {e}"));
                }
            }
            Err(e) => c.fail(
                "shared_quota.url",
                format!("is not a Redis URL (redis://, rediss:// or unix://): {e}"),
            ),
        }
    }
    let key = section
        .key
        .clone()
        .unwrap_or_else(|| defaults::SHARED_QUOTA_KEY.to_string());
    if key.is_empty()
        || key
            .chars()
            .any(|ch| ch.is_whitespace() || ch.is_control() || ch == '{' || ch == '}')
    {
        c.fail(
            "shared_quota.key",
            format!("must be a non-empty name without spaces or braces, got {key:?}"),
        );
    }
    if section.instances == Some(0) {
        c.fail("shared_quota.instances", "must be at least 1, got 0");
    }
    let max_lease = section.max_lease.unwrap_or(defaults::MAX_LEASE);
    if !(1..=1000).contains(&max_lease) {
        c.fail(
            "shared_quota.max_lease",
            format!("must be between 1 and 1000, got {max_lease}"),
        );
    }
    let lease_ahead = c.duration(
        "shared_quota.lease_ahead",
        section.lease_ahead,
        defaults::LEASE_AHEAD,
        false,
    );
    if lease_ahead > Duration::from_secs(60) {
        c.fail(
            "shared_quota.lease_ahead",
            format!(
                "must be at most 60 seconds, got {}",
                lease_ahead.as_secs_f64()
            ),
        );
    }
    let ca_pem = section
        .ca_file
        .as_deref()
        .and_then(|path| match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                c.fail("shared_quota.ca_file", format!("cannot read {path}: {e}"));
                None
            }
        });
    if let Some(pem) = &ca_pem {
        use redis::IntoConnectionInfo;
        if !url.starts_with("rediss://") {
            c.fail(
                "shared_quota.ca_file",
                "is only used with a rediss:// url (TLS)",
            );
        } else if let Ok(info) = url.as_str().into_connection_info() {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            };
            if let Err(e) = redis::Client::build_with_tls(info, certs) {
                c.fail(
                    "shared_quota.ca_file",
                    format!("holds no usable CA certificate: {e}"),
                );
            }
        }
    }
    if section.ca_file.is_some() && !sentinels.is_empty() {
        c.fail(
            "shared_quota.ca_file",
            "is not supported with shared_quota.sentinels (TLS to Sentinels is not implemented)",
        );
    }
    SharedQuotaSettings {
        url,
        sentinels,
        sentinel_master: section
            .sentinel_master
            .clone()
            .unwrap_or_else(|| defaults::SENTINEL_MASTER.to_string()),
        ca_file: section.ca_file.clone(),
        ca_pem,
        username: section.username.clone(),
        password: c.secret(
            "shared_quota.password_file",
            section.password_file.as_deref(),
            section.password_env.as_deref(),
            env,
        ),
        key,
        instances: section.instances,
        lease_ahead,
        max_lease,
        timeout: c.duration(
            "shared_quota.timeout",
            section.timeout,
            defaults::REDIS_TIMEOUT,
            false,
        ),
    }
}

/// `shared_quota.sentinels` as `redis://host:port` URLs, and a sensible `sentinel_master`.
fn validate_sentinels(c: &mut Checker, section: &SharedQuotaSection) -> Vec<String> {
    let Some(addresses) = &section.sentinels else {
        if section.sentinel_master.is_some() {
            c.fail(
                "shared_quota.sentinel_master",
                "is only used with shared_quota.sentinels",
            );
        }
        return Vec::new();
    };
    if addresses.is_empty() {
        c.fail("shared_quota.sentinels", "must list at least one host:port");
    }
    if let Some(name) = &section.sentinel_master {
        if name.is_empty() || name.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
            c.fail(
                "shared_quota.sentinel_master",
                format!("must be a name without spaces, got {name:?}"),
            );
        }
    }
    let mut urls = Vec::new();
    for address in addresses {
        let parsed = address
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty() && !host.contains(['/', '@', ' ']))
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok().filter(|p| *p > 0)?)));
        match parsed {
            Some((host, port)) => urls.push(format!("redis://{host}:{port}")),
            None => c.fail(
                "shared_quota.sentinels",
                format!("must be host:port entries, got {address:?}"),
            ),
        }
    }
    urls
}
