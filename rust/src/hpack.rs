//! HPACK (RFC 7541): header compression for HTTP/2, compiled.
//!
//! The same codec as the `hpack` Python library (the one `h2` uses), with the same
//! behaviour where it matters to `h2`: the encoder indexes every header it can (incremental
//! indexing) except the sensitive ones (never indexed), Huffman-codes a literal when that is
//! shorter; the decoder enforces the maximum table size we advertised and the maximum
//! decoded header list size (HPACK bombs), and refuses malformed blocks. `hpack_py` is the
//! pyo3 binding that `h2.connection.H2Connection.encoder`/`.decoder` are replaced with
//! (`dispa/protocols/http2/hpack_codec.py`). Plain Rust here, so `cargo test` needs no Python.

use std::collections::VecDeque;

use crate::hpack_tables::{HUFFMAN_CODES, HUFFMAN_LENGTHS, STATIC};

/// Default dynamic table size (SETTINGS_HEADER_TABLE_SIZE's initial value).
pub const DEFAULT_TABLE_SIZE: usize = 4096;
/// The largest dynamic table the encoder uses, whatever the peer allows (nghttp2's
/// default too): a client advertising SETTINGS_HEADER_TABLE_SIZE = 2^32-1 must not make us
/// keep every distinct response header we ever sent (RFC 7541 §4.2 lets the encoder use
/// less than the setting; the size update tells the peer).
pub const ENCODER_MAX_TABLE_SIZE: usize = 4096;
/// Default maximum decoded header list size (the `hpack` library's default).
pub const DEFAULT_MAX_HEADER_LIST_SIZE: usize = 65536;
const ENTRY_OVERHEAD: usize = 32;
const STATIC_LEN: usize = STATIC.len();
/// Integers longer than this many continuation bytes are refused (the `hpack` library's
/// `VARINT_MAX_LENGTH`), which also keeps them far below `usize` overflow.
const VARINT_MAX_LENGTH: usize = 5;

/// Why a header block was refused; the binding maps these to `hpack.exceptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HpackError {
    /// Malformed block (truncated, bad integer, bad Huffman, update after a header).
    Decoding(&'static str),
    /// An index outside the static and dynamic tables.
    InvalidIndex(usize),
    /// A table size above the one we allow.
    InvalidTableSize(&'static str),
    /// The decoded header list is larger than `max_header_list_size`.
    OversizedHeaderList(usize),
}

impl std::fmt::Display for HpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HpackError::Decoding(m) => write!(f, "{m}"),
            HpackError::InvalidIndex(i) => write!(f, "Invalid table index {i}"),
            HpackError::InvalidTableSize(m) => write!(f, "{m}"),
            HpackError::OversizedHeaderList(n) => {
                write!(f, "A header list larger than {n} has been received")
            }
        }
    }
}

fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + ENTRY_OVERHEAD
}

/// The dynamic table: newest entry first (HPACK index 62).
#[derive(Debug, Clone)]
pub struct Table {
    entries: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            entries: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE,
        }
    }
}

impl Table {
    /// The table's maximum size (octets, RFC 7541 §4.1).
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// Number of dynamic entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the dynamic table holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Current size in octets (entries plus 32 each).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Change the maximum size, evicting the oldest entries past it.
    pub fn set_max_size(&mut self, max: usize) {
        self.max_size = max;
        self.shrink();
    }

