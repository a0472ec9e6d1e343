//! Spans: what a finished exchange becomes, in Zipkin v2's model.
//!
//! A span is built from a parsed exchange, the connection it travelled on, and the identity the
//! linker gave it (`conn::link`). This is also where what leaves the host is decided: names are
//! folded so that ids do not explode the span-name cardinality, query strings are redacted, and
//! request headers other than the few named here are never exported.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, LazyLock},
};

use serde::{Serialize, Serializer};

use crate::{
    conn::{ConnInfo, link::Identity},
    protocols::{DbExchange, DbSystem, Exchange, HttpExchange, Outcome, Side},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SpanKind {
    Server,
    Client,
}

/// A Zipkin v2 endpoint: `ipv4` or `ipv6` in its JSON comes from the address, an IPv4-mapped
/// IPv6 address as IPv4 (as the peer would see it), the unspecified address not at all. The
/// address is kept as a value and written as text only when the span is, and the service name
/// is the process's shared one: an endpoint costs no allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub service_name: Option<Arc<str>>,
    /// Never IPv4-mapped nor unspecified ([`Endpoint::new`] sees to it).
    ip: Option<IpAddr>,
    /// Zipkin omits port 0.
    pub port: Option<u16>,
}

impl Endpoint {
    pub fn new(service_name: Option<Arc<str>>, addr: SocketAddr) -> Self {
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        Self {
            service_name,
            ip: (!ip.is_unspecified()).then_some(ip),
            port: (addr.port() != 0).then_some(addr.port()),
        }
    }

    /// The address, as reported: IPv4 for an IPv4-mapped one, `None` for the unspecified one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// The `ipv4` field's text.
    pub fn ipv4(&self) -> Option<String> {
        self.ip.filter(IpAddr::is_ipv4).map(|ip| ip.to_string())
    }

    /// The `ipv6` field's text.
    pub fn ipv6(&self) -> Option<String> {
        self.ip.filter(IpAddr::is_ipv6).map(|ip| ip.to_string())
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let fields = usize::from(self.service_name.is_some())
            + usize::from(self.ip.is_some())
            + usize::from(self.port.is_some());
        let mut st = s.serialize_struct("Endpoint", fields)?;
        if let Some(name) = &self.service_name {
            st.serialize_field("serviceName", &**name)?;
        }
        match &self.ip {
            Some(ip @ IpAddr::V4(_)) => st.serialize_field("ipv4", &DisplayStr(ip))?,
            Some(ip @ IpAddr::V6(_)) => st.serialize_field("ipv6", &DisplayStr(ip))?,
            None => {}
        }
        if let Some(port) = self.port {
            st.serialize_field("port", &port)?;
        }
        st.end()
    }
}

/// Serializes as the string `Display` writes, without a String of it first.
struct DisplayStr<'a, T>(&'a T);

impl<T: std::fmt::Display> Serialize for DisplayStr<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self.0)
    }
}

/// One Zipkin v2 span; `serde_json::to_string` gives exactly the wire form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Span {
    #[serde(serialize_with = "hex128")]
    pub trace_id: u128,
    #[serde(serialize_with = "hex64")]
    pub id: u64,
    #[serde(serialize_with = "hex64_opt", skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<u64>,
    pub kind: SpanKind,
    pub name: String,
    /// Microseconds since the Unix epoch.
    pub timestamp: u64,
    /// Microseconds; at least 1, as Zipkin drops a zero duration.
    pub duration: u64,
    pub local_endpoint: Endpoint,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_endpoint: Option<Endpoint>,
    pub tags: Tags,
}

/// A span's tags: few, with names known at compile time, in the order they were first set
/// (Zipkin's JSON has them as an object; the order is the same for every span of a kind).
/// The values share one buffer: a span's tags cost two allocations, where a String per value
/// cost one per tag, about ten per span.
#[derive(Clone, Default)]
pub struct Tags {
    /// Each tag's name and the byte range of its value in `text`.
    entries: Vec<(&'static str, usize, usize)>,
    /// The values, back to back. A replaced value's bytes stay behind, unused: replacing is
    /// rare and spans are short-lived.
    text: String,
}

/// Tag names are string constants, usually one copy each: comparing addresses first saves
/// comparing bytes, which a span's dozen tags did dozens of times.
fn same_name(a: &str, b: &str) -> bool {
    a.len() == b.len() && (std::ptr::eq(a.as_ptr(), b.as_ptr()) || a == b)
}

impl Tags {
    pub fn new() -> Self {
        // An HTTP span's values take about 100 bytes: room for them without regrowing.
        Self {
            entries: Vec::with_capacity(12),
            text: String::with_capacity(256),
        }
    }

    /// Sets `name` to `value`, replacing an earlier value.
    pub fn insert(&mut self, name: &'static str, value: &str) {
        self.insert_with(name, |text| text.push_str(value));
    }

    /// Sets `name` to the decimal digits of `value`, without a String of them first.
    pub fn insert_int(&mut self, name: &'static str, value: impl itoa::Integer) {
        self.insert(name, itoa::Buffer::new().format(value));
    }

    /// Sets `name` to `value` cut to `max` bytes on a character boundary, with `...` when cut.
    fn insert_bounded(&mut self, name: &'static str, value: &str, max: usize) {
        self.insert_with(name, |text| push_bounded(text, value, max));
    }

    /// Sets `name` to what `write` appends to the value buffer; `write` must only append.
    fn insert_with(&mut self, name: &'static str, write: impl FnOnce(&mut String)) {
        let start = self.text.len();
        write(&mut self.text);
        debug_assert!(self.text.len() >= start, "a tag writer only appends");
        let end = self.text.len();
        match self.entries.iter_mut().find(|(n, _, _)| same_name(n, name)) {
            Some((_, s, e)) => (*s, *e) = (start, end),
            None => self.entries.push((name, start, end)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _, _)| same_name(n, name))
            .map(|(_, start, end)| &self.text[*start..*end])
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.entries
            .iter()
            .map(|(n, start, end)| (*n, &self.text[*start..*end]))
    }
}

/// Equal when the same names have the same values in the same order, whatever bytes replaced
/// values left behind.
impl PartialEq for Tags {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Tags {}

impl std::fmt::Debug for Tags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl std::ops::Index<&str> for Tags {
    type Output = str;

