//! Ketama consistent-hash ring, placed exactly as nginx's `hash $key consistent`.
//!
//! # Theory of operation
//!
//! The ring is built once from `(name, weight)` nodes and never changes; a new endpoint
//! set means a new [`Ring`] (the worker swaps one reference). Results are indexes into
//! the node slice the ring was built from, so the caller keeps its own endpoint tuple and
//! nothing but plain data lives here (no pyo3 types: `cargo test` needs no Python).
//!
//! Point placement follows `ngx_http_upstream_init_chash()` in nginx's
//! `src/http/modules/ngx_http_upstream_hash_module.c` (compatible with
//! Cache::Memcached::Fast):
//!
//! 1. The node name is the `server` directive's text, e.g. `"127.0.0.1:8081"`. A trailing
//!    `:<digits>` is the port and the rest the host; `"unix:/path"` hashes the path with no
//!    port, and a name with no trailing `:<digits>` (`"backend"`, `"[::1]"`) has no port.
//! 2. `base = crc32_update(INIT, host ++ "\0" ++ port)` (not finalised).
//! 3. For each of `points_per_weight * weight` points (nginx: 160 per weight),
//!    `point = crc32_final(crc32_update(base, prev_le))` where `prev_le` is the previous
//!    point's hash as 4 little-endian bytes (0 for the first). In plain CRC-32 terms:
//!    `point_j = crc32(host ++ "\0" ++ port ++ le32(point_{j-1}))`.
//! 4. All points are sorted by hash; for equal hashes only the first is kept (nginx's
//!    `qsort` is not stable, so the survivor of a collision is unspecified there; here it
//!    is the lowest node index, which keeps the result deterministic).
//!
//! Lookup: `h = crc32(key)`; the owner is the first point with `hash >= h`, wrapping to the
//! first point (nginx `ngx_http_upstream_find_chash_point` + `% points->number`).
//! The failover walk ([`Ring::lookup_n`], [`Ring::walk`]) continues clockwise from there,
//! as nginx does with `hp->hash++` when a peer is down.
//!
//! nginx compatibility ("nginx_compat mode") is this placement with
//! [`DEFAULT_POINTS_PER_WEIGHT`]; any other `points_per_weight` keeps the algorithm but not
//! nginx's answers (1000-1600 points bring the load CV from ~7% to 3-4%; see
//! `docs/consistent-hashing.md`). The golden test `nginx_captured_json_traces` replays
//! traces recorded from nginx 1.22.1 (`tests/golden/nginx_hash/`).
//!
//! [`Ring::lookup_bounded`] adds bounded loads over the same walk ([`crate::bounded`]).
//!
//! WARNING: `dispa/balancer/_ring_py.py` is the pure twin of this file. Any change to
//! placement, de-duplication, or walk order must be made in both places; the Python test
//! suite compares them on random inputs.
//!
//! # Example
//!
//! ```
//! use _rust::ring::Ring;
//!
//! let ring = Ring::new(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 2)], 160).unwrap();
//! assert_eq!(ring.len(), 2);
//! let owner = ring.lookup(b"/users/42");
//! assert!(owner < 2);
//! // The failover walk starts with the owner and then visits every other node once.
//! let walk = ring.lookup_n(b"/users/42", 5);
//! assert_eq!(walk[0], owner);
//! assert_eq!(walk.len(), 2);
//! ```

use std::fmt;

use crate::bounded::{BoundedError, Capacity};

/// nginx's number of virtual nodes per unit of weight.
pub const DEFAULT_POINTS_PER_WEIGHT: u32 = 160;

/// Upper bound on the number of points in one ring (32 Mi points = 256 MiB), so a typo in
/// a weight cannot exhaust memory. nginx has no such bound; no real cluster comes near it.
pub const MAX_POINTS: u64 = 1 << 25;

/// Why a ring could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// No nodes were given.
    Empty,
    /// The node at this index has weight 0.
    ZeroWeight(usize),
    /// `points_per_weight` is 0.
    ZeroPoints,
    /// `points_per_weight * sum(weights)` exceeds [`MAX_POINTS`].
    TooManyPoints(u64),
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::Empty => write!(f, "a ring needs at least one node"),
            RingError::ZeroWeight(i) => write!(f, "node {i} has weight 0; weights must be >= 1"),
            RingError::ZeroPoints => write!(f, "points_per_weight must be >= 1"),
            RingError::TooManyPoints(n) => {
                write!(
                    f,
                    "ring would have {n} points, more than the limit of {MAX_POINTS}"
                )
            }
        }
    }
}

