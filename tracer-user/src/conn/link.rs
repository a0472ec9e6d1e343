//! In-process causality: which request a process was serving when it sent a request of its own.
//!
//! A server request gets its identity (trace id, span id, parent) when its first byte is read,
//! not when it finishes: the calls it makes finish first and need it as their parent. A request
//! read with `traceparent`/`b3` joins the caller's trace. A client request written by a thread
//! that is serving exactly one request becomes that request's child. When a thread serves
//! several requests at once (an event loop) the link is uncertain and the call stays a root:
//! a wrong parent is worse than none. Both outcomes are counted.
//!
//! With context injection on, the kernel names the spans instead (see `tracer-ebpf`'s
//! `inject.rs`): the ids it wrote into a request on the wire are the ones that must be
//! exported, so identities carried by the data events win over the ones made here.

use std::collections::VecDeque;

use rustc_hash::FxHashMap as HashMap;

use rand::Rng as _;

use tracer_common::{CTX_FROM_HEADER, CTX_INJECTED, CTX_SAMPLED, CTX_VALID, TraceCtx};

use crate::{
    context::{IncomingContext, extract, extract_from},
    protocols::{HttpExchange, Side},
};

/// A connection: (tgid, fd).
pub type ConnKey = (u32, u32);

/// The ids a span gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    /// False when an upstream caller decided not to sample this trace.
    pub sampled: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Client spans given the server span of their thread as parent.
    pub linked: u64,
    /// Client spans left as roots because their thread was serving several requests at once.
    pub unlinked_ambiguous: u64,
    /// Client spans sent outside any request (a cron job, a client program): roots by nature.
    pub roots: u64,
    /// Server spans that joined a trace from an incoming traceparent/b3 header.
    pub joined_incoming: u64,
    /// Client spans whose context the kernel wrote into the request.
    pub injected: u64,
}

#[derive(Clone, Copy, Debug)]
struct Serving {
    conn: ConnKey,
    start_ns: u64,
    identity: Identity,
    /// Another request started on this thread while this one was in flight.
    ambiguous: bool,
    finished: bool,
}

#[derive(Clone, Copy, Debug)]
struct Started {
    start_ns: u64,
    tid: u32,
    identity: Option<Identity>,
    /// A client request whose identity the kernel chose and wrote into it.
    injected: bool,
}

/// An identity named by the kernel (`tracer_common::TraceCtx`).
#[derive(Clone, Copy, Debug)]
struct KernelIdentity {
    identity: Identity,
    injected: bool,
    from_header: bool,
}

impl KernelIdentity {
    fn of(ctx: &TraceCtx) -> Option<Self> {
        if ctx.flags & CTX_VALID == 0 || ctx.span_id == 0 {
            return None;
        }
        Some(Self {
            identity: Identity {
                trace_id: (u128::from(ctx.trace_id_hi) << 64) | u128::from(ctx.trace_id_lo),
                span_id: ctx.span_id,
                parent_id: (ctx.parent_id != 0).then_some(ctx.parent_id),
                sampled: ctx.flags & CTX_SAMPLED != 0,
            },
            injected: ctx.flags & CTX_INJECTED != 0,
            from_header: ctx.flags & CTX_FROM_HEADER != 0,
        })
    }
}

/// Bound on requests remembered per connection (pipelining depth) and on threads tracked.
const MAX_PENDING_PER_CONN: usize = 64;
const MAX_THREADS: usize = 65_536;

#[derive(Default)]
pub struct Linker {
    /// What each thread is serving (the latest request it read).
    serving: HashMap<u32, Serving>,
    /// Request starts per connection, oldest first, matched to finished exchanges by start time.
    started: HashMap<ConnKey, VecDeque<Started>>,
    /// Served requests whose head has not all been read yet, and began without a caller's
    /// context: the rest of their header lines may carry it.
    open_heads: HashMap<ConnKey, OpenHead>,
    stats: LinkStats,
}

