//! RFC 9113 §8.2/§8.3 checks of a received HTTP/2 header list, in one pass.
//!
//! The same decisions as `h2`'s inbound header validation (`h2.utilities.validate_headers`,
//! the chain of generators `h2` runs on every header block when
//! `validate_inbound_headers` is on), which costs about a tenth of a small request's CPU in
//! pure Python. `dispa/protocols/http2/__init__.py` turns `h2`'s off when this compiled
//! check is available and runs this one on each header event instead; a refused block is a
//! connection error (GOAWAY PROTOCOL_ERROR), as with `h2`. What is refused:
//!
//! - names with uppercase letters, bytes <= 0x20 or >= 0x7f, a colon after the first byte,
//!   or empty; values with NUL/CR/LF or starting or ending with SP/HTAB;
//! - `te` other than `trailers`; connection-specific fields (`connection`, `keep-alive`,
//!   `proxy-connection`, `transfer-encoding`, `upgrade`);
//! - pseudo-headers that are unknown, repeated, after a regular field, in trailers, of the
//!   wrong side (`:status` in a request, request ones in a response), missing (`:method`,
//!   `:scheme`, `:path` except for plain CONNECT, `:status`), `:protocol` without CONNECT,
//!   `:scheme`/`:path` with plain CONNECT;
//! - requests with neither `:authority` nor `host`, two `host`s, or the two differing;
//!   an empty `:path`.

/// What kind of header block is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request (or a PUSH_PROMISE's request) head.
    Request,
    /// A response head, final or informational.
    Response,
    /// Trailers.
    Trailers,
}

const CONNECTION_HEADERS: [&[u8]; 5] = [
    b"connection",
    b"proxy-connection",
    b"keep-alive",
    b"transfer-encoding",
    b"upgrade",
];

// bits of the pseudo-headers seen
const METHOD: u8 = 1;
const SCHEME: u8 = 2;
const AUTHORITY: u8 = 4;
const PATH: u8 = 8;
const STATUS: u8 = 16;
const PROTOCOL: u8 = 32;

fn pseudo_bit(name: &[u8]) -> Option<u8> {
    Some(match name {
        b":method" => METHOD,
        b":scheme" => SCHEME,
        b":authority" => AUTHORITY,
        b":path" => PATH,
        b":status" => STATUS,
        b":protocol" => PROTOCOL,
        _ => return None,
    })
}

/// Running state of one check (fields are fed in order with [`Check::field`]).
pub struct Check<'a> {
    kind: Kind,
    seen: u8,
    regular: bool,
    method: Option<&'a [u8]>,
    authority: Option<&'a [u8]>,
    host: Option<&'a [u8]>,
}

