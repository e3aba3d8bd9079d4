//! The README's configuration reference is generated from the doc comments of the config
//! structs (`src/config/file.rs`) and the shipped defaults (`conf/sidecar.yaml`). This test
//! fails when the two drift apart; `UPDATE_README=1 cargo test --test docs` rewrites it.

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

use std::collections::BTreeMap;

const START: &str = "<!-- config-reference:start -->";
const END: &str = "<!-- config-reference:end -->";

/// Struct name → its fields with their doc comments, in source order.
fn documented_fields(source: &str) -> BTreeMap<String, Vec<(String, String, String)>> {
    let mut structs = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut doc = String::new();
    for line in source.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("pub struct ") {
            current = Some(rest.trim_end_matches(" {").to_string());
            structs.insert(current.clone().unwrap(), Vec::new());
            doc.clear();
        } else if let Some(text) = line.strip_prefix("///") {
            if !doc.is_empty() {
                doc.push(' ');
            }
            doc.push_str(text.trim());
        } else if let (Some(rest), Some(name)) = (line.strip_prefix("pub "), current.as_ref()) {
            let (field, ty) = rest
                .split_once(':')
                .expect("a field line is `pub name: Type,`");
            assert!(!doc.is_empty(), "{name}.{field} has no doc comment");
            let ty = ty.trim().trim_end_matches(',').to_string();
            structs
                .get_mut(name)
                .unwrap()
                .push((field.to_string(), ty, doc.clone()));
            doc.clear();
        } else if !line.starts_with("#[") {
            doc.clear();
        }
    }
    structs
}

fn default_of(defaults: &serde_yaml::Value, path: &[&str]) -> String {
    let mut value = defaults;
    for key in path {
        match value.get(*key) {
            Some(v) => value = v,
            None => return "unset".to_string(),
        }
    }
    match value {
        serde_yaml::Value::Sequence(_) | serde_yaml::Value::Mapping(_) => {
            "see `conf/sidecar.yaml`".to_string()
        }
        other => format!("`{}`", serde_yaml::to_string(other).unwrap().trim()),
    }
}

fn reference() -> String {
    let source = std::fs::read_to_string("src/config/file.rs").unwrap();
    let defaults: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string("conf/sidecar.yaml").unwrap()).unwrap();
    let structs = documented_fields(&source);
    let sections = [
        ("FileConfig", ""),
        ("AdaptiveSection", "adaptive"),
        ("UpstreamSection", "upstream"),
        ("KeySection", "upstream.keys[]"),
        ("RouteSection", "routes[]"),
        ("AdminSection", "admin"),
        ("AccessSection", "access"),
        ("ServerSection", "server"),
        ("SharedQuotaSection", "shared_quota"),
        ("ModelSection", "models.<id>"),
        ("ClientSection", "clients[]"),
    ];
    let mut out = String::new();
    out.push_str("| key | default | meaning |\n|---|---|---|\n");
    for (name, prefix) in sections {
        for (field, ty, doc) in &structs[name] {
            if ty.ends_with("Section") || ty.starts_with("Vec<RouteSection") {
                continue;
            }
            let key = if prefix.is_empty() {
                field.clone()
            } else {
                format!("{prefix}.{field}")
            };
            // `shared_quota` is unset in the shipped config; its defaults are in the docs.
            let default =
                if prefix.ends_with("[]") || prefix.contains('<') || prefix == "shared_quota" {
                    "—".to_string()
                } else if prefix.is_empty() {
                    default_of(&defaults, &[field])
                } else {
                    default_of(&defaults, &[prefix, field])
                };
            out.push_str(&format!("| `{key}` | {default} | {doc} |\n"));
        }
    }
    out
}

#[test]
fn readme_config_reference_matches_the_doc_comments() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let start = readme
        .find(START)
        .expect("README has the config reference start marker")
        + START.len();
    let end = readme
        .find(END)
        .expect("README has the config reference end marker");
    let expected = format!("\n{}", reference());
    if readme[start..end] != expected {
        if std::env::var_os("UPDATE_README").is_some() {
            let updated = format!("{}{}{}", &readme[..start], expected, &readme[end..]);
            std::fs::write("README.md", updated).unwrap();
        } else {
            panic!("README's config reference is out of date; run `UPDATE_README=1 cargo test --test docs`");
        }
    }
}

#[test]
fn every_config_field_is_documented() {
    let source = std::fs::read_to_string("src/config/file.rs").unwrap();
    let structs = documented_fields(&source);
    assert!(
        structs["FileConfig"].len() >= 18,
        "{:?}",
        structs["FileConfig"]
    );
}