/// A request head read in pieces (a client that writes its headers in several sends).
struct OpenHead {
    start_ns: u64,
    tid: u32,
    /// The context headers seen so far.
    headers: Vec<(&'static str, String)>,
}

impl Linker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// A segment on `conn` began with a request line: read by the process (it serves the
    /// request) when `ingress`, written (it makes a call) otherwise. `whole`: `head` is all
    /// the call moved (not cut by the capture size).
    #[allow(clippy::too_many_arguments)] // the fields of one data event, from one call site
    pub fn request_started(
        &mut self,
        conn: ConnKey,
        ingress: bool,
        tid: u32,
        ts_ns: u64,
        head: &[u8],
        whole: bool,
        kernel: &TraceCtx,
    ) {
        let kernel = KernelIdentity::of(kernel);
        if !ingress {
            // A client request the kernel wrote a context into: its identity is fixed already.
            if let Some(k) = kernel.filter(|k| k.injected) {
                self.push_started(
                    conn,
                    Started {
                        start_ns: ts_ns,
                        tid,
                        identity: Some(k.identity),
                        injected: true,
                    },
                );
            } else {
                self.push_started(
                    conn,
                    Started {
                        start_ns: ts_ns,
                        tid,
                        identity: None,
                        injected: false,
                    },
                );
            }
            return;
        }
        // A new request on the connection: the previous one's head is over.
        self.open_heads.remove(&conn);
        let identity = {
            let mut context_headers = Vec::new();
            let head_ended = context_header_lines(head, true, &mut context_headers);
            let incoming = extract_some(&context_headers);
            let identity = match (&incoming, kernel) {
                // The kernel named this server span (and its calls already carry that name),
                // unless the caller used a header the kernel does not read (b3), whose trace
                // wins: joining the caller's trace matters more.
                (None, Some(k)) => k.identity,
                (Some(_), Some(k)) if k.from_header => k.identity,
                (Some(ctx), _) => Identity {
                    trace_id: ctx.trace_id,
                    span_id: new_span_id(),
                    parent_id: Some(ctx.parent_span_id),
                    sampled: ctx.sampled != Some(false),
                },
                (None, None) => Identity {
                    trace_id: new_trace_id(),
                    span_id: new_span_id(),
                    parent_id: None,
                    sampled: true,
                },
            };
            let ambiguous = self
                .serving
                .get(&tid)
                .is_some_and(|s| !s.finished && s.conn != conn);
            if let Some(previous) = self.serving.get_mut(&tid)
                && ambiguous
            {
                previous.ambiguous = true;
            }
            if self.serving.len() >= MAX_THREADS && !self.serving.contains_key(&tid) {
                self.serving.retain(|_, s| !s.finished);
            }
            self.serving.insert(
                tid,
                Serving {
                    conn,
                    start_ns: ts_ns,
                    identity,
                    ambiguous,
                    finished: false,
                },
            );
            // All of what the call moved was seen and the head did not end in it: the rest
            // of the head comes in the next reads.
            if identity.parent_id.is_none()
                && whole
                && !head_ended
                && self.open_heads.len() < MAX_THREADS
            {
                self.open_heads.insert(
                    conn,
                    OpenHead {
                        start_ns: ts_ns,
                        tid,
                        headers: context_headers,
                    },
                );
            }
            identity
        };
        self.push_started(
            conn,
            Started {
                start_ns: ts_ns,
                tid,
                identity: Some(identity),
                injected: false,
            },
        );
    }

    /// More of a served request's bytes on `conn`, read after its first segment. While its
    /// head is open, the header lines in them can still join the caller's trace: until then the
    /// request is a root (or carries the name the kernel gave it, which is given up here as it
    /// is for a b3 caller: joining the caller's trace matters more).
    pub fn request_continued(&mut self, conn: ConnKey, bytes: &[u8]) {
        let Some(open) = self.open_heads.get_mut(&conn) else {
            return;
        };
        let before = open.headers.len();
        let ended = context_header_lines(bytes, false, &mut open.headers);
        let context = (open.headers.len() > before)
            .then(|| extract_some(&open.headers))
            .flatten();
        let (start_ns, tid) = (open.start_ns, open.tid);
        if ended || context.is_some() {
            self.open_heads.remove(&conn);
        }
        let Some(ctx) = context else {
            return;
        };
        let join = |identity: &mut Identity| {
            identity.trace_id = ctx.trace_id;
            identity.parent_id = Some(ctx.parent_span_id);
            identity.sampled = ctx.sampled != Some(false);
        };
        if let Some(started) = self
            .started
            .get_mut(&conn)
            .and_then(|q| q.iter_mut().find(|s| s.start_ns == start_ns))
            && let Some(identity) = started.identity.as_mut()
        {
            join(identity);
        }
        if let Some(serving) = self.serving.get_mut(&tid)
            && serving.conn == conn
            && serving.start_ns == start_ns
        {
            join(&mut serving.identity);
        }
    }

