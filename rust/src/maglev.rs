//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4).
//!
//! # Theory of operation
//!
//! A lookup table of `M` slots (`M` prime, 65537 by default) is filled once from the
//! `(name, weight)` nodes and never changes; a new endpoint set means a new [`Maglev`].
//! A key's node is `table[crc32(key) % M]`: one hash and one load, no search, and every
//! node owns almost exactly `M * weight / sum(weights)` slots (balance is by construction,
//! unlike a ketama ring whose balance is statistical).
//!
//! Filling (the paper's Pseudocode 1):
//!
//! 1. Each node's *preference list* is a permutation of the slots:
//!    `perm(j) = (offset + j * skip) % M` with `offset = h1(name) % M` and
//!    `skip = h2(name) % (M - 1) + 1`. `M` prime makes every `skip` generate all slots.
//! 2. Nodes take turns, in input order; on its turn a node claims the next slot of its
//!    preference list that is still empty. Weights: the weights are first divided by their
//!    gcd (so `2, 4` fills exactly like `1, 2`); a round is `max(w)` passes, and pass `t`
//!    gives a turn to every node whose weight is above `t`. A node of weight `w` thus takes
//!    `w` turns per round, and every node gets a slot in the first pass (`M >= N`). This
//!    stops when all `M` slots are taken.
//!
//! `h1` and `h2` are two 64-bit hashes of the node name: FNV-1a 64, then the MurmurHash3
//! `fmix64` finaliser, the second after xoring the golden-ratio constant
//! (`h1 = fmix64(fnv(name))`, `h2 = fmix64(fnv(name) ^ 0x9E3779B97F4A7C15)`). Keys are
//! hashed with CRC-32 (the same hash as the ring and as nginx), so the pure twin hashes a
//! key with `zlib.crc32` at C speed.
//!
//! Failover ([`Maglev::lookup_n`], [`Maglev::walk`]) walks the table forward from the key's
//! slot (`slot + 1`, `slot + 2`, ...): the next distinct owners are spread over the nodes in
//! proportion to their slots, so a down node's keys spread over the others. Only keys owned
//! by an unusable node move.
//!
//! Disruption: removing one of `N` nodes moves that node's `1/N` of the keys plus a small
//! extra (the paper measures a few percent of the table), because the other nodes' turns
//! shift; the tests bound it.
//!
//! WARNING: `dispa/balancer/_maglev_py.py` is the pure twin of this file. Any change to the
//! hashes, the weight turns, the fill order or the walk must be made in both places; the
//! Python suite compares them on random inputs.
//!
//! # Example
//!
//! ```
//! use _rust::maglev::Maglev;
//!
//! let m = Maglev::new(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)], 65537).unwrap();
//! assert_eq!(m.len(), 2);
//! let owner = m.lookup(b"/users/42");
//! assert_eq!(m.lookup_n(b"/users/42", 2)[0], owner);
//! ```

use std::fmt;

use crate::bounded::{BoundedError, Capacity};
use crate::ring::{crc32, first_distinct};

/// The paper's and Envoy's default table size: prime, and large enough for about 650 nodes
/// at the paper's recommended `M >= 100 * N`.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// Upper bound on the table size (64 MiB of `u32` slots). Envoy caps it near 5,000,011.
pub const MAX_TABLE_SIZE: u32 = 1 << 24;

/// Why a Maglev table could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaglevError {
    /// No nodes were given.
    Empty,
    /// The node at this index has weight 0.
    ZeroWeight(usize),
    /// The table size is not a prime (the permutations need it).
    NotPrime(u32),
    /// The table has fewer slots than there are nodes.
    TooSmall {
        /// Requested table size.
        table_size: u32,
        /// Number of nodes.
        nodes: usize,
    },
    /// The table size exceeds [`MAX_TABLE_SIZE`].
    TooLarge(u64),
}

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaglevError::Empty => write!(f, "a Maglev table needs at least one node"),
            MaglevError::ZeroWeight(i) => write!(f, "node {i} has weight 0; weights must be >= 1"),
            MaglevError::NotPrime(m) => write!(f, "table_size {m} is not a prime"),
            MaglevError::TooSmall { table_size, nodes } => write!(
                f,
                "table_size {table_size} is smaller than the number of nodes ({nodes})"
            ),
            MaglevError::TooLarge(m) => {
                write!(f, "table_size {m} exceeds the limit of {MAX_TABLE_SIZE}")
            }
        }
    }
}

