//! Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018; the
//! scheme behind HAProxy's `hash-balance-factor`).
//!
//! # Theory of operation
//!
//! A key is normally served by its owner on the ring (or Maglev table). With bounded loads
//! no node may carry more than `factor` times its fair share of the in-flight requests: the
//! request goes to the first node along the key's walk (the same order as the failover
//! walk) whose load is below its capacity
//!
//! ```text
//! capacity(i) = ceil(factor * (total + 1) * weight(i) / total_weight)
//! ```
//!
//! where `total` is the sum of the current loads and `+ 1` counts the request being placed
//! (HAProxy's `(served + 1) * balance_factor`). With equal weights this is
//! `ceil(factor * average)`, the paper's bound. Because `factor >= 1`, the capacities add up
//! to more than `total`, so some node is always below capacity; if rounding or a node that
//! lost every point to hash collisions ever defeats the walk, the plain owner is returned.
//!
//! Rule: the arithmetic is done in `f64` in exactly this order (`factor * (total + 1)`, then
//! `* weight`, then `/ total_weight`, then `ceil`), so the pure twin
//! (`dispa/balancer/_ring_py.py`, `bounded_capacity`) gets bit-identical capacities.
//!
//! WARNING: keep the formula, the operation order and the fallback in sync with
//! `_ring_py.py`; `tests/unit/balancer/test_ring_properties.py` compares the twins.

use std::fmt;

/// Smallest balance factor: below 1 the capacities could not hold the current load.
pub const MIN_FACTOR: f64 = 1.0;

/// Largest balance factor. Anything above ~3 is effectively unbounded already; the cap keeps
/// `factor * (total + 1) * weight` finite, so the capacity is always a finite integer.
pub const MAX_FACTOR: f64 = 1.0e6;

/// Why a bounded lookup was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum BoundedError {
    /// `loads` does not have one entry per node.
    LoadsLength {
        /// Number of nodes.
        expected: usize,
        /// Length of the `loads` given.
        got: usize,
    },
    /// `factor` is NaN or outside `[MIN_FACTOR, MAX_FACTOR]`.
    BadFactor(f64),
}

impl fmt::Display for BoundedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoundedError::LoadsLength { expected, got } => {
                write!(f, "loads has {got} entries; expected one per node ({expected})")
            }
            BoundedError::BadFactor(x) => write!(
                f,
                "balance factor {x} is out of range; it must be between {MIN_FACTOR} and {MAX_FACTOR}"
            ),
        }
    }
}

impl std::error::Error for BoundedError {}

/// Per-node capacities for one placement decision.
#[derive(Debug, Clone)]
pub struct Capacity<'a> {
    loads: &'a [u64],
    weights: &'a [u32],
    /// `factor * (total + 1)`.
    scaled: f64,
    total_weight: f64,
}

impl<'a> Capacity<'a> {
    /// Capacities for `loads` (in-flight requests per node) and node `weights`.
    ///
    /// Errors: [`BoundedError::LoadsLength`] if the lengths differ,
    /// [`BoundedError::BadFactor`] for a NaN factor or one outside `[MIN_FACTOR, MAX_FACTOR]`.
    pub fn new(loads: &'a [u64], weights: &'a [u32], factor: f64) -> Result<Self, BoundedError> {
        if loads.len() != weights.len() {
            return Err(BoundedError::LoadsLength {
                expected: weights.len(),
                got: loads.len(),
            });
        }
        if !(MIN_FACTOR..=MAX_FACTOR).contains(&factor) {
            return Err(BoundedError::BadFactor(factor));
        }
        let total: u128 = loads.iter().map(|&l| u128::from(l)).sum();
        let total_weight: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        Ok(Capacity {
            loads,
            weights,
            scaled: factor * ((total + 1) as f64),
            total_weight: total_weight as f64,
        })
    }