    fn shrink(&mut self) {
        while self.size > self.max_size {
            match self.entries.pop_back() {
                Some((n, v)) => self.size -= entry_size(&n, &v),
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }

    fn add(&mut self, name: &[u8], value: &[u8]) {
        let size = entry_size(name, value);
        if size > self.max_size {
            // RFC 7541 §4.4: an entry larger than the table empties it
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.entries.push_front((name.to_vec(), value.to_vec()));
        self.size += size;
        self.shrink();
    }

    /// The (name, value) at HPACK index `index` (1-based: static table, then dynamic).
    pub fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        if index == 0 {
            return Err(HpackError::InvalidIndex(0));
        }
        if index <= STATIC_LEN {
            let (n, v) = STATIC[index - 1];
            return Ok((n, v));
        }
        match self.entries.get(index - STATIC_LEN - 1) {
            Some((n, v)) => Ok((n.as_slice(), v.as_slice())),
            None => Err(HpackError::InvalidIndex(index)),
        }
    }

    /// Best match: `(index, true)` for name and value, `(index, false)` for the name only.
    fn search(&self, name: &[u8], value: &[u8]) -> Option<(usize, bool)> {
        let mut partial = None;
        for (i, (n, v)) in STATIC.iter().enumerate() {
            if *n == name {
                if *v == value {
                    return Some((i + 1, true));
                }
                if partial.is_none() {
                    partial = Some((i + 1, false));
                }
            }
        }
        for (i, (n, v)) in self.entries.iter().enumerate() {
            if n.as_slice() == name {
                if v.as_slice() == value {
                    return Some((i + STATIC_LEN + 1, true));
                }
                if partial.is_none() {
                    partial = Some((i + STATIC_LEN + 1, false));
                }
            }
        }
        partial
    }
}

// ------------------------------------------------------------------ integers and strings

/// Append `value` with an N-bit prefix; `first` holds the representation's flag bits.
pub fn encode_integer(out: &mut Vec<u8>, value: usize, prefix_bits: u32, first: u8) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// (value, bytes consumed) of an N-bit prefix integer at the start of `data`.
pub fn decode_integer(data: &[u8], prefix_bits: u32) -> Result<(usize, usize), HpackError> {
    let max = (1u64 << prefix_bits) - 1;
    let first = *data
        .first()
        .ok_or(HpackError::Decoding("Unable to decode HPACK integer"))?;
    let mut value = (first as u64) & max;
    if value < max {
        return Ok((value as usize, 1));
    }
    // at most VARINT_MAX_LENGTH bytes of 7 bits: no u64 overflow
    let mut shift = 0u32;
    let mut i = 1;
    loop {
        let b = *data
            .get(i)
            .ok_or(HpackError::Decoding("Unable to decode HPACK integer"))?;
        i += 1;
        value += ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            let v = usize::try_from(value)
                .map_err(|_| HpackError::Decoding("HPACK integer too large"))?;
            return Ok((v, i));
        }
        shift += 7;
        if i > VARINT_MAX_LENGTH {
            return Err(HpackError::Decoding(
                "Variable integer representation is too long",
            ));
        }
    }
}

/// Length of `data` once Huffman-coded, in octets.
pub fn huffman_len(data: &[u8]) -> usize {
    let bits: usize = data
        .iter()
        .map(|&b| HUFFMAN_LENGTHS[b as usize] as usize)
        .sum();
    bits.div_ceil(8)
}

/// Append the Huffman code of `data` (padded with the EOS prefix: all ones).
pub fn huffman_encode(out: &mut Vec<u8>, data: &[u8]) {
    let mut acc: u64 = 0;
    let mut nbits: u32 = 0;
    for &b in data {
        let len = HUFFMAN_LENGTHS[b as usize] as u32;
        acc = (acc << len) | HUFFMAN_CODES[b as usize] as u64;
        nbits += len;
        while nbits >= 8 {
            nbits -= 8;
            out.push((acc >> nbits) as u8);
        }
        acc &= (1u64 << nbits) - 1;
    }
    if nbits > 0 {
        out.push(((acc << (8 - nbits)) as u8) | (0xffu8 >> nbits));
    }
}

/// A binary decoding tree of the Huffman code: node `i` has children `tree[i][0/1]`;
/// values >= `LEAF` are leaves (symbol = value - LEAF).
struct HuffTree {
    nodes: Vec<[u16; 2]>,
}

const LEAF: u16 = 0x8000;
const EOS: u16 = 256;

impl HuffTree {
    fn build() -> HuffTree {
        let mut nodes: Vec<[u16; 2]> = vec![[0, 0]];
        for sym in 0..257usize {
            let code = HUFFMAN_CODES[sym];
            let len = HUFFMAN_LENGTHS[sym] as u32;
            let mut node = 0usize;
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    nodes[node][bit] = LEAF | sym as u16;
                } else {
                    if nodes[node][bit] == 0 {
                        nodes.push([0, 0]);
                        nodes[node][bit] = (nodes.len() - 1) as u16;
                    }
                    node = nodes[node][bit] as usize;
                }
            }
        }
        HuffTree { nodes }
    }
}

fn huff_tree() -> &'static HuffTree {
    static TREE: std::sync::OnceLock<HuffTree> = std::sync::OnceLock::new();
    TREE.get_or_init(HuffTree::build)
}

