//! PostgreSQL frontend/backend protocol (3.x) query/response matching for one connection.
//!
//! Each direction is walked by a streaming framer (`Framer`) that reads the 5-byte header of a
//! message (type byte and big-endian length; startup packets have no type byte) and then
//! skips the body by count, keeping only a bounded prefix of the messages that matter: query
//! text (`KEEP_TEXT`), statement and portal names, the fields of an ErrorResponse. Password,
//! SASL and GSS messages are skipped without keeping a byte. Bytes past the captured `head`
//! of a syscall are skipped by `len` while they fall inside a body whose length is known, and
//! read from the syscall's `tail` once all that is left of it lies there.
//!
//! Detection is from the bytes, not the port: the first bytes a client writes are a startup
//! packet (StartupMessage 3.x, SSLRequest, GSSENCRequest, CancelRequest) or, when we attach
//! to a connection in progress, frontend messages whose structure checks out (a Query with
//! NUL-terminated SQL-looking text, or Parse/Bind/Describe/Execute/Sync). The side is the
//! writer's: Client when the traced process wrote them, Server when it read them. Small
//! leading syscalls are gathered (`PROBE_MAX`) so a message split across writes is still
//! recognised; other protocols give up after `SEARCH_MAX_SEGMENTS` (HTTP and TLS at once).
//!
//! The backend answers frontend messages strictly in order, so the messages that expect an
//! answer wait in a FIFO of units (`Unit`) and every backend message is checked against what
//! the oldest unit may receive; anything else means the pairing is off, and matching stops
//! until it is safe again (see below). Exchanges reported:
//! - Simple query `Q`: one exchange per Query message, from its first byte to ReadyForQuery.
//!   A Query holding several statements (`BEGIN; INSERT ...; COMMIT`) is one exchange: the
//!   statement shows them all (normalized), the operation and target are those of the first.
//! - Extended query: one exchange per Execute `E`, named after the statement its portal was
//!   bound to (Parse texts are remembered per statement name, bounded). Its request runs from
//!   the first message of its group (Parse/Bind/Describe since the previous Execute or Sync)
//!   to the Execute; its response from the group's first answer (ParseComplete...) to the
//!   CommandComplete, EmptyQueryResponse, PortalSuspended or ErrorResponse that ends it.
//!   Sync and its ReadyForQuery belong to no exchange. Pipelines pair in order.
//! - After an ErrorResponse the backend skips every message until Sync. The error is given to
//!   the Execute whose group failed (a failed Parse or Bind fails the query it prepared); the
//!   Executes skipped after it are reported as errors too, with `SKIPPED_ERROR`, never as
//!   successes: the application did ask for them and got none of their results.
//! - Parse(s) then Sync with no Execute in between (a prepare, e.g. libpq `PQprepare`) is one
//!   exchange with operation `PREPARE`, the statement being the prepared text; it ends at
//!   ReadyForQuery. A Describe or Close alone reports nothing.
//! - COPY: CopyIn/CopyOut/CopyBoth responses and CopyData/CopyDone/CopyFail are framed like
//!   any message and belong to the exchange of the COPY statement (the client's copy data
//!   count in its request bytes).
//! - `error` is `SQLSTATE: message` (the C and M fields, e.g. `42P01: relation "nope" does not
//!   exist`): the code tells the kind of failure even when the message is localized. When the
//!   capture kept neither field it is `UNCAPTURED_ERROR`. The message is the server's: it may
//!   quote a value (`invalid input syntax for type integer: "abc"`); redaction, if wanted, is
//!   the span builder's job, as for HTTP targets.
//! - statement = `sql::normalize_sql` of the text (literals become `?`, bound parameters stay
//!   `$n`; parameter values are never read), operation = `sql::sql_operation`, target =
//!   `sql::sql_target`. A statement prepared before we attached is `EXECUTE name`.
//! - Startup, SSLRequest answered `N`, authentication, ParameterStatus, BackendKeyData,
//!   NoticeResponse and NotificationResponse report nothing. An SSLRequest (or GSSENCRequest)
//!   answered `S` (`G`) means TLS (GSS encryption) follows: the connection is given up.
//!
//! Never mis-pairing: when a response cannot be framed (its message headers fell in bytes the
//! capture did not keep), or a backend message is not one the oldest unit may receive, every
//! waiting unit is dropped (`Sync::Desync`); the exchange whose response was under way is kept
//! (`blind`) and ends, Complete, with the last response bytes seen (Closed if the connection
//! closes before the backend was seen idle). Matching starts again when
//! the backend is known idle: a response syscall ended with ReadyForQuery and the client then
//! writes a new request that starts like a message. When the one dropped unit was the only one
//! waiting for a ReadyForQuery, the ReadyForQuery that ends a response syscall completes it at
//! once (a large result whose rows were not captured). A run of request bytes that cannot be
//! framed is queued as `Unit::Unknown`: the units before it are still matched; when responses
//! reach it, matching stops as above. One exception keeps ORMs' long statements: a write
//! whose Parse or Bind was cut by the capture but whose tail shows it ends with an unnamed
//! Execute and a Sync is taken as one group (`Unit::Guess`), and its responses must have the
//! shape of one group or matching stops. A client that pipelines more requests while a
//! response it sent before is still unframable can still defeat this, as with any capture
//! loss; clients that wait for ReadyForQuery (psql, most drivers outside pipeline mode) cannot.
//! Likewise, when we attach mid-stream, a reply to a request written before we attached is
//! paired with the first request we saw only if the client pipelined and the reply has the
//! shape that request expects.
//!
//! When the tracer knows it stopped capturing for a while (`gap`), both directions lose framing
//! at once: every waiting unit is dropped (`Sync::Desync`, no `blind`: where the response under
//! way ended went unseen) and the backend is taken to be idle (`after_gap`): a client that waits
//! for ReadyForQuery writes again only once it has read every earlier response. Since that is
//! assumed rather than seen, the first write resyncs only if its own bytes show frontend
//! messages (the rest of a message begun during the gap must not pass for one); response bytes
//! seen first decide idleness as above instead. The unnamed statement and portal are forgotten,
//! being redefined all the time and so most likely during the gap. A gap before the startup
//! packet (after SSLRequest) starts detection over, as TLS may follow.
//!
//! Memory is bounded per connection: `MAX_UNITS` waiting units (deeper pipelines are counted,
//! not kept: `Unit::Overflow`), `MAX_STATEMENTS` prepared statements and `MAX_PORTALS`
//! portals of at most `MAX_STATEMENT` normalized bytes, one message prefix per direction.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use super::{DbExchange, DbSystem, Direction, Outcome, Segment, Side, sql};

/// Units (messages awaiting an answer) kept in order; past this they are only counted.
const MAX_UNITS: usize = 256;
/// Named prepared statements remembered per connection (oldest forgotten first).
const MAX_STATEMENTS: usize = 256;
/// Named portals remembered per connection.
const MAX_PORTALS: usize = 32;
/// Longest statement or portal name remembered; longer names are treated as unknown.
const MAX_NAME: usize = 64;
/// Query text bytes kept from a Query or Parse message.
const KEEP_TEXT: usize = 4096;
/// Longest normalized statement reported.
const MAX_STATEMENT: usize = 1024;
/// ErrorResponse bytes kept (the SQLSTATE and message come first).
const KEEP_ERROR: usize = 1024;
/// Longest error reported.
const MAX_ERROR: usize = 256;
/// Largest message length accepted (the protocol's length field is a signed 32-bit count).
const MAX_MESSAGE: u32 = i32::MAX as u32;
/// Largest length accepted when guessing that bytes are a frontend message.
const MAX_DETECT: usize = 1 << 24;
/// PostgreSQL refuses startup packets longer than this.
const MAX_STARTUP: u32 = 10_000;
/// While nothing looked like PostgreSQL yet, give up after this many segments or bytes.
const SEARCH_MAX_SEGMENTS: u32 = 8;
const SEARCH_MAX_BYTES: u64 = 64 * 1024;
/// Bytes of small leading segments gathered to recognise a message split across syscalls.
const PROBE_MAX: usize = 64;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

/// The error reported for an Execute the backend skipped after an earlier error.
pub const SKIPPED_ERROR: &str = "skipped: an earlier message before Sync failed";

/// The error reported when the ErrorResponse fields were not captured.
pub const UNCAPTURED_ERROR: &str = "error (message not captured)";

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Does `buf` start like the first bytes a PostgreSQL client sends: a StartupMessage (3.x),
/// an SSLRequest, a GSSENCRequest or a CancelRequest — or, for a connection already in
/// progress, a frontend message sequence (a Query with NUL-terminated text, or
/// Parse/Bind/Describe/Execute/Sync messages whose structure checks out)?
pub fn looks_like_postgres_client_start(buf: &[u8]) -> bool {
    startup_verdict(buf, false) == Verdict::Yes || midstream_verdict(buf, false) == Verdict::Yes
}

/// Does `buf` start with a startup packet (StartupMessage 3.x, SSLRequest, GSSENCRequest or
/// CancelRequest)? The strict half of [`looks_like_postgres_client_start`].
pub fn looks_like_postgres_startup(buf: &[u8]) -> bool {
    startup_verdict(buf, false) == Verdict::Yes
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Yes,
    No,
    /// Too few bytes to tell, and more may come.
    NeedMore,
}

fn startup_verdict(buf: &[u8], more: bool) -> Verdict {
    let wait = if more { Verdict::NeedMore } else { Verdict::No };
    if buf.len() < 8 {
        return wait;
    }
    let len = be32(buf);
    let code = be32(&buf[4..]);
    match code {
        SSL_REQUEST | GSSENC_REQUEST if len == 8 && buf.len() == 8 => Verdict::Yes,
        CANCEL_REQUEST if len == 16 => Verdict::Yes,
        c if c >> 16 == 3 && c & 0xffff <= 2 => {
            if !(9..=MAX_STARTUP).contains(&len) {
                return Verdict::No;
            }
            let end = (len as usize).min(buf.len());
            let params = &buf[8..end];
            let Some(&first) = params.first() else {
                return wait;
            };
            let printable = params.iter().all(|&b| b == 0 || (b >= 0x20 && b != 0x7f));
            if !(first.is_ascii_alphabetic() || first == b'_') || !printable {
                return Verdict::No;
            }
            if end == len as usize && buf[end - 1] != 0 {
                return Verdict::No;
            }
            if params.len() < 8.min(len as usize - 8) {
                return wait;
            }
            Verdict::Yes
        }
        _ => Verdict::No,
    }
}

/// A NUL-terminated string at the start of `b`: (string, rest after the NUL).
fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

fn name_ok(name: &[u8]) -> bool {
    name.len() <= MAX_NAME && name.iter().all(|&b| (0x21..0x7f).contains(&b))
}

/// Plausible SQL text: no control bytes but whitespace, starts like a statement or comment.
fn text_ok(text: &[u8]) -> bool {
    let Some(&first) = text.iter().find(|b| !b.is_ascii_whitespace()) else {
        return false;
    };
    (first.is_ascii_alphabetic() || matches!(first, b'(' | b'/' | b'-'))
        && text
            .iter()
            .all(|&b| b >= 0x20 && b != 0x7f || matches!(b, b'\t' | b'\n' | b'\r'))
}

fn query_body_ok(body: &[u8]) -> bool {
    matches!(cstr(body), Some((text, rest)) if rest.is_empty() && text_ok(text))
}

fn parse_body_ok(body: &[u8]) -> bool {
    let Some((name, rest)) = cstr(body) else {
        return false;
    };
    let Some((text, rest)) = cstr(rest) else {
        return false;
    };
    name_ok(name)
        && text_ok(text)
        && rest.len() >= 2
        && rest.len() == 2 + 4 * usize::from(be16(rest))
}

fn bind_body_ok(body: &[u8]) -> bool {
    fn formats(b: &[u8]) -> Option<&[u8]> {
        let n = usize::from(be16(b.get(..2)?));
        let list = b.get(2..2 + 2 * n)?;
        list.chunks(2)
            .all(|f| be16(f) <= 1)
            .then(|| &b[2 + 2 * n..])
    }
    let check = || -> Option<bool> {
        let (portal, rest) = cstr(body)?;
        let (stmt, rest) = cstr(rest)?;
        let mut rest = formats(rest)?;
        let params = be16(rest.get(..2)?);
        rest = &rest[2..];
        for _ in 0..params {
            let len = be32(rest.get(..4)?);
            rest = &rest[4..];
            if len != u32::MAX {
                rest = rest.get(usize::try_from(len).ok()?..)?;
            }
        }
        let rest = formats(rest)?;
        Some(name_ok(portal) && name_ok(stmt) && rest.is_empty())
    };
    check().unwrap_or(false)
}