impl std::error::Error for MaglevError {}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// MurmurHash3's 64-bit finaliser: a bijective avalanche mix.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// `(offset, skip)` of a node's preference list in a table of `m` slots.
fn offset_skip(name: &[u8], m: u64) -> (u64, u64) {
    let h = fnv1a64(name);
    (fmix64(h) % m, fmix64(h ^ GOLDEN) % (m - 1) + 1)
}

/// Deterministic primality test by trial division (table sizes are at most 2^24).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// An immutable Maglev lookup table over `len()` nodes.
#[derive(Debug, Clone)]
pub struct Maglev {
    /// `table[slot]` is the node index owning `slot`.
    table: Vec<u32>,
    /// Node weights, in input order (for bounded loads).
    weights: Vec<u32>,
}

impl Maglev {
    /// Build the table from `(name, weight)` nodes with `table_size` slots
    /// ([`DEFAULT_TABLE_SIZE`] is the usual choice).
    ///
    /// Errors: [`MaglevError::Empty`], [`MaglevError::ZeroWeight`],
    /// [`MaglevError::NotPrime`], [`MaglevError::TooSmall`] (fewer slots than nodes),
    /// [`MaglevError::TooLarge`] (past [`MAX_TABLE_SIZE`]).
    pub fn new<S: AsRef<[u8]>>(nodes: &[(S, u32)], table_size: u32) -> Result<Maglev, MaglevError> {
        if nodes.is_empty() {
            return Err(MaglevError::Empty);
        }
        if let Some(i) = nodes.iter().position(|(_, w)| *w == 0) {
            return Err(MaglevError::ZeroWeight(i));
        }
        if table_size > MAX_TABLE_SIZE {
            return Err(MaglevError::TooLarge(u64::from(table_size)));
        }
        if !is_prime(table_size) {
            return Err(MaglevError::NotPrime(table_size));
        }
        if (table_size as usize) < nodes.len() {
            return Err(MaglevError::TooSmall {
                table_size,
                nodes: nodes.len(),
            });
        }
        let m = u64::from(table_size);
        let g = nodes.iter().fold(0, |g, (_, w)| gcd(g, *w));
        let turns: Vec<u32> = nodes.iter().map(|(_, w)| *w / g).collect();
        let prefs: Vec<(u64, u64)> = nodes
            .iter()
            .map(|(name, _)| offset_skip(name.as_ref(), m))
            .collect();
        // `pos[i]` is node i's current place in its preference list, `offset + next * skip`
        // (mod m), advanced by one `skip` per step. While the table is not full every list
        // still holds an empty slot, so the inner search always ends.
        let mut pos: Vec<u64> = prefs.iter().map(|&(offset, _)| offset).collect();
        let mut table = vec![u32::MAX; table_size as usize];
        let mut filled = 0u64;
        let mut active: Vec<usize> = Vec::with_capacity(nodes.len());
        'fill: loop {
            // One round: pass t gives a turn to every node with more than t turns, in input
            // order, so every node claims a slot in the first pass (m >= nodes).
            active.clear();
            active.extend(0..nodes.len());
            let mut pass = 0u32;
            while !active.is_empty() {
                for &i in &active {
                    let skip = prefs[i].1;
                    let mut p = pos[i];
                    while table[p as usize] != u32::MAX {
                        p += skip;
                        if p >= m {
                            p -= m;
                        }
                    }
                    table[p as usize] = i as u32;
                    filled += 1;
                    p += skip;
                    if p >= m {
                        p -= m;
                    }
                    pos[i] = p;
                    if filled == m {
                        break 'fill;
                    }
                }
                pass += 1;
                active.retain(|&i| turns[i] > pass);
            }
        }
        Ok(Maglev {
            table,
            weights: nodes.iter().map(|(_, w)| *w).collect(),
        })
    }

    /// Number of nodes the table was built from.
    #[inline]
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Always false: a table has at least one node.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Number of slots (the prime `table_size`).
    #[inline]
    pub fn table_size(&self) -> usize {
        self.table.len()
    }

    /// Number of slots each node owns, in input order.
    pub fn slot_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.len()];
        for &n in &self.table {
            counts[n as usize] += 1;
        }
        counts
    }

    #[inline]
    fn slot(&self, key: &[u8]) -> usize {
        (crc32(key) as usize) % self.table.len()
    }

    /// Index of the node owning `key`.
    #[inline]
    pub fn lookup(&self, key: &[u8]) -> usize {
        self.table[self.slot(key)] as usize
    }

    /// Up to `n` distinct node indexes in table-walk order from `key`'s slot: the failover
    /// order. The result has `min(n, len())` entries (every node owns at least one slot).
    pub fn lookup_n(&self, key: &[u8], n: usize) -> Vec<usize> {
        first_distinct(self.walk(key), n, self.len())
    }

    /// Bounded-load lookup (see [`crate::bounded`]) along the table walk from `key`'s slot.
    ///
    /// Errors: [`BoundedError::LoadsLength`] unless `loads.len() == len()`,
    /// [`BoundedError::BadFactor`] for a factor outside `[1, 1e6]` or NaN.
    pub fn lookup_bounded(
        &self,
        key: &[u8],
        loads: &[u64],
        factor: f64,
    ) -> Result<usize, BoundedError> {
        let cap = Capacity::new(loads, &self.weights, factor)?;
        let start = self.slot(key);
        Ok(cap.pick(self.walk_from(start), self.table[start] as usize))
    }

    /// Owners of every slot once, from `key`'s slot forward, wrapping (nodes repeat).
    pub fn walk(&self, key: &[u8]) -> impl Iterator<Item = usize> + '_ {
        self.walk_from(self.slot(key))
    }

    fn walk_from(&self, start: usize) -> impl Iterator<Item = usize> + '_ {
        self.table[start..]
            .iter()
            .chain(self.table[..start].iter())
            .map(|&n| n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize, seed: usize) -> Vec<(String, u32)> {
        (0..n)
            .map(|i| (format!("10.{seed}.{}.{}:8080", i / 250, i % 250 + 1), 1))
            .collect()
    }

    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("/objects/{i}?v=1").into_bytes())
            .collect()
    }

    #[test]
    fn hashes_match_reference_values() {
        // FNV-1a 64 reference vectors (Fowler/Noll/Vo test suite).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fmix64(0), 0);
        // Pinned values, shared with the pure twin's tests.
        assert_eq!(offset_skip(b"10.0.0.1:80", 65537), (56_402, 46_226));
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, vec![2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537));
        assert!(is_prime(5_000_011));
        assert!(!is_prime(65535));
        assert!(!is_prime(1 << 24));
    }

    #[test]
    fn errors() {
        let empty: [(&str, u32); 0] = [];
        assert_eq!(Maglev::new(&empty, 7).unwrap_err(), MaglevError::Empty);
        assert_eq!(
            Maglev::new(&[("a", 1), ("b", 0)], 7).unwrap_err(),
            MaglevError::ZeroWeight(1)
        );
        assert_eq!(
            Maglev::new(&[("a", 1)], 8).unwrap_err(),
            MaglevError::NotPrime(8)
        );
        assert_eq!(
            Maglev::new(&[("a", 1)], 1).unwrap_err(),
            MaglevError::NotPrime(1)
        );
        assert_eq!(
            Maglev::new(&[("a", 1), ("b", 1), ("c", 1)], 2).unwrap_err(),
            MaglevError::TooSmall {
                table_size: 2,
                nodes: 3
            }
        );
        assert!(matches!(
            Maglev::new(&[("a", 1)], MAX_TABLE_SIZE + 1),
            Err(MaglevError::TooLarge(_))
        ));
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_exact() {
        let m = Maglev::new(&names(10, 0), 65537).unwrap();
        let counts = m.slot_counts();
        assert_eq!(counts.iter().sum::<usize>(), 65537);
        // Equal weights: the round-robin fill gives every node 6553 or 6554 slots.
        assert!(counts.iter().all(|&c| c == 6553 || c == 6554), "{counts:?}");
    }

    #[test]
    fn weights_are_turns() {
        let nodes = [("a:1", 1u32), ("b:1", 2), ("c:1", 3), ("d:1", 4)];
        let m = Maglev::new(&nodes, 65537).unwrap();
        for (i, &c) in m.slot_counts().iter().enumerate() {
            let want = 65537.0 * f64::from(nodes[i].1) / 10.0;
            assert!(
                (c as f64 - want).abs() <= f64::from(nodes[i].1),
                "node {i}: {c} vs {want}"
            );
        }
        // The gcd is divided out: 2, 4, 6, 8 fills exactly like 1, 2, 3, 4.
        let doubled = [("a:1", 2u32), ("b:1", 4), ("c:1", 6), ("d:1", 8)];
        let m2 = Maglev::new(&doubled, 65537).unwrap();
        assert_eq!(m.table, m2.table);
    }

    #[test]
    fn lookups_are_balanced() {
        let ks = keys(100_000);
        let m = Maglev::new(&names(10, 3), 65537).unwrap();
        let mut counts = [0f64; 10];
        for k in &ks {
            counts[m.lookup(k)] += 1.0;
        }
        let mean = ks.len() as f64 / 10.0;
        let cv = (counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / 10.0).sqrt() / mean;
        // The table is balanced to a slot; what is left is the sampling noise of 100k keys.
        assert!(cv < 0.02, "cv {cv} {counts:?}");
    }

    #[test]
    fn removing_one_node_moves_few_extra_keys() {
        let all = names(20, 1);
        let full = Maglev::new(&all, 65537).unwrap();
        let less = Maglev::new(&all[..19], 65537).unwrap();
        let moved = full
            .table
            .iter()
            .zip(&less.table)
            .filter(|(a, b)| **a != 19 && a != b)
            .count();
        let lost = full.table.iter().filter(|&&a| a == 19).count();
        // The removed node's slots must move; the others should mostly stay.
        assert!(lost > 3000);
        assert!((moved as f64) < 0.05 * 65537.0, "extra moved slots {moved}");
    }

    #[test]
    fn walk_and_lookup_n() {
        let m = Maglev::new(&names(5, 0), 65537).unwrap();
        for k in keys(500) {
            let all = m.lookup_n(&k, 10);
            assert_eq!(all.len(), 5);
            assert_eq!(all[0], m.lookup(&k));
            let mut sorted = all.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
            assert_eq!(m.lookup_n(&k, 2), all[..2].to_vec());
        }
        assert_eq!(m.walk(b"x").count(), 65537);
    }

    #[test]
    fn every_node_gets_a_slot_even_when_one_weight_dwarfs_the_table() {
        let m = Maglev::new(&[("big", 1000), ("a", 1), ("b", 1)], 5).unwrap();
        let counts = m.slot_counts();
        assert_eq!(counts, vec![3, 1, 1]);
        assert_eq!(m.lookup_n(b"k", 3).len(), 3);
    }

    #[test]
    fn small_tables_work() {
        let m = Maglev::new(&[("a", 1), ("b", 1), ("c", 1)], 3).unwrap();
        let mut counts = m.slot_counts();
        counts.sort_unstable();
        assert_eq!(counts, vec![1, 1, 1]);
        let one = Maglev::new(&[("only", 5)], 2).unwrap();
        assert_eq!(one.lookup(b"k"), 0);
    }

    #[test]
    fn bounded_spills_along_the_walk() {
        let m = Maglev::new(&names(4, 0), 251).unwrap();
        let k = b"hot key";
        let owner = m.lookup(k);
        let mut loads = vec![0u64; 4];
        assert_eq!(m.lookup_bounded(k, &loads, 1.25).unwrap(), owner);
        loads[owner] = 10;
        let got = m.lookup_bounded(k, &loads, 1.25).unwrap();
        assert_ne!(got, owner);
        assert_eq!(got, m.lookup_n(k, 4)[1]);
        assert!(m.lookup_bounded(k, &loads[..3], 1.25).is_err());
    }
}