    fn push_started(&mut self, conn: ConnKey, started: Started) {
        let queue = self.started.entry(conn).or_default();
        if queue.len() >= MAX_PENDING_PER_CONN {
            queue.pop_front();
        }
        queue.push_back(started);
    }

    /// The identity of a finished exchange on `conn`.
    pub fn finished(&mut self, conn: ConnKey, exchange: &HttpExchange) -> Identity {
        let started = self.take_started(conn, exchange.req_start_ns);
        match exchange.side {
            Side::Server => {
                let identity = match started.and_then(|s| s.identity) {
                    Some(identity) => identity,
                    // Its start was not seen as such (a head split oddly, or events lost).
                    None => self.root_or_incoming(exchange),
                };
                if identity.parent_id.is_some() {
                    self.stats.joined_incoming += 1;
                }
                if let Some(tid) = started.map(|s| s.tid)
                    && let Some(s) = self.serving.get_mut(&tid)
                    && s.conn == conn
                    && s.start_ns == exchange.req_start_ns
                {
                    s.finished = true;
                }
                identity
            }
            Side::Client => {
                if let Some(s) = started.filter(|s| s.injected)
                    && let Some(identity) = s.identity
                {
                    self.stats.injected += 1;
                    if identity.parent_id.is_some() {
                        self.stats.linked += 1;
                    } else {
                        self.stats.roots += 1;
                    }
                    return identity;
                }
                self.call_identity(started.map(|s| s.tid), exchange.req_start_ns)
            }
        }
    }

    /// The identity of a call (a client request) that thread `tid` began at `start_ns`:
    /// a child of the request the thread was serving then, when that is certain.
    pub fn call_identity(&mut self, tid: Option<u32>, start_ns: u64) -> Identity {
        let parent = tid
            .and_then(|tid| self.serving.get(&tid))
            .filter(|s| s.start_ns <= start_ns);
        match parent {
            Some(p) if p.ambiguous => {
                self.stats.unlinked_ambiguous += 1;
                self.new_root()
            }
            Some(p) if !p.finished => {
                self.stats.linked += 1;
                Identity {
                    trace_id: p.identity.trace_id,
                    span_id: new_span_id(),
                    parent_id: Some(p.identity.span_id),
                    sampled: p.identity.sampled,
                }
            }
            _ => {
                self.stats.roots += 1;
                self.new_root()
            }
        }
    }

    /// The connection is gone: forget its unmatched starts.
    pub fn conn_closed(&mut self, conn: ConnKey) {
        self.started.remove(&conn);
        self.open_heads.remove(&conn);
    }

    /// Capture of the connection had a gap (per-turn sampling of a shed process): the
    /// requests started on it, and what threads serve from it, are unknown now.
    pub fn conn_gap(&mut self, conn: ConnKey) {
        self.conn_closed(conn);
        self.serving.retain(|_, s| s.conn != conn);
    }

    /// The process is gone (its tids may be reused).
    pub fn process_exited(&mut self, tgid: u32) {
        self.started.retain(|conn, _| conn.0 != tgid);
        self.open_heads.retain(|conn, _| conn.0 != tgid);
        self.serving.retain(|_, s| s.conn.0 != tgid);
    }

    fn take_started(&mut self, conn: ConnKey, start_ns: u64) -> Option<Started> {
        let queue = self.started.get_mut(&conn)?;
        // Starts older than this exchange's never finished (no response): drop them.
        while queue.front().is_some_and(|s| s.start_ns < start_ns) {
            queue.pop_front();
        }
        if queue.front().is_some_and(|s| s.start_ns == start_ns) {
            queue.pop_front()
        } else {
            None
        }
    }

    fn root_or_incoming(&self, exchange: &HttpExchange) -> Identity {
        match extract_from(|name| exchange.header(name)) {
            Some(ctx) => Identity {
                trace_id: ctx.trace_id,
                span_id: new_span_id(),
                parent_id: Some(ctx.parent_span_id),
                sampled: ctx.sampled != Some(false),
            },
            None => self.new_root(),
        }
    }