/// Does `buf` hold frontend messages of a connection in progress? Every complete message must
/// check out, and at least one must be a Query, Parse, Bind or Execute; a last message cut by
/// the end of `buf` counts when it is a Query or Parse whose text prefix looks like SQL.
fn midstream_verdict(buf: &[u8], more: bool) -> Verdict {
    let mut strong = false;
    let mut rest = buf;
    while !rest.is_empty() {
        if rest.len() < 5 {
            return if more {
                Verdict::NeedMore
            } else if strong {
                Verdict::Yes
            } else {
                Verdict::No
            };
        }
        let kind = rest[0];
        let len = be32(&rest[1..]) as usize;
        let (min, max) = match kind {
            b'Q' => (5, MAX_DETECT),
            b'P' => (8, MAX_DETECT),
            b'B' => (12, MAX_DETECT),
            b'D' | b'C' => (6, 6 + MAX_NAME),
            b'E' => (9, 9 + MAX_NAME),
            b'S' | b'H' => (4, 4),
            _ => return Verdict::No,
        };
        if !(min..=max).contains(&len) {
            return Verdict::No;
        }
        let Some(body) = rest.get(5..1 + len) else {
            if more {
                return Verdict::NeedMore;
            }
            let part = &rest[5..];
            let ok = match kind {
                b'Q' => part.len() >= 8 && !part.contains(&0) && text_ok(part),
                b'P' => match cstr(part) {
                    Some((name, rest)) if name_ok(name) => match cstr(rest) {
                        // The text is whole; parameter types are cut.
                        Some((text, _)) => text_ok(text),
                        None => rest.len() >= 8 && text_ok(rest),
                    },
                    _ => false,
                },
                _ => false,
            };
            return if ok || strong {
                Verdict::Yes
            } else {
                Verdict::No
            };
        };
        let ok = match kind {
            b'Q' => query_body_ok(body),
            b'P' => parse_body_ok(body),
            b'B' => bind_body_ok(body),
            b'D' | b'C' => {
                matches!(body[0], b'S' | b'P')
                    && matches!(cstr(&body[1..]), Some((n, r)) if r.is_empty() && name_ok(n))
            }
            b'E' => matches!(cstr(body), Some((n, r)) if r.len() == 4 && name_ok(n)),
            _ => true,
        };
        if !ok {
            return Verdict::No;
        }
        strong |= matches!(kind, b'Q' | b'P' | b'B' | b'E');
        rest = &rest[1 + len..];
    }
    if strong { Verdict::Yes } else { Verdict::No }
}

/// Other protocols recognised at once, to give up without waiting.
fn clearly_other_protocol(buf: &[u8]) -> bool {
    const PREFIXES: [&[u8]; 10] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"PATCH ",
        b"OPTIONS ",
        b"HTTP/",
        b"PRI * HTTP/2",
        b"\x16\x03",
    ];
    PREFIXES.iter().any(|p| buf.starts_with(p))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Frontend,
    Backend,
}

fn header_ok(role: Role, kind: u8, len: u32) -> bool {
    if !(4..=MAX_MESSAGE).contains(&len) {
        return false;
    }
    match role {
        Role::Frontend => match kind {
            0 => (8..=MAX_STARTUP).contains(&len),
            b'S' | b'H' | b'X' | b'c' => len == 4,
            b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'F' | b'd' | b'f' | b'p' => len > 4,
            _ => false,
        },
        Role::Backend => match kind {
            b'Z' => len == 5,
            b'1' | b'2' | b'3' | b'n' | b'I' | b'c' | b's' => len == 4,
            b'K' => (12..=12 + 256).contains(&len),
            b'R' | b'S' | b'E' | b'N' | b'A' | b'T' | b'D' | b'C' | b't' | b'G' | b'H' | b'W'
            | b'd' | b'V' | b'v' => len > 4,
            _ => false,
        },
    }
}

/// Body bytes kept for each message type; all other bodies are only counted.
fn keep_limit(role: Role, kind: u8) -> usize {
    match (role, kind) {
        (Role::Frontend, 0) => 4,
        (Role::Frontend, b'Q') => KEEP_TEXT,
        (Role::Frontend, b'P') => MAX_NAME + 1 + KEEP_TEXT,
        (Role::Frontend, b'B') => 2 * (MAX_NAME + 1),
        (Role::Frontend, b'D' | b'C') => MAX_NAME + 2,
        (Role::Frontend, b'E') => MAX_NAME + 1,
        (Role::Backend, b'E') => KEEP_ERROR,
        _ => 0,
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum FState {
    /// Reading a header (`Framer::have` bytes of it so far).
    #[default]
    Header,
    /// Inside a body: bytes left.
    Body { left: u64 },
    /// Framing lost.
    Lost,
}

/// Streaming message framer for one direction.
#[derive(Debug, Default)]
struct Framer {
    state: FState,
    /// The next message is a startup packet (no type byte).
    untyped: bool,
    hdr: [u8; 5],
    have: usize,
    /// Type of the current (or last complete) message; 0 for a startup packet.
    kind: u8,
    /// Its size on the wire.
    size: u64,
    /// The kept prefix of its body.
    keep: Vec<u8>,
    keep_max: usize,
    /// When its first byte moved.
    start_ns: u64,
    /// Bytes before its first in the syscall dated `start_ns`.
    start_offset: u64,
    /// Type of the last complete message.
    last: u8,
}

/// The bytes of one segment being framed.
struct Input<'a> {
    head: &'a [u8],
    /// Where `head` begins in the segment's bytes.
    base: u64,
    pos: usize,
    /// Bytes past `head` not yet skipped.
    left: u64,
    /// The segment's last bytes: once the bytes not yet skipped all lie in it, they are read
    /// from it.
    tail: &'a [u8],
    start_ns: u64,
    len: u64,
}

impl<'a> Input<'a> {
    fn new(seg: &Segment<'a>) -> Self {
        let (head, left) = captured(seg);
        Input {
            head,
            base: 0,
            pos: 0,
            left,
            tail: seg.tail,
            start_ns: seg.start_ns,
            len: seg.len,
        }
    }

    fn remaining(&self) -> u64 {
        (self.head.len() - self.pos) as u64 + self.left
    }

    /// At the end of the captured bytes, go on with the tail when it holds all the rest.
    fn refill(&mut self) {
        if self.pos == self.head.len() && self.left > 0 && self.left <= self.tail.len() as u64 {
            self.head = &self.tail[self.tail.len() - self.left as usize..];
            self.base = self.len - self.left;
            self.pos = 0;
            self.left = 0;
        }
    }
}

enum Next {
    /// A message is complete (its details are in the framer).
    Msg,
    /// The segment is used up.
    End,
    /// A header fell where it cannot be read, or is not valid: framing is lost.
    Lost,
}

impl Framer {
    fn at_boundary(&self) -> bool {
        self.state == FState::Header && self.have == 0
    }

    /// Bytes of the message under way seen so far.
    fn partial(&self) -> u64 {
        match self.state {
            FState::Header => self.have as u64,
            FState::Body { left } => self.size - left,
            FState::Lost => 0,
        }
    }

    fn reset(&mut self) {
        self.state = FState::Header;
        self.have = 0;
        self.untyped = false;
        self.keep.clear();
    }

    fn next(&mut self, role: Role, inp: &mut Input<'_>) -> Next {
        loop {
            inp.refill();
            match self.state {
                FState::Lost => return Next::Lost,
                FState::Header => {
                    if inp.pos == inp.head.len() {
                        if inp.left == 0 {
                            return Next::End;
                        }
                        self.state = FState::Lost;
                        return Next::Lost;
                    }
                    let need = if self.untyped { 4 } else { 5 };
                    if self.have == 0 {
                        self.start_ns = inp.start_ns;
                        self.start_offset = inp.base + inp.pos as u64;
                        self.keep.clear();
                    }
                    let n = (need - self.have).min(inp.head.len() - inp.pos);
                    self.hdr[self.have..self.have + n]
                        .copy_from_slice(&inp.head[inp.pos..inp.pos + n]);
                    self.have += n;
                    inp.pos += n;
                    if self.have < need {
                        continue;
                    }
                    self.have = 0;
                    let (kind, len, size) = if self.untyped {
                        let len = be32(&self.hdr);
                        (0, len, u64::from(len))
                    } else {
                        let len = be32(&self.hdr[1..]);
                        (self.hdr[0], len, u64::from(len) + 1)
                    };
                    if !header_ok(role, kind, len) {
                        self.state = FState::Lost;
                        return Next::Lost;
                    }
                    self.kind = kind;
                    self.size = size;
                    self.keep_max = keep_limit(role, kind);
                    let body = u64::from(len) - 4;
                    if body == 0 {
                        self.last = kind;
                        return Next::Msg;
                    }
                    self.state = FState::Body { left: body };
                }
                FState::Body { left } => {
                    let n = if inp.pos < inp.head.len() {
                        let avail = inp.head.len() - inp.pos;
                        let take = usize::try_from(left).map_or(avail, |l| l.min(avail));
                        let room = self.keep_max.saturating_sub(self.keep.len());
                        let chunk = &inp.head[inp.pos..inp.pos + take];
                        self.keep.extend_from_slice(&chunk[..take.min(room)]);
                        inp.pos += take;
                        take as u64
                    } else if inp.left > 0 {
                        let n = left.min(inp.left);
                        inp.left -= n;
                        n
                    } else {
                        return Next::End;
                    };
                    if n == left {
                        self.state = FState::Header;
                        self.last = self.kind;
                        return Next::Msg;
                    }
                    self.state = FState::Body { left: left - n };
                }
            }
        }
    }
}

/// What a statement is reported as.
#[derive(Debug)]
struct Stmt {
    operation: String,
    statement: String,
    target: Option<String>,
}

impl Stmt {
    fn from_sql(text: &[u8]) -> Arc<Stmt> {
        let text = String::from_utf8_lossy(text);
        Arc::new(Stmt {
            operation: sql::sql_operation(&text),
            statement: sql::normalize_sql(&text, MAX_STATEMENT),
            target: sql::sql_target(&text),
        })
    }

    /// A statement prepared before we attached (or whose name was too long to remember).
    fn unknown(name: &[u8]) -> Arc<Stmt> {
        let statement = if name.is_empty() || !name_ok(name) {
            "EXECUTE".to_owned()
        } else {
            format!("EXECUTE {}", String::from_utf8_lossy(name))
        };
        Arc::new(Stmt {
            operation: "EXECUTE".to_owned(),
            statement,
            target: None,
        })
    }
}

/// A bounded name -> statement map; the oldest name is forgotten first.
#[derive(Debug)]
struct Names {
    map: HashMap<Vec<u8>, Arc<Stmt>>,
    order: VecDeque<Vec<u8>>,
    cap: usize,
}

impl Names {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn get(&self, name: &[u8]) -> Option<Arc<Stmt>> {
        self.map.get(name).cloned()
    }

    fn insert(&mut self, name: &[u8], stmt: Arc<Stmt>) {
        if name.len() > MAX_NAME {
            return;
        }
        if let Some(slot) = self.map.get_mut(name) {
            *slot = stmt;
            return;
        }
        while self.map.len() >= self.cap {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => self.map.clear(),
            }
        }
        self.map.insert(name.to_vec(), stmt);
        self.order.push_back(name.to_vec());
    }

    fn remove(&mut self, name: &[u8]) {
        if self.map.remove(name).is_some() {
            self.order.retain(|n| n != name);
        }
    }
}

/// An exchange whose request was seen and whose response is awaited.
#[derive(Debug)]
struct Pending {
    stmt: Arc<Stmt>,
    /// A Parse-only group: reported as `PREPARE`.
    prepare: bool,
    error: Option<String>,
    req_start_ns: u64,
    /// See `DbExchange::req_offset`.
    req_offset: u64,
    req_end_ns: u64,
    req_bytes: u64,
    /// The backend asked for COPY data: the client's CopyData counts as request bytes.
    copy_in: bool,
}

/// Guess-unit progress bits.
const G_BIND: u8 = 1;
const G_PARAMS: u8 = 2;
const G_DESC: u8 = 4;
const G_DONE: u8 = 8;

/// A frontend message (or run of messages) awaiting its answer.
#[derive(Debug)]
enum Unit {
    /// StartupMessage: authentication and parameters, until ReadyForQuery.
    Startup,
    /// SSLRequest or GSSENCRequest: a one-byte answer.
    Ssl,
    /// Simple query, until ReadyForQuery.
    Query(Pending),
    /// FunctionCall, until ReadyForQuery.
    Func,
    Parse,
    Bind,
    Describe {
        statement: bool,
        seen_params: bool,
    },
    Close,
    Execute(Pending),
    /// ReadyForQuery; with the exchange of a Parse-only group.
    Sync(Option<Pending>),
    /// The rest of a group cut by the capture, taken as [Bind] [Describe] Execute Sync.
    Guess {
        p: Option<Pending>,
        seen: u8,
    },
    /// Request bytes that could not be framed.
    Unknown,
    /// Units beyond `MAX_UNITS`: `z` ReadyForQuery answers still to come; `open` while units
    /// after the last Sync/Query were absorbed.
    Overflow {
        z: u64,
        open: bool,
    },
}

impl Unit {
    fn ends_at_ready(&self) -> bool {
        matches!(
            self,
            Unit::Startup | Unit::Query(_) | Unit::Func | Unit::Sync(_) | Unit::Guess { .. }
        )
    }

    fn reported(&self) -> Option<&Pending> {
        match self {
            Unit::Query(p)
            | Unit::Execute(p)
            | Unit::Sync(Some(p))
            | Unit::Guess { p: Some(p), .. } => Some(p),
            _ => None,
        }
    }
}