/// Decode a Huffman-coded string (RFC 7541 §5.2: padding of at most 7 one bits, no EOS).
pub fn huffman_decode(data: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let tree = &huff_tree().nodes;
    let mut node = 0usize;
    let mut depth = 0u32; // bits since the last symbol
    let mut all_ones = true;
    for &byte in data {
        for i in (0..8).rev() {
            let bit = ((byte >> i) & 1) as usize;
            all_ones &= bit == 1;
            depth += 1;
            let next = tree[node][bit];
            if next & LEAF != 0 {
                let sym = next & !LEAF;
                if sym == EOS {
                    return Err(HpackError::Decoding("Huffman string contains EOS"));
                }
                out.push(sym as u8);
                node = 0;
                depth = 0;
                all_ones = true;
            } else if next == 0 {
                return Err(HpackError::Decoding("Invalid Huffman string"));
            } else {
                node = next as usize;
            }
        }
    }
    if depth > 7 || !all_ones {
        return Err(HpackError::Decoding("Invalid Huffman padding"));
    }
    Ok(())
}

fn encode_string(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
    if huffman {
        let hl = huffman_len(s);
        if hl < s.len() {
            encode_integer(out, hl, 7, 0x80);
            huffman_encode(out, s);
            return;
        }
    }
    encode_integer(out, s.len(), 7, 0);
    out.extend_from_slice(s);
}

/// (string, consumed) of a string literal at the start of `data`.
fn decode_string(data: &[u8]) -> Result<(Vec<u8>, usize), HpackError> {
    let first = *data
        .first()
        .ok_or(HpackError::Decoding("Truncated header block"))?;
    let (len, used) = decode_integer(data, 7)?;
    let end = used
        .checked_add(len)
        .ok_or(HpackError::Decoding("Truncated header block"))?;
    if end > data.len() {
        return Err(HpackError::Decoding("Truncated header block"));
    }
    let raw = &data[used..end];
    if first & 0x80 != 0 {
        let mut out = Vec::with_capacity(raw.len() * 8 / 5 + 1);
        huffman_decode(raw, &mut out)?;
        Ok((out, end))
    } else {
        Ok((raw.to_vec(), end))
    }
}

// ------------------------------------------------------------------ encoder

/// HPACK encoder: one per connection direction (our responses to a client).
#[derive(Debug, Clone, Default)]
pub struct Encoder {
    table: Table,
    /// Smallest table size set since the last block, when a size update is owed (§4.2).
    pending_min: Option<usize>,
}

impl Encoder {
    /// A new encoder with the default 4096-octet table.
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// The dynamic table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The peer's SETTINGS_HEADER_TABLE_SIZE (capped at [`ENCODER_MAX_TABLE_SIZE`]): when
    /// that changes our table's size, the next block starts with a size update.
    pub fn set_table_size(&mut self, size: usize) {
        let size = size.min(ENCODER_MAX_TABLE_SIZE);
        if size == self.table.max_size && self.pending_min.is_none() {
            return;
        }
        self.pending_min = Some(self.pending_min.map_or(size, |m| m.min(size)));
        self.table.set_max_size(size);
    }

    /// Start a header block (the owed table size updates); call before `encode_field`.
    pub fn begin_block(&mut self, out: &mut Vec<u8>) {
        if let Some(min) = self.pending_min.take() {
            let last = self.table.max_size;
            if min < last {
                encode_integer(out, min, 5, 0x20);
            }
            encode_integer(out, last, 5, 0x20);
        }
    }

    /// Append one header field; `sensitive` fields are never indexed (§7.1.3).
    pub fn encode_field(
        &mut self,
        out: &mut Vec<u8>,
        name: &[u8],
        value: &[u8],
        sensitive: bool,
        huffman: bool,
    ) {
        match self.table.search(name, value) {
            Some((index, true)) => encode_integer(out, index, 7, 0x80),
            Some((index, false)) => {
                if sensitive {
                    encode_integer(out, index, 4, 0x10);
                } else {
                    encode_integer(out, index, 6, 0x40);
                }
                encode_string(out, value, huffman);
                if !sensitive {
                    self.table.add(name, value);
                }
            }
            None => {
                out.push(if sensitive { 0x10 } else { 0x40 });
                encode_string(out, name, huffman);
                encode_string(out, value, huffman);
                if !sensitive {
                    self.table.add(name, value);
                }
            }
        }
    }