    pub fn new_root(&self) -> Identity {
        Identity {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent_id: None,
            sampled: true,
        }
    }
}

/// Collects the trace-context header lines of `bytes` (a request head as captured, or a later
/// piece of it: `skip_first` skips the request line) into `headers`. Returns whether the head's
/// blank line was among them. A head cut short gives the complete lines it has.
fn context_header_lines(
    bytes: &[u8],
    skip_first: bool,
    headers: &mut Vec<(&'static str, String)>,
) -> bool {
    // Only lines that end are read: what follows the last line break is a line cut short.
    let mut start = 0;
    for (n, end) in memchr::memchr_iter(b'\n', bytes).enumerate() {
        let line = &bytes[start..end];
        start = end + 1;
        if n == 0 && skip_first {
            continue;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return true;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        // Every header line of every request passes here: only a context header costs an
        // allocation (its value).
        match context_header_name(&line[..colon]) {
            Some(OTHER_B3) => headers.push((OTHER_B3, String::new())),
            Some(name) => headers.push((
                name,
                String::from_utf8_lossy(&line[colon + 1..])
                    .trim()
                    .to_string(),
            )),
            None => {}
        }
    }
    false
}

/// Whether a request head carries a trace context header of its own, one that makes the
/// kernel's injector leave the request alone (`traceparent`, `b3`, `X-B3-TraceId`).
pub fn has_own_context(head: &[u8]) -> bool {
    let mut lines = head.split(|b| *b == b'\n').skip(1);
    lines.any(|line| {
        line.iter().position(|b| *b == b':').is_some_and(|colon| {
            matches!(
                context_header_name(&line[..colon]),
                Some("traceparent" | "b3" | "x-b3-traceid")
            )
        })
    })
}

/// Any other `X-B3-*` header. `extract` reads none, but one arriving in a later piece of a
/// head still counts as new context there (`request_continued` reads the context again), so
/// it is kept, by this name and without its value.
const OTHER_B3: &str = "x-b3-*";

/// The static name of a trace-context header line's `name` (any case).
fn context_header_name(name: &[u8]) -> Option<&'static str> {
    // Every header line of every request is asked: most (Host, User-Agent, Accept...) are
    // told by their first letter.
    if !matches!(
        name.first().map(u8::to_ascii_lowercase),
        Some(b't' | b'b' | b'x')
    ) {
        return None;
    }
    if let Some(known) = crate::context::HEADERS
        .iter()
        .find(|known| name.eq_ignore_ascii_case(known.as_bytes()))
    {
        return Some(known);
    }
    name.get(..5)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"x-b3-"))
        .then_some(OTHER_B3)
}

