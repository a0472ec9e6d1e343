//! Protocol parsers: pure functions of the bytes a connection carried.
//!
//! Nothing here touches the kernel, aya or the network, so every parser is tested with plain
//! `cargo test` on byte fixtures. The connection tracker (`crate::conn`) feeds a parser one
//! [`Segment`] per syscall, in order, per connection; the parser reports finished exchanges.

use std::borrow::Cow;

#[cfg(test)]
pub(crate) mod fixture;
pub mod http1;
pub mod postgres;
pub mod redis;
pub mod sql;

/// Which way bytes moved, seen from the traced process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The traced process wrote or sent these bytes.
    Egress,
    /// The traced process read or received these bytes.
    Ingress,
}

impl Direction {
    pub fn opposite(self) -> Self {
        match self {
            Direction::Egress => Direction::Ingress,
            Direction::Ingress => Direction::Egress,
        }
    }
}

/// One syscall's worth of stream bytes on one connection.
///
/// The kernel copies only a bounded prefix (`head`) and the last few bytes (`tail`) of what a
/// syscall moved; `len` is the full count. Parsers must keep byte accounting right (bodies,
/// message ends) even when `head.len() < len`.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    pub dir: Direction,
    /// CLOCK_MONOTONIC nanoseconds when the bytes finished moving: a receive's return; for a
    /// send, when its last bytes left (see `tracer_common::DataEvent::start_ns`).
    pub ts_ns: u64,
    /// When the bytes began to move: for sends, no later than the peer could read them (it
    /// may read them before the send returns), `ts_ns` for receives. A message's first byte is
    /// dated by this, its last byte by `ts_ns`.
    pub start_ns: u64,
    /// Bytes the syscall moved (its return value).
    pub len: u64,
    /// The first `head.len()` bytes moved (`head.len() <= len`).
    pub head: &'a [u8],
    /// The last `tail.len()` bytes moved (`tail.len() <= min(len, 16)`); may overlap `head`.
    pub tail: &'a [u8],
}

impl<'a> Segment<'a> {
    /// A segment all of whose bytes are at hand: bytes a parser held back and replays, or a
    /// test's.
    pub fn whole(dir: Direction, ts_ns: u64, start_ns: u64, bytes: &'a [u8]) -> Self {
        Segment {
            dir,
            ts_ns,
            start_ns,
            len: bytes.len() as u64,
            head: bytes,
            tail: &bytes[bytes.len().saturating_sub(tracer_common::TAIL_LEN)..],
        }
    }
}

/// Which end of the exchange the traced process was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The process read the request and wrote the response.
    Server,
    /// The process wrote the request and read the response.
    Client,
}

/// How an exchange ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The whole response was seen.
    Complete,
    /// The connection closed (or reset, when `reset`) before the response was complete;
    /// `status` of the exchange tells whether its head had arrived.
    Closed { reset: bool },
}

/// One finished HTTP/1.x request/response pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpExchange {
    pub side: Side,
    /// A constant for the common methods, which spares an allocation per request.
    pub method: Cow<'static, str>,
    /// The request-target and the kept request headers.
    pub request: RequestText,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// `None` when the connection ended before a response head arrived.
    pub status: Option<u16>,
    /// First byte of the request.
    pub req_start_ns: u64,
    /// Bytes before the request's first in the syscall it began in (the one dated
    /// `req_start_ns`): see `DbExchange::req_offset`.
    pub req_offset: u64,
    /// Last byte of the request (headers and body).
    pub req_end_ns: u64,
    /// First byte of the final (non-1xx) response, if any.
    pub resp_start_ns: Option<u64>,
    /// Last byte of the response, or the close time when the exchange did not complete.
    pub end_ns: u64,
    /// Request bytes on the wire (head + body).
    pub req_bytes: u64,
    /// Response bytes on the wire (head + body), including 1xx interim responses.
    pub resp_bytes: u64,
    pub outcome: Outcome,
}

impl HttpExchange {
    /// The raw request-target (`/path?query`), as sent. Redaction is the span builder's job.
    pub fn target(&self) -> &str {
        self.request.target()
    }

    /// Request headers in order, names lowercased; bounded in count and size by the parser.
    pub fn request_headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.request.headers()
    }

    /// The first value of a kept request header (`name` lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.request.header(name)
    }
}

/// The text of a request that later stages use, its target and kept header values, in one
/// buffer: a `String` each cost an allocation per request and per value, and their frees
/// (about 6% of the agent's CPU under load).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestText {
    /// The target, then each kept header's value, back to back.
    text: String,
    target_end: u32,
    /// Each kept header's name and where its value ends in `text`. Only a fixed list of headers
    /// is kept, so the names are that list's (lowercase) constants.
    headers: Vec<(&'static str, u32)>,
}