impl<'a> Check<'a> {
    /// Start checking a block of `kind`.
    pub fn new(kind: Kind) -> Check<'a> {
        Check {
            kind,
            seen: 0,
            regular: false,
            method: None,
            authority: None,
            host: None,
        }
    }

    /// Check one field; `Err` says why the block is malformed.
    pub fn field(&mut self, name: &'a [u8], value: &'a [u8]) -> Result<(), &'static str> {
        if name.is_empty() {
            return Err("Received header name with zero length.");
        }
        for &c in name {
            if c.is_ascii_uppercase() {
                return Err("Received uppercase header name.");
            }
            if c <= 0x20 || c >= 0x7f {
                return Err("Illegal character in header name");
            }
        }
        if name[1..].contains(&b':') {
            return Err("Illegal character ':' in header name");
        }
        if let (Some(&first), Some(&last)) = (value.first(), value.last()) {
            if value.iter().any(|&c| c == 0 || c == b'\n' || c == b'\r') {
                return Err("Illegal character in header value");
            }
            if first == b' ' || first == b'\t' || last == b' ' || last == b'\t' {
                return Err("Received header value surrounded by whitespace");
            }
        }
        if name == b"te" && !value.eq_ignore_ascii_case(b"trailers") {
            return Err("Invalid value for TE header");
        }
        if CONNECTION_HEADERS.contains(&name) {
            return Err("Connection-specific header field present");
        }
        let request = self.kind == Kind::Request;
        if name[0] == b':' {
            let bit = pseudo_bit(name);
            if let Some(b) = bit {
                if self.seen & b != 0 {
                    return Err("Received duplicate pseudo-header field");
                }
            }
            if self.regular {
                return Err("Received pseudo-header field out of sequence");
            }
            let b = bit.ok_or("Received custom pseudo-header field")?;
            self.seen |= b;
            match b {
                METHOD => self.method = Some(value),
                AUTHORITY => self.authority = Some(value),
                PATH if request && value.is_empty() => {
                    return Err("An empty :path header is forbidden")
                }
                _ => {}
            }
        } else {
            self.regular = true;
            if request && name == b"host" {
                if self.host.is_some() {
                    return Err("Request header block has multiple Host headers.");
                }
                self.host = Some(value);
            }
        }
        Ok(())
    }

    /// The checks on the whole block, after its last field.
    pub fn finish(&self) -> Result<(), &'static str> {
        let seen = self.seen;
        match self.kind {
            Kind::Trailers => {
                if seen != 0 {
                    return Err("Received pseudo-header in trailer");
                }
            }
            Kind::Response => {
                if seen & STATUS == 0 {
                    return Err("Header block missing mandatory :status header");
                }
                if seen & !STATUS != 0 {
                    return Err("Encountered request-only headers");
                }
            }
            Kind::Request => {
                if seen & METHOD == 0 {
                    return Err("Header block missing mandatory :method header");
                }
                let connect = self.method == Some(b"CONNECT".as_slice());
                if connect && seen & PROTOCOL == 0 {
                    if seen & (SCHEME | PATH) != 0 {
                        return Err("Ordinary CONNECT MUST NOT include :scheme or :path");
                    }
                } else if seen & (SCHEME | PATH) != SCHEME | PATH {
                    return Err("Header block missing mandatory :scheme or :path header");
                }
                if seen & STATUS != 0 {
                    return Err("Encountered response-only headers");
                }
                if !connect && seen & PROTOCOL != 0 {
                    return Err("Encountered connect-request-only headers");
                }
                match (self.authority, self.host) {
                    (None, None) => {
                        return Err(
                            "Request header block does not have an :authority or Host header.",
                        )
                    }
                    (Some(a), Some(h)) if a != h => {
                        return Err(
                            "Request header block has mismatched :authority and Host headers",
                        )
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// Check a whole header list.
pub fn check<'a>(
    kind: Kind,
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<(), &'static str> {
    let mut c = Check::new(kind);
    for (n, v) in fields {
        c.field(n, v)?;
    }
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(extra: &[(&'static str, &'static str)]) -> Vec<(&'static [u8], &'static [u8])> {
        let mut v: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"a"),
        ];
        v.extend(extra.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        v
    }

    #[test]
    fn requests() {
        assert_eq!(
            check(Kind::Request, req(&[("accept", "*/*"), ("te", "Trailers")])),
            Ok(())
        );
        for bad in [
            ("Accept", "x"),
            ("a b", "x"),
            ("x:y", "x"),
            ("te", "gzip"),
            ("connection", "close"),
            ("x", " v"),
            ("x", "a\r\nb"),
            (":method", "GET"),
            ("host", "b"),
        ] {
            assert!(check(Kind::Request, req(&[bad])).is_err(), "{bad:?}");
        }
        let reorder: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"GET"),
            (b"x", b"1"),
            (b":scheme", b"http"),
            (b":path", b"/"),
        ];
        assert!(check(Kind::Request, reorder).is_err());
        let connect: Vec<(&[u8], &[u8])> = vec![(b":method", b"CONNECT"), (b":authority", b"a:1")];
        assert_eq!(check(Kind::Request, connect), Ok(()));
        let host_only: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b"host", b"a"),
        ];
        assert_eq!(check(Kind::Request, host_only), Ok(()));
    }

    #[test]
    fn responses_and_trailers() {
        let ok: Vec<(&[u8], &[u8])> = vec![(b":status", b"200"), (b"server", b"x")];
        assert_eq!(check(Kind::Response, ok.clone()), Ok(()));
        assert!(check(Kind::Trailers, ok).is_err());
        let t: Vec<(&[u8], &[u8])> = vec![(b"grpc-status", b"0")];
        assert_eq!(check(Kind::Trailers, t.clone()), Ok(()));
        assert!(check(Kind::Response, t).is_err());
    }
}