fn extract_some(headers: &[(&'static str, String)]) -> Option<IncomingContext> {
    if headers.is_empty() {
        None
    } else {
        extract(headers)
    }
}

fn new_trace_id() -> u128 {
    rand::rng().random_range(1..=u128::MAX)
}

fn new_span_id() -> u64 {
    rand::rng().random_range(1..=u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_CTX: TraceCtx = TraceCtx {
        trace_id_hi: 0,
        trace_id_lo: 0,
        span_id: 0,
        parent_id: 0,
        flags: 0,
        _pad: 0,
    };
    use crate::protocols::{Outcome, RequestText};

    fn exchange(
        side: Side,
        start: u64,
        end: u64,
        headers: &[(&'static str, &str)],
    ) -> HttpExchange {
        HttpExchange {
            side,
            method: "GET".into(),
            request: RequestText::new("/", headers),
            minor_version: 1,
            status: Some(200),
            req_start_ns: start,
            req_offset: 0,
            req_end_ns: start,
            resp_start_ns: Some(end),
            end_ns: end,
            req_bytes: 10,
            resp_bytes: 10,
            outcome: Outcome::Complete,
        }
    }

    const IN: ConnKey = (1, 5);
    const OUT: ConnKey = (1, 6);

    #[test]
    fn call_made_while_serving_is_a_child() {
        let mut l = Linker::new();
        l.request_started(IN, true, 11, 100, b"GET /a HTTP/1.1\r\n\r\n", true, &NO_CTX);
        call_started(&mut l, 11, 150, &NO_CTX);
        let client = l.finished(OUT, &exchange(Side::Client, 150, 180, &[]));
        let server = l.finished(IN, &exchange(Side::Server, 100, 200, &[]));
        assert_eq!(client.trace_id, server.trace_id);
        assert_eq!(client.parent_id, Some(server.span_id));
        assert_eq!(server.parent_id, None);
        assert_ne!(client.span_id, server.span_id);
        assert_eq!(l.stats().linked, 1);
    }

    #[test]
    fn incoming_traceparent_is_joined_and_passed_to_children() {
        let mut l = Linker::new();
        l.request_started(IN, true, 11, 100, b"GET /a HTTP/1.1\r\nHost: x\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n", true, &NO_CTX);
        call_started(&mut l, 11, 150, &NO_CTX);
        let client = l.finished(OUT, &exchange(Side::Client, 150, 180, &[]));
        let server = l.finished(IN, &exchange(Side::Server, 100, 200, &[]));
        assert_eq!(server.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(server.parent_id, Some(0x00f067aa0ba902b7));
        assert_eq!(client.trace_id, server.trace_id);
        assert_eq!(client.parent_id, Some(server.span_id));
        assert_eq!(l.stats().joined_incoming, 1);
    }

    #[test]
    fn context_in_a_later_piece_of_the_head_is_joined() {
        let mut l = Linker::new();
        l.request_started(
            IN,
            true,
            11,
            100,
            b"GET /a HTTP/1.1\r\nHost: x\r\n",
            true,
            &NO_CTX,
        );
        // B3 headers split over two more reads, then the end of the head.
        l.request_continued(IN, b"X-B3-TraceId: 463ac35c9f6413ad48485a3953bb6124\r\n");
        l.request_continued(
            IN,
            b"X-B3-SpanId: a2fb4a1d1a96d312\r\nX-B3-Sampled: 1\r\n\r\n",
        );
        call_started(&mut l, 11, 150, &NO_CTX);
        let client = l.finished(OUT, &exchange(Side::Client, 150, 180, &[]));
        let server = l.finished(IN, &exchange(Side::Server, 100, 200, &[]));
        assert_eq!(server.trace_id, 0x463ac35c9f6413ad48485a3953bb6124);
        assert_eq!(server.parent_id, Some(0xa2fb4a1d1a96d312));
        assert_eq!(
            (client.trace_id, client.parent_id),
            (server.trace_id, Some(server.span_id)),
            "a call made while serving joins the caller's trace too"
        );
    }

    #[test]
    fn an_unsampled_context_in_a_later_piece_is_respected() {
        let mut l = Linker::new();
        l.request_started(IN, true, 11, 100, b"GET /a HTTP/1.1\r\n", true, &NO_CTX);
        l.request_continued(
            IN,
            b"traceparent: 00-11111111111111111111111111111111-2222222222222222-00\r\n\r\n",
        );
        let server = l.finished(IN, &exchange(Side::Server, 100, 200, &[]));
        assert!(!server.sampled);
        assert_eq!(server.trace_id, 0x11111111111111111111111111111111);
    }

    #[test]
    fn bytes_after_the_head_or_an_unseen_rest_are_not_read_as_headers() {
        let body: &[u8] =
            b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n";
        let parent_after = |first: &[u8], whole: bool, later: &[&[u8]]| {
            let mut l = Linker::new();
            l.request_started(IN, true, 11, 100, first, whole, &NO_CTX);
            for bytes in later {
                l.request_continued(IN, bytes);
            }
            l.finished(IN, &exchange(Side::Server, 100, 200, &[]))
                .parent_id
        };
        // The head ended in its first read: what follows is the body.
        assert_eq!(
            parent_after(b"POST /a HTTP/1.1\r\n\r\n", true, &[body]),
            None
        );
        // The first read was not all captured: the head's end may have been in the unseen rest.
        assert_eq!(
            parent_after(b"POST /a HTTP/1.1\r\nHost:", false, &[body]),
            None
        );
        // A later piece ends the head without context: what follows is the body.
        assert_eq!(
            parent_after(b"POST /a HTTP/1.1\r\n", true, &[b"Host: x\r\n\r\n", body]),
            None
        );
        // The same context before the blank line joins.
        assert_eq!(
            parent_after(b"POST /a HTTP/1.1\r\n", true, &[body]),
            Some(0x00f067aa0ba902b7)
        );
    }

    #[test]
    fn unsampled_decision_is_respected() {
        let mut l = Linker::new();
        l.request_started(
            IN,
            true,
            11,
            100,
            b"GET /a HTTP/1.1\r\nb3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0\r\n\r\n",
            true,
            &NO_CTX,
        );
        call_started(&mut l, 11, 150, &NO_CTX);
        assert!(
            !l.finished(OUT, &exchange(Side::Client, 150, 180, &[]))
                .sampled
        );
        assert!(
            !l.finished(IN, &exchange(Side::Server, 100, 200, &[]))
                .sampled
        );
    }

    #[test]
    fn thread_reused_for_the_next_request_links_to_the_new_one() {
        let mut l = Linker::new();
        let in2: ConnKey = (1, 7);
        l.request_started(IN, true, 11, 100, b"GET /1 HTTP/1.1\r\n\r\n", true, &NO_CTX);
        let first = l.finished(IN, &exchange(Side::Server, 100, 120, &[]));
        l.request_started(
            in2,
            true,
            11,
            130,
            b"GET /2 HTTP/1.1\r\n\r\n",
            true,
            &NO_CTX,
        );
        call_started(&mut l, 11, 140, &NO_CTX);
        let client = l.finished(OUT, &exchange(Side::Client, 140, 150, &[]));
        let second = l.finished(in2, &exchange(Side::Server, 130, 160, &[]));
        assert_eq!(client.parent_id, Some(second.span_id));
        assert_ne!(client.trace_id, first.trace_id);
    }

    #[test]
    fn call_after_the_request_finished_is_a_root() {
        let mut l = Linker::new();
        l.request_started(IN, true, 11, 100, b"GET /1 HTTP/1.1\r\n\r\n", true, &NO_CTX);
        l.finished(IN, &exchange(Side::Server, 100, 120, &[]));
        call_started(&mut l, 11, 140, &NO_CTX);
        let client = l.finished(OUT, &exchange(Side::Client, 140, 150, &[]));
        assert_eq!(client.parent_id, None);
        assert_eq!(l.stats().roots, 1);
    }

    #[test]
    fn event_loop_with_concurrent_requests_stays_unlinked() {
        let mut l = Linker::new();
        let in2: ConnKey = (1, 7);
        l.request_started(IN, true, 11, 100, b"GET /1 HTTP/1.1\r\n\r\n", true, &NO_CTX);
        l.request_started(
            in2,
            true,
            11,
            110,
            b"GET /2 HTTP/1.1\r\n\r\n",
            true,
            &NO_CTX,
        );
        call_started(&mut l, 11, 120, &NO_CTX);
        let client = l.finished(OUT, &exchange(Side::Client, 120, 130, &[]));
        assert_eq!(client.parent_id, None);
        assert_eq!(l.stats().unlinked_ambiguous, 1);
    }

    #[test]
    fn other_threads_do_not_link() {
        let mut l = Linker::new();
        l.request_started(IN, true, 11, 100, b"GET /1 HTTP/1.1\r\n\r\n", true, &NO_CTX);
        call_started(&mut l, 12, 110, &NO_CTX);
        assert_eq!(
            l.finished(OUT, &exchange(Side::Client, 110, 130, &[]))
                .parent_id,
            None
        );
    }

    #[test]
    fn unseen_start_falls_back_to_headers() {
        let mut l = Linker::new();
        let id = l.finished(
            IN,
            &exchange(
                Side::Server,
                100,
                200,
                &[(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )],
            ),
        );
        assert_eq!(id.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    }

    /// Thread `tid` writes a request on `OUT` at `ts`.
    fn call_started(l: &mut Linker, tid: u32, ts: u64, kernel: &TraceCtx) {
        l.request_started(
            OUT,
            false,
            tid,
            ts,
            b"GET /b HTTP/1.1\r\n\r\n",
            true,
            kernel,
        );
    }

    fn incoming_context(head: &[u8]) -> Option<IncomingContext> {
        let mut headers = Vec::new();
        context_header_lines(head, true, &mut headers);
        extract_some(&headers)
    }

    #[test]
    fn context_header_names_match_in_any_case() {
        let mut headers = Vec::new();
        let ended = context_header_lines(
            b"GET / HTTP/1.1\r\nHost: x\r\nTRACEPARENT:  00-a \r\nTraceState: k=v\r\nB3: 1\r\nX-B3-TraceId: t\r\nx-B3-sPaNiD:s\r\nX-B3-Future: f\r\nX-B3: no\r\nTraceparentX: no\r\nb3 : no\r\n\r\nx-b3-flags: body\r\n",
            true,
            &mut headers,
        );
        assert!(ended);
        assert_eq!(
            headers,
            [
                ("traceparent", "00-a".to_string()),
                ("tracestate", "k=v".to_string()),
                ("b3", "1".to_string()),
                ("x-b3-traceid", "t".to_string()),
                ("x-b3-spanid", "s".to_string()),
                (OTHER_B3, String::new()),
            ]
        );
    }

    #[test]
    fn every_context_header_passes_the_first_letter_filter() {
        for name in crate::context::HEADERS {
            assert_eq!(context_header_name(name.as_bytes()), Some(name));
            assert_eq!(
                context_header_name(name.to_ascii_uppercase().as_bytes()),
                Some(name)
            );
        }
        assert_eq!(context_header_name(b"X-B3-Other"), Some(OTHER_B3));
        assert_eq!(context_header_name(b"host"), None);
        assert_eq!(context_header_name(b""), None);
    }

    #[test]
    fn own_context_is_what_the_injector_respects() {
        assert!(has_own_context(
            b"GET / HTTP/1.1\r\nHost: x\r\nTraceParent: 00-a-b-01\r\n\r\n"
        ));
        assert!(has_own_context(b"GET / HTTP/1.1\r\nb3: 1-2-1\r\n\r\n"));
        assert!(has_own_context(b"GET / HTTP/1.1\r\nX-B3-TraceId: 1\r\n"));
        assert!(!has_own_context(
            b"GET / HTTP/1.1\r\ntracestate: k=v\r\nX-B3-SpanId: 2\r\n\r\n"
        ));
        assert!(!has_own_context(
            b"GET /traceparent: HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
    }

    #[test]
    fn cut_heads_still_yield_complete_header_lines() {
        let ctx = incoming_context(b"GET / HTTP/1.1\r\nTraceParent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nUser-Ag");
        assert_eq!(ctx.unwrap().parent_span_id, 0x00f067aa0ba902b7);
    }

    #[test]
    fn kernel_named_identities_win() {
        let mut l = Linker::new();
        let server = TraceCtx {
            trace_id_hi: 7,
            trace_id_lo: 8,
            span_id: 0x55,
            parent_id: 0,
            flags: CTX_VALID | CTX_SAMPLED | tracer_common::CTX_SERVER,
            _pad: 0,
        };
        let client = TraceCtx {
            trace_id_hi: 7,
            trace_id_lo: 8,
            span_id: 0x66,
            parent_id: 0x55,
            flags: CTX_VALID | CTX_SAMPLED | CTX_INJECTED,
            _pad: 0,
        };
        l.request_started(IN, true, 11, 100, b"GET /a HTTP/1.1\r\n\r\n", true, &server);
        call_started(&mut l, 11, 150, &client);
        let c = l.finished(OUT, &exchange(Side::Client, 150, 200, &[]));
        let s = l.finished(IN, &exchange(Side::Server, 100, 300, &[]));
        let trace = (7u128 << 64) | 8;
        assert_eq!((s.trace_id, s.span_id, s.parent_id), (trace, 0x55, None));
        assert_eq!(
            (c.trace_id, c.span_id, c.parent_id),
            (trace, 0x66, Some(0x55))
        );
        assert_eq!(l.stats().injected, 1);
    }

    #[test]
    fn a_b3_caller_wins_over_a_kernel_named_root() {
        let mut l = Linker::new();
        let server = TraceCtx {
            trace_id_hi: 7,
            trace_id_lo: 8,
            span_id: 0x55,
            parent_id: 0,
            flags: CTX_VALID | CTX_SAMPLED | tracer_common::CTX_SERVER,
            _pad: 0,
        };
        l.request_started(
            IN,
            true,
            11,
            100,
            b"GET /a HTTP/1.1\r\nb3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n\r\n",
            true,
            &server,
        );
        let s = l.finished(IN, &exchange(Side::Server, 100, 300, &[]));
        assert_eq!(s.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert_eq!(s.parent_id, Some(0xe457b5a2e4d86bd1));
    }
}