impl std::error::Error for RingError {}

// ---------------------------------------------------------------------------------------
// CRC-32 (IEEE 802.3, reflected, poly 0xEDB88320): nginx's ngx_crc32 and zlib.crc32.
// Slicing-by-8 tables (8 KiB, built at compile time) keep the crate free of dependencies
// while hashing ~8 bytes per step instead of one.

const fn make_crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = make_crc_tables();

/// Running CRC state (`ngx_crc32_init`); finish with [`crc32_final`].
const CRC_INIT: u32 = 0xFFFF_FFFF;

#[inline]
fn crc32_update(mut crc: u32, data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        crc = t[7][(lo & 0xFF) as usize]
            ^ t[6][((lo >> 8) & 0xFF) as usize]
            ^ t[5][((lo >> 16) & 0xFF) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][c[4] as usize]
            ^ t[2][c[5] as usize]
            ^ t[1][c[6] as usize]
            ^ t[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = t[0][((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

#[inline]
fn crc32_final(crc: u32) -> u32 {
    crc ^ 0xFFFF_FFFF
}

/// CRC-32 of `data`, equal to Python's `zlib.crc32(data)` and nginx's `ngx_crc32_long`.
#[inline]
pub fn crc32(data: &[u8]) -> u32 {
    crc32_final(crc32_update(CRC_INIT, data))
}

/// Split a `server` name into (host, port) exactly as `ngx_http_upstream_init_chash` does:
/// a case-insensitive `unix:` prefix means "host = the path, no port"; otherwise the name is
/// scanned backwards over ASCII digits, and only if that run of digits is preceded by `:`
/// is it the port. So `"10.0.0.1:80"` splits, while `"backend"`, `"[::1]"` (an IPv6
/// address without a port) and `"a:b"` have no port and hash whole. `"host:"` has an
/// empty port.
fn split_host_port(name: &[u8]) -> (&[u8], &[u8]) {
    if name.len() >= 5 && name[..5].eq_ignore_ascii_case(b"unix:") {
        return (&name[5..], b"");
    }
    let digits = name.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    let colon = name.len() - digits;
    if colon > 0 && name[colon - 1] == b':' {
        (&name[..colon - 1], &name[colon..])
    } else {
        (name, b"")
    }
}

/// An immutable ketama ring over `len()` nodes.
#[derive(Debug, Clone)]
pub struct Ring {
    /// Point hashes, sorted ascending, unique.
    hashes: Vec<u32>,
    /// `owners[i]` is the node index owning `hashes[i]`.
    owners: Vec<u32>,
    /// Node weights, in input order (for bounded loads).
    weights: Vec<u32>,
    /// Number of nodes the ring was built from.
    node_count: usize,
}

impl Ring {
    /// Build a ring from `(name, weight)` nodes with `points_per_weight` points per unit of
    /// weight (nginx uses [`DEFAULT_POINTS_PER_WEIGHT`]).
    ///
    /// Errors: [`RingError::Empty`] for no nodes, [`RingError::ZeroWeight`] for a weight of 0,
    /// [`RingError::ZeroPoints`] for `points_per_weight == 0`, [`RingError::TooManyPoints`]
    /// past [`MAX_POINTS`].
    pub fn new<S: AsRef<[u8]>>(
        nodes: &[(S, u32)],
        points_per_weight: u32,
    ) -> Result<Ring, RingError> {
        if nodes.is_empty() {
            return Err(RingError::Empty);
        }
        if points_per_weight == 0 {
            return Err(RingError::ZeroPoints);
        }
        if nodes.len() > u32::MAX as usize {
            return Err(RingError::TooManyPoints(nodes.len() as u64));
        }
        let mut total: u64 = 0;
        for (i, (_, w)) in nodes.iter().enumerate() {
            if *w == 0 {
                return Err(RingError::ZeroWeight(i));
            }
            total += u64::from(*w) * u64::from(points_per_weight);
        }
        if total > MAX_POINTS {
            return Err(RingError::TooManyPoints(total));
        }

        let mut points: Vec<(u32, u32)> = Vec::with_capacity(total as usize);
        for (idx, (name, weight)) in nodes.iter().enumerate() {
            let (host, port) = split_host_port(name.as_ref());
            let mut base = crc32_update(CRC_INIT, host);
            base = crc32_update(base, b"\0");
            base = crc32_update(base, port);
            let mut prev: u32 = 0;
            for _ in 0..u64::from(*weight) * u64::from(points_per_weight) {
                let hash = crc32_final(crc32_update(base, &prev.to_le_bytes()));
                points.push((hash, idx as u32));
                prev = hash;
            }
        }
        // Sort by hash, then node index, and keep the first of equal hashes.
        points.sort_unstable();
        points.dedup_by_key(|p| p.0);

        let (hashes, owners) = points.into_iter().unzip();
        Ok(Ring {
            hashes,
            owners,
            weights: nodes.iter().map(|(_, w)| *w).collect(),
            node_count: nodes.len(),
        })
    }

    /// Number of nodes the ring was built from (not the number of points).
    #[inline]
    pub fn len(&self) -> usize {
        self.node_count
    }

    /// Always false: a ring has at least one node.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.node_count == 0
    }

    /// Number of (unique) points on the ring.
    #[inline]
    pub fn point_count(&self) -> usize {
        self.hashes.len()
    }

    /// Position of the first point owning `key`.
    #[inline]
    fn start(&self, key: &[u8]) -> usize {
        let h = crc32(key);
        let i = self.hashes.partition_point(|&p| p < h);
        if i == self.hashes.len() {
            0
        } else {
            i
        }
    }

    /// Index of the node owning `key`.
    #[inline]
    pub fn lookup(&self, key: &[u8]) -> usize {
        self.owners[self.start(key)] as usize
    }

    /// Up to `n` distinct node indexes in ring-walk order starting at the owner of `key`:
    /// the failover order. The result has `min(n, len())` entries unless some node lost
    /// every point to hash collisions (then it is absent from every walk).
    pub fn lookup_n(&self, key: &[u8], n: usize) -> Vec<usize> {
        first_distinct(self.walk(key), n, self.node_count)
    }

    /// Bounded-load lookup (see [`crate::bounded`]): the first node along `key`'s walk whose
    /// in-flight load is below `ceil(factor * (sum(loads) + 1) * weight / sum(weights))`.
    /// With loads that are all zero, or a generous factor, this is [`Ring::lookup`].
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
        let start = self.start(key);
        Ok(cap.pick(self.walk_from(start), self.owners[start] as usize))
    }

    /// Node weights, in input order.
    pub fn weights(&self) -> &[u32] {
        &self.weights
    }

    /// Iterate over the owners of every point once, clockwise from the owner of `key`
    /// (nodes repeat; pingora's `node_iter`).
    pub fn walk(&self, key: &[u8]) -> Walk<'_> {
        self.walk_from(self.start(key))
    }

    fn walk_from(&self, pos: usize) -> Walk<'_> {
        Walk {
            ring: self,
            pos,
            left: self.hashes.len(),
        }
    }
}

/// The first `min(n, node_count)` distinct nodes of `walk`, in order (the failover order of
/// a ring walk or a Maglev table walk).
pub(crate) fn first_distinct<I: Iterator<Item = usize>>(
    walk: I,
    n: usize,
    node_count: usize,
) -> Vec<usize> {
    let want = n.min(node_count);
    let mut out = Vec::with_capacity(want);
    if want == 0 {
        return out;
    }
    if want <= 8 {
        for node in walk {
            if !out.contains(&node) {
                out.push(node);
                if out.len() == want {
                    break;
                }
            }
        }
    } else {
        let mut seen = vec![false; node_count];
        for node in walk {
            if !seen[node] {
                seen[node] = true;
                out.push(node);
                if out.len() == want {
                    break;
                }
            }
        }
    }
    out
}

/// Iterator returned by [`Ring::walk`].
#[derive(Debug, Clone)]
pub struct Walk<'a> {
    ring: &'a Ring,
    pos: usize,
    left: usize,
}