    /// Encode a whole header list (2-tuples, not sensitive) into a block.
    pub fn encode(&mut self, headers: &[(&[u8], &[u8])], huffman: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(headers.len() * 8);
        self.begin_block(&mut out);
        for (n, v) in headers {
            self.encode_field(&mut out, n, v, false, huffman);
        }
        out
    }
}

// ------------------------------------------------------------------ decoder

/// One decoded field: name, value, and whether it was sent as never-indexed.
pub type Field = (Vec<u8>, Vec<u8>, bool);

/// HPACK decoder: one per connection direction (a client's requests to us).
#[derive(Debug, Clone)]
pub struct Decoder {
    table: Table,
    /// SETTINGS_HEADER_TABLE_SIZE we advertised: the peer may not use a larger table.
    pub max_allowed_table_size: usize,
    /// Maximum decoded size (sum of name + value + 32) of one header list.
    pub max_header_list_size: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            table: Table::default(),
            max_allowed_table_size: DEFAULT_TABLE_SIZE,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
        }
    }
}

impl Decoder {
    /// A new decoder with the default limits.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// The dynamic table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Set the dynamic table's size directly (as `hpack.Decoder.header_table_size`).
    pub fn set_table_size(&mut self, size: usize) {
        self.table.set_max_size(size);
    }

    /// Decode one complete header block, calling `emit(name, value, never_indexed)` per
    /// field in order. On error the table may be partly updated (the connection is over).
    pub fn decode_with(
        &mut self,
        data: &[u8],
        mut emit: impl FnMut(&[u8], &[u8], bool),
    ) -> Result<(), HpackError> {
        let mut pos = 0usize;
        let mut inflated = 0usize;
        let mut any = false;
        while pos < data.len() {
            let rest = &data[pos..];
            let b = rest[0];
            if b & 0x80 != 0 {
                let (index, used) = decode_integer(rest, 7)?;
                let (n, v) = self.table.get(index)?;
                inflated += entry_size(n, v);
                if inflated > self.max_header_list_size {
                    return Err(HpackError::OversizedHeaderList(self.max_header_list_size));
                }
                emit(n, v, false);
                any = true;
                pos += used;
            } else if b & 0xe0 == 0x20 {
                if any {
                    return Err(HpackError::Decoding(
                        "Table size update not at the start of the block",
                    ));
                }
                let (size, used) = decode_integer(rest, 5)?;
                if size > self.max_allowed_table_size {
                    return Err(HpackError::InvalidTableSize(
                        "Encoder exceeded max allowable table size",
                    ));
                }
                self.table.set_max_size(size);
                pos += used;
            } else {
                // literals: 01 incremental indexing (6-bit index), 0000 without indexing,
                // 0001 never indexed (4-bit index)
                let (indexing, prefix) = if b & 0x40 != 0 { (true, 6) } else { (false, 4) };
                let never = !indexing && b & 0x10 != 0;
                let (index, mut used) = decode_integer(rest, prefix)?;
                let name: Vec<u8>;
                if index != 0 {
                    name = self.table.get(index)?.0.to_vec();
                } else {
                    let (n, u) = decode_string(&rest[used..])?;
                    name = n;
                    used += u;
                }
                let (value, u) = decode_string(&rest[used..])?;
                used += u;
                inflated += entry_size(&name, &value);
                if inflated > self.max_header_list_size {
                    return Err(HpackError::OversizedHeaderList(self.max_header_list_size));
                }
                emit(&name, &value, never);
                any = true;
                if indexing {
                    self.table.add(&name, &value);
                }
                pos += used;
            }
        }
        if self.table.max_size > self.max_allowed_table_size {
            return Err(HpackError::InvalidTableSize(
                "Encoder did not shrink table size to within the max",
            ));
        }
        Ok(())
    }