    fn index(&self, name: &str) -> &str {
        self.get(name).unwrap_or_else(|| panic!("no tag {name:?}"))
    }
}

impl Serialize for Tags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl Span {
    /// Appends the span's Zipkin v2 JSON to `out`: the bytes `serde_json::to_writer` writes,
    /// written directly. Spans are encoded by the tens of thousands a second, and serde's
    /// generic path (a call per token, every byte of every string checked for escaping, ids and
    /// numbers included) was the largest single cost of the agent.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"traceId\":\"");
        out.extend_from_slice(&hex_digits::<32>(self.trace_id));
        out.extend_from_slice(b"\",\"id\":\"");
        out.extend_from_slice(&hex_digits::<16>(u128::from(self.id)));
        out.push(b'"');
        if let Some(parent) = self.parent_id {
            out.extend_from_slice(b",\"parentId\":\"");
            out.extend_from_slice(&hex_digits::<16>(u128::from(parent)));
            out.push(b'"');
        }
        out.extend_from_slice(match self.kind {
            SpanKind::Server => b",\"kind\":\"SERVER\"",
            SpanKind::Client => b",\"kind\":\"CLIENT\"",
        });
        out.extend_from_slice(b",\"name\":");
        json_str(out, &self.name);
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(b",\"timestamp\":");
        out.extend_from_slice(digits.format(self.timestamp).as_bytes());
        out.extend_from_slice(b",\"duration\":");
        out.extend_from_slice(digits.format(self.duration).as_bytes());
        out.extend_from_slice(b",\"localEndpoint\":");
        self.local_endpoint.write_json(out);
        if let Some(remote) = &self.remote_endpoint {
            out.extend_from_slice(b",\"remoteEndpoint\":");
            remote.write_json(out);
        }
        out.extend_from_slice(b",\"tags\":{");
        for (i, (name, value)) in self.tags.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_known_str(out, name);
            out.push(b':');
            json_str(out, value);
        }
        out.extend_from_slice(b"}}");
    }
}

impl Endpoint {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        let mut sep = "";
        if let Some(name) = &self.service_name {
            out.extend_from_slice(b"\"serviceName\":");
            json_str(out, name);
            sep = ",";
        }
        // Address text needs no JSON escaping.
        match self.ip {
            Some(IpAddr::V4(v4)) => {
                out.extend_from_slice(sep.as_bytes());
                out.extend_from_slice(b"\"ipv4\":\"");
                out.extend_from_slice(ipv4_text(v4).as_bytes());
                out.push(b'"');
                sep = ",";
            }
            Some(IpAddr::V6(v6)) => {
                use std::io::Write as _;
                out.extend_from_slice(sep.as_bytes());
                let _ = write!(out, "\"ipv6\":\"{v6}\"");
                sep = ",";
            }
            None => {}
        }
        if let Some(port) = self.port {
            out.extend_from_slice(sep.as_bytes());
            out.extend_from_slice(b"\"port\":");
            out.extend_from_slice(itoa::Buffer::new().format(port).as_bytes());
        }
        out.push(b'}');
    }
}

/// A JSON string. Nearly every string here needs no escaping (names, addresses, numbers); the
/// rest goes through serde_json, so the output is always its.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if !needs_escaping(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("a string always serializes");
    }
}

/// A JSON string of this program's own text (a tag name), which needs no escaping.
fn json_known_str(out: &mut Vec<u8>, s: &'static str) {
    debug_assert!(!needs_escaping(s.as_bytes()), "{s:?} needs escaping");
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// Whether `s` has a byte JSON escapes: a control character, `"` or `\`. Tested 16 bytes at
/// a time with no exit inside a chunk, which LLVM turns into a few SIMD compares per chunk; a
/// byte-by-byte `all` that stops at the first such byte was not vectorised, and this check
/// runs over every string of every span. The bytes after the last whole chunk are one more
/// chunk, the string's last 16 bytes; a string shorter than that (most tag values) is read
/// as two overlapping words (byte by byte, it cost more than the rest of the check).
fn needs_escaping(s: &[u8]) -> bool {
    let escaped = |b: u8| (b < 0x20) | (b == b'"') | (b == b'\\');
    let any_escaped = |chunk: &[u8; 16]| chunk.iter().fold(false, |any, &b| any | escaped(b));
    let (chunks, rest) = s.as_chunks::<16>();
    if chunks.iter().any(any_escaped) {
        return true;
    }
    if let Some(last) = s.last_chunk::<16>() {
        return !rest.is_empty() && any_escaped(last);
    }
    let word = |bytes: &[u8]| match bytes.first_chunk::<4>() {
        Some(first) => {
            let last = bytes.last_chunk::<4>().unwrap_or(first);
            u64::from(u32::from_ne_bytes(*first)) | u64::from(u32::from_ne_bytes(*last)) << 32
        }
        None => 0,
    };
    match s.len() {
        8.. => word_needs_escaping(word(&s[..8])) || word_needs_escaping(word(&s[s.len() - 8..])),
        4.. => word_needs_escaping(word(s)),
        _ => s.iter().any(|&b| escaped(b)),
    }
}

/// Whether a byte of `w` is one JSON escapes, with the classic word-at-a-time tests (a byte
/// below a value; a byte equal to one): exact as a whole, since a borrow only starts at a
/// byte that matches.
fn word_needs_escaping(w: u64) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH_BITS: u64 = ONES * 0x80;
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH_BITS;
    let equal = |n: u8| below(w ^ (ONES * u64::from(n)), 1);
    (below(w, 0x20) | equal(b'"') | equal(b'\\')) != 0
}

/// Lowercase hex of `v`'s low `N * 4` bits, zero-padded: ids are written for every span, and
/// the formatting machinery (then JSON escaping of what it wrote) cost more than the rest of
/// their serialization.
fn hex_digits<const N: usize>(v: u128) -> [u8; N] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; N];
    for (i, d) in out.iter_mut().enumerate() {
        *d = DIGITS[((v >> (4 * (N - 1 - i))) & 0xf) as usize];
    }
    out
}

fn hex128<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
    let digits = hex_digits::<32>(*v);
    // Hex digits are ASCII.
    s.serialize_str(std::str::from_utf8(&digits).unwrap_or_default())
}

fn hex64<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    let digits = hex_digits::<16>(u128::from(*v));
    s.serialize_str(std::str::from_utf8(&digits).unwrap_or_default())
}

fn hex64_opt<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => hex64(v, s),
        None => s.serialize_none(),
    }
}