impl Iterator for Walk<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let node = self.ring.owners[self.pos] as usize;
        self.pos += 1;
        if self.pos == self.ring.hashes.len() {
            self.pos = 0;
        }
        Some(node)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<(String, u32)> {
        (0..n)
            .map(|i| (format!("10.0.{}.{}:8080", i / 250, i % 250 + 1), 1))
            .collect()
    }

    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("/objects/{i}?v=1").into_bytes())
            .collect()
    }

    #[test]
    fn crc32_matches_known_vectors() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
        // Every length around the 8-byte stride, against a bit-at-a-time reference.
        let data: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
        for len in 0..data.len() {
            let mut r = 0xFFFF_FFFFu32;
            for &b in &data[..len] {
                r ^= b as u32;
                for _ in 0..8 {
                    r = if r & 1 != 0 {
                        0xEDB8_8320 ^ (r >> 1)
                    } else {
                        r >> 1
                    };
                }
            }
            assert_eq!(crc32(&data[..len]), !r, "len {len}");
        }
        // Chaining an unfinalised state equals hashing the concatenation.
        let s = crc32_update(crc32_update(CRC_INIT, b"1234"), b"56789");
        assert_eq!(crc32_final(s), 0xCBF4_3926);
    }

    #[test]
    fn host_port_split_follows_nginx() {
        assert_eq!(
            split_host_port(b"127.0.0.1:8081"),
            (&b"127.0.0.1"[..], &b"8081"[..])
        );
        assert_eq!(split_host_port(b"[::1]:80"), (&b"[::1]"[..], &b"80"[..]));
        assert_eq!(split_host_port(b"backend"), (&b"backend"[..], &b""[..]));
        // Only a trailing `:<digits>` is a port (nginx scans back over digits, then wants `:`).
        assert_eq!(split_host_port(b"[::1]"), (&b"[::1]"[..], &b""[..]));
        assert_eq!(split_host_port(b"a:b"), (&b"a:b"[..], &b""[..]));
        assert_eq!(split_host_port(b"a:8b0"), (&b"a:8b0"[..], &b""[..]));
        assert_eq!(split_host_port(b"host:"), (&b"host"[..], &b""[..]));
        assert_eq!(split_host_port(b":80"), (&b""[..], &b"80"[..]));
        assert_eq!(split_host_port(b"8080"), (&b"8080"[..], &b""[..]));
        assert_eq!(split_host_port(b""), (&b""[..], &b""[..]));
        assert_eq!(split_host_port(b"unix:"), (&b""[..], &b""[..]));
        assert_eq!(
            split_host_port(b"UNIX:/tmp/a.sock"),
            (&b"/tmp/a.sock"[..], &b""[..])
        );
    }

    #[test]
    fn first_point_is_crc_of_host_nul_port_and_zero() {
        let ring = Ring::new(&[("127.0.0.1:8081", 1)], 1).unwrap();
        let expected = crc32(b"127.0.0.1\x008081\x00\x00\x00\x00");
        assert_eq!(ring.hashes, vec![expected]);
    }

    #[test]
    fn errors() {
        let empty: [(&str, u32); 0] = [];
        assert_eq!(Ring::new(&empty, 160).unwrap_err(), RingError::Empty);
        assert_eq!(
            Ring::new(&[("a:1", 1), ("b:1", 0)], 160).unwrap_err(),
            RingError::ZeroWeight(1)
        );
        assert_eq!(
            Ring::new(&[("a:1", 1)], 0).unwrap_err(),
            RingError::ZeroPoints
        );
        assert!(matches!(
            Ring::new(&[("a:1", u32::MAX)], 160),
            Err(RingError::TooManyPoints(_))
        ));
    }

    #[test]
    fn points_sorted_unique_and_counted() {
        let ring = Ring::new(&names(10), 160).unwrap();
        assert!(ring.hashes.windows(2).all(|w| w[0] < w[1]));
        assert!(ring.point_count() <= 1600 && ring.point_count() > 1590);
        assert_eq!(ring.len(), 10);
        assert!(!ring.is_empty());
    }

    #[test]
    fn deterministic_across_builds_and_input_order_of_points() {
        let a = Ring::new(&names(7), 160).unwrap();
        let b = Ring::new(&names(7), 160).unwrap();
        for k in keys(2000) {
            assert_eq!(a.lookup(&k), b.lookup(&k));
            assert_eq!(a.lookup_n(&k, 3), b.lookup_n(&k, 3));
        }
    }

    #[test]
    fn lookup_wraps_past_the_last_point() {
        let ring = Ring::new(&names(3), 160).unwrap();
        let last = *ring.hashes.last().unwrap();
        // Find a key hashing above the last point; it must map to the first point's owner.
        let key = (0u32..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| crc32(k) > last)
            .unwrap();
        assert_eq!(ring.lookup(&key), ring.owners[0] as usize);
    }

    #[test]
    fn lookup_n_is_a_distinct_walk_starting_at_the_owner() {
        let ring = Ring::new(&names(5), 160).unwrap();
        for k in keys(500) {
            let all = ring.lookup_n(&k, 100);
            assert_eq!(all.len(), 5);
            assert_eq!(all[0], ring.lookup(&k));
            let mut sorted = all.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
            assert_eq!(ring.lookup_n(&k, 2), all[..2].to_vec());
            assert!(ring.lookup_n(&k, 0).is_empty());
        }
        // The large-n path (seen bitmap) agrees with the small-n path.
        let big = Ring::new(&names(20), 160).unwrap();
        for k in keys(200) {
            let all = big.lookup_n(&k, 20);
            assert_eq!(all.len(), 20);
            assert_eq!(big.lookup_n(&k, 8), all[..8].to_vec());
        }
    }

    /// Coefficient of variation of the per-node load over `keys`.
    fn load_cv(ring: &Ring, ks: &[Vec<u8>]) -> f64 {
        let mut counts = vec![0f64; ring.len()];
        for k in ks {
            counts[ring.lookup(k)] += 1.0;
        }
        let mean = ks.len() as f64 / ring.len() as f64;
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / ring.len() as f64;
        var.sqrt() / mean
    }

    fn node_set(seed: usize, n: usize) -> Vec<(String, u32)> {
        (0..n)
            .map(|i| (format!("10.{seed}.0.{}:8080", i + 1), 1))
            .collect()
    }

    /// Ketama's balance is statistical: a node's share of the circle has a relative spread
    /// of about 1/sqrt(points), so 160 points (nginx) give a CV near 8% and 1000 give ~3%.
    #[test]
    fn load_spread_matches_ketama_theory() {
        let ks = keys(100_000);
        let cvs: Vec<f64> = (0..10)
            .map(|s| load_cv(&Ring::new(&node_set(s, 10), 160).unwrap(), &ks))
            .collect();
        let mean = cvs.iter().sum::<f64>() / cvs.len() as f64;
        assert!(mean < 0.09, "mean CV with 160 points {mean} ({cvs:?})");
        assert!(cvs.iter().all(|&c| c < 0.12), "{cvs:?}");
        for s in 0..5 {
            let cv = load_cv(&Ring::new(&node_set(s, 10), 1000).unwrap(), &ks);
            assert!(cv < 0.05, "CV with 1000 points {cv}");
        }
    }

    #[test]
    fn weights_are_honoured() {
        let nodes = vec![
            ("10.0.0.1:80", 1u32),
            ("10.0.0.2:80", 2),
            ("10.0.0.3:80", 3),
            ("10.0.0.4:80", 4),
        ];
        let ks = keys(100_000);
        for ppw in [160u32, 1000] {
            let ring = Ring::new(&nodes, ppw).unwrap();
            let mut counts = [0f64; 4];
            for k in &ks {
                counts[ring.lookup(k)] += 1.0;
            }
            for (i, (_, w)) in nodes.iter().enumerate() {
                let share = counts[i] / ks.len() as f64;
                let want = *w as f64 / 10.0;
                // 5% at 1000 points; a 3-sigma ketama bound (3/sqrt(points)) at 160.
                let tol = if ppw == 1000 {
                    0.05
                } else {
                    3.0 / ((ppw * w) as f64).sqrt()
                };
                assert!(
                    (share - want).abs() / want < tol,
                    "ppw {ppw} node {i}: share {share}, want {want}"
                );
            }
        }
    }

    #[test]
    fn removing_one_node_moves_only_its_keys() {
        let all = names(10);
        let full = Ring::new(&all, 160).unwrap();
        let less = Ring::new(&all[..9], 160).unwrap();
        let ks = keys(20_000);
        let mut moved = 0;
        for k in &ks {
            let a = full.lookup(k);
            let b = less.lookup(k);
            if a != b {
                moved += 1;
                // Only keys owned by the removed node move, and they go to its successor.
                assert_eq!(a, 9);
                assert_eq!(b, full.lookup_n(k, 2)[1]);
            }
        }
        let expected = ks.len() as f64 / 10.0;
        assert!(
            ((moved as f64) - expected).abs() / expected < 0.10,
            "moved {moved}"
        );
    }

    #[test]
    fn bounded_lookup_is_the_plain_lookup_until_the_owner_is_full() {
        let ring = Ring::new(&names(5), 160).unwrap();
        let idle = vec![0u64; 5];
        for k in keys(500) {
            assert_eq!(
                ring.lookup_bounded(&k, &idle, 1.25).unwrap(),
                ring.lookup(&k)
            );
            // Owner over capacity (total 20 + 1, 1.25 * 21 / 5 -> 6): the next node of the walk.
            let walk = ring.lookup_n(&k, 5);
            let mut loads = vec![0u64; 5];
            loads[walk[0]] = 20;
            assert_eq!(ring.lookup_bounded(&k, &loads, 1.25).unwrap(), walk[1]);
            // A huge factor never spills.
            assert_eq!(ring.lookup_bounded(&k, &loads, 1000.0).unwrap(), walk[0]);
        }
        assert!(ring.lookup_bounded(b"k", &[0; 4], 1.25).is_err());
        assert!(ring.lookup_bounded(b"k", &idle, 0.5).is_err());
    }

    #[test]
    fn bounded_lookup_keeps_every_load_under_the_bound() {
        let ring = Ring::new(&names(8), 160).unwrap();
        let mut loads = vec![0u64; 8];
        // A skewed stream: one key in three is the same hot key.
        for (i, k) in keys(8000).iter().enumerate() {
            let key: &[u8] = if i % 3 == 0 { b"hot" } else { k };
            let node = ring.lookup_bounded(key, &loads, 1.25).unwrap();
            loads[node] += 1;
            let total: u64 = loads.iter().sum();
            let bound = (1.25 * total as f64 / 8.0).ceil() as u64 + 1;
            assert!(loads[node] <= bound, "{loads:?}");
        }
    }

    /// Replays `tests/golden/nginx_hash/*.json`, captured from a real nginx by
    /// `tests/golden/nginx_hash/capture.py` (the Python suite replays them too).
    #[test]
    fn nginx_captured_json_traces() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/nginx_hash");
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let (nodes, down, rows) = parse_trace(&text);
            let ring = Ring::new(&nodes, DEFAULT_POINTS_PER_WEIGHT).unwrap();
            for (key, up, when_down) in &rows {
                assert_eq!(ring.lookup(key.as_bytes()), *up, "{path:?} key {key:?}");
                if let (Some(d), Some(w)) = (down, when_down) {
                    let failover = ring.walk(key.as_bytes()).find(|&i| i != d).unwrap();
                    assert_eq!(failover, *w, "{path:?} key {key:?} with node {d} down");
                }
            }
            assert!(rows.len() >= 1000, "{path:?}");
            files += 1;
        }
        assert!(files >= 3, "no traces in {dir:?}");
    }

    type Trace = (
        Vec<(String, u32)>,
        Option<usize>,
        Vec<(String, usize, Option<usize>)>,
    );

    /// A parser for exactly the layout capture.py writes (one value per line, ASCII keys
    /// without quotes or backslashes), so the crate needs no JSON dependency.
    fn parse_trace(text: &str) -> Trace {
        let mut nodes = Vec::new();
        let mut down = None;
        let mut rows = Vec::new();
        let mut in_rows = false;
        for line in text.lines() {
            let line = line.trim().trim_end_matches(',');
            if let Some(v) = line.strip_prefix("\"nodes\": ") {
                for pair in v
                    .trim_start_matches("[[")
                    .trim_end_matches("]]")
                    .split("], [")
                {
                    let (name, w) = pair.rsplit_once(", ").unwrap();
                    nodes.push((name.trim_matches('"').to_string(), w.parse().unwrap()));
                }
            } else if let Some(v) = line.strip_prefix("\"down\": ") {
                down = v.parse().ok();
            } else if line == "\"rows\": [" {
                in_rows = true;
            } else if in_rows && line.starts_with("[\"") {
                let inner = &line[1..line.len() - 1];
                let close = inner[1..].find('"').unwrap() + 1;
                let key = inner[1..close].to_string();
                let nums: Vec<usize> = inner[close + 1..]
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().parse().unwrap())
                    .collect();
                rows.push((key, nums[0], nums.get(1).copied()));
            }
        }
        (nodes, down, rows)
    }

    /// Owners observed from a real nginx 1.22.1 (`hash $arg_k consistent` over the four
    /// servers below, then again with the weight-2 server marked `down`). The first 80 lines
    /// of the trace in `tests/unit/balancer/test_ring.py::NGINX_TRACE`, which holds all 300.
    #[test]
    fn nginx_golden_trace() {
        let nodes = [
            ("127.0.0.1:18081", 1u32),
            ("127.0.0.1:18082", 1),
            ("127.0.0.1:18083", 2),
            ("127.0.0.1:18084", 1),
        ];
        let ring = Ring::new(&nodes, DEFAULT_POINTS_PER_WEIGHT).unwrap();
        let mut checked = 0;
        for line in NGINX_TRACE.lines().filter(|l| !l.trim().is_empty()) {
            let mut f = line.rsplitn(3, ' ');
            let down: usize = f.next().unwrap().parse().unwrap();
            let up: usize = f.next().unwrap().parse().unwrap();
            let key = f.next().unwrap().trim_start_matches('|');
            assert_eq!(ring.lookup(key.as_bytes()), up, "key {key:?}");
            // With node 2 down nginx walks on clockwise: the first other node of the walk.
            let failover = ring
                .lookup_n(key.as_bytes(), 4)
                .into_iter()
                .find(|&i| i != 2)
                .unwrap();
            assert_eq!(failover, down, "key {key:?} with node 2 down");
            checked += 1;
        }
        assert_eq!(checked, 80);
    }

    /// `key owner owner_with_node_2_down` per line; keys are prefixed with `|` so the empty
    /// key (nginx: no `k` argument) survives.
    const NGINX_TRACE: &str = "
