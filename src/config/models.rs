//! `models:`, checked: per-model rates and concurrency, in the order they are matched.

use std::collections::BTreeMap;

use super::checker::Checker;
use super::file::ModelSection;
use crate::limiter::ModelSettings;

/// The most model entries.
const MAX_MODELS: usize = 256;

/// The model limits, exact ids first, then globs from the most specific (the most literal
/// characters) to the least, so that the first match is the best one.
pub(super) fn validate_models(
    c: &mut Checker,
    models: &BTreeMap<String, ModelSection>,
) -> Vec<ModelSettings> {
    if models.len() > MAX_MODELS {
        c.fail(
            "models",
            format!("holds at most {MAX_MODELS} entries, got {}", models.len()),
        );
    }
    let mut out = Vec::new();
    for (pattern, m) in models {
        let key = |field: &str| format!("models.{pattern}.{field}");
        if pattern.trim().is_empty() || pattern.len() > 256 {
            c.fail(
                &format!("models.{pattern}"),
                "must be a model id or glob of 1-256 characters",
            );
            continue;
        }
        if m.rate_rpm.is_none() && m.max_concurrency.is_none() && m.tpm.is_none() {
            c.fail(
                &format!("models.{pattern}"),
                "sets none of rate_rpm, tpm and max_concurrency",
            );
        }
        let tpm = m.tpm.and_then(|t| c.tpm(&key("tpm"), t));
        if let Some(rpm) = m.rate_rpm {
            c.rpm(&key("rate_rpm"), rpm);
        }
        if let Some(n) = m.max_concurrency {
            if !(1..=100_000).contains(&n) {
                c.fail(
                    &key("max_concurrency"),
                    format!("must be between 1 and 100000, got {n}"),
                );
            }
        }
        out.push(ModelSettings {
            pattern: pattern.clone(),
            rate_rpm: m.rate_rpm,
            max_concurrency: m.max_concurrency,
            tpm,
        });
    }
    out.sort_by_key(|m| {
        let glob = m.pattern.contains('*');
        let literal = m.pattern.chars().filter(|c| *c != '*').count();
        (glob, std::cmp::Reverse(literal))
    });
    out
}