/// Converts kernel timestamps (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`) to wall-clock time.
///
/// The offset is measured once between two monotonic reads around one realtime read, so it is
/// right to a few microseconds; `recalibrate` follows NTP steps on long runs.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Unix nanoseconds minus monotonic nanoseconds.
    offset_ns: i128,
}

impl Clock {
    pub fn now_calibrated() -> Self {
        let before = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        let after = clock_ns(libc::CLOCK_MONOTONIC);
        let mono = before + (after - before) / 2;
        Self {
            offset_ns: real - mono,
        }
    }

    /// A clock with a known offset, for tests.
    pub fn with_offset_ns(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    pub fn recalibrate(&mut self) {
        *self = Self::now_calibrated();
    }

    pub fn mono_ns_to_unix_us(&self, mono_ns: u64) -> u64 {
        let unix_ns = i128::from(mono_ns) + self.offset_ns;
        u64::try_from(unix_ns.max(0) / 1000).unwrap_or(u64::MAX)
    }
}

/// Clock `clock` now, in nanoseconds.
pub(crate) fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; the clocks asked for (realtime, monotonic, the
    // process's CPU time) exist on every Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Longest value kept for tags that come from traffic, so a hostile request cannot make spans
/// (and the collector's storage) large.
const MAX_TAG_VALUE: usize = 256;

/// Builds the span of one finished exchange.
pub fn span_of(exchange: &Exchange, conn: &ConnInfo, identity: &Identity, clock: &Clock) -> Span {
    match exchange {
        Exchange::Http(e) => span_from_http(e, conn, identity, clock),
        Exchange::Db(e) => span_from_db(e, conn, identity, clock),
    }
}

/// Builds the span of one database call: named for the operation and its main object
/// (`SELECT cats`, `GET`), with the statement as the parser left it (literals and arguments
/// already replaced by `?`).
pub fn span_from_db(
    exchange: &DbExchange,
    conn: &ConnInfo,
    identity: &Identity,
    clock: &Clock,
) -> Span {
    let (system, system_upper) = match exchange.system {
        DbSystem::Postgresql => ("postgresql", "POSTGRESQL"),
        DbSystem::Redis => ("redis", "REDIS"),
    };
    let mut tags = Tags::new();
    tags.insert("db.system", system);
    if exchange.operation.is_empty() {
        tags.insert("db.operation", system_upper);
    } else {
        tags.insert_bounded("db.operation", &exchange.operation, MAX_TAG_VALUE);
    }
    let operation = &tags["db.operation"];
    let target_len = exchange
        .target
        .as_ref()
        .map_or(0, |t| 1 + t.len().min(MAX_TAG_VALUE + 3));
    let mut name = String::with_capacity(operation.len() + target_len);
    name.push_str(operation);
    if let Some(target) = &exchange.target {
        name.push(' ');
        push_bounded(&mut name, target, MAX_TAG_VALUE);
    }
    if !exchange.statement.is_empty() {
        tags.insert_bounded("db.statement", &exchange.statement, 2048);
    }
    if let Some(target) = &exchange.target {
        tags.insert_bounded("db.sql.table", target, MAX_TAG_VALUE);
    }
    tags.insert_int("db.request.size", exchange.req_bytes);
    tags.insert_int("db.response.size", exchange.resp_bytes);
    match (&exchange.error, &exchange.outcome) {
        (Some(message), _) => {
            tags.insert_bounded("error", db_error_without_values(message), MAX_TAG_VALUE);
        }
        (None, Outcome::Closed { reset: true }) => tags.insert("error", "connection reset"),
        (None, Outcome::Closed { reset: false }) => {
            tags.insert("error", "connection closed before response");
        }
        (None, Outcome::Complete) => {}
    }
    let remote_service = (exchange.side == Side::Client).then(|| match exchange.system {
        DbSystem::Postgresql => POSTGRESQL.clone(),
        DbSystem::Redis => REDIS.clone(),
    });
    let times = (exchange.req_start_ns, exchange.end_ns);
    assemble(
        name,
        tags,
        remote_service,
        exchange.side,
        times,
        conn,
        identity,
        clock,
    )
}

/// The remote service of database calls, shared by all their spans.
static POSTGRESQL: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("postgresql"));
static REDIS: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("redis"));

/// A server's error message without the request values some errors quote: Redis's
/// "ERR unknown command 'x', with args beginning with: 'secret'" and PostgreSQL's
/// `invalid input syntax for type integer: "secret"` keep only the part before the value.
/// (PostgreSQL also quotes names, as in `relation "cats" does not exist`: those stay.)
fn db_error_without_values(message: &str) -> &str {
    if let Some(i) = message.find(", with args beginning with") {
        return &message[..i];
    }
    if message.contains("invalid input ")
        && let Some(i) = message.rfind(": \"")
    {
        return &message[..i];
    }
    message
}

/// Builds the span of one HTTP/1.x exchange.
pub fn span_from_http(
    exchange: &HttpExchange,
    conn: &ConnInfo,
    identity: &Identity,
    clock: &Clock,
) -> Span {
    let (path, query) = split_target(exchange.target());
    let name = match &*exchange.method {
        // CONNECT's target is host:port, an address rather than a route.
        "CONNECT" => "CONNECT".to_string(),
        method => {
            // Folding may lengthen a path (`/1` is `/{id}`), not much past FOLD_MAX: a segment
            // of 32 bytes or more is an id.
            let folded = (3 * path.len()).min(FOLD_MAX + 40);
            let mut name = String::with_capacity(method.len() + 1 + folded);
            name.push_str(method);
            name.push(' ');
            fold_path_into(&mut name, path);
            name
        }
    };
    let mut tags = Tags::new();
    tags.insert_bounded("http.method", &exchange.method, MAX_TAG_VALUE);
    tags.insert_bounded("http.path", path, MAX_TAG_VALUE);
    if !query.is_empty() {
        tags.insert_with("http.query", |text| {
            let start = text.len();
            push_redacted_query(text, query);
            cut_from(text, start, MAX_TAG_VALUE);
        });
    }
    if let Some(host) = exchange.header("host") {
        tags.insert_bounded("http.host", host, MAX_TAG_VALUE);
    }
    if let Some(status) = exchange.status {
        tags.insert_int("http.status_code", status);
    }
    tags.insert_int("http.request.size", exchange.req_bytes);
    tags.insert_int("http.response.size", exchange.resp_bytes);
    match http_error(exchange) {
        Some(HttpError::Message(message)) => tags.insert("error", message),
        Some(HttpError::Status(status)) => tags.insert_int("error", status),
        None => {}
    }
    // The server's name is not known from here; its host name (without the port) is what
    // Zipkin's dependency graph can use.
    let remote_service = match exchange.side {
        Side::Server => None,
        Side::Client => exchange
            .header("host")
            .map(|h| host_service(host_without_port(h))),
    };
    let times = (exchange.req_start_ns, exchange.end_ns);
    assemble(
        name,
        tags,
        remote_service,
        exchange.side,
        times,
        conn,
        identity,
        clock,
    )
}