#[derive(Debug)]
enum Mode {
    Searching { segments: u32, bytes: u64 },
    Active,
    NotPostgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sync {
    InSync,
    /// Responses cannot be paired. `exact`: the dropped units expected exactly one more
    /// ReadyForQuery and the client wrote nothing since, so the one that ends a response
    /// syscall brings the connection back in sync.
    Desync {
        exact: bool,
    },
}

/// Response bytes since the current group's first answer.
#[derive(Debug, Default)]
struct RespAcc {
    start: Option<u64>,
    bytes: u64,
}

/// Request bytes of the group under way (messages since the last Execute, Sync or Query).
#[derive(Debug, Default)]
struct ReqGroup {
    start: Option<u64>,
    /// Where its first message began in the syscall dated `start`.
    offset: u64,
    bytes: u64,
    /// The statement of the group's last Parse or Bind.
    stmt: Option<Arc<Stmt>>,
    parsed: bool,
}

impl ReqGroup {
    /// When and where in that syscall its first message began.
    fn began(&self) -> Option<(u64, u64)> {
        self.start.map(|ns| (ns, self.offset))
    }

    fn add(&mut self, (start_ns, offset): (u64, u64), size: u64) {
        if self.start.is_none() {
            self.start = Some(start_ns);
            self.offset = offset;
        }
        self.bytes += size;
    }
}

/// The exchange whose response was under way when responses stopped being framable.
#[derive(Debug)]
struct Blind {
    p: Pending,
    /// The exchange ends with ReadyForQuery (a Query or a prepare), not before it.
    until_ready: bool,
    resp_start_ns: Option<u64>,
    resp_bytes: u64,
    end_ns: u64,
}

/// Small leading segments gathered while searching.
#[derive(Debug, Default)]
struct Probe {
    dir: Option<Direction>,
    bytes: Vec<u8>,
    start_ns: u64,
    ts_ns: u64,
}

/// Per-connection PostgreSQL matcher: feed it the connection's syscalls in order.
#[derive(Debug)]
pub struct PgConn {
    mode: Mode,
    /// Meaningful once `mode` is `Active`.
    side: Side,
    probe: Probe,
    req: Framer,
    resp: Framer,
    units: VecDeque<Unit>,
    sync: Sync,
    /// The last response syscall ended with a ReadyForQuery and the client wrote nothing
    /// since: the backend is idle.
    quiet: bool,
    /// A gap was reported and nothing was seen since: the backend is assumed idle (see `gap`).
    after_gap: bool,
    blind: Option<Blind>,
    group: ReqGroup,
    acc: RespAcc,
    /// The backend skips messages until Sync; the error not yet given to an Execute.
    abort: Option<Option<String>>,
    statements: Names,
    portals: Names,
}

impl Default for PgConn {
    fn default() -> Self {
        Self::new()
    }
}

/// The captured bytes of a segment and how many more it moved.
fn captured<'a>(seg: &Segment<'a>) -> (&'a [u8], u64) {
    let n = seg
        .head
        .len()
        .min(usize::try_from(seg.len).unwrap_or(usize::MAX));
    (&seg.head[..n], seg.len - n as u64)
}

/// The segment's last bytes are a whole ReadyForQuery message.
fn tail_is_ready(seg: &Segment<'_>) -> bool {
    let t = seg.tail;
    seg.len >= 6
        && t.len() >= 6
        && t[t.len() - 6..t.len() - 1] == [b'Z', 0, 0, 0, 5]
        && matches!(t[t.len() - 1], b'I' | b'T' | b'E')
}

/// The segment's last bytes are an Execute of the unnamed portal followed by Sync.
fn tail_is_execute_sync(seg: &Segment<'_>) -> bool {
    let t = seg.tail;
    seg.len >= 15
        && t.len() >= 15
        && t[t.len() - 15..t.len() - 9] == [b'E', 0, 0, 0, 9, 0]
        && t[t.len() - 5..] == [b'S', 0, 0, 0, 4]
}

