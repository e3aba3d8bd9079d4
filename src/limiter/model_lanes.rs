//! Placeholder, filled in below.
/// A reference to one learned model of the limiter, checked against reuse of its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelRef {
    pub(super) slot: u32,
    pub(super) generation: u32,
}