/// The part of every span that comes from the connection, the process and the identity:
/// kind, endpoints, time, and the process and link tags.
#[allow(clippy::too_many_arguments)]
fn assemble(
    name: String,
    mut tags: Tags,
    remote_service: Option<Arc<str>>,
    side: Side,
    (start, end): (u64, u64),
    conn: &ConnInfo,
    identity: &Identity,
    clock: &Clock,
) -> Span {
    tags.insert_int("process.pid", conn.pid);
    tags.insert("process.command", &conn.comm);
    if let Some(seq) = conn.request_seq {
        tags.insert_with(LINK_TAG, |text| {
            push_link_key(text, side, conn.local, conn.remote, seq);
        });
    }
    let end = end.max(start);
    Span {
        trace_id: identity.trace_id,
        id: identity.span_id,
        parent_id: identity.parent_id,
        kind: match side {
            Side::Server => SpanKind::Server,
            Side::Client => SpanKind::Client,
        },
        name,
        timestamp: clock.mono_ns_to_unix_us(start),
        duration: ((end - start) / 1000).max(1),
        local_endpoint: Endpoint::new(Some(conn.service_name.clone()), conn.local),
        remote_endpoint: Some(Endpoint::new(remote_service, conn.remote)),
        tags,
    }
}

/// Tag carrying [`link_key`]: the relay (`tracer collect`) joins a SERVER span to the CLIENT
/// span with the same key, and removes the tag before spans reach Zipkin.
pub const LINK_TAG: &str = "tracer.link";

/// The same string on both ends of a connection for the same request: the client's and the
/// server's address (IPv4-mapped addresses as IPv4) and the TCP sequence number of the
/// request's first byte, which both kernels report for that byte.
pub fn link_key(side: Side, local: SocketAddr, remote: SocketAddr, seq: u32) -> String {
    let mut key = String::with_capacity(64);
    push_link_key(&mut key, side, local, remote, seq);
    key
}

/// Appends [`link_key`] to `out`.
fn push_link_key(out: &mut String, side: Side, local: SocketAddr, remote: SocketAddr, seq: u32) {
    let (client, server) = match side {
        Side::Server => (remote, local),
        Side::Client => (local, remote),
    };
    push_socket_addr(out, client);
    out.push('>');
    push_socket_addr(out, server);
    out.push('#');
    out.push_str(itoa::Buffer::new().format(seq));
}

/// Appends `addr` as `Display` would, with IPv4-mapped IPv6 addresses as IPv4. IPv4, the
/// common case, is written without the formatting machinery (this runs for every span).
fn push_socket_addr(out: &mut String, addr: SocketAddr) {
    use std::fmt::Write as _;
    let v4 = match addr.ip() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    match v4 {
        Some(v4) => {
            push_ipv4(out, v4);
            out.push(':');
            out.push_str(itoa::Buffer::new().format(addr.port()));
        }
        None => {
            let _ = write!(out, "{addr}");
        }
    }
}

fn push_ipv4(out: &mut String, ip: std::net::Ipv4Addr) {
    out.push_str(ipv4_text(ip).as_str());
}

/// `ip` as `Display` writes it.
fn ipv4_text(ip: std::net::Ipv4Addr) -> Ipv4Text {
    let mut text = [0u8; 16];
    let mut len = 0;
    for octet in ip.octets() {
        let (digits, n) = OCTET_TEXT[usize::from(octet)];
        text[len..len + 4].copy_from_slice(&digits);
        len += usize::from(n);
    }
    // Less the last octet's dot.
    Ipv4Text { text, len: len - 1 }
}

/// IPv4 text on the stack: at most 15 bytes ("255.255.255.255").
struct Ipv4Text {
    text: [u8; 16],
    len: usize,
}

impl Ipv4Text {
    fn as_bytes(&self) -> &[u8] {
        &self.text[..self.len]
    }

    fn as_str(&self) -> &str {
        debug_assert!(
            self.as_bytes()
                .iter()
                .all(|&b| b == b'.' || b.is_ascii_digit())
        );
        // SAFETY: the bytes are ASCII, digits and dots from `OCTET_TEXT`. (Checking cost a
        // third of writing a link key's address.)
        unsafe { std::str::from_utf8_unchecked(self.as_bytes()) }
    }
}

/// Each octet's decimal digits and a dot, as four bytes, and how many of them are used. The
/// addresses of every span are written as text three times (two endpoints, the link key):
/// formatting each octet with its own small copies was most of an endpoint's cost, a table
/// entry is one 4-byte copy.
static OCTET_TEXT: [([u8; 4], u8); 256] = {
    let mut table = [([0u8; 4], 0u8); 256];
    let mut i = 0;
    while i < 256 {
        let (h, t, u) = ((i / 100) as u8, (i / 10 % 10) as u8, (i % 10) as u8);
        table[i] = if i >= 100 {
            ([b'0' + h, b'0' + t, b'0' + u, b'.'], 4)
        } else if i >= 10 {
            ([b'0' + t, b'0' + u, b'.', 0], 3)
        } else {
            ([b'0' + u, b'.', 0, 0], 2)
        };
        i += 1;
    }
    table
};

