//! `clients:`, checked: who may use the proxy, under which id, with which weight, priority
//! ceiling and rate cap. A client is known by its key alone.

use std::sync::Arc;

use super::checker::Checker;
use super::file::ClientSection;
use super::keys::{source, valid_name};
use super::Secret;
use crate::limiter::{ClientCap, Priority};

/// The most clients.
const MAX_CLIENTS: usize = 10_000;

/// One client as the proxy knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSettings {
    pub id: Arc<str>,
    pub key: Secret,
    pub weight: u32,
    pub max_priority: Priority,
    pub rate_rpm: Option<f64>,
    pub tpm: Option<u64>,
}

/// Every configured client; empty when the proxy is open to any local client.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Clients {
    pub list: Vec<ClientSettings>,
}

impl Clients {
    pub fn is_enabled(&self) -> bool {
        !self.list.is_empty()
    }

    /// The client whose key is `presented`. Every key is compared in full, whatever matches,
    /// so that the time taken says nothing about how much of a key was right.
    pub fn by_key(&self, presented: &str) -> Option<&ClientSettings> {
        let mut found = None;
        for client in &self.list {
            if same_secret(client.key.expose().as_bytes(), presented.as_bytes()) {
                found = Some(client);
            }
        }
        found
    }

    /// The rate caps and token budgets the limiter enforces.
    pub fn caps(&self) -> Vec<ClientCap> {
        self.list
            .iter()
            .filter(|c| c.rate_rpm.is_some() || c.tpm.is_some())
            .map(|c| ClientCap {
                id: c.id.clone(),
                rate_rpm: c.rate_rpm,
                tpm: c.tpm,
            })
            .collect()
    }
}

/// Compares two byte strings in time that depends on their lengths only.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

pub(super) fn validate_clients(
    c: &mut Checker,
    sections: &[ClientSection],
    env: &dyn Fn(&str) -> Option<String>,
) -> Clients {
    if sections.len() > MAX_CLIENTS {
        c.fail(
            "clients",
            format!(
                "holds at most {MAX_CLIENTS} clients, got {}",
                sections.len()
            ),
        );
    }
    let mut list: Vec<ClientSettings> = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        let at = |field: &str| format!("clients[{i}].{field}");
        if !valid_name(&s.id) {
            c.fail(
                &at("id"),
                format!(
                    "must be 1-64 letters, digits, '.', '_' or '-', got {:?}",
                    s.id
                ),
            );
        } else if list.iter().any(|o| *o.id == *s.id) {
            c.fail(&at("id"), format!("{:?} is listed twice", s.id));
        }
        let weight = s.weight.unwrap_or(1);
        if !(1..=100).contains(&weight) {
            c.fail(
                &at("weight"),
                format!("must be between 1 and 100, got {weight}"),
            );
        }
        let max_priority = match &s.max_priority {
            Some(p) => c.priority(&at("max_priority"), p),
            None => Priority::High,
        };
        if let Some(rpm) = s.rate_rpm {
            c.rpm(&at("rate_rpm"), rpm);
        }
        let tpm = s.tpm.and_then(|t| c.tpm(&at("tpm"), t));
        let Some(key) = source(
            c,
            &at("key_file"),
            &at("key_env"),
            s.key_file.as_deref(),
            s.key_env.as_deref(),
            env,
        ) else {
            continue;
        };
        if list.iter().any(|o| o.key.expose() == key.expose()) {
            c.fail(&at("id"), "has the same key as an earlier client");
        }
        list.push(ClientSettings {
            id: Arc::from(s.id.as_str()),
            key,
            weight,
            max_priority,
            rate_rpm: s.rate_rpm,
            tpm,
        });
    }
    Clients { list }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_in_full() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"a"));
    }
}