/// `SQLSTATE: message` from an ErrorResponse body, bounded.
fn error_text(body: &[u8]) -> String {
    let mut code: &[u8] = b"";
    let mut message: &[u8] = b"";
    let mut fields = body;
    while let Some((&field, rest)) = fields.split_first() {
        if field == 0 {
            break;
        }
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        match field {
            b'C' => code = &rest[..end],
            b'M' => message = &rest[..end],
            _ => {}
        }
        fields = rest.get(end + 1..).unwrap_or_default();
    }
    let code: String = code
        .iter()
        .take(5)
        .filter(|b| b.is_ascii_alphanumeric())
        .map(|&b| char::from(b))
        .collect();
    if code.is_empty() && message.is_empty() {
        return UNCAPTURED_ERROR.to_owned();
    }
    let mut text = String::from_utf8_lossy(message).into_owned();
    if !code.is_empty() {
        text = if text.is_empty() {
            code
        } else {
            format!("{code}: {text}")
        };
    }
    if text.len() > MAX_ERROR {
        let mut cut = MAX_ERROR - 3;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

impl PgConn {
    pub fn new() -> Self {
        Self {
            mode: Mode::Searching {
                segments: 0,
                bytes: 0,
            },
            side: Side::Client,
            probe: Probe::default(),
            req: Framer::default(),
            resp: Framer::default(),
            units: VecDeque::new(),
            sync: Sync::InSync,
            quiet: true,
            after_gap: false,
            blind: None,
            group: ReqGroup::default(),
            acc: RespAcc::default(),
            abort: None,
            statements: Names::new(MAX_STATEMENTS),
            portals: Names::new(MAX_PORTALS),
        }
    }

    /// True once the connection was found not to carry PostgreSQL (or to switch to TLS or GSS
    /// encryption); `feed` is then a no-op.
    pub fn is_not_postgres(&self) -> bool {
        matches!(self.mode, Mode::NotPostgres)
    }

    /// Feed one syscall's bytes; push every exchange that finished into `out`.
    pub fn feed(&mut self, seg: &Segment<'_>, out: &mut Vec<DbExchange>) {
        if seg.len == 0 {
            return;
        }
        match self.mode {
            Mode::NotPostgres => {}
            Mode::Searching { .. } => self.search(seg, out),
            Mode::Active => self.dispatch(seg, out),
        }
    }

    /// Bytes in both directions went unseen since the last segment (the tracer stopped capturing
    /// for a while). Requests waiting for a response are dropped, since their outcome is unknown,
    /// and each direction resyncs at the first segment that starts like a message again.
    /// Returns how many unfinished requests were dropped.
    pub fn gap(&mut self) -> usize {
        match self.mode {
            Mode::NotPostgres => return 0,
            Mode::Searching { .. } => {
                // The gathered start of a message split across syscalls does not go on after
                // unseen bytes. The search budget is left as it is: the gap says nothing about
                // the protocol.
                self.probe = Probe::default();
                return 0;
            }
            Mode::Active => {}
        }
        let dropped = self.units.iter().filter(|u| u.reported().is_some()).count()
            + usize::from(self.blind.is_some());
        if self.req.untyped {
            // The startup packet was still to come, and the answer to an SSLRequest may have
            // gone unseen: the connection may be encrypted now. Detect it again (TLS gives up
            // at once, a startup packet or queries start matching).
            *self = Self::new();
            return dropped;
        }
        // Pairing is off until the backend is known idle, as after any loss; once the startup
        // packet was seen, later traffic is queries whatever happened during the gap.
        self.desync();
        self.group = ReqGroup::default();
        // Neither stream is at a known message boundary: the framers resync in `resync`.
        self.req.reset();
        self.req.state = FState::Lost;
        self.resp.reset();
        self.resp.state = FState::Lost;
        // A client that waits for ReadyForQuery writes again only once the backend is idle;
        // `walk_requests` checks that its write starts like messages.
        self.quiet = false;
        self.after_gap = true;
        self.statements.remove(b"");
        self.portals.remove(b"");
        dropped
    }

    /// The connection closed: exchanges still waiting end as [`Outcome::Closed`]. The one
    /// whose response could not be framed ends Complete where it was last seen if the backend
    /// was idle by then (its last response syscall ended with ReadyForQuery), else Closed too.
    /// The matcher is then back to its initial state.
    pub fn close(&mut self, ts_ns: u64, reset: bool, out: &mut Vec<DbExchange>) {
        if matches!(self.mode, Mode::Active) {
            if let Some(b) = self.blind.take() {
                let (outcome, end) = if self.quiet {
                    (Outcome::Complete, b.end_ns)
                } else {
                    (Outcome::Closed { reset }, ts_ns)
                };
                self.emit(b.p, outcome, b.resp_start_ns, b.resp_bytes, end, out);
            }
            // Only the first waiting exchange can have had response bytes, including those of
            // a message cut by the close.
            let mut acc = std::mem::take(&mut self.acc);
            let partial = self.resp.partial();
            if partial > 0 {
                acc.start.get_or_insert(self.resp.start_ns);
                acc.bytes += partial;
            }
            let mut acc = Some(acc);
            for unit in std::mem::take(&mut self.units) {
                let ready = unit.ends_at_ready();
                let p = match unit {
                    Unit::Query(p) | Unit::Execute(p) | Unit::Sync(Some(p)) => Some(p),
                    Unit::Guess { p, .. } => p,
                    _ => None,
                };
                if let Some(p) = p {
                    let (start, bytes) = acc.take().map_or((None, 0), |a| (a.start, a.bytes));
                    self.emit(p, Outcome::Closed { reset }, start, bytes, ts_ns, out);
                } else if ready {
                    acc = None;
                }
            }
        }
        *self = Self::new();
    }

    fn request_dir(&self) -> Direction {
        match self.side {
            Side::Client => Direction::Egress,
            Side::Server => Direction::Ingress,
        }
    }

    fn dispatch(&mut self, seg: &Segment<'_>, out: &mut Vec<DbExchange>) {
        if seg.dir == self.request_dir() {
            self.walk_requests(seg, out);
        } else {
            self.walk_responses(seg, out);
        }
    }

    fn search(&mut self, seg: &Segment<'_>, out: &mut Vec<DbExchange>) {
        let (head, _) = captured(seg);
        if self.probe.dir != Some(seg.dir) {
            self.probe = Probe::default();
        }
        let joined;
        let buf = if self.probe.bytes.is_empty() {
            head
        } else {
            joined = [self.probe.bytes.as_slice(), head].concat();
            &joined[..]
        };
        let more = head.len() as u64 == seg.len && buf.len() < PROBE_MAX;
        let startup = startup_verdict(buf, more);
        let midstream = midstream_verdict(buf, more);
        if startup == Verdict::Yes || midstream == Verdict::Yes {
            self.mode = Mode::Active;
            self.side = match seg.dir {
                Direction::Egress => Side::Client,
                Direction::Ingress => Side::Server,
            };
            self.req.untyped = startup == Verdict::Yes;
            self.quiet = true;
            let probe = std::mem::take(&mut self.probe);
            if !probe.bytes.is_empty() {
                let early = Segment::whole(seg.dir, probe.ts_ns, probe.start_ns, &probe.bytes);
                self.dispatch(&early, out);
            }
            self.dispatch(seg, out);
            return;
        }
        let Mode::Searching { segments, bytes } = &mut self.mode else {
            return;
        };
        *bytes = bytes.saturating_add(seg.len);
        if startup == Verdict::NeedMore || midstream == Verdict::NeedMore {
            if self.probe.bytes.is_empty() {
                self.probe.start_ns = seg.start_ns;
            }
            self.probe.dir = Some(seg.dir);
            self.probe.bytes.extend_from_slice(head);
            self.probe.ts_ns = seg.ts_ns;
            return;
        }
        self.probe = Probe::default();
        *segments += 1;
        if *segments >= SEARCH_MAX_SEGMENTS
            || *bytes >= SEARCH_MAX_BYTES
            || clearly_other_protocol(buf)
        {
            self.give_up();
        }
    }

    fn give_up(&mut self) {
        *self = Self::new();
        self.mode = Mode::NotPostgres;
    }

    /// Requests can be matched again only from a point where the backend is idle.
    fn needs_resync(&self) -> bool {
        matches!(self.sync, Sync::Desync { .. })
            || (self.req.state == FState::Lost
                && self.units.iter().all(|u| matches!(u, Unit::Unknown)))
    }

    fn walk_requests(&mut self, seg: &Segment<'_>, out: &mut Vec<DbExchange>) {
        let (head, _) = captured(seg);
        if self.needs_resync() {
            let at_start = match self.req.state {
                // The backend is idle, so the client's write starts a message: only bytes
                // that cannot be one are refused (a short head may be all there is). After a
                // gap that is only assumed: the bytes must show messages by themselves.
                FState::Lost => midstream_verdict(head, !self.after_gap) != Verdict::No,
                _ => self.req.at_boundary(),
            };
            if (self.quiet || self.after_gap) && at_start {
                self.resync(out);
            } else if let Sync::Desync { exact } = &mut self.sync {
                // New requests: the ReadyForQuery count is no longer known.
                *exact = false;
            }
        }
        self.quiet = false;
        self.after_gap = false;
        if self.req.state == FState::Lost {
            self.copy_bytes(seg.len, seg.ts_ns);
            return;
        }
        let mut inp = Input::new(seg);
        loop {
            match self.req.next(Role::Frontend, &mut inp) {
                Next::End => break,
                Next::Msg => self.request_message(seg.ts_ns, out),
                Next::Lost => {
                    // A header cut by the end of the capture belongs to the lost bytes.
                    let rest = inp.remaining().saturating_add(self.req.have as u64);
                    self.request_lost(seg, rest, out);
                    break;
                }
            }
        }
    }

    /// Back in step: the backend is idle and the client starts a new request.
    fn resync(&mut self, out: &mut Vec<DbExchange>) {
        if let Some(b) = self.blind.take() {
            self.emit(
                b.p,
                Outcome::Complete,
                b.resp_start_ns,
                b.resp_bytes,
                b.end_ns,
                out,
            );
        }
        self.units.clear();
        self.sync = Sync::InSync;
        self.acc = RespAcc::default();
        self.abort = None;
        self.group = ReqGroup::default();
        if self.req.state == FState::Lost {
            self.req.reset();
        }
        self.resp.reset();
    }

    /// Copy data the client sent for the COPY under way.
    fn copy_bytes(&mut self, size: u64, ts_ns: u64) {
        if let Some(p) = self.units.front_mut().and_then(|u| match u {
            Unit::Query(p) | Unit::Execute(p) | Unit::Guess { p: Some(p), .. } if p.copy_in => {
                Some(p)
            }
            _ => None,
        }) {
            p.req_bytes = p.req_bytes.saturating_add(size);
            p.req_end_ns = ts_ns;
        }
    }

    /// Request framing is lost `rest` bytes before the end of `seg`.
    fn request_lost(&mut self, seg: &Segment<'_>, rest: u64, out: &mut Vec<DbExchange>) {
        let group_open = self.group.start.is_some() && matches!(self.req.last, b'P' | b'B' | b'D');
        if group_open && tail_is_execute_sync(seg) {
            // The group's messages were cut by the capture; the write ends with an Execute of
            // the unnamed portal and a Sync, so the next byte starts a message again.
            let group = std::mem::take(&mut self.group);
            let p = Pending {
                stmt: group.stmt.unwrap_or_else(|| Stmt::unknown(b"")),
                prepare: false,
                error: None,
                req_start_ns: group.start.unwrap_or(seg.start_ns),
                req_offset: group.offset,
                req_end_ns: seg.ts_ns,
                // The final Sync is no part of the exchange.
                req_bytes: group.bytes.saturating_add(rest.saturating_sub(5)),
                copy_in: false,
            };
            self.req.reset();
            self.push_unit(
                Unit::Guess {
                    p: Some(p),
                    seen: 0,
                },
                out,
            );
            return;
        }
        self.copy_bytes(rest, seg.ts_ns);
        self.group = ReqGroup::default();
        self.req.state = FState::Lost;
        if matches!(self.sync, Sync::InSync) && !matches!(self.units.back(), Some(Unit::Unknown)) {
            self.units.push_back(Unit::Unknown);
        }
    }

    fn request_message(&mut self, ts_ns: u64, out: &mut Vec<DbExchange>) {
        let kind = self.req.kind;
        let size = self.req.size;
        let start = (self.req.start_ns, self.req.start_offset);
        let body = std::mem::take(&mut self.req.keep);
        match kind {
            0 => match body.get(..4).map_or(0, be32) {
                SSL_REQUEST | GSSENC_REQUEST => self.push_unit(Unit::Ssl, out),
                CANCEL_REQUEST => {}
                code if code >> 16 == 3 => {
                    self.req.untyped = false;
                    self.push_unit(Unit::Startup, out);
                }
                _ => self.req.state = FState::Lost,
            },
            b'Q' => {
                let text = cstr(&body).map_or(&body[..], |(t, _)| t);
                self.group = ReqGroup::default();
                let p = Pending {
                    stmt: Stmt::from_sql(text),
                    prepare: false,
                    error: None,
                    req_start_ns: start.0,
                    req_offset: start.1,
                    req_end_ns: ts_ns,
                    req_bytes: size,
                    copy_in: false,
                };
                self.push_unit(Unit::Query(p), out);
            }
            b'P' => {
                let stmt = match cstr(&body) {
                    Some((name, rest)) if name.len() <= MAX_NAME => {
                        let text = cstr(rest).map_or(rest, |(t, _)| t);
                        let stmt = Stmt::from_sql(text);
                        if self.abort.is_none() {
                            self.statements.insert(name, stmt.clone());
                        }
                        stmt
                    }
                    _ => Stmt::unknown(b""),
                };
                self.group.add(start, size);
                self.group.stmt = Some(stmt);
                self.group.parsed = true;
                self.push_unit(Unit::Parse, out);
            }
            b'B' => {
                let names = cstr(&body).and_then(|(portal, rest)| Some((portal, cstr(rest)?.0)));
                let stmt = match names {
                    Some((portal, name)) => {
                        let stmt = self
                            .statements
                            .get(name)
                            .unwrap_or_else(|| Stmt::unknown(name));
                        self.portals.insert(portal, stmt.clone());
                        stmt
                    }
                    None => Stmt::unknown(b""),
                };
                self.group.add(start, size);
                self.group.stmt = Some(stmt);
                self.push_unit(Unit::Bind, out);
            }
            b'D' => {
                self.group.add(start, size);
                let statement = body.first() == Some(&b'S');
                self.push_unit(
                    Unit::Describe {
                        statement,
                        seen_params: false,
                    },
                    out,
                );
            }
            b'E' => {
                let portal = cstr(&body).map_or(&body[..], |(p, _)| p);
                let stmt = self
                    .portals
                    .get(portal)
                    .unwrap_or_else(|| Stmt::unknown(b""));
                self.group.add(start, size);
                let group = std::mem::take(&mut self.group);
                let began = group.began().unwrap_or(start);
                let p = Pending {
                    stmt,
                    prepare: false,
                    error: None,
                    req_start_ns: began.0,
                    req_offset: began.1,
                    req_end_ns: ts_ns,
                    req_bytes: group.bytes,
                    copy_in: false,
                };
                self.push_unit(Unit::Execute(p), out);
            }
            b'C' => {
                if let Some((name, _)) = body.get(1..).and_then(cstr) {
                    match body[0] {
                        b'S' => self.statements.remove(name),
                        b'P' => self.portals.remove(name),
                        _ => {}
                    }
                }
                self.group.add(start, size);
                self.push_unit(Unit::Close, out);
            }
            b'S' => {
                let group = std::mem::take(&mut self.group);
                let began = group.began().unwrap_or(start);
                let prepare = group.parsed.then(|| Pending {
                    stmt: group.stmt.unwrap_or_else(|| Stmt::unknown(b"")),
                    prepare: true,
                    error: None,
                    req_start_ns: began.0,
                    req_offset: began.1,
                    req_end_ns: ts_ns,
                    req_bytes: group.bytes + size,
                    copy_in: false,
                });
                self.push_unit(Unit::Sync(prepare), out);
            }
            b'H' if self.group.start.is_some() => self.group.bytes += size,
            b'F' => {
                self.group = ReqGroup::default();
                self.push_unit(Unit::Func, out);
            }
            b'd' | b'c' | b'f' => self.copy_bytes(size, ts_ns),
            // Terminate; password, SASL and GSS responses (nothing of them is kept).
            _ => {}
        }
        self.req.keep = body;
    }

    fn push_unit(&mut self, unit: Unit, out: &mut Vec<DbExchange>) {
        if matches!(self.sync, Sync::Desync { .. }) {
            return;
        }
        if let Some(blame) = &mut self.abort {
            // The backend discards everything up to the next Sync.
            match unit {
                Unit::Query(mut p) | Unit::Execute(mut p) => {
                    p.error = Some(blame.take().unwrap_or_else(|| SKIPPED_ERROR.to_owned()));
                    let end = p.req_end_ns;
                    self.emit(p, Outcome::Complete, None, 0, end, out);
                    return;
                }
                Unit::Guess { p: Some(mut p), .. } => {
                    p.error = Some(blame.take().unwrap_or_else(|| SKIPPED_ERROR.to_owned()));
                    let end = p.req_end_ns;
                    self.emit(p, Outcome::Complete, None, 0, end, out);
                    self.abort = None;
                    return self.push_unit(Unit::Sync(None), out);
                }
                Unit::Sync(mut prepare) => {
                    // A Parse written after the error was skipped: no prepare happened.
                    if let Some(p) = &mut prepare {
                        p.error = Some(blame.take().unwrap_or_else(|| SKIPPED_ERROR.to_owned()));
                    }
                    self.abort = None;
                    return self.push_unit(Unit::Sync(prepare), out);
                }
                Unit::Unknown | Unit::Startup | Unit::Ssl => self.abort = None,
                _ => return,
            }
        }
        let absorb = match self.units.back() {
            Some(Unit::Overflow { open, .. }) => *open || self.units.len() >= MAX_UNITS,
            _ => self.units.len() >= MAX_UNITS,
        };
        if absorb && !matches!(unit, Unit::Unknown) {
            if !matches!(self.units.back(), Some(Unit::Overflow { .. })) {
                self.units.push_back(Unit::Overflow { z: 0, open: false });
            }
            if let Some(Unit::Overflow { z, open }) = self.units.back_mut() {
                if unit.ends_at_ready() {
                    *z += 1;
                    *open = false;
                } else {
                    *open = true;
                }
            }
            return;
        }
        self.units.push_back(unit);
    }

    fn walk_responses(&mut self, seg: &Segment<'_>, out: &mut Vec<DbExchange>) {
        let (head, _) = captured(seg);
        if let (Sync::Desync { .. }, Some(b)) = (self.sync, &mut self.blind) {
            b.resp_bytes = b.resp_bytes.saturating_add(seg.len);
            b.end_ns = seg.ts_ns;
        }
        let mut inp = Input::new(seg);
        while matches!(self.mode, Mode::Active) {
            let in_sync = self.sync == Sync::InSync;
            if in_sync
                && self.resp.at_boundary()
                && matches!(self.units.front(), Some(Unit::Ssl))
                && inp.pos < head.len()
            {
                // The one-byte answer to SSLRequest / GSSENCRequest.
                match head[inp.pos] {
                    b'N' => {
                        inp.pos += 1;
                        self.units.pop_front();
                        self.acc = RespAcc::default();
                        continue;
                    }
                    b'S' | b'G' => {
                        self.give_up();
                        return;
                    }
                    // 'E': an ErrorResponse, framed below.
                    _ => {}
                }
            }
            match self.resp.next(Role::Backend, &mut inp) {
                Next::End => break,
                Next::Msg => {
                    if in_sync {
                        self.response_message(seg.ts_ns, out);
                    }
                }
                Next::Lost => {
                    if in_sync {
                        let rest = inp.remaining().saturating_add(self.resp.have as u64);
                        self.response_lost(seg, rest);
                    }
                    break;
                }
            }
        }
        if !matches!(self.mode, Mode::Active) {
            return;
        }
        // What the responses show replaces what the gap made us assume.
        self.after_gap = false;
        self.quiet = if self.resp.state == FState::Lost {
            tail_is_ready(seg)
        } else {
            self.resp.at_boundary() && self.resp.last == b'Z'
        };
        if self.sync == (Sync::Desync { exact: true }) && self.quiet {
            if let Some(b) = self.blind.take() {
                // The ReadyForQuery that ends the syscall is not part of an Execute.
                let ready = if b.until_ready { 0 } else { 6 };
                let bytes = b.resp_bytes.saturating_sub(ready);
                self.emit(
                    b.p,
                    Outcome::Complete,
                    b.resp_start_ns,
                    bytes,
                    seg.ts_ns,
                    out,
                );
            }
            self.sync = Sync::InSync;
            self.units.clear();
            self.acc = RespAcc::default();
            self.resp.reset();
        }
    }

    /// Response framing is lost `rest` bytes before the end of `seg`.
    fn response_lost(&mut self, seg: &Segment<'_>, rest: u64) {
        let readies = self.units.iter().filter(|u| u.ends_at_ready()).count();
        let reported = self.units.iter().filter(|u| u.reported().is_some()).count();
        let opaque = self
            .units
            .iter()
            .any(|u| matches!(u, Unit::Unknown | Unit::Overflow { .. }));
        let exact = readies == 1
            && reported <= 1
            && !opaque
            && self.units.back().is_some_and(Unit::ends_at_ready);
        // The exchange the unframable bytes belong to: the first reported unit, unless a unit
        // answered by its own ReadyForQuery comes before it.
        let mut owner = None;
        for (i, u) in self.units.iter().enumerate() {
            if u.reported().is_some() {
                owner = Some(i);
                break;
            }
            if u.ends_at_ready() {
                break;
            }
        }
        let acc = std::mem::take(&mut self.acc);
        self.blind = owner
            .and_then(|i| self.units.remove(i))
            .and_then(|u| match u {
                Unit::Query(p) | Unit::Sync(Some(p)) => Some((p, true)),
                Unit::Execute(p) => Some((p, false)),
                Unit::Guess { p, .. } => p.map(|p| (p, false)),
                _ => None,
            })
            .map(|(p, until_ready)| Blind {
                p,
                until_ready,
                resp_start_ns: acc.start.or(Some(seg.start_ns)),
                resp_bytes: acc.bytes.saturating_add(rest),
                end_ns: seg.ts_ns,
            });
        self.units.clear();
        self.abort = None;
        self.sync = Sync::Desync {
            exact: exact && self.blind.is_some(),
        };
        self.resp.state = FState::Lost;
    }

    /// A backend message that the oldest unit cannot receive: pairing is off.
    fn desync(&mut self) {
        self.blind = None;
        self.units.clear();
        self.acc = RespAcc::default();
        self.abort = None;
        self.sync = Sync::Desync { exact: false };
    }

    fn response_message(&mut self, ts_ns: u64, out: &mut Vec<DbExchange>) {
        let kind = self.resp.kind;
        let size = self.resp.size;
        let start = self.resp.start_ns;
        // ParameterStatus, NoticeResponse, NotificationResponse may come at any time: they
        // belong to the response under way (a SET's ParameterStatus, a DROP's notice), if any.
        if matches!(kind, b'S' | b'N' | b'A') {
            if !self.units.is_empty() {
                self.acc.start.get_or_insert(start);
                self.acc.bytes += size;
            }
            return;
        }
        let Some(front) = self.units.front_mut() else {
            // A FATAL error may come unasked (e.g. the server shutting down); anything else
            // answers a request we did not see.
            if kind != b'E' {
                self.desync();
            }
            return;
        };
        self.acc.start.get_or_insert(start);
        self.acc.bytes += size;
        let error = || error_text(&self.resp.keep);
        match front {
            Unit::Startup => match kind {
                b'R' | b'K' | b'v' => {}
                b'Z' | b'E' => self.finish_silent(),
                _ => self.desync(),
            },
            Unit::Ssl => match kind {
                b'E' => self.finish_silent(),
                _ => self.desync(),
            },
            Unit::Query(p) => match kind {
                b'T' | b'D' | b'C' | b'I' | b'H' | b'd' | b'c' => {}
                b'G' | b'W' => p.copy_in = true,
                b'E' => {
                    if p.error.is_none() {
                        p.error = Some(error_text(&self.resp.keep));
                    }
                }
                b'Z' => {
                    if let Some(Unit::Query(p)) = self.units.pop_front() {
                        self.finish(p, ts_ns, out);
                    }
                }
                _ => self.desync(),
            },
            Unit::Func => match kind {
                b'V' | b'E' => {}
                b'Z' => self.finish_silent(),
                _ => self.desync(),
            },
            Unit::Parse | Unit::Bind | Unit::Close => {
                let expected = match front {
                    Unit::Parse => b'1',
                    Unit::Bind => b'2',
                    _ => b'3',
                };
                match kind {
                    k if k == expected => {
                        self.units.pop_front();
                    }
                    b'E' => self.extended_error(error(), ts_ns, out),
                    _ => self.desync(),
                }
            }
            Unit::Describe {
                statement,
                seen_params,
            } => match kind {
                b't' if *statement && !*seen_params => *seen_params = true,
                b'T' | b'n' if !*statement || *seen_params => {
                    self.units.pop_front();
                }
                b'E' => self.extended_error(error(), ts_ns, out),
                _ => self.desync(),
            },
            Unit::Execute(p) => match kind {
                b'D' | b'H' | b'd' | b'c' => {}
                b'G' | b'W' => p.copy_in = true,
                b'C' | b'I' | b's' => {
                    if let Some(Unit::Execute(p)) = self.units.pop_front() {
                        self.finish(p, ts_ns, out);
                    }
                }
                b'E' => self.extended_error(error(), ts_ns, out),
                _ => self.desync(),
            },
            Unit::Sync(prepare) => match kind {
                b'Z' => match self.units.pop_front() {
                    Some(Unit::Sync(Some(p))) => self.finish(p, ts_ns, out),
                    _ => self.acc = RespAcc::default(),
                },
                // The implicit COMMIT at Sync can fail.
                b'E' => {
                    if let Some(p) = prepare
                        && p.error.is_none()
                    {
                        p.error = Some(error_text(&self.resp.keep));
                    }
                }
                _ => self.desync(),
            },
            Unit::Guess { p, seen } => {
                let done = *seen & G_DONE != 0;
                match kind {
                    b'Z' if done => self.finish_silent(),
                    // The implicit COMMIT at Sync can fail; the exchange was reported.
                    b'E' if done => {}
                    _ if done => self.desync(),
                    b'2' if *seen & (G_BIND | G_PARAMS | G_DESC) == 0 => *seen |= G_BIND,
                    b't' if *seen & (G_PARAMS | G_DESC) == 0 => *seen |= G_PARAMS,
                    b'T' | b'n' if *seen & G_DESC == 0 => *seen |= G_DESC,
                    b'D' | b'H' | b'd' | b'c' => {}
                    b'G' | b'W' => {
                        if let Some(p) = p {
                            p.copy_in = true;
                        }
                    }
                    b'C' | b'I' | b's' | b'E' => {
                        *seen |= G_DONE;
                        if let Some(mut p) = p.take() {
                            if kind == b'E' {
                                p.error = Some(error_text(&self.resp.keep));
                            }
                            self.finish(p, ts_ns, out);
                        }
                    }
                    _ => self.desync(),
                }
            }
            Unit::Unknown => self.desync(),
            Unit::Overflow { z, open } => {
                if kind == b'Z' {
                    *z = z.saturating_sub(1);
                    let over = *z == 0 && !*open;
                    self.acc = RespAcc::default();
                    if over {
                        self.units.pop_front();
                    }
                }
            }
        }
    }

    /// The oldest unit got its last answer and reports nothing.
    fn finish_silent(&mut self) {
        self.units.pop_front();
        self.acc = RespAcc::default();
    }

    /// An exchange got its last answer at `ts_ns`.
    fn finish(&mut self, p: Pending, ts_ns: u64, out: &mut Vec<DbExchange>) {
        let acc = std::mem::take(&mut self.acc);
        self.emit(p, Outcome::Complete, acc.start, acc.bytes, ts_ns, out);
    }

    /// An ErrorResponse to the extended-protocol message at the front: the backend now skips
    /// every message until Sync.
    fn extended_error(&mut self, error: String, ts_ns: u64, out: &mut Vec<DbExchange>) {
        let mut blame = Some(error);
        if let Some(Unit::Execute(mut p)) = self.units.pop_front() {
            p.error = blame.take();
            self.finish(p, ts_ns, out);
        }
        // A failed Parse, Bind or Describe fails the Execute it prepared.
        loop {
            match self.units.front_mut() {
                None => {
                    self.abort = Some(blame);
                    return;
                }
                Some(Unit::Sync(prepare)) => {
                    if let (Some(p), Some(e)) = (prepare, blame) {
                        p.error.get_or_insert(e);
                    }
                    return;
                }
                Some(Unit::Guess { p, seen }) => {
                    *seen |= G_DONE;
                    if let Some(mut p) = p.take() {
                        match blame {
                            Some(e) => {
                                p.error = Some(e);
                                self.finish(p, ts_ns, out);
                            }
                            None => {
                                p.error = Some(SKIPPED_ERROR.to_owned());
                                self.emit(p, Outcome::Complete, None, 0, ts_ns, out);
                            }
                        }
                    }
                    return;
                }
                Some(Unit::Unknown | Unit::Overflow { .. } | Unit::Startup | Unit::Ssl) => return,
                Some(_) => {
                    // Parse, Bind, Describe, Close, FunctionCall: skipped silently.
                    if let Some(Unit::Execute(mut p) | Unit::Query(mut p)) = self.units.pop_front()
                    {
                        match blame.take() {
                            Some(e) => {
                                p.error = Some(e);
                                self.finish(p, ts_ns, out);
                            }
                            None => {
                                p.error = Some(SKIPPED_ERROR.to_owned());
                                let end = ts_ns.max(p.req_end_ns);
                                self.emit(p, Outcome::Complete, None, 0, end, out);
                            }
                        }
                    }
                }
            }
        }
    }

    fn emit(
        &self,
        p: Pending,
        outcome: Outcome,
        resp_start_ns: Option<u64>,
        resp_bytes: u64,
        end_ns: u64,
        out: &mut Vec<DbExchange>,
    ) {
        let operation = if p.prepare {
            "PREPARE".to_owned()
        } else {
            p.stmt.operation.clone()
        };
        out.push(DbExchange {
            system: DbSystem::Postgresql,
            side: self.side,
            operation,
            statement: p.stmt.statement.clone(),
            target: p.stmt.target.clone(),
            error: p.error,
            req_start_ns: p.req_start_ns,
            req_offset: p.req_offset,
            req_end_ns: p.req_end_ns,
            resp_start_ns,
            end_ns,
            req_bytes: p.req_bytes,
            resp_bytes,
            outcome,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::fixture::{self, FixtureSegment, Item, Rng};

    const MIN_FIXTURES: usize = 20;

    /// Runs fixture items through a fresh matcher; also tells whether it gave up.
    fn run_items(items: &[Item], max_cap: Option<usize>) -> (Vec<DbExchange>, bool) {
        let mut conn = PgConn::new();
        let mut out = Vec::new();
        let mut gave_up = false;
        for item in items {
            match item {
                Item::Segment(s) => conn.feed(&s.segment(max_cap), &mut out),
                Item::Close { ts, reset } => {
                    gave_up |= conn.is_not_postgres();
                    conn.close(*ts, *reset, &mut out);
                }
            }
            assert_bounded(&conn);
        }
        gave_up |= conn.is_not_postgres();
        (out, gave_up)
    }

    fn assert_bounded(conn: &PgConn) {
        assert!(
            conn.units.len() <= MAX_UNITS + 2,
            "units {}",
            conn.units.len()
        );
        assert!(conn.statements.map.len() <= MAX_STATEMENTS);
        assert!(conn.statements.order.len() <= MAX_STATEMENTS);
        assert!(conn.portals.map.len() <= MAX_PORTALS);
        assert!(conn.probe.bytes.len() < PROBE_MAX + 4096);
        assert!(conn.req.keep.len() <= MAX_NAME + 1 + KEEP_TEXT);
        assert!(conn.resp.keep.len() <= KEEP_ERROR);
    }

    fn fixture_files() -> Vec<(String, String)> {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/postgres");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("fixture dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .map(|p| {
                let name = p.file_stem().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&p).unwrap())
            })
            .collect();
        files.sort();
        assert!(files.len() >= MIN_FIXTURES);
        files
    }

    /// The same bytes with every fully captured segment cut into pieces of `size()` bytes;
    /// pieces keep the segment's timestamp, so timings must not change.
    fn split_items(items: &[Item], mut size: impl FnMut() -> usize) -> Vec<Item> {
        let mut split = Vec::new();
        for item in items {
            match item {
                Item::Segment(s) if s.cap.is_none() => {
                    let mut rest = &s.bytes[..];
                    while !rest.is_empty() {
                        let n = size().clamp(1, rest.len());
                        split.push(Item::Segment(FixtureSegment {
                            dir: s.dir,
                            ts: s.ts,
                            cap: None,
                            bytes: rest[..n].to_vec(),
                        }));
                        rest = &rest[n..];
                    }
                }
                Item::Segment(s) => split.push(Item::Segment(FixtureSegment {
                    dir: s.dir,
                    ts: s.ts,
                    cap: s.cap,
                    bytes: s.bytes.clone(),
                })),
                Item::Close { ts, reset } => split.push(Item::Close {
                    ts: *ts,
                    reset: *reset,
                }),
            }
        }
        split
    }

    #[test]
    fn golden_fixtures() {
        fixture::check_golden("postgres", MIN_FIXTURES, |text| {
            let (out, gave_up) = run_items(&fixture::parse_fixture(text), None);
            fixture::render_db(&out, gave_up)
        });
    }

    /// The exchanges without where each began in its syscall, which depends on the cut.
    fn uncut((mut exchanges, gave_up): (Vec<DbExchange>, bool)) -> (Vec<DbExchange>, bool) {
        for e in &mut exchanges {
            e.req_offset = 0;
        }
        (exchanges, gave_up)
    }

    #[test]
    fn splits_give_identical_exchanges() {
        for (name, text) in fixture_files() {
            let items = fixture::parse_fixture(&text);
            let whole = uncut(run_items(&items, None));
            let bytewise = uncut(run_items(&split_items(&items, || 1), None));
            assert_eq!(whole, bytewise, "{name}: byte by byte");
            for seed in 1..=20u64 {
                let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let random = uncut(run_items(&split_items(&items, || 1 + rng.below(40)), None));
                assert_eq!(whole, random, "{name}: random splits, seed {seed}");
            }
        }
    }

    #[test]
    fn truncated_captures_never_mis_pair() {
        for (name, text) in fixture_files() {
            let items = fixture::parse_fixture(&text);
            let (full, _) = run_items(&items, None);
            for cap in [
                0, 1, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 100, 200, 512, 1024,
            ] {
                let (cut, _) = run_items(&items, Some(cap));
                for e in &cut {
                    let found = full.iter().any(|f| consistent(e, f).is_ok());
                    let why: Vec<_> = full
                        .iter()
                        .filter(|f| f.req_start_ns == e.req_start_ns)
                        .map(|f| (f, consistent(e, f)))
                        .collect();
                    assert!(
                        found,
                        "{name} cap={cap}: mis-paired?\n  cut {e:?}\n  full {why:#?}"
                    );
                }
            }
        }
    }

    /// Can `e`, seen through a truncated capture, be the exchange `f` of the full capture?
    /// Text may be cut (operation a prefix, error a prefix or not captured), nothing else.
    fn consistent(e: &DbExchange, f: &DbExchange) -> Result<(), &'static str> {
        let checks = [
            (e.req_start_ns == f.req_start_ns, "req_start"),
            (e.req_offset == f.req_offset, "req_offset"),
            (e.req_end_ns == f.req_end_ns, "req_end"),
            (e.req_bytes == f.req_bytes, "req_bytes"),
            (e.resp_start_ns == f.resp_start_ns, "resp_start"),
            (e.end_ns == f.end_ns, "end"),
            (e.resp_bytes == f.resp_bytes, "resp_bytes"),
            (e.outcome == f.outcome, "outcome"),
            (e.side == f.side, "side"),
            (
                f.operation.starts_with(e.operation.as_str())
                    || ["UNKNOWN", "EXECUTE"].contains(&e.operation.as_str()),
                "operation",
            ),
            (
                match (&e.error, &f.error) {
                    (None, _) => true,
                    (Some(a), Some(b)) => b.starts_with(a.as_str()) || a == UNCAPTURED_ERROR,
                    (Some(_), None) => false,
                },
                "error",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, what)) => Err(what),
            None => Ok(()),
        }
    }

    #[test]
    fn detection() {
        let startup = b"\x00\x00\x00\x21\x00\x03\x00\x00user\x00app\x00database\x00appdb\x00\x00";
        assert!(looks_like_postgres_client_start(startup));
        assert!(looks_like_postgres_startup(startup));
        assert!(looks_like_postgres_client_start(
            b"\x00\x00\x00\x08\x04\xd2\x16/"
        ));
        assert!(looks_like_postgres_client_start(
            b"\x00\x00\x00\x08\x04\xd2\x160"
        ));
        assert!(looks_like_postgres_client_start(
            b"\x00\x00\x00\x10\x04\xd2\x16.\x00\x00\x01\x02\x03\x04\x05\x06"
        ));
        // Mid-stream: a Query, an extended group, a Bind of a named statement.
        assert!(looks_like_postgres_client_start(
            b"Q\x00\x00\x00\x0dSELECT 1\x00"
        ));
        assert!(!looks_like_postgres_startup(
            b"Q\x00\x00\x00\x0dSELECT 1\x00"
        ));
        let group = b"P\x00\x00\x00\x11\x00SELECT $1\x00\x00\x00B\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00E\x00\x00\x00\x09\x00\x00\x00\x00\x00S\x00\x00\x00\x04";
        assert!(looks_like_postgres_client_start(group));
        let bind = b"B\x00\x00\x00\x1a\x00P_0\x00\x00\x00\x00\x01\x00\x00\x00\x0577288\x00\x01\x00\x00E\x00\x00\x00\x09\x00\x00\x00\x00\x00S\x00\x00\x00\x04";
        assert!(looks_like_postgres_client_start(bind));
        // A query longer than the capture.
        assert!(looks_like_postgres_client_start(
            b"Q\x00\x00\x10\x00SELECT a, b, c FROM t WHERE"
        ));
        // Not PostgreSQL.
        for other in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"*1\r\n$4\r\nPING\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"Q\x00\x00\x00\x0dSELECT 1\x01",
            b"Q\xff\xff\xff\xffSELECT 1\x00",
            b"S\x00\x00\x00\x04",
            b"\x00\x00\x00\x08\x00\x02\x00\x00",
            b"\xff\xff\xff\xff\x00\x03\x00\x00user\x00",
            b"Z\x00\x00\x00\x05I",
            b"C\x00\x00\x00\x0dSELECT 1\x00Z\x00\x00\x00\x05I",
            b"",
            b"Q",
        ] {
            assert!(!looks_like_postgres_client_start(other), "{other:?}");
        }
    }

    fn q(text: &str) -> Vec<u8> {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&(text.len() as u32 + 5).to_be_bytes());
        m.extend_from_slice(text.as_bytes());
        m.push(0);
        m
    }

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    const READY: &[u8] = b"Z\x00\x00\x00\x05I";

    fn started() -> (PgConn, Vec<DbExchange>) {
        let mut conn = PgConn::new();
        let mut out = Vec::new();
        let startup = b"\x00\x00\x00\x21\x00\x03\x00\x00user\x00app\x00database\x00appdb\x00\x00";
        conn.feed(&fixture::seg(Direction::Egress, 1, startup), &mut out);
        let mut ok = msg(b'R', &[0, 0, 0, 0]);
        ok.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 2, &ok), &mut out);
        assert!(out.is_empty());
        (conn, out)
    }

    /// Queries pipelined in one write each say where they began in it, however much of the
    /// write was captured: with its TCP sequence number, each query's own.
    #[test]
    fn pipelined_queries_each_say_where_they_began() {
        let (mut conn, mut out) = started();
        // Two extended-protocol groups and one Sync, as libpq's pipeline mode writes them.
        let mut first = msg(b'P', b"\x00SELECT $1::int\x00\x00\x00");
        first.extend(msg(
            b'B',
            b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00",
        ));
        first.extend(msg(b'E', b"\x00\x00\x00\x00\x00"));
        let mut second = msg(b'B', b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x012\x00\x00");
        second.extend(msg(b'E', b"\x00\x00\x00\x00\x00"));
        let mut write = first.clone();
        write.extend(&second);
        write.extend(msg(b'S', b""));
        conn.feed(&fixture::seg(Direction::Egress, 10, &write), &mut out);
        let mut answer = msg(b'1', b"");
        for _ in 0..2 {
            answer.extend(msg(b'2', b""));
            answer.extend(msg(b'D', b"\x00\x01\x00\x00\x00\x011"));
            answer.extend(msg(b'C', b"SELECT 1\x00"));
        }
        answer.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 11, &answer), &mut out);
        let began: Vec<_> = out.iter().map(|e| (e.req_start_ns, e.req_offset)).collect();
        assert_eq!(began, [(10, 0), (10, first.len() as u64)]);

        // Simple queries, the second read from the write's last bytes (its middle was not
        // captured).
        out.clear();
        let long = q(&format!("SELECT '{}'", "x".repeat(200)));
        let mut write = long.clone();
        write.extend(q("SELECT 1"));
        let seg = Segment {
            dir: Direction::Egress,
            ts_ns: 20,
            start_ns: 20,
            len: write.len() as u64,
            head: &write[..32],
            tail: &write[write.len() - tracer_common::TAIL_LEN..],
        };
        assert!(write.len() - long.len() <= tracer_common::TAIL_LEN);
        conn.feed(&seg, &mut out);
        let mut answer = msg(b'C', b"SELECT 1\x00");
        answer.extend_from_slice(READY);
        answer.extend(answer.clone());
        conn.feed(&fixture::seg(Direction::Ingress, 21, &answer), &mut out);
        let began: Vec<_> = out.iter().map(|e| (e.req_start_ns, e.req_offset)).collect();
        assert_eq!(began, [(20, 0), (20, long.len() as u64)]);
        assert_eq!(out[1].statement, "SELECT ?");
    }

    #[test]
    fn passwords_are_never_kept() {
        let mut conn = PgConn::new();
        let mut out = Vec::new();
        let startup = b"\x00\x00\x00\x21\x00\x03\x00\x00user\x00app\x00database\x00appdb\x00\x00";
        conn.feed(&fixture::seg(Direction::Egress, 1, startup), &mut out);
        conn.feed(
            &fixture::seg(Direction::Ingress, 2, &msg(b'R', &[0, 0, 0, 3])),
            &mut out,
        );
        // Cleartext password, split so that a buffer would be needed to hold it.
        let password = msg(b'p', b"hunter2-secret\x00");
        for (i, b) in password.iter().enumerate() {
            conn.feed(
                &fixture::seg(Direction::Egress, 3 + i as u64, &[*b]),
                &mut out,
            );
            assert!(!format!("{conn:?}").contains("hunter"), "{conn:?}");
        }
        let mut ok = msg(b'R', &[0, 0, 0, 0]);
        ok.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 40, &ok), &mut out);
        conn.feed(
            &fixture::seg(Direction::Egress, 41, &q("SELECT 'hunter2' AS pw")),
            &mut out,
        );
        let mut resp = msg(b'C', b"SELECT 1\x00");
        resp.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 42, &resp), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].statement, "SELECT ? AS pw");
        assert!(!format!("{out:?}{conn:?}").contains("hunter"));
    }

    #[test]
    fn encryption_requests() {
        let gss = b"\x00\x00\x00\x08\x04\xd2\x160";
        let ssl = b"\x00\x00\x00\x08\x04\xd2\x16/";
        let startup = b"\x00\x00\x00\x21\x00\x03\x00\x00user\x00app\x00database\x00appdb\x00\x00";
        // GSSENCRequest refused, SSLRequest refused, then a plain startup and a query.
        let mut conn = PgConn::new();
        let mut out = Vec::new();
        conn.feed(&fixture::seg(Direction::Egress, 1, gss), &mut out);
        conn.feed(&fixture::seg(Direction::Ingress, 2, b"N"), &mut out);
        conn.feed(&fixture::seg(Direction::Egress, 3, ssl), &mut out);
        conn.feed(&fixture::seg(Direction::Ingress, 4, b"N"), &mut out);
        conn.feed(&fixture::seg(Direction::Egress, 5, startup), &mut out);
        let mut ok = msg(b'R', &[0, 0, 0, 0]);
        ok.extend(msg(b'S', b"client_encoding\x00UTF8\x00"));
        ok.extend(msg(b'K', &[0; 8]));
        ok.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 6, &ok), &mut out);
        conn.feed(
            &fixture::seg(Direction::Egress, 7, &q("SET application_name = 'x'")),
            &mut out,
        );
        let mut set = msg(b'S', b"application_name\x00x\x00");
        set.extend(msg(b'C', b"SET\x00"));
        set.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 8, &set), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].statement, "SET application_name = ?");
        assert_eq!(out[0].resp_bytes, set.len() as u64);
        assert!(!conn.is_not_postgres());
        // GSS encryption accepted: give up.
        let mut conn = PgConn::new();
        conn.feed(&fixture::seg(Direction::Egress, 1, gss), &mut out);
        conn.feed(&fixture::seg(Direction::Ingress, 2, b"G"), &mut out);
        assert!(conn.is_not_postgres());
        // A CancelRequest is PostgreSQL and reports nothing.
        let mut conn = PgConn::new();
        let cancel = b"\x00\x00\x00\x10\x04\xd2\x16.\x00\x00\x01\x02\x03\x04\x05\x06";
        conn.feed(&fixture::seg(Direction::Egress, 1, cancel), &mut out);
        conn.close(2, false, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn unexpected_responses_desync_until_idle() {
        let (mut conn, mut out) = started();
        // A response nobody asked for (a request from before we attached).
        let mut stray = msg(b'C', b"SELECT 1\x00");
        stray.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 10, &stray), &mut out);
        conn.feed(
            &fixture::seg(Direction::Egress, 11, &q("SELECT 2")),
            &mut out,
        );
        conn.feed(&fixture::seg(Direction::Ingress, 12, &stray), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].req_start_ns, out[0].end_ns), (11, 12));
        // A Parse answered by a DataRow: the pairing is off, nothing is reported.
        let mut parse = msg(b'P', b"\x00SELECT 3\x00\x00\x00");
        parse.extend(msg(b'S', b""));
        conn.feed(&fixture::seg(Direction::Egress, 13, &parse), &mut out);
        let mut wrong = msg(b'D', b"\x00\x00");
        wrong.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 14, &wrong), &mut out);
        assert_eq!(out.len(), 1);
        // Idle again: the next query pairs.
        conn.feed(
            &fixture::seg(Direction::Egress, 15, &q("SELECT 4")),
            &mut out,
        );
        conn.feed(&fixture::seg(Direction::Ingress, 16, &stray), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((out[1].req_start_ns, out[1].end_ns), (15, 16));
    }

    /// A write whose Parse was cut by the capture but which holds more than the one group
    /// that its tail suggests: the responses do not have the shape of one group, so only the
    /// first Execute (whose answer comes first either way) is reported, then nothing until
    /// the backend is idle.
    #[test]
    fn guessed_groups_are_checked() {
        let long = format!("SELECT 1 /* {} */", "x".repeat(2000));
        let parse = msg(b'P', format!("\x00{long}\x00\x00\x00").as_bytes());
        let bind = msg(b'B', b"\x00\x00\x00\x00\x00\x00\x00\x00");
        let exec = msg(b'E', b"\x00\x00\x00\x00\x00");
        let sync = msg(b'S', b"");
        let mut one = msg(b'2', b"");
        one.extend(msg(b'C', b"SELECT 1\x00"));
        let mut answer_of_two = one.clone();
        answer_of_two.extend_from_slice(&one);
        let cases: [(Vec<&[u8]>, Vec<u8>); 2] = [
            // Two Executes before one Sync.
            (vec![&parse, &bind, &exec, &bind, &exec, &sync], {
                let mut r = msg(b'1', b"");
                r.extend_from_slice(&answer_of_two);
                r.extend_from_slice(READY);
                r
            }),
            // Two groups, two Syncs.
            (
                vec![&parse, &bind, &exec, &sync, &parse, &bind, &exec, &sync],
                {
                    let mut r = msg(b'1', b"");
                    r.extend_from_slice(&one);
                    r.extend_from_slice(READY);
                    r.extend(msg(b'1', b""));
                    r.extend_from_slice(&one);
                    r.extend_from_slice(READY);
                    r
                },
            ),
        ];
        for (parts, response) in cases {
            let (mut conn, mut out) = started();
            let write = parts.concat();
            conn.feed(&fixture::cut(Direction::Egress, 10, &write, 64), &mut out);
            conn.feed(&fixture::seg(Direction::Ingress, 11, &response), &mut out);
            assert_eq!(out.len(), 1, "{out:?}");
            assert_eq!(out[0].statement, "SELECT ?");
            assert_eq!((out[0].req_start_ns, out[0].end_ns), (10, 11));
            conn.feed(
                &fixture::seg(Direction::Egress, 12, &q("SELECT 2")),
                &mut out,
            );
            let mut r = msg(b'C', b"SELECT 1\x00");
            r.extend_from_slice(READY);
            conn.feed(&fixture::seg(Direction::Ingress, 13, &r), &mut out);
            assert_eq!(out.len(), 2, "{out:?}");
            assert_eq!((out[1].req_start_ns, out[1].end_ns), (12, 13));
        }
    }

    #[test]
    fn huge_lengths_and_garbage_never_panic() {
        let mut rng = Rng(0x5eed);
        let mut kinds: Vec<u8> = b"QPBDECSHFXdcfpRKZNATI123nstGWVv".to_vec();
        kinds.push(0);
        for round in 0..3000u64 {
            let (mut conn, mut out) = if round % 2 == 0 {
                started()
            } else {
                (PgConn::new(), Vec::new())
            };
            for step in 0..20 {
                let mut bytes = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    bytes.push(kinds[rng.below(kinds.len())]);
                    let len: u32 = match rng.below(6) {
                        0 => u32::MAX - rng.below(8) as u32,
                        1 => i32::MAX as u32 - rng.below(8) as u32,
                        2 => rng.below(8) as u32,
                        3 => 0x8000_0000,
                        _ => 4 + rng.below(40) as u32,
                    };
                    bytes.extend_from_slice(&len.to_be_bytes());
                    for _ in 0..rng.below(48) {
                        bytes.push(rng.next() as u8);
                    }
                }
                let dir = if rng.below(2) == 0 {
                    Direction::Egress
                } else {
                    Direction::Ingress
                };
                let cap = rng.below(bytes.len() + 1);
                let mut seg = fixture::cut(dir, 100 + step, &bytes, cap);
                if rng.below(8) == 0 {
                    // More bytes moved than were captured, up to absurd counts.
                    seg.len = seg.len.saturating_add(rng.next() >> rng.below(64));
                }
                conn.feed(&seg, &mut out);
                assert_bounded(&conn);
            }
            conn.close(1000, round % 3 == 0, &mut out);
        }
        // Pure noise.
        for seed in 1..200u64 {
            let mut rng = Rng(seed);
            let mut conn = PgConn::new();
            let mut out = Vec::new();
            for step in 0..50 {
                let bytes: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
                let dir = if rng.below(2) == 0 {
                    Direction::Egress
                } else {
                    Direction::Ingress
                };
                conn.feed(&fixture::seg(dir, step, &bytes), &mut out);
                assert_bounded(&conn);
            }
            conn.close(99, false, &mut out);
        }
    }

    #[test]
    fn huge_messages_are_skipped_by_count() {
        let (mut conn, mut out) = started();
        // A 1 GB query text, of which 64 bytes are captured, in several syscalls.
        let mut first = b"Q\x40\x00\x00\x04SELECT * FROM big WHERE x = '".to_vec();
        first.resize(64, b'a');
        let total: u64 = 0x4000_0004 + 1;
        let mut seg = fixture::cut(Direction::Egress, 10, &first, 64);
        seg.len = total - 10;
        conn.feed(&seg, &mut out);
        let mut last = fixture::seg(Direction::Egress, 11, b"aaaaaaaa'\x00");
        last.len = 10;
        conn.feed(&last, &mut out);
        let mut resp = msg(b'C', b"SELECT 0\x00");
        resp.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 12, &resp), &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].statement, "SELECT * FROM big WHERE x = ?");
        assert_eq!(out[0].req_bytes, total);
        assert_eq!(
            (out[0].req_start_ns, out[0].req_end_ns, out[0].end_ns),
            (10, 11, 12)
        );
    }

    #[test]
    fn deep_pipeline_stays_bounded_and_in_order() {
        let (mut conn, mut out) = started();
        let n = 100_000;
        let one = q("SELECT 1");
        let mut requests = Vec::with_capacity(one.len() * n);
        for _ in 0..n {
            requests.extend_from_slice(&one);
        }
        conn.feed(&fixture::seg(Direction::Egress, 10, &requests), &mut out);
        assert_bounded(&conn);
        let mut answer = msg(b'C', b"SELECT 1\x00");
        answer.extend_from_slice(READY);
        let mut responses = Vec::with_capacity(answer.len() * n);
        for _ in 0..n {
            responses.extend_from_slice(&answer);
        }
        for (i, chunk) in responses.chunks(65536).enumerate() {
            conn.feed(
                &fixture::seg(Direction::Ingress, 11 + i as u64, chunk),
                &mut out,
            );
            assert_bounded(&conn);
        }
        assert_eq!(out.len(), MAX_UNITS);
        assert!(conn.units.is_empty(), "{:?}", conn.units.len());
        // Still in step: the next query pairs with its own answer.
        conn.feed(
            &fixture::seg(Direction::Egress, 1000, &q("SELECT 2")),
            &mut out,
        );
        let mut two = msg(b'E', b"SERROR\x00C22012\x00Mdivision by zero\x00\x00");
        two.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 1001, &two), &mut out);
        let last = out.last().unwrap();
        assert_eq!(last.statement, "SELECT ?");
        assert_eq!(last.error.as_deref(), Some("22012: division by zero"));
        assert_eq!((last.req_start_ns, last.end_ns), (1000, 1001));

        // The same with extended-protocol groups (Bind/Execute/Sync of a named statement).
        let (mut conn, mut out) = started();
        let mut prep = msg(b'P', b"s1\x00SELECT 1\x00\x00\x00");
        prep.extend(msg(b'S', b""));
        conn.feed(&fixture::seg(Direction::Egress, 10, &prep), &mut out);
        let mut ready = msg(b'1', b"");
        ready.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 11, &ready), &mut out);
        assert_eq!(out.len(), 1);
        let mut group = msg(b'B', b"\x00s1\x00\x00\x00\x00\x00\x00\x00");
        group.extend(msg(b'E', b"\x00\x00\x00\x00\x00"));
        group.extend(msg(b'S', b""));
        let mut requests = Vec::new();
        for _ in 0..n {
            requests.extend_from_slice(&group);
        }
        conn.feed(&fixture::seg(Direction::Egress, 12, &requests), &mut out);
        assert_bounded(&conn);
        let mut answer = msg(b'2', b"");
        answer.extend(msg(b'C', b"SELECT 1\x00"));
        answer.extend_from_slice(READY);
        let mut responses = Vec::new();
        for _ in 0..n {
            responses.extend_from_slice(&answer);
        }
        for (i, chunk) in responses.chunks(4096).enumerate() {
            conn.feed(
                &fixture::seg(Direction::Ingress, 13 + i as u64, chunk),
                &mut out,
            );
            assert_bounded(&conn);
        }
        assert!(conn.units.is_empty());
        assert!(out.len() > 1 && out.len() <= 1 + MAX_UNITS, "{}", out.len());
        assert!(
            out[1..]
                .iter()
                .all(|e| e.statement == "SELECT ?" && e.error.is_none())
        );
    }

    #[test]
    fn statement_map_is_bounded() {
        let (mut conn, mut out) = started();
        for i in 0..5000u64 {
            let mut m = msg(
                b'P',
                format!("stmt{i}\x00SELECT {i}\x00\x00\x00").as_bytes(),
            );
            m.extend(msg(b'S', b""));
            conn.feed(&fixture::seg(Direction::Egress, 10 + 2 * i, &m), &mut out);
            let mut r = msg(b'1', b"");
            r.extend_from_slice(READY);
            conn.feed(&fixture::seg(Direction::Ingress, 11 + 2 * i, &r), &mut out);
            if i % 3 == 0 {
                let close = msg(b'C', format!("S stmt{}\x00", i / 2).as_bytes());
                let mut close = close;
                close[5] = b'S';
                close.extend(msg(b'S', b""));
                conn.feed(
                    &fixture::seg(Direction::Egress, 11 + 2 * i, &close),
                    &mut out,
                );
                let mut r = msg(b'3', b"");
                r.extend_from_slice(READY);
                conn.feed(&fixture::seg(Direction::Ingress, 11 + 2 * i, &r), &mut out);
            }
            assert_bounded(&conn);
        }
        assert_eq!(out.len(), 5000);
        assert!(
            out.iter()
                .all(|e| e.operation == "PREPARE" && e.statement == "SELECT ?")
        );
        // The newest statement is still known, the oldest forgotten.
        let mut run = msg(b'B', b"\x00stmt4999\x00\x00\x00\x00\x00\x00\x00");
        run.extend(msg(b'E', b"\x00\x00\x00\x00\x00"));
        run.extend(msg(b'B', b"\x00stmt1\x00\x00\x00\x00\x00\x00\x00"));
        run.extend(msg(b'E', b"\x00\x00\x00\x00\x00"));
        run.extend(msg(b'S', b""));
        conn.feed(&fixture::seg(Direction::Egress, 20_000, &run), &mut out);
        let mut r = msg(b'2', b"");
        r.extend(msg(b'C', b"SELECT 1\x00"));
        r.extend(msg(b'2', b""));
        r.extend(msg(b'C', b"SELECT 1\x00"));
        r.extend_from_slice(READY);
        conn.feed(&fixture::seg(Direction::Ingress, 20_001, &r), &mut out);
        assert_eq!(out.len(), 5002);
        assert_eq!(out[5000].statement, "SELECT ?");
        assert_eq!(out[5001].statement, "EXECUTE stmt1");
    }

    fn response(rows: usize) -> Vec<u8> {
        let mut r = msg(b'T', b"\x00\x00");
        for _ in 0..rows {
            r.extend(msg(b'D', b"\x00\x01\x00\x00\x00\x03abc"));
        }
        r.extend(msg(b'C', format!("SELECT {rows}\x00").as_bytes()));
        r.extend_from_slice(READY);
        r
    }

    /// (statement, request start, response start, end) of each exchange.
    fn summary(out: &[DbExchange]) -> Vec<(&str, u64, Option<u64>, u64)> {
        out.iter()
            .map(|e| {
                (
                    e.statement.as_str(),
                    e.req_start_ns,
                    e.resp_start_ns,
                    e.end_ns,
                )
            })
            .collect()
    }

    const EG: Direction = Direction::Egress;
    const IN: Direction = Direction::Ingress;

    #[test]
    fn gap_between_exchanges_changes_nothing() {
        let (mut conn, mut out) = started();
        conn.feed(&fixture::seg(EG, 10, &q("SELECT 1")), &mut out);
        conn.feed(&fixture::seg(IN, 11, &response(1)), &mut out);
        assert_eq!(conn.gap(), 0);
        conn.feed(&fixture::seg(EG, 20, &q("SELECT 2 FROM t")), &mut out);
        conn.feed(&fixture::seg(IN, 21, &response(2)), &mut out);
        assert_eq!(
            summary(&out),
            [
                ("SELECT ?", 10, Some(11), 11),
                ("SELECT ? FROM t", 20, Some(21), 21)
            ]
        );
        assert_eq!(out[1].resp_bytes, response(2).len() as u64);
        assert_eq!(out[1].target.as_deref(), Some("t"));
    }

    #[test]
    fn gap_drops_queries_waiting_for_their_response() {
        let (mut conn, mut out) = started();
        conn.feed(&fixture::seg(EG, 10, &q("SELECT 1")), &mut out);
        assert_eq!(conn.gap(), 1);
        conn.feed(&fixture::seg(EG, 20, &q("SELECT 2")), &mut out);
        conn.feed(&fixture::seg(IN, 21, &response(2)), &mut out);
        assert_eq!(summary(&out), [("SELECT ?", 20, Some(21), 21)]);
        assert_eq!(out[0].resp_bytes, response(2).len() as u64);
        // An extended-protocol pipeline whose response the gap cut.
        let mut group = msg(b'P', b"\x00SELECT 3\x00\x00\x00");
        group.extend(msg(b'B', b"\x00\x00\x00\x00\x00\x00\x00\x00"));
        group.extend(msg(b'E', b"\x00\x00\x00\x00\x00"));
        group.extend(msg(b'S', b""));
        let two = [group.as_slice(), &group].concat();
        conn.feed(&fixture::seg(EG, 30, &two), &mut out);
        let mut partial = msg(b'1', b"");
        partial.extend(msg(b'2', b""));
        partial.extend(msg(b'D', b"\x00\x01\x00\x00\x00\x03a"));
        conn.feed(&fixture::seg(IN, 31, &partial), &mut out);
        assert_eq!(conn.gap(), 2);
        conn.feed(&fixture::seg(EG, 40, &q("SELECT 4")), &mut out);
        conn.feed(&fixture::seg(IN, 41, &response(0)), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((out[1].req_start_ns, out[1].end_ns), (40, 41));
    }

    #[test]
    fn gap_ending_inside_a_message_resyncs_at_the_next_request() {
        let (mut conn, mut out) = started();
        conn.feed(&fixture::seg(EG, 10, &q("SELECT 1")), &mut out);
        conn.feed(&fixture::seg(IN, 11, &response(1)), &mut out);
        // The rest of a large result, in two reads: the backend is idle once one ends with
        // ReadyForQuery.
        conn.gap();
        let rows = response(50);
        let (a, b) = rows.split_at(rows.len() / 2);
        conn.feed(&fixture::seg(IN, 20, &a[7..]), &mut out);
        conn.feed(&fixture::seg(IN, 21, b), &mut out);
        conn.feed(&fixture::seg(EG, 22, &q("SELECT 2")), &mut out);
        conn.feed(&fixture::seg(IN, 23, &response(0)), &mut out);
        // The rest of a long query text, its response, then the next query.
        conn.gap();
        conn.feed(
            &fixture::seg(EG, 30, b"ERE id = 7 ORDER BY 1\x00"),
            &mut out,
        );
        conn.feed(&fixture::seg(IN, 31, &response(1)), &mut out);
        conn.feed(&fixture::seg(EG, 32, &q("SELECT 3")), &mut out);
        conn.feed(&fixture::seg(IN, 33, &response(3)), &mut out);
        assert_eq!(
            summary(&out),
            [
                ("SELECT ?", 10, Some(11), 11),
                ("SELECT ?", 22, Some(23), 23),
                ("SELECT ?", 32, Some(33), 33)
            ]
        );
        assert_eq!(out[2].resp_bytes, response(3).len() as u64);
    }

    #[test]
    fn response_to_a_query_sent_during_a_gap_is_not_matched() {
        let (mut conn, mut out) = started();
        conn.gap();
        let mut error = msg(
            b'E',
            b"SERROR\x00C42P01\x00Mrelation \"t\" does not exist\x00\x00",
        );
        error.extend_from_slice(READY);
        conn.feed(&fixture::seg(IN, 10, &error), &mut out);
        conn.feed(&fixture::seg(EG, 11, &q("SELECT 1")), &mut out);
        conn.feed(&fixture::seg(IN, 12, &response(1)), &mut out);
        assert_eq!(summary(&out), [("SELECT ?", 11, Some(12), 12)]);
        assert_eq!(out[0].error, None);
        assert!(!conn.is_not_postgres());
    }

    #[test]
    fn gap_while_searching_or_starting_up_does_not_give_up() {
        // Fresh, then searching with the start of a message gathered: what follows the gap
        // does not complete it.
        let mut conn = PgConn::new();
        let mut out = Vec::new();
        assert_eq!(conn.gap(), 0);
        conn.feed(&fixture::seg(EG, 1, b"Q\x00\x00"), &mut out);
        assert!(!conn.probe.bytes.is_empty());
        assert_eq!(conn.gap(), 0);
        assert!(conn.probe.bytes.is_empty());
        conn.feed(&fixture::seg(EG, 10, &q("SELECT 1")), &mut out);
        conn.feed(&fixture::seg(IN, 11, &response(1)), &mut out);
        assert_eq!(summary(&out), [("SELECT ?", 10, Some(11), 11)]);
        // Authentication went unseen.
        let startup = b"\x00\x00\x00\x21\x00\x03\x00\x00user\x00app\x00database\x00appdb\x00\x00";
        let mut conn = PgConn::new();
        let mut out = Vec::new();
        conn.feed(&fixture::seg(EG, 1, startup), &mut out);
        conn.feed(&fixture::seg(IN, 2, &msg(b'R', &[0, 0, 0, 10])), &mut out);
        assert_eq!(conn.gap(), 0);
        assert!(!conn.is_not_postgres());
        let mut params = msg(b'S', b"TimeZone\x00UTC\x00");
        params.extend(msg(b'K', &[0; 8]));
        params.extend_from_slice(READY);
        conn.feed(&fixture::seg(IN, 10, &params), &mut out);
        conn.feed(&fixture::seg(EG, 11, &q("SELECT 1")), &mut out);
        conn.feed(&fixture::seg(IN, 12, &response(1)), &mut out);
        assert_eq!(summary(&out), [("SELECT ?", 11, Some(12), 12)]);
        assert!(!conn.is_not_postgres());
        // The answer to SSLRequest went unseen: queries follow, or TLS.
        let ssl = b"\x00\x00\x00\x08\x04\xd2\x16/";
        for tls in [false, true] {
            let mut conn = PgConn::new();
            let mut out = Vec::new();
            conn.feed(&fixture::seg(EG, 1, ssl), &mut out);
            assert_eq!(conn.gap(), 0);
            if tls {
                conn.feed(
                    &fixture::seg(EG, 10, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
                    &mut out,
                );
                assert!(conn.is_not_postgres());
            } else {
                conn.feed(&fixture::seg(EG, 10, &q("SELECT 1")), &mut out);
                conn.feed(&fixture::seg(IN, 11, &response(1)), &mut out);
                assert_eq!(summary(&out), [("SELECT ?", 10, Some(11), 11)]);
                assert!(!conn.is_not_postgres());
            }
        }
    }

    #[test]
    fn gap_forgets_the_unnamed_statement_and_partial_messages() {
        let (mut conn, mut out) = started();
        let bind_exec = || {
            let mut m = msg(b'B', b"\x00\x00\x00\x00\x00\x00\x00\x00");
            m.extend(msg(b'E', b"\x00\x00\x00\x00\x00"));
            m.extend(msg(b'S', b""));
            m
        };
        let mut first = msg(b'P', b"\x00SELECT 1\x00\x00\x00");
        first.extend(msg(b'P', b"named\x00SELECT 2\x00\x00\x00"));
        first.extend(bind_exec());
        conn.feed(&fixture::seg(EG, 10, &first), &mut out);
        let answer = |parses: usize| {
            let mut r = msg(b'1', b"").repeat(parses);
            r.extend(msg(b'2', b""));
            r.extend(msg(b'C', b"SELECT 1\x00"));
            r.extend_from_slice(READY);
            r
        };
        conn.feed(&fixture::seg(IN, 11, &answer(2)), &mut out);
        // A query cut in the middle of its text, and a response in the middle of a row.
        conn.feed(
            &fixture::seg(EG, 12, b"Q\x00\x00\x01\x00SELECT a, b"),
            &mut out,
        );
        conn.feed(
            &fixture::seg(IN, 13, b"T\x00\x00\x00\x06\x00\x00D\x00\x00\x01\x00"),
            &mut out,
        );
        assert!(!conn.req.keep.is_empty());
        // The query is not waiting for a response yet: nothing is dropped.
        assert_eq!(conn.gap(), 0);
        assert!(conn.req.keep.is_empty() && conn.resp.keep.is_empty());
        assert!(conn.units.is_empty() && conn.blind.is_none());
        // The unnamed statement may have been parsed again during the gap; the named one
        // lives on.
        conn.feed(&fixture::seg(EG, 20, &bind_exec()), &mut out);
        conn.feed(&fixture::seg(IN, 21, &answer(0)), &mut out);
        let mut named = msg(b'B', b"\x00named\x00\x00\x00\x00\x00\x00\x00");
        named.extend(msg(b'E', b"\x00\x00\x00\x00\x00"));
        named.extend(msg(b'S', b""));
        conn.feed(&fixture::seg(EG, 22, &named), &mut out);
        conn.feed(&fixture::seg(IN, 23, &answer(0)), &mut out);
        let st: Vec<_> = out.iter().map(|e| e.statement.as_str()).collect();
        assert_eq!(st, ["SELECT ?", "EXECUTE", "SELECT ?"]);
    }

    /// A conversation without pipelining of simple queries and extended-protocol groups, cut into
    /// random syscalls, with gaps at random points that also hide a few syscalls. Every
    /// exchange untouched by gaps is reported exactly; every one reported has its own response
    /// (one whose request start went unseen may be reported from the part seen, like one seen
    /// on attaching).
    #[test]
    fn random_gaps_never_mis_pair_and_keep_untouched_exchanges() {
        /// Per exchange: statement, request start and end, bytes, response start and end, bytes,
        /// whether a gap touched it.
        #[derive(Debug)]
        struct Expect {
            statement: String,
            req: (u64, u64, u64),
            resp: (u64, u64, u64),
            touched: bool,
        }
        let mut rng = Rng(0x3c6e_f372_fe94_f82b);
        for round in 0..300 {
            let server = round % 2 == 1;
            let (req_dir, resp_dir) = if server { (IN, EG) } else { (EG, IN) };
            let (mut conn, mut out) = if server {
                let mut conn = PgConn::new();
                let mut out = Vec::new();
                let startup =
                    b"\x00\x00\x00\x21\x00\x03\x00\x00user\x00app\x00database\x00appdb\x00\x00";
                conn.feed(&fixture::seg(IN, 1, startup), &mut out);
                let mut ok = msg(b'R', &[0, 0, 0, 0]);
                ok.extend_from_slice(READY);
                conn.feed(&fixture::seg(EG, 2, &ok), &mut out);
                (conn, out)
            } else {
                started()
            };
            let mut ts = 10u64;
            let mut expect: Vec<Expect> = Vec::new();
            let mut gaps = fixture::Gaps::default();
            for i in 0..40 {
                let text = format!("SELECT {i} FROM t{i}");
                let rows = rng.below(20);
                let extended = rng.below(2) == 0;
                let (request, reply, req_bytes, resp_bytes) = if extended {
                    let mut r = msg(b'P', format!("\x00{text}\x00\x00\x00").as_bytes());
                    r.extend(msg(b'B', b"\x00\x00\x00\x00\x00\x00\x00\x00"));
                    r.extend(msg(b'D', b"P\x00"));
                    r.extend(msg(b'E', b"\x00\x00\x00\x00\x00"));
                    let req_bytes = r.len();
                    r.extend(msg(b'S', b""));
                    let mut a = msg(b'1', b"");
                    a.extend(msg(b'2', b""));
                    a.extend(response(rows));
                    let resp_bytes = a.len() - READY.len();
                    (r, a, req_bytes, resp_bytes)
                } else {
                    let r = q(&text);
                    let a = response(rows);
                    let (n, m) = (r.len(), a.len());
                    (r, a, n, m)
                };
                let mut touched = false;
                let mut times = [(0, 0); 2];
                for (k, (dir, bytes)) in [(req_dir, &request), (resp_dir, &reply)]
                    .into_iter()
                    .enumerate()
                {
                    let mut at = 0;
                    while at < bytes.len() {
                        // A request's first syscall shows a message start; a response's last
                        // one holds all of ReadyForQuery: so do real peers, and that is what
                        // tells where messages start and when the backend is idle.
                        let min = if k == 0 && at == 0 { 16 } else { 1 };
                        let mut end = (at + min + rng.below(bytes.len())).min(bytes.len());
                        if end > bytes.len() - READY.len() && k == 1 {
                            end = bytes.len();
                        }
                        ts += 10;
                        let step = gaps.step(&mut rng);
                        let hidden = step == fixture::GapStep::Hidden;
                        if step == fixture::GapStep::GapEnds {
                            conn.gap();
                            touched |= k == 1 || at > 0;
                        }
                        if hidden {
                            touched = true;
                        } else {
                            conn.feed(&fixture::seg(dir, ts, &bytes[at..end]), &mut out);
                            assert_bounded(&conn);
                        }
                        if at == 0 {
                            times[k].0 = ts;
                        }
                        // An Execute's request and response end before Sync and ReadyForQuery.
                        let counted = if k == 0 { req_bytes } else { resp_bytes };
                        if (at..end).contains(&(counted - 1)) {
                            times[k].1 = ts;
                        }
                        at = end;
                    }
                }
                expect.push(Expect {
                    statement: format!("SELECT ? FROM t{i}"),
                    req: (times[0].0, times[0].1, req_bytes as u64),
                    resp: (times[1].0, times[1].1, resp_bytes as u64),
                    touched,
                });
            }
            for e in &out {
                let x = expect
                    .iter()
                    .find(|x| x.req.1 == e.req_end_ns)
                    .unwrap_or_else(|| panic!("round {round}: {e:?}"));
                assert_eq!(
                    (
                        e.resp_start_ns,
                        e.end_ns,
                        e.resp_bytes,
                        &e.outcome,
                        &e.error
                    ),
                    (
                        Some(x.resp.0),
                        x.resp.1,
                        x.resp.2,
                        &Outcome::Complete,
                        &None
                    ),
                    "round {round}: {e:?} {x:?}"
                );
                if !x.touched {
                    assert_eq!(
                        (e.req_start_ns, e.req_bytes, e.statement.as_str()),
                        (x.req.0, x.req.2, x.statement.as_str()),
                        "round {round}: {e:?}"
                    );
                }
            }
            for x in expect.iter().filter(|x| !x.touched) {
                assert!(
                    out.iter().any(|e| e.req_end_ns == x.req.1),
                    "round {round}: {x:?} not reported"
                );
            }
            assert!(!conn.is_not_postgres(), "round {round}");
        }
    }
}