    /// Decode one complete header block into a list of fields.
    pub fn decode(&mut self, data: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut out = Vec::new();
        self.decode_with(data, |n, v, never| {
            out.push((n.to_vec(), v.to_vec(), never))
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn fields(v: &[(&str, &str)]) -> Vec<Field> {
        v.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec(), false))
            .collect()
    }

    #[test]
    fn integers_rfc7541_c1() {
        let mut out = Vec::new();
        encode_integer(&mut out, 10, 5, 0);
        assert_eq!(out, [10]);
        out.clear();
        encode_integer(&mut out, 1337, 5, 0);
        assert_eq!(out, [31, 154, 10]);
        assert_eq!(decode_integer(&[31, 154, 10], 5).unwrap(), (1337, 3));
        assert!(decode_integer(&[31, 154], 5).is_err());
        assert!(decode_integer(&[31, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1], 5).is_err());
    }

    #[test]
    fn requests_with_huffman_rfc7541_c4() {
        let mut d = Decoder::new();
        let b1 = hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
        assert_eq!(
            d.decode(&b1).unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        let b2 = hex("8286 84be 5886 a8eb 1064 9cbf");
        assert_eq!(
            d.decode(&b2).unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        let b3 = hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf");
        assert_eq!(
            d.decode(&b3).unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.table().size(), 164);
        // the encoder makes the same bytes
        let mut e = Encoder::new();
        let h1: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"www.example.com"),
        ];
        assert_eq!(e.encode(&h1, true), b1);
    }

    #[test]
    fn encoder_table_is_capped() {
        let mut e = Encoder::new();
        let mut d = Decoder::new();
        d.max_allowed_table_size = u32::MAX as usize;
        e.set_table_size(u32::MAX as usize);
        for i in 0..1000 {
            let v = format!("id-{i}");
            let block = e.encode(&[(b"x-request-id", v.as_bytes())], true);
            assert_eq!(d.decode(&block).unwrap()[0].1, v.as_bytes());
        }
        assert!(e.table().size() <= ENCODER_MAX_TABLE_SIZE);
        assert_eq!(d.table().size(), e.table().size());
        // a smaller setting is followed (with a size update the peer sees)
        e.set_table_size(100);
        let block = e.encode(&[(b"x-a", b"1")], true);
        assert_eq!(block[0] & 0xe0, 0x20);
        d.decode(&block).unwrap();
        assert_eq!(d.table().max_size(), 100);
    }

    #[test]
    fn huffman_padding_and_eos() {
        let mut out = Vec::new();
        huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff"), &mut out).unwrap();
        assert_eq!(out, b"www.example.com");
        // 8 bits of padding
        assert!(huffman_decode(&hex("ff"), &mut Vec::new()).is_err());
        // padding not all ones ('0' is 00000 then 000 padding)
        assert!(huffman_decode(&hex("00"), &mut Vec::new()).is_err());
        // EOS (30 ones)
        assert!(huffman_decode(&hex("ffff ffff"), &mut Vec::new()).is_err());
        for s in [&b""[..], b"a", b"hello world", &[0u8, 1, 2, 255, 254, 128]] {
            let mut enc = Vec::new();
            huffman_encode(&mut enc, s);
            assert_eq!(enc.len(), huffman_len(s));
            let mut dec = Vec::new();
            huffman_decode(&enc, &mut dec).unwrap();
            assert_eq!(dec, s);
        }
    }

    #[test]
    fn limits() {
        let mut d = Decoder::new();
        d.max_header_list_size = 40;
        let mut e = Encoder::new();
        let block = e.encode(&[(b"x-a", b"0123456789")], true);
        assert_eq!(d.decode(&block), Err(HpackError::OversizedHeaderList(40)));
        let mut d = Decoder::new();
        d.max_allowed_table_size = 100;
        assert!(matches!(
            d.decode(&[0x3f, 0xe1, 0x1f]),
            Err(HpackError::InvalidTableSize(_))
        ));
        assert!(matches!(
            d.decode(&[0xbf]),
            Err(HpackError::InvalidIndex(_))
        ));
        assert!(matches!(
            d.decode(&[0x80]),
            Err(HpackError::InvalidIndex(0))
        ));
        // size update after a header
        assert!(d.decode(&[0x82, 0x20]).is_err());
    }

    #[test]
    fn table_size_update_and_eviction() {
        let mut e = Encoder::new();
        let mut d = Decoder::new();
        for i in 0..200 {
            if i == 50 {
                e.set_table_size(100);
                d.max_allowed_table_size = 100;
            }
            if i == 120 {
                e.set_table_size(0);
                e.set_table_size(3000);
                d.max_allowed_table_size = 4096;
            }
            let v = format!("value-{i}");
            let h: Vec<(&[u8], &[u8])> = vec![(b"x-n", v.as_bytes()), (b"x-same", b"1")];
            let block = e.encode(&h, i % 2 == 0);
            let got = d.decode(&block).unwrap();
            assert_eq!(got, fields(&[("x-n", &v), ("x-same", "1")]));
            assert_eq!(d.table().size(), e.table().size());
        }
    }
}
