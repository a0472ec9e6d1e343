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
    /// CLOCK_MONOTONIC nanoseconds when the bytes finished moving: the syscall's exit.
    pub ts_ns: u64,
    /// When the bytes began to move: the syscall's entry for sends (the peer may read them
    /// before the send returns), `ts_ns` for receives. A message's first byte is dated by this,
    /// its last byte by `ts_ns`.
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
    /// The raw request-target (`/path?query`), as sent. Redaction is the span builder's job.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Request headers in order, names lowercased; bounded in count and size by the parser.
    /// Only a fixed list of headers is kept, so their names are that list's constants.
    pub request_headers: Vec<(&'static str, String)>,
    /// `None` when the connection ended before a response head arrived.
    pub status: Option<u16>,
    /// First byte of the request.
    pub req_start_ns: u64,
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
