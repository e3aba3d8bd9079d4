//! Validation of the key pool, the model limits and the client keys: bad input is named by
//! its key, secrets never show, and the limiter gets what was configured.

use super::*;
use crate::limiter::Priority;

fn env(name: &str) -> Option<String> {
    match name {
        "KEY_A" => Some("nvapi-aaaa".to_string()),
        "KEY_B" => Some("nvapi-bbbb".to_string()),
        "ALICE" => Some("client-alice".to_string()),
        "BOB" => Some("client-bob".to_string()),
        "EMPTY" => Some("  ".to_string()),
        _ => None,
    }
}

fn load(text: &str) -> Result<Settings, Vec<String>> {
    let file = parse(text).map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    validate(&file, &env).map_err(|e| e.iter().map(ToString::to_string).collect())
}

fn errors(text: &str) -> Vec<String> {
    load(text).err().unwrap_or_default()
}

#[test]
fn a_key_pool_reaches_the_limiter_with_its_names_and_rates() {
    let s = load(
        "rate_rpm: 40\nupstream:\n  keys:\n    - {name: a, key_env: KEY_A}\n    - {name: b, key_env: KEY_B, rate_rpm: 30}\n",
    )
    .unwrap();
    let names: Vec<&str> = s.upstream.keys.iter().map(|k| &*k.name).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        s.upstream.keys[1].authorization.as_ref().unwrap(),
        "Bearer nvapi-bbbb"
    );
    assert!(s.upstream.keys[0]
        .authorization
        .as_ref()
        .unwrap()
        .is_sensitive());
    let bucket = s.default_route.bucket.as_ref().unwrap();
    assert_eq!(bucket.keys.len(), 2);
    assert_eq!(bucket.keys[1].rpm, Some(30.0));
    assert_eq!(bucket.base_rpm, 40.0);
    assert!(
        !format!("{s:?}").contains("nvapi-"),
        "no key in Debug output"
    );
    assert!(!effective_view(&s).to_string().contains("nvapi-"));
}

#[test]
fn without_a_pool_the_single_key_is_a_pool_of_one() {
    let s = load("upstream: {api_key_env: KEY_A}\n").unwrap();
    assert_eq!(s.upstream.keys.len(), 1);
    assert_eq!(&*s.upstream.keys[0].name, "default");
    assert_eq!(
        s.upstream.keys[0].authorization, s.upstream.authorization,
        "the first key is the one requests without a grant carry"
    );
}

#[test]
fn bad_pools_are_named_key_by_key() {
    let e = errors(
        "upstream:\n  api_key_env: KEY_A\n  keys:\n    - {name: a, key_env: KEY_A}\n    - {name: a, key_env: MISSING}\n    - {name: 'bad name', key_env: KEY_B, key_file: /x}\n    - {name: c}\n    - {name: d, key_env: KEY_B, rate_rpm: 0}\n    - {name: e, key_env: EMPTY}\n",
    );
    let has = |prefix: &str| e.iter().any(|x| x.starts_with(prefix));
    assert!(has("upstream.keys: replaces"), "{e:?}");
    assert!(has("upstream.keys[1].name: \"a\" is listed twice"), "{e:?}");
    assert!(has("upstream.keys[1].key_env: names MISSING"), "{e:?}");
    assert!(has("upstream.keys[2].name: must be"), "{e:?}");
    assert!(has("upstream.keys[2].key_file: use either"), "{e:?}");
    assert!(has("upstream.keys[3].key_env: is required"), "{e:?}");
    assert!(has("upstream.keys[4].rate_rpm: must be > 0"), "{e:?}");
    assert!(has("upstream.keys[5].key_env: names EMPTY"), "{e:?}");
    assert!(e.iter().all(|x| !x.contains("nvapi-")), "{e:?}");
    let e = errors(
        "upstream:\n  keys:\n    - {name: a, key_env: KEY_A}\n    - {name: b, key_env: KEY_A}\n",
    );
    assert!(
        e.iter()
            .any(|x| x == "upstream.keys[1].name: holds the same key as an earlier entry"),
        "{e:?}"
    );
}

#[test]
fn models_are_matched_exact_first_then_the_most_specific_glob() {
    let s = load(
        "models:\n  '*': {max_concurrency: 8}\n  'meta/*': {rate_rpm: 20}\n  meta/llama-3.1-8b-instruct: {max_concurrency: 2}\n",
    )
    .unwrap();
    let patterns: Vec<&str> = s.models.iter().map(|m| m.pattern.as_str()).collect();
    assert_eq!(patterns, ["meta/llama-3.1-8b-instruct", "meta/*", "*"]);
    let at = |id: &str| crate::limiter::model_index(&s.models, id).map(|i| patterns[i]);
    assert_eq!(
        at("meta/llama-3.1-8b-instruct"),
        Some("meta/llama-3.1-8b-instruct")
    );
    assert_eq!(at("meta/llama-3.3-70b"), Some("meta/*"));
    assert_eq!(at("mistral/x"), Some("*"));
    assert_eq!(s.default_route.bucket.as_ref().unwrap().models, s.models);
}

#[test]
fn bad_model_limits_are_named() {
    let e = errors("models:\n  a: {}\n  b: {max_concurrency: 0}\n  c: {rate_rpm: -1}\n");
    assert!(
        e.contains(&"models.a: sets none of rate_rpm, tpm and max_concurrency".to_string()),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|x| x.starts_with("models.b.max_concurrency: must be between 1")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|x| x.starts_with("models.c.rate_rpm: must be > 0")),
        "{e:?}"
    );
}

#[test]
fn clients_are_found_by_their_key_and_bad_ones_are_named() {
    let s = load(
        "clients:\n  - {id: alice, key_env: ALICE, weight: 2, max_priority: normal, rate_rpm: 10}\n  - {id: bob, key_env: BOB}\n",
    )
    .unwrap();
    assert!(s.clients.is_enabled());
    let alice = s.clients.by_key("client-alice").unwrap();
    assert_eq!(
        (&*alice.id, alice.weight, alice.max_priority),
        ("alice", 2, Priority::Normal)
    );
    assert_eq!(&*s.clients.by_key("client-bob").unwrap().id, "bob");
    assert!(s.clients.by_key("client-bo").is_none());
    assert!(s.clients.by_key("").is_none());
    let caps = &s.default_route.bucket.as_ref().unwrap().client_caps;
    assert_eq!(caps.len(), 1);
    assert_eq!((&*caps[0].id, caps[0].rate_rpm), ("alice", Some(10.0)));
    assert!(!format!("{s:?}").contains("client-alice"));
    assert!(!effective_view(&s).to_string().contains("client-alice"));

    let e = errors(
        "clients:\n  - {id: a, key_env: ALICE, weight: 0}\n  - {id: a, key_env: ALICE, max_priority: urgent}\n  - {id: c, key_file: /nonexistent/key}\n",
    );
    let has = |prefix: &str| e.iter().any(|x| x.starts_with(prefix));
    assert!(has("clients[0].weight: must be between 1 and 100"), "{e:?}");
    assert!(has("clients[1].id: \"a\" is listed twice"), "{e:?}");
    assert!(
        has("clients[1].id: has the same key as an earlier client"),
        "{e:?}"
    );
    assert!(
        has("clients[1].max_priority: must be high, normal or low"),
        "{e:?}"
    );
    assert!(
        has("clients[2].key_file: cannot read /nonexistent/key"),
        "{e:?}"
    );
    assert!(load("clients: []\n").unwrap().clients.list.is_empty());
}
