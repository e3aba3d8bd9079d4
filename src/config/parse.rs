//! Reading the configuration file leniently: every unknown key and wrongly typed value is
//! reported at once, a hostile nesting depth is refused before parsing, and serde's messages
//! are cleaned of what means nothing to an operator.

use serde_yaml::{Mapping, Value};

use super::{validate_with_env, ConfigError, FileConfig, EMBEDDED_DEFAULT};

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
        serde_yaml::from_str(text).map_err(|e| vec![ConfigError::parse("(file)", clean(&e))])?;
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
        .map_err(|e| vec![ConfigError::parse("(file)", clean(&e))])?;
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
                    errors.push(ConfigError::parse(format!("{name}.{field}"), e));
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
                            errors.push(ConfigError::parse(format!("{name}[{i}].{field}"), e));
                        }
                    }
                } else if let Err(e) = try_entry(Value::Sequence(vec![item.clone()])) {
                    errors.push(ConfigError::parse(format!("{name}[{i}]"), e));
                }
            }
        }
        _ => {}
    }
    if errors.is_empty() {
        errors.push(ConfigError::parse(name, whole));
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
pub(super) fn parse_checked(text: &str) -> Result<FileConfig, Vec<ConfigError>> {
    let (file, mut errors) = parse_lenient(text)?;
    if errors.is_empty() {
        return Ok(file);
    }
    if let Err(more) = validate_with_env(&file) {
        errors.extend(more);
    }
    Err(errors)
}