/// Zipkin's `error` tag of an HTTP exchange.
enum HttpError {
    Message(&'static str),
    /// A 5xx, tagged with its number.
    Status(u16),
}

/// Why the exchange failed: a 5xx, or a connection that ended early.
fn http_error(exchange: &HttpExchange) -> Option<HttpError> {
    match (&exchange.outcome, exchange.status) {
        (Outcome::Closed { reset: true }, _) => Some(HttpError::Message("connection reset")),
        (Outcome::Closed { reset: false }, None) => {
            Some(HttpError::Message("connection closed before response"))
        }
        (Outcome::Closed { reset: false }, Some(s)) if s >= 500 => Some(HttpError::Status(s)),
        (Outcome::Closed { reset: false }, Some(_)) => {
            Some(HttpError::Message("connection closed during response"))
        }
        (Outcome::Complete, Some(s)) if s >= 500 => Some(HttpError::Status(s)),
        (Outcome::Complete, _) => None,
    }
}

/// The service name of a Host header's host: bounded, lowercase.
fn host_service(host: &str) -> Arc<str> {
    // Nearly always short and lowercase already: then it is the name as it is.
    if host.len() <= MAX_TAG_VALUE
        && host
            .bytes()
            .all(|b| b.is_ascii() && !b.is_ascii_uppercase())
    {
        return Arc::from(host);
    }
    let mut bounded = String::new();
    push_bounded(&mut bounded, host, MAX_TAG_VALUE);
    Arc::from(bounded.to_lowercase())
}

fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

/// Splits a request-target into path and query. An absolute-form target (a request to a
/// proxy) gives its path; the fragment, never sent by browsers but possible, is dropped.
fn split_target(target: &str) -> (&str, &str) {
    let mut rest = target;
    // Absolute form (to a proxy): the path starts after the authority. An origin-form target
    // (starting with '/') is not searched: a "://" in its query is no scheme.
    if !rest.starts_with('/')
        && let Some(i) = rest.find("://")
    {
        let after = &rest[i + 3..];
        rest = after.find('/').map_or("/", |j| &after[j..]);
    }
    let (path, query) = match memchr::memchr2(b'?', b'#', rest.as_bytes()) {
        Some(i) if rest.as_bytes()[i] == b'?' => {
            let query = &rest[i + 1..];
            (&rest[..i], query.split('#').next().unwrap_or(query))
        }
        Some(i) => (&rest[..i], ""),
        None => (rest, ""),
    };
    (if path.is_empty() { "/" } else { path }, query)
}

/// Appends `s` cut to `max` bytes on a character boundary, with `...` when cut.
fn push_bounded(out: &mut String, s: &str, max: usize) {
    let start = out.len();
    out.push_str(s);
    cut_from(out, start, max);
}

/// Cuts what `out` holds past `start` to `max` bytes on a character boundary, with `...` when
/// cut.
fn cut_from(out: &mut String, start: usize, max: usize) {
    if out.len() - start <= max {
        return;
    }
    let mut end = start + max;
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    out.truncate(end);
    out.push_str("...");
}

/// Replaces path segments that look like identifiers with `{id}`: the span name is a route,
/// not a request (`GET /users/42` and `GET /users/43` are one operation).
pub fn fold_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len().min(FOLD_MAX));
    fold_path_into(&mut out, path);
    out
}

/// A folded path is cut (with `...`) once it is longer than this.
const FOLD_MAX: usize = 128;

/// Appends [`fold_path`] to `out`.
fn fold_path_into(out: &mut String, path: &str) {
    let start = out.len();
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if out.len() - start > FOLD_MAX {
            out.push_str("...");
            break;
        }
        if looks_like_id(segment) {
            out.push_str("{id}");
        } else {
            out.push_str(segment);
        }
    }
}

fn looks_like_id(segment: &str) -> bool {
    let s = segment.as_bytes();
    if s.is_empty() {
        return false;
    }
    let digits = s.iter().filter(|b| b.is_ascii_digit()).count();
    // Numbers, also signed or decimal (`-1`, `3.14`).
    if digits > 0
        && s.iter()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_' | b','))
    {
        return true;
    }
    // Hex identifiers and UUIDs: hashes, object ids, commit ids.
    let hexish = s.iter().all(|b| b.is_ascii_hexdigit() || *b == b'-');
    if hexish && digits > 0 && s.iter().filter(|b| b.is_ascii_hexdigit()).count() >= 8 {
        return true;
    }
    // Long tokens mixing letters and digits: base64 ids, session tokens, slugs with ids.
    s.len() >= 16 && digits > 0 && s.iter().any(u8::is_ascii_alphabetic) && !s.contains(&b'.')
        || s.len() >= 32
        // Percent-encoded data is payload, not route.
        || s.iter().filter(|b| **b == b'%').count() >= 3
}

/// Query parameters whose values are secrets. Matched as a substring of the lowercased name,
/// so `access_token`, `X-Api-Key` and `client_secret` are all caught.
const SECRET_PARAMS: [&str; 11] = [
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "auth",
    "key",
    "session",
    "signature",
    "sig",
    "credential",
];

/// The query with the values of secret-looking parameters replaced by `REDACTED`; what users
/// put in URLs (`?api_key=...`) must not reach the collector.
pub fn redact_query(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    push_redacted_query(&mut out, query);
    out
}

/// Appends [`redact_query`] to `out`.
fn push_redacted_query(out: &mut String, query: &str) {
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((name, _)) if is_secret_name(name) => {
                out.push_str(name);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
    }
}

/// Whether a lowercase [`SECRET_PARAMS`] entry is within `name`, in any ASCII case (a
/// lowercased copy per query parameter was an allocation each).
fn is_secret_name(name: &str) -> bool {
    let name = name.as_bytes();
    SECRET_PARAMS.iter().any(|secret| {
        name.windows(secret.len())
            .any(|w| w.eq_ignore_ascii_case(secret.as_bytes()))
    })
}

/// One human-readable line for the live view on stdout.
pub fn text_line(span: &Span) -> String {
    let secs = span.timestamp / 1_000_000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let ms = (span.timestamp / 1000) % 1000;
    let service = span.local_endpoint.service_name.as_deref().unwrap_or("?");
    let pid = span.tags.get("process.pid").unwrap_or("?");
    let kind = match span.kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
    };
    let status = span.tags.get("http.status_code").unwrap_or("-");
    let peer = span.remote_endpoint.as_ref().map_or_else(
        || "-".to_string(),
        |r| match (r.ip(), r.port) {
            (Some(ip @ IpAddr::V6(_)), Some(port)) => format!("[{ip}]:{port}"),
            (Some(ip), Some(port)) => format!("{ip}:{port}"),
            (Some(ip), None) => ip.to_string(),
            _ => "-".into(),
        },
    );
    let error = span
        .tags
        .get("error")
        .map(|e| format!("  error={e}"))
        .unwrap_or_default();
    format!(
        "{h:02}:{m:02}:{s:02}.{ms:03}  {service}[{pid}]  {kind:<6}  {}  {status}  {}  {peer}  trace={:032x}{error}",
        span.name,
        format_duration(span.duration),
        span.trace_id,
    )
}