    /// `ceil(factor * (total + 1) * weight(node) / total_weight)`, as an `f64` holding an
    /// integer.
    #[inline]
    pub fn capacity(&self, node: usize) -> f64 {
        (self.scaled * f64::from(self.weights[node]) / self.total_weight).ceil()
    }

    /// Whether `node` may take one more request: `load < capacity`, compared exactly.
    #[inline]
    pub fn has_room(&self, node: usize) -> bool {
        let cap = self.capacity(node);
        // `cap` is a whole number; below 2^64 it converts to u64 exactly.
        cap >= 18_446_744_073_709_551_616.0 || self.loads[node] < cap as u64
    }

    /// The first node of `walk` with room, or `fallback` if none has.
    #[inline]
    pub fn pick<I: Iterator<Item = usize>>(&self, walk: I, fallback: usize) -> usize {
        for node in walk {
            if self.has_room(node) {
                return node;
            }
        }
        fallback
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_ceil_of_factor_times_fair_share() {
        let loads = [3u64, 0, 1, 0];
        let weights = [1u32, 1, 1, 1];
        let c = Capacity::new(&loads, &weights, 1.25).unwrap();
        // total 4, +1 for this request: 1.25 * 5 / 4 = 1.5625 -> 2.
        for i in 0..4 {
            assert_eq!(c.capacity(i), 2.0);
        }
        assert!(!c.has_room(0));
        assert!(c.has_room(1));
        assert!(c.has_room(2));
        assert_eq!(c.pick([0, 2, 1].into_iter(), 9), 2);
        assert_eq!(c.pick([0, 0].into_iter(), 9), 9);
    }

    #[test]
    fn capacity_follows_weights() {
        let loads = [0u64, 0, 0];
        let weights = [1u32, 2, 5];
        // total 0: factor 2 * 1 * w / 8.
        let c = Capacity::new(&loads, &weights, 2.0).unwrap();
        assert_eq!(c.capacity(0), 1.0);
        assert_eq!(c.capacity(1), 1.0);
        assert_eq!(c.capacity(2), 2.0);
    }

    #[test]
    fn some_node_always_has_room() {
        let weights = [1u32, 3, 2, 7, 1];
        let mut loads = [0u64; 5];
        // Fill greedily through the capacity check and confirm it never runs dry.
        for step in 0..10_000u64 {
            let c = Capacity::new(&loads, &weights, 1.0).unwrap();
            let start = (step * 2_654_435_761 % 5) as usize;
            let pick = c.pick((0..5).map(|i| (start + i) % 5), usize::MAX);
            assert_ne!(pick, usize::MAX, "no room at step {step} with {loads:?}");
            loads[pick] += 1;
        }
        // With factor 1, no node ends more than one request above its weighted share.
        let total: u64 = loads.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let share = total as f64 * f64::from(w) / 14.0;
            assert!(loads[i] as f64 <= share + 1.0, "{loads:?}");
        }
    }

    #[test]
    fn errors() {
        assert_eq!(
            Capacity::new(&[1, 2], &[1], 1.5).unwrap_err(),
            BoundedError::LoadsLength {
                expected: 1,
                got: 2
            }
        );
        for bad in [0.99, f64::NAN, f64::INFINITY, -1.0, 2e6] {
            assert!(matches!(
                Capacity::new(&[0], &[1], bad),
                Err(BoundedError::BadFactor(_))
            ));
        }
        assert!(Capacity::new(&[0], &[1], MIN_FACTOR).is_ok());
        assert!(Capacity::new(&[0], &[1], MAX_FACTOR).is_ok());
    }

    #[test]
    fn huge_loads_stay_exact() {
        let loads = [u64::MAX, 0];
        let c = Capacity::new(&loads, &[1, 1], 1.0).unwrap();
        assert!(!c.has_room(0) || c.capacity(0) >= 18_446_744_073_709_551_616.0);
        assert!(c.has_room(1));
    }
}
