//! Label values that come from clients, bounded: the first few seen are named, every later
//! one is `other`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Client or model ids named by the token counters.
pub const TOKEN_LABELS_MAX: usize = 64;

/// The label every id past the bound is counted under.
pub const OTHER: &str = "other";

/// The ids a counter names.
#[derive(Debug)]
pub struct BoundedLabels {
    named: Mutex<HashSet<Arc<str>>>,
    max: usize,
    other: Arc<str>,
}

impl BoundedLabels {
    pub fn new(max: usize) -> BoundedLabels {
        BoundedLabels {
            named: Mutex::new(HashSet::new()),
            max,
            other: Arc::from(OTHER),
        }
    }

    /// The label `id` is counted under: itself while there is room or once named, else
    /// `other`.
    pub fn label(&self, id: &str) -> Arc<str> {
        let mut named = self
            .named
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(known) = named.get(id) {
            return known.clone();
        }
        if named.len() >= self.max || id == OTHER {
            return self.other.clone();
        }
        let id: Arc<str> = Arc::from(id);
        named.insert(id.clone());
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_ids_are_named_and_later_ones_are_other() {
        let labels = BoundedLabels::new(2);
        assert_eq!(&*labels.label("a"), "a");
        assert_eq!(&*labels.label("b"), "b");
        assert_eq!(&*labels.label("c"), OTHER);
        assert_eq!(&*labels.label("a"), "a", "a named id stays named");
    }
}