| 2 0
|a 2 1
|hello 2 0
|user-42 0 0
|/objects/0 1 1
|/objects/1 1 1
|/objects/2 1 1
|/objects/3 1 1
|/objects/4 2 1
|/objects/5 2 1
|/objects/6 2 3
|/objects/7 2 1
|/objects/8 2 3
|/objects/9 2 0
|/objects/10 2 1
|/objects/11 0 0
|/objects/12 2 0
|/objects/13 0 0
|/objects/14 2 3
|/objects/15 3 3
|/objects/16 2 1
|/objects/17 0 0
|/objects/18 2 0
|/objects/19 2 0
|/objects/20 1 1
|/objects/21 1 1
|/objects/22 3 3
|/objects/23 0 0
|/objects/24 2 1
|/objects/25 0 0
|/objects/26 1 1
|/objects/27 3 3
|/objects/28 2 3
|/objects/29 2 0
|/objects/30 2 3
|/objects/31 1 1
|/objects/32 3 3
|/objects/33 0 0
|/objects/34 2 3
|/objects/35 1 1
|/objects/36 2 0
|/objects/37 1 1
|/objects/38 3 3
|/objects/39 0 0
|/objects/40 2 3
|/objects/41 2 0
|/objects/42 3 3
|/objects/43 3 3
|/objects/44 2 0
|/objects/45 0 0
|/objects/46 2 1
|/objects/47 0 0
|/objects/48 2 0
|/objects/49 2 3
|/objects/50 3 3
|/objects/51 0 0
|/objects/52 2 3
|/objects/53 0 0
|/objects/54 3 3
|/objects/55 2 3
|/objects/56 0 0
|/objects/57 3 3
|/objects/58 2 3
|/objects/59 3 3
|/objects/60 2 3
|/objects/61 0 0
|/objects/62 0 0
|/objects/63 0 0
|/objects/64 2 3
|/objects/65 2 0
|/objects/66 2 1
|/objects/67 3 3
|/objects/68 3 3
|/objects/69 3 3
|/objects/70 0 0
|/objects/71 3 3
|/objects/72 2 3
|/objects/73 2 1
|/objects/74 2 3
|/objects/75 2 3
";
}
