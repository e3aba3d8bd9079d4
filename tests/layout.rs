//! The crate's layout: no module imports one that imports it back, directly or through others,
//! neither among the crate's top-level modules nor among the modules of any folder
//! (`src/proxy/` first among them). A cycle
//! means two files that can only be read together.
//!
//! Imports are read from the source (`use` trees, and `crate::`/`super::` paths in code); test
//! modules (`#[cfg(test)] mod … {`) and comments are left out. A child's `impl` of its parent's
//! type (`use super::SidecarProxy`) is not an edge: the parent declares its children.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every source file's module path (`crate::proxy::intake`) and its text.
fn modules(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                parts.clear();
            }
            let name = std::iter::once("crate".to_string())
                .chain(parts)
                .collect::<Vec<_>>()
                .join("::");
            out.insert(name, std::fs::read_to_string(&path).unwrap());
        }
    }
    out
}

/// The text without comments and without its test modules.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            // The test module follows; the rest of the file is tests in this codebase's style
            // only when it is a `mod` (a `#[cfg(test)]` fn elsewhere is kept).
            let rest = &text[text.find(line).unwrap()..];
            let next = rest.lines().nth(1).unwrap_or("").trim_start();
            if next.starts_with("mod ") && next.ends_with('{') {
                break;
            }
            continue;
        }
        let line = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `a::{b, c::{d}}` as `a::b`, `a::c::d`.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let close = tree.rfind('}').unwrap_or(tree.len());
    let (prefix, inner) = (&tree[..open], &tree[open + 1..close]);
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(&format!("{prefix}{p}")))
        .collect()
}

/// The paths `text` (module `module`) refers to, absolute (`crate::…`).
fn paths(module: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        rest = &rest[at + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = rest.find(';').unwrap_or(rest.len());
        found.extend(expand(&rest[..end]));
    }
    for start in ["crate::", "super::"] {
        let mut rest = text;
        while let Some(at) = rest.find(start) {
            let tail = &rest[at..];
            let len = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            found.push(tail[..len].trim_end_matches(':').to_string());
            rest = &rest[at + start.len()..];
        }
    }
    let parent: Vec<&str> = module.split("::").collect();
    found
        .into_iter()
        .filter_map(|p| {
            let mut parts: Vec<&str> = p.split("::").collect();
            let mut base: Vec<&str> = match *parts.first()? {
                "crate" => vec!["crate"],
                "super" => parent[..parent.len().saturating_sub(1)].to_vec(),
                "self" => parent.clone(),
                _ => return None,
            };
            parts.remove(0);
            base.extend(parts);
            Some(base.join("::"))
        })
        .collect()
}

/// Module → the modules it imports, each path resolved to the deepest module it names, and
/// mapped through `level` (the module itself, or its top-level ancestor).
fn graph(
    modules: &BTreeMap<String, String>,
    level: impl Fn(&str) -> String,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in modules {
        for path in paths(module, &code(text)) {
            let parts: Vec<&str> = path.split("::").collect();
            let target = (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("::"))
                .find(|m| modules.contains_key(m));
            let Some(target) = target else { continue };
            // A parent, or an ancestor: what a child uses of its parent's own items.
            if module.starts_with(&format!("{target}::")) || &target == module {
                continue;
            }
            let (from, to) = (level(module), level(&target));
            if from != to {
                edges.entry(from).or_default().insert(to);
            }
        }
    }
    edges
}

/// A cycle in `edges`, as the modules on it, if there is one.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

fn src() -> BTreeMap<String, String> {
    modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

#[test]
fn the_crates_top_level_modules_import_no_cycle() {
    let top = |m: &str| m.split("::").take(2).collect::<Vec<_>>().join("::");
    let edges = graph(&src(), top);
    assert_eq!(
        cycle(&edges),
        None,
        "an import cycle between top-level modules"
    );
}

#[test]
fn the_modules_of_each_folder_import_no_cycle() {
    let modules = src();
    let folders: BTreeSet<String> = modules
        .keys()
        .filter_map(|m| m.rsplit_once("::").map(|(parent, _)| parent.to_string()))
        .collect();
    for folder in folders {
        let inside: BTreeMap<String, String> = modules
            .iter()
            .filter(|(m, _)| m.starts_with(&format!("{folder}::")) || **m == folder)
            .map(|(m, t)| (m.clone(), t.clone()))
            .collect();
        let edges = graph(&inside, str::to_string);
        assert_eq!(cycle(&edges), None, "an import cycle in {folder}");
    }
}

#[test]
fn the_reader_finds_a_cycle_where_there_is_one() {
    let modules: BTreeMap<String, String> = [
        (
            "crate::a",
            "use super::b::{X, Y};\nfn f() { crate::c::g(); }\n",
        ),
        ("crate::b", "// use crate::a;\nuse crate::{c::Z};\n"),
        (
            "crate::c",
            "#[cfg(test)]\nmod tests {\n    use crate::a;\n}\n",
        ),
    ]
    .into_iter()
    .map(|(m, t)| (m.to_string(), t.to_string()))
    .collect();
    let edges = graph(&modules, str::to_string);
    assert_eq!(cycle(&edges), None, "comments and tests are no imports");
    let mut modules = modules;
    modules.insert("crate::c".into(), "fn g() { super::a::f() }\n".into());
    let edges = graph(&modules, str::to_string);
    let found = cycle(&edges).expect("a → c → a");
    assert!(found.contains(&"crate::a".to_string()) && found.contains(&"crate::c".to_string()));
}