fn format_duration(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}us"),
        1_000..1_000_000 => format!("{:.2}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::RequestText;

    #[test]
    fn direct_json_is_serde_json() {
        let mut spans = vec![tests_support::span()];
        let mut odd = tests_support::span();
        odd.parent_id = Some(7);
        odd.kind = SpanKind::Client;
        odd.name = "GET /\"quoted\"\\back\u{1}ctl\ttab é ☃ \u{7f}".into();
        odd.local_endpoint = Endpoint::new(None, "[2001:db8::1]:0".parse().unwrap());
        odd.remote_endpoint = None;
        odd.tags.insert("error", "line\nbreak");
        odd.tags.insert("http.path", "");
        // Replaced: its first value stays in the buffer, unused.
        odd.tags.insert("http.method", "POST");
        spans.push(odd);
        let mut bare = tests_support::span();
        bare.tags = Tags::new();
        bare.local_endpoint = Endpoint::new(None, "0.0.0.0:0".parse().unwrap());
        spans.push(bare);
        for span in &spans {
            let mut direct = Vec::new();
            span.write_json(&mut direct);
            assert_eq!(
                String::from_utf8(direct).unwrap(),
                serde_json::to_string(span).unwrap()
            );
        }
    }

    #[test]
    fn tags_keep_first_set_order_and_replace_values() {
        let mut tags = Tags::new();
        tags.insert("b", "1");
        tags.insert_int("a", 42u16);
        tags.insert("c", "three");
        tags.insert("b", "two");
        tags.insert_bounded("d", &"é".repeat(10), 5);
        tags.insert("e", "");
        let want = [
            ("b", "two"),
            ("a", "42"),
            ("c", "three"),
            ("d", "éé..."),
            ("e", ""),
        ];
        assert_eq!(tags.iter().collect::<Vec<_>>(), want);
        assert_eq!((tags.get("b"), &tags["a"]), (Some("two"), "42"));
        // The same name at another address is the same name.
        assert_eq!(tags.get(&String::from("c")), Some("three"));
        assert!(tags.contains_key("e") && !tags.contains_key("f"));
        assert_eq!(tags.get("f"), None);
        assert_eq!(
            serde_json::to_string(&tags).unwrap(),
            r#"{"b":"two","a":"42","c":"three","d":"éé...","e":""}"#
        );
        assert_eq!(
            format!("{tags:?}"),
            r#"{"b": "two", "a": "42", "c": "three", "d": "éé...", "e": ""}"#
        );
        // Equal to tags set once each: the replaced value's bytes do not count.
        let mut fresh = Tags::new();
        for (name, value) in want {
            fresh.insert(name, value);
        }
        assert_eq!(tags, fresh);
        fresh.insert("e", "x");
        assert_ne!(tags, fresh);
    }

    #[test]
    fn long_queries_are_redacted_then_cut() {
        let query = format!("TOKEN=abc&X-Api-Key=k&q={}", "é".repeat(200));
        let e = exchange(
            Side::Server,
            "GET",
            &format!("/s?{query}"),
            Some(200),
            Outcome::Complete,
        );
        let redacted = redact_query(&query);
        assert!(redacted.starts_with("TOKEN=REDACTED&X-Api-Key=REDACTED&q=éé"));
        let mut end = MAX_TAG_VALUE;
        while !redacted.is_char_boundary(end) {
            end -= 1;
        }
        assert_eq!(
            &build(&e).tags["http.query"],
            format!("{}...", &redacted[..end])
        );
    }

    #[test]
    fn escaping_is_found_at_every_position() {
        // Every byte next to one that is escaped, and bytes with the high bit set.
        let plain = "abcdefghijklmnopqrstuvwxyz0123456789/é-_.:?=&ABC !#[]DEFGHIJKLMNOPQRSTUVWXYZ\u{7f}\u{ff}";
        for len in 0..plain.len() {
            assert!(!needs_escaping(&plain.as_bytes()[..len]));
            for pos in 0..len {
                for bad in [b'"', b'\\', 0, b'\n', 0x1f] {
                    let mut bytes = plain.as_bytes()[..len].to_vec();
                    bytes[pos] = bad;
                    assert!(needs_escaping(&bytes), "{len} {pos} {bad}");
                }
                let mut bytes = plain.as_bytes()[..len].to_vec();
                bytes[pos] = 0x7f;
                assert!(!needs_escaping(&bytes), "DEL is not escaped");
            }
        }
    }

    #[test]
    fn ids_are_zero_padded_lowercase_hex() {
        for v in [
            0u128,
            1,
            0xabc,
            u128::from(u64::MAX),
            u128::MAX,
            0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
        ] {
            assert_eq!(hex_digits::<32>(v), *format!("{v:032x}").as_bytes());
            let low = v as u64;
            assert_eq!(
                hex_digits::<16>(u128::from(low)),
                *format!("{low:016x}").as_bytes()
            );
        }
    }

    fn exchange(
        side: Side,
        method: &str,
        target: &str,
        status: Option<u16>,
        outcome: Outcome,
    ) -> HttpExchange {
        HttpExchange {
            side,
            method: method.to_owned().into(),
            request: RequestText::new(
                target,
                &[
                    ("host", "cats.example:8080"),
                    ("authorization", "Bearer s3cret"),
                    ("cookie", "session=abc"),
                ],
            ),
            minor_version: 1,
            status,
            req_start_ns: 1_000_000,
            req_offset: 0,
            req_end_ns: 1_100_000,
            resp_start_ns: Some(2_000_000),
            end_ns: 3_500_000,
            req_bytes: 120,
            resp_bytes: 4_000,
            outcome,
        }
    }

    fn conn() -> ConnInfo {
        ConnInfo {
            pid: 4242,
            comm: "python3".into(),
            service_name: "cats-api".into(),
            local: "127.0.0.1:8080".parse().unwrap(),
            remote: "127.0.0.1:51000".parse().unwrap(),
            request_seq: None,
        }
    }

    fn identity() -> Identity {
        Identity {
            trace_id: 0x0af7651916cd43dd8448eb211c80319c,
            span_id: 0xb7ad6b7169203331,
            parent_id: None,
            sampled: true,
        }
    }

    fn build(e: &HttpExchange) -> Span {
        span_from_http(
            e,
            &conn(),
            &identity(),
            &Clock::with_offset_ns(1_700_000_000_000_000_000),
        )
    }

    #[test]
    fn server_span_has_zipkin_shape() {
        let span = build(&exchange(
            Side::Server,
            "GET",
            "/users/42?verbose=1",
            Some(200),
            Outcome::Complete,
        ));
        let json: serde_json::Value = serde_json::to_value(&span).unwrap();
        assert_eq!(json["traceId"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(json["id"], "b7ad6b7169203331");
        assert!(json.get("parentId").is_none());
        assert_eq!(json["kind"], "SERVER");
        assert_eq!(json["name"], "GET /users/{id}");
        assert_eq!(json["timestamp"], 1_700_000_000_001_000u64);
        assert_eq!(json["duration"], 2_500);
        assert_eq!(
            json["localEndpoint"],
            serde_json::json!({"serviceName": "cats-api", "ipv4": "127.0.0.1", "port": 8080})
        );
        assert_eq!(
            json["remoteEndpoint"],
            serde_json::json!({"ipv4": "127.0.0.1", "port": 51000})
        );
        assert_eq!(json["tags"]["http.method"], "GET");
        assert_eq!(json["tags"]["http.path"], "/users/42");
        assert_eq!(json["tags"]["http.query"], "verbose=1");
        assert_eq!(json["tags"]["http.status_code"], "200");
        assert_eq!(json["tags"]["process.pid"], "4242");
        assert_eq!(json["tags"]["process.command"], "python3");
        assert!(json["tags"].get("error").is_none());
    }

    #[test]
    fn credentials_and_bodies_never_leave() {
        let span = build(&exchange(
            Side::Client,
            "POST",
            "/login?user=bob&password=hunter2&api_key=xyz",
            Some(200),
            Outcome::Complete,
        ));
        let text = serde_json::to_string(&span).unwrap();
        for secret in ["s3cret", "session=abc", "hunter2", "xyz", "Bearer"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(
            &span.tags["http.query"],
            "user=bob&password=REDACTED&api_key=REDACTED"
        );
    }

    #[test]
    fn client_span_names_the_remote_host() {
        let span = build(&exchange(
            Side::Client,
            "GET",
            "/",
            Some(200),
            Outcome::Complete,
        ));
        assert_eq!(span.kind, SpanKind::Client);
        assert_eq!(
            span.remote_endpoint.unwrap().service_name.as_deref(),
            Some("cats.example")
        );
    }

    #[test]
    fn remote_host_names_are_bounded_and_lowercase() {
        let long = "A".repeat(300);
        for (host, want) in [
            ("Cats.EXAMPLE:8080", "cats.example".to_string()),
            ("ÉCOLE.example", "école.example".to_string()),
            ("[::1]:80", "::1".to_string()),
            (&long, format!("{}...", "a".repeat(MAX_TAG_VALUE))),
        ] {
            let mut e = exchange(Side::Client, "GET", "/", Some(200), Outcome::Complete);
            e.request = RequestText::new(
                "/",
                &[
                    ("host", host),
                    ("authorization", "Bearer s3cret"),
                    ("cookie", "session=abc"),
                ],
            );
            let span = build(&e);
            assert_eq!(
                span.remote_endpoint.unwrap().service_name.as_deref(),
                Some(want.as_str())
            );
        }
    }

    #[test]
    fn errors_are_tagged() {
        let five = build(&exchange(
            Side::Server,
            "GET",
            "/x",
            Some(503),
            Outcome::Complete,
        ));
        assert_eq!(&five.tags["error"], "503");
        let four = build(&exchange(
            Side::Server,
            "GET",
            "/x",
            Some(404),
            Outcome::Complete,
        ));
        assert!(!four.tags.contains_key("error"));
        let reset = build(&exchange(
            Side::Client,
            "GET",
            "/x",
            None,
            Outcome::Closed { reset: true },
        ));
        assert_eq!(&reset.tags["error"], "connection reset");
        assert!(!reset.tags.contains_key("http.status_code"));
        let closed = build(&exchange(
            Side::Client,
            "GET",
            "/x",
            None,
            Outcome::Closed { reset: false },
        ));
        assert_eq!(&closed.tags["error"], "connection closed before response");
    }

    #[test]
    fn parent_id_is_lowercase_hex() {
        let e = exchange(Side::Client, "GET", "/", Some(200), Outcome::Complete);
        let id = Identity {
            parent_id: Some(0xABC),
            ..identity()
        };
        let span = span_from_http(&e, &conn(), &id, &Clock::with_offset_ns(0));
        let json = serde_json::to_value(&span).unwrap();
        assert_eq!(json["parentId"], "0000000000000abc");
    }

    #[test]
    fn zero_duration_becomes_one_microsecond() {
        let mut e = exchange(Side::Server, "GET", "/", Some(200), Outcome::Complete);
        e.end_ns = e.req_start_ns + 10;
        assert_eq!(build(&e).duration, 1);
    }

    #[test]
    fn folds_identifiers() {
        let cases = [
            ("/", "/"),
            ("/hello", "/hello"),
            ("/users/42", "/users/{id}"),
            ("/status/500", "/status/{id}"),
            ("/v1/orders/123/items/7", "/v1/orders/{id}/items/{id}"),
            (
                "/objects/550e8400-e29b-41d4-a716-446655440000",
                "/objects/{id}",
            ),
            (
                "/commits/9fceb02d0ae598e95dc970b74767f19372d61af8",
                "/commits/{id}",
            ),
            ("/blobs/deadbeef12", "/blobs/{id}"),
            ("/api/v2/spans", "/api/v2/spans"),
            ("/static/app.js", "/static/app.js"),
            ("/cafe", "/cafe"),
            ("/sessions/aZ9xQ2LmN8pR4sT6", "/sessions/{id}"),
            ("/files/%E2%9C%93%E2%9C%93", "/files/{id}"),
            ("/prices/-3.5", "/prices/{id}"),
        ];
        for (path, want) in cases {
            assert_eq!(fold_path(path), want, "{path}");
        }
    }

    #[test]
    fn span_names_are_the_method_and_the_folded_path() {
        let long_word = format!("/{}", "x".repeat(31)).repeat(10);
        for path in [
            "/",
            "/users/42",
            &"/a".repeat(100),
            &"/1".repeat(100),
            &long_word,
        ] {
            let span = build(&exchange(
                Side::Server,
                "DELETE",
                path,
                Some(200),
                Outcome::Complete,
            ));
            assert_eq!(span.name, format!("DELETE {}", fold_path(path)));
        }
    }

    #[test]
    fn folding_is_bounded() {
        let long = "/a".repeat(10_000);
        assert!(fold_path(&long).len() < 200);
    }

    #[test]
    fn targets_split_into_path_and_query() {
        assert_eq!(split_target("/a?b=1#frag"), ("/a", "b=1"));
        assert_eq!(split_target("http://proxy.example/x/y?z"), ("/x/y", "z"));
        assert_eq!(split_target("http://proxy.example"), ("/", ""));
        assert_eq!(split_target("*"), ("*", ""));
        assert_eq!(
            split_target("/login?next=https://example.com/home"),
            ("/login", "next=https://example.com/home")
        );
        assert_eq!(split_target("/a#frag?not-a-query"), ("/a", ""));
        assert_eq!(split_target("/a?#"), ("/a", ""));
        assert_eq!(split_target(""), ("/", ""));
    }

    #[test]
    fn connect_is_named_without_its_address() {
        let span = build(&exchange(
            Side::Client,
            "CONNECT",
            "db.internal:5432",
            Some(200),
            Outcome::Complete,
        ));
        assert_eq!(span.name, "CONNECT");
    }

    #[test]
    fn endpoints_are_written_as_zipkin_reads_them() {
        for (name, addr, want) in [
            (
                Some("a"),
                "10.0.0.1:80",
                r#"{"serviceName":"a","ipv4":"10.0.0.1","port":80}"#,
            ),
            (
                None,
                "[::ffff:10.0.0.7]:9",
                r#"{"ipv4":"10.0.0.7","port":9}"#,
            ),
            (None, "[2001:db8::1]:0", r#"{"ipv6":"2001:db8::1"}"#),
            (Some("b"), "[::]:443", r#"{"serviceName":"b","port":443}"#),
            (None, "[::ffff:0.0.0.0]:0", "{}"),
            (
                Some("q\"uote"),
                "0.0.0.0:1",
                r#"{"serviceName":"q\"uote","port":1}"#,
            ),
        ] {
            let e = Endpoint::new(name.map(Arc::from), addr.parse().unwrap());
            assert_eq!(serde_json::to_string(&e).unwrap(), want, "{addr}");
            let mut direct = Vec::new();
            e.write_json(&mut direct);
            assert_eq!(String::from_utf8(direct).unwrap(), want, "{addr}");
        }
    }

    #[test]
    fn ipv4_text_is_what_display_writes() {
        for octet in 0..=255u8 {
            for ip in [
                [octet, 0, 0, 0],
                [0, octet, 1, 2],
                [10, 20, octet, 255],
                [255, 9, 99, octet],
                [octet; 4],
            ] {
                let ip = std::net::Ipv4Addr::from(ip);
                assert_eq!(ipv4_text(ip).as_str(), ip.to_string());
            }
        }
    }

    #[test]
    fn mapped_ipv6_is_reported_as_ipv4() {
        let e = Endpoint::new(None, "[::ffff:10.1.2.3]:80".parse().unwrap());
        assert_eq!(
            (e.ipv4().as_deref(), e.ipv6().as_deref()),
            (Some("10.1.2.3"), None)
        );
        let e = Endpoint::new(None, "[2001:db8::1]:80".parse().unwrap());
        assert_eq!(e.ipv6().as_deref(), Some("2001:db8::1"));
        let e = Endpoint::new(None, "0.0.0.0:0".parse().unwrap());
        assert_eq!((e.ipv4(), e.port), (None, None));
    }

    #[test]
    fn long_tag_values_are_cut_on_char_boundaries() {
        let mut e = exchange(Side::Server, "GET", "/", Some(200), Outcome::Complete);
        e.request = RequestText::new(
            "/",
            &[
                ("authorization", "Bearer s3cret"),
                ("cookie", "session=abc"),
                ("host", &"é".repeat(500)),
            ],
        );
        let span = build(&e);
        assert!(span.tags["http.host"].len() <= MAX_TAG_VALUE + 3);
    }

    #[test]
    fn both_ends_compute_the_same_link_key() {
        let server = link_key(
            Side::Server,
            "10.0.0.2:80".parse().unwrap(),
            "[::ffff:10.0.0.1]:5000".parse().unwrap(),
            77,
        );
        let client = link_key(
            Side::Client,
            "10.0.0.1:5000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            77,
        );
        assert_eq!(server, client);
        assert_eq!(server, "10.0.0.1:5000>10.0.0.2:80#77");
        let mut info = conn();
        info.request_seq = Some(5);
        let e = exchange(Side::Server, "GET", "/", Some(200), Outcome::Complete);
        let span = span_from_http(&e, &info, &identity(), &Clock::with_offset_ns(0));
        assert_eq!(&span.tags[LINK_TAG], "127.0.0.1:51000>127.0.0.1:8080#5");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for addr in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.213.0.1:8080",
            "1.20.100.9:10",
            "127.0.0.1:18080",
            "[::1]:443",
            "[2001:db8::1]:80",
            "[::ffff:192.168.1.20]:5432",
        ] {
            let a: SocketAddr = addr.parse().unwrap();
            let mut fast = String::new();
            push_socket_addr(&mut fast, a);
            let canonical = match a.ip() {
                IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
                IpAddr::V4(_) => a,
            };
            assert_eq!(fast, canonical.to_string());
        }
        let e = Endpoint::new(None, "[::ffff:10.0.0.7]:9".parse().unwrap());
        assert_eq!((e.ipv4().as_deref(), e.port), (Some("10.0.0.7"), Some(9)));
    }

    #[test]
    fn text_line_reads_well() {
        let span = build(&exchange(
            Side::Server,
            "GET",
            "/users/42",
            Some(200),
            Outcome::Complete,
        ));
        let line = text_line(&span);
        assert!(
            line.contains("cats-api[4242]  SERVER  GET /users/{id}  200  2.50ms  127.0.0.1:51000"),
            "{line}"
        );
    }
}

/// A plausible span for tests of later stages (the exporters).
#[cfg(test)]
pub mod tests_support {
    use super::*;

    pub fn span() -> Span {
        Span {
            trace_id: 0x0af7651916cd43dd8448eb211c80319c,
            id: 0xb7ad6b7169203331,
            parent_id: None,
            kind: SpanKind::Server,
            name: "GET /hello".into(),
            timestamp: 1_700_000_000_000_000,
            duration: 1_234,
            local_endpoint: Endpoint::new(Some("cats".into()), "127.0.0.1:8080".parse().unwrap()),
            remote_endpoint: Some(Endpoint::new(None, "127.0.0.1:50000".parse().unwrap())),
            tags: {
                let mut t = Tags::new();
                t.insert("http.method", "GET");
                t
            },
        }
    }
}