impl RequestText {
    /// A target and headers (names lowercase), in one allocation of the exact size; invalid
    /// UTF-8 in a value becomes U+FFFD.
    pub fn new<V: AsRef<[u8]>>(target: &str, headers: &[(&'static str, V)]) -> Self {
        let len = target.len() + headers.iter().map(|(_, v)| v.as_ref().len()).sum::<usize>();
        let mut text = String::with_capacity(len);
        text.push_str(target);
        let target_end = offset(text.len());
        let headers = headers
            .iter()
            .map(|(name, value)| {
                // Valid nearly always: checked without `from_utf8_lossy`'s slower walk.
                match std::str::from_utf8(value.as_ref()) {
                    Ok(valid) => text.push_str(valid),
                    Err(_) => text.push_str(&String::from_utf8_lossy(value.as_ref())),
                }
                (*name, offset(text.len()))
            })
            .collect();
        Self {
            text,
            target_end,
            headers,
        }
    }

    /// A target without headers, in the allocation it already has.
    pub(crate) fn from_target(target: String) -> Self {
        Self {
            target_end: offset(target.len()),
            text: target,
            headers: Vec::new(),
        }
    }

    pub fn target(&self) -> &str {
        &self.text[..self.target_end as usize]
    }

    /// The headers in order.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let starts = std::iter::once(self.target_end).chain(self.headers.iter().map(|h| h.1));
        self.headers
            .iter()
            .zip(starts)
            .map(|(&(name, end), start)| (name, &self.text[start as usize..end as usize]))
    }

    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// An offset in a request's text, bounded by the parser's head and header limits (tens of KiB).
fn offset(len: usize) -> u32 {
    u32::try_from(len).expect("a request's kept text is far below 4 GiB")
}

/// Which database protocol an exchange was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DbSystem {
    Postgresql,
    Redis,
}

/// One finished database call (a query, a command, or a pipelined/transaction batch element).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbExchange {
    pub system: DbSystem,
    pub side: Side,
    /// Operation name: the SQL verb (`SELECT`, `INSERT`, `BEGIN`...) or the Redis command (`GET`).
    pub operation: String,
    /// The statement with literals replaced by `?` (SQL) or the command with arguments replaced
    /// by `?` (Redis), bounded in length. Never raw values.
    pub statement: String,
    /// The main table or key-space object when it is cheap to tell (`cats` in `SELECT ... FROM
    /// cats`); used in the span name.
    pub target: Option<String>,
    /// The server's error message, when the call failed.
    pub error: Option<String>,
    pub req_start_ns: u64,
    /// Bytes before the request's first in the syscall it began in (the one dated
    /// `req_start_ns`): with that syscall's TCP sequence number, the request's own, the same
    /// on both ends however each cut the stream into syscalls (pipelined commands a server
    /// reads at once).
    pub req_offset: u64,
    pub req_end_ns: u64,
    pub resp_start_ns: Option<u64>,
    pub end_ns: u64,
    pub req_bytes: u64,
    pub resp_bytes: u64,
    pub outcome: Outcome,
}

/// A finished exchange of any protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exchange {
    Http(HttpExchange),
    Db(DbExchange),
}

impl Exchange {
    pub fn side(&self) -> Side {
        match self {
            Exchange::Http(e) => e.side,
            Exchange::Db(e) => e.side,
        }
    }

    pub fn as_http(&self) -> Option<&HttpExchange> {
        match self {
            Exchange::Http(e) => Some(e),
            Exchange::Db(_) => None,
        }
    }

    /// First byte of the request.
    pub fn req_start_ns(&self) -> u64 {
        match self {
            Exchange::Http(e) => e.req_start_ns,
            Exchange::Db(e) => e.req_start_ns,
        }
    }
}

/// Whether `head` begins with a TLS handshake record (content type 22, protocol version
/// 3.x, as SSL 3.0 through TLS 1.3 all write it): a connection's first bytes when it carries
/// TLS.
pub fn is_tls_handshake(head: &[u8]) -> bool {
    matches!(head, [0x16, 0x03, minor, ..] if *minor <= 0x04)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_handshakes_are_told_by_their_record_header() {
        // A ClientHello as curl sends it, its first bytes; a ServerHello's record header.
        assert!(is_tls_handshake(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
        ));
        assert!(is_tls_handshake(b"\x16\x03\x03\x00\x7a"));
        // Application data, HTTP, other versions and too little to tell: no.
        assert!(!is_tls_handshake(b"\x17\x03\x03\x00\x40"));
        assert!(!is_tls_handshake(b"GET / HTTP/1.1\r\n"));
        assert!(!is_tls_handshake(b"\x16\x02\x00"));
        assert!(!is_tls_handshake(b"\x16\x03\x09"));
        assert!(!is_tls_handshake(b"\x16\x03"));
    }

    #[test]
    fn a_request_text_keeps_its_target_and_headers_apart() {
        let request = RequestText::new(
            "/cats?id=1",
            &[
                ("host", "cats.example"),
                ("b3", ""),
                ("b3", "1"),
                ("user-agent", "wrk"),
            ],
        );
        assert_eq!(request.target(), "/cats?id=1");
        assert_eq!(
            request.headers().collect::<Vec<_>>(),
            [
                ("host", "cats.example"),
                ("b3", ""),
                ("b3", "1"),
                ("user-agent", "wrk")
            ]
        );
        assert_eq!(request.header("b3"), Some(""), "the first value");
        assert_eq!(request.header("user-agent"), Some("wrk"));
        assert_eq!(request.header("traceparent"), None);
        assert_eq!(
            request.text.capacity(),
            request.text.len(),
            "one allocation, exact"
        );

        let bare = RequestText::from_target("é".repeat(3));
        assert_eq!(bare.target(), "ééé");
        assert_eq!(bare.headers().count(), 0);
        assert_eq!(bare, RequestText::new::<&str>("ééé", &[]));
        assert_eq!(RequestText::default().target(), "");
        assert_eq!(
            RequestText::new("", &[("host", "h")]).header("host"),
            Some("h")
        );
    }
}
