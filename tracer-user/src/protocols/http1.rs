//! HTTP/1.x request/response matching for one connection, seen through one process's syscalls.
//!
//! Each direction of the connection is walked by its own small state machine (`Stream`): a
//! message head (parsed with `httparse`, buffered only when a syscall split it), then a body
//! framed by Content-Length, chunked coding, or the close. Requests wait in a FIFO until the
//! response stream finishes their final response, which is what makes keep-alive and pipelining
//! work; 1xx interim responses are counted but matched to nothing.
//!
//! What the kernel captured is partial: `head` is a bounded prefix of each syscall and `tail` its
//! last few bytes. Body lengths are therefore counted from `len`, and when the capture cut a head
//! or lost chunk boundaries the stream goes "blind": the message is then taken to end at a
//! segment boundary, told by the chunked terminator in `tail`, by the next segment that starts
//! like a message head, or by the close. Memory is bounded: partial heads are capped at
//! `MAX_HEAD`, requests awaiting a response at `MAX_PENDING`, kept headers in count and size.
//!
//! When the stream cannot be followed (garbage where a head should be, a broken chunk, a message
//! start that was not captured), that direction drops to `Desync` and resyncs at the first
//! segment that starts like a head again. Losing the response stream also drops the requests
//! waiting for a response: matching them to later responses would report wrong statuses.
//! Bytes the tracer missed (lost events) make a counted body swallow what follows; a status line
//! at a segment start after the peer already sent its next request ends such a response.
//!
//! When the tracer knows it stopped capturing for a while, it says so (`gap`): both directions
//! then drop to `Desync` at once, rather than a counted body swallowing whatever comes next,
//! and every request waiting for a response is dropped. A response that comes before any request
//! seen after the gap answers one sent during it: it is framed but reported for nothing. Only a
//! client that pipelines across the gap can still get a request paired with another's response,
//! and so can one whose pipelined requests the capture limit cut from a read, where the server's
//! writes do not answer the reads one for one (the responses to the unseen requests then come
//! before those to requests seen later). Where a response whose end cannot be told runs into
//! unseen bytes, the requests pipelined behind it are dropped: their responses may be there.

use std::{borrow::Cow, collections::VecDeque, mem::MaybeUninit};

use super::{Direction, HttpExchange, Outcome, RequestText, Segment, Side};

/// Largest partial head kept across syscalls. A longer head is handled like one cut by the
/// capture limit (start line and the headers seen so far, then a blind body).
const MAX_HEAD: usize = 16 * 1024;
/// Headers `httparse` may return for one head; a head with more is treated as malformed.
const MAX_PARSED_HEADERS: usize = 128;
/// Request headers kept per exchange.
const MAX_KEPT_HEADERS: usize = 16;
/// The request headers later stages use besides trace context (`context::HEADERS`): the host
/// (span tags) and the user agent (the agent recognises its own export traffic). No other
/// header value is copied: it costs an allocation per header per request, and most are never
/// to leave the parser anyway (cookies, credentials).
const KEPT_HEADERS: [&str; 2] = ["host", "user-agent"];

/// The static name of a kept header (`name` in any case): one of [`KEPT_HEADERS`] or of the
/// trace-context headers.
fn kept_name(name: &str) -> Option<&'static str> {
    KEPT_HEADERS
        .iter()
        .chain(&crate::context::HEADERS)
        .find(|k| name.eq_ignore_ascii_case(k))
        .copied()
}

/// Methods kept as these constants rather than copied: nearly every request's.
const KNOWN_METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];
/// Bytes kept of a request header value.
const MAX_HEADER_VALUE: usize = 1024;
/// Requests awaiting a response; past this the oldest is forgotten (a peer that never answers
/// must not make the connection's state grow).
const MAX_PENDING: usize = 32;
/// While nothing looked like HTTP yet, give up after this many segments or bytes.
const SEARCH_MAX_SEGMENTS: u32 = 8;
const SEARCH_MAX_BYTES: u64 = 64 * 1024;
/// Bounds on the parts of chunked coding that are skipped rather than stored, so that garbage
/// in a chunked body is noticed instead of being skipped forever.
const MAX_CHUNK_EXT: u32 = 4 * 1024;
const MAX_TRAILERS: u32 = 16 * 1024;
/// Buffers grown past this are released rather than kept for the connection's lifetime.
const KEEP_CAPACITY: usize = 4 * 1024;

/// Request methods recognised when looking for the start of HTTP/1.x in a stream.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Does `buf` start like an HTTP/1.x request line: a known method, a space, and a target?
pub fn looks_like_request(buf: &[u8]) -> bool {
    METHODS.iter().any(|m| {
        // The byte after the space must start a target: rejects prose such as "PUT  it".
        buf.strip_prefix(*m)
            .is_some_and(|rest| rest.first().is_none_or(u8::is_ascii_graphic))
    })
}

/// Does `buf` start like an HTTP/1.x status line (`HTTP/1.x `)?
pub fn looks_like_response(buf: &[u8]) -> bool {
    matches!(buf, [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor, b' ', ..] if minor.is_ascii_digit())
}

/// Per-connection HTTP/1.x matcher: feed it the connection's syscalls in order.
#[derive(Debug)]
pub struct Http1Conn {
    mode: Mode,
    /// Meaningful once `mode` is `Active`.
    side: Side,
    req: Stream,
    resp: Stream,
    /// Requests whose final response has not finished yet, oldest first.
    pending: VecDeque<Pending>,
    next_seq: u64,
    /// Reused to close a head cut by the capture limit so that `httparse` accepts it.
    scratch: Vec<u8>,
    /// See `last_request_start_ns()`.
    last_request_start_ns: Option<u64>,
}

#[derive(Debug)]
enum Mode {
    /// Nothing parsed yet: waiting for a segment that starts with a request line.
    Searching {
        segments: u32,
        bytes: u64,
        saw_response: bool,
    },
    Active,
    NotHttp,
    /// A 101 or a CONNECT tunnel: the bytes that follow are another protocol.
    Upgraded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Request,
    Response,
}

/// One direction's framing state.
#[derive(Debug, Default)]
struct Stream {
    state: State,
    /// Head bytes of the current message when its head was split across syscalls.
    buf: Vec<u8>,
    /// The pending exchange the current message belongs to; `None` for a message nobody is
    /// waiting for (an unsolicited response, a request body whose exchange already finished).
    owner: Option<u64>,
    msg_start_ns: u64,
    /// Bytes before the current message's first in the segment dated `msg_start_ns`.
    msg_offset: u64,
    /// Wire bytes of the current message so far.
    msg_bytes: u64,
    /// Time of the latest segment that carried bytes of the current message.
    last_ns: u64,
    /// A head was parsed since the stream was last (re)started: a loss of sync now means
    /// messages were lost, not that we started in the middle of one.
    in_sync: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    /// At a message boundary.
    #[default]
    Idle,
    /// Part of a head is in `Stream::buf`.
    Head,
    Body(Body),
    /// Framing lost: skip until a segment starts like a head.
    Desync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Chunk boundaries were lost to the capture limit: the body ends in the segment that ends
    /// with the last-chunk, or at the next head or the close.
    ChunkedBlind,
    /// The head was cut by the capture limit so its framing headers may be unseen: the body
    /// ends at the next head or the close.
    Unknown,
    /// A response framed by the close.
    UntilClose,
}

/// Position inside chunked coding (RFC 9112 section 7.1), kept across segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Size {
        value: u64,
        digits: u8,
    },
    /// Extensions (or whitespace) after the size, up to the line end.
    Ext {
        value: u64,
        len: u32,
    },
    /// CR seen after the size line.
    SizeLf {
        value: u64,
    },
    Data(u64),
    /// The CRLF that ends chunk data.
    DataCr,
    DataLf,
    /// Start of a trailer line, or of the empty line that ends the message.
    TrailerStart {
        total: u32,
    },
    TrailerLine {
        total: u32,
    },
    /// CR of the final empty line seen.
    EndLf,
}

/// A request waiting for (the end of) its final response.
#[derive(Debug)]
struct Pending {
    seq: u64,
    method: Cow<'static, str>,
    request: RequestText,
    minor_version: u8,
    /// Responses to HEAD carry no body whatever their headers say.
    is_head: bool,
    /// A 2xx to CONNECT turns the connection into a tunnel.
    is_connect: bool,
    req_start_ns: u64,
    req_offset: u64,
    req_end_ns: u64,
    req_bytes: u64,
    status: Option<u16>,
    resp_start_ns: Option<u64>,
    resp_bytes: u64,
    /// Last response byte seen so far.
    end_ns: u64,
}

/// Framing-relevant headers of one head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Framing {
    content_length: Option<u64>,
    /// Transfer-Encoding with chunked as the final coding.
    chunked: bool,
    /// Transfer-Encoding whose final coding is not chunked.
    other_coding: bool,
    /// Unparsable or conflicting Content-Length.
    invalid: bool,
}

#[derive(Debug)]
struct ReqHead {
    method: Cow<'static, str>,
    request: RequestText,
    minor_version: u8,
    framing: Framing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RespHead {
    status: u16,
    framing: Framing,
}

#[derive(Debug)]
enum Head {
    Request(ReqHead),
    Response(RespHead),
}

enum Parsed {
    /// The head and its length in bytes.
    Complete(Head, usize),
    Partial,
    Invalid,
}

/// What follows a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    NoBody,
    Body(Body),
    /// The connection stops carrying HTTP/1.x after this response.
    Upgrade,
    /// The head's framing cannot be followed.
    Invalid,
}

/// Result of walking body bytes.
enum Advance {
    /// All the bytes belong to the body, which goes on.
    More,
    /// The body ended after this many bytes.
    Done(usize),
    Invalid,
}

impl Default for Http1Conn {
    fn default() -> Self {
        Self::new()
    }
}

impl Http1Conn {
    pub fn new() -> Self {
        Self {
            mode: Mode::Searching {
                segments: 0,
                bytes: 0,
                saw_response: false,
            },
            side: Side::Server,
            req: Stream::default(),
            resp: Stream::default(),
            pending: VecDeque::new(),
            next_seq: 0,
            scratch: Vec::new(),
            last_request_start_ns: None,
        }
    }

    /// True once this connection has been found not to carry HTTP/1.x (then `feed` is a
    /// no-op). That includes a connection upgraded away from HTTP/1.x (101, CONNECT tunnel).
    pub fn is_not_http(&self) -> bool {
        matches!(self.mode, Mode::NotHttp | Mode::Upgraded)
    }

    /// True while no request line was found yet (the connection may carry another protocol).
    pub fn is_searching(&self) -> bool {
        matches!(self.mode, Mode::Searching { .. })
    }

    /// When the latest request whose first byte was seen began (its segment's `start_ns`).
    pub fn last_request_start_ns(&self) -> Option<u64> {
        self.last_request_start_ns
    }

    /// Bytes held in partial-head buffers (bounded by about twice `MAX_HEAD`, 16 KiB).
    pub fn buffered_bytes(&self) -> usize {
        self.req.buf.len() + self.resp.buf.len() + self.scratch.len()
    }

    /// Feed one syscall's bytes; push every exchange that finished into `out`.
    pub fn feed(&mut self, seg: &Segment<'_>, out: &mut Vec<HttpExchange>) {
        if seg.len == 0 {
            return;
        }
        match self.mode {
            Mode::NotHttp | Mode::Upgraded => return,
            Mode::Searching { .. } => {
                if !self.search(seg) {
                    return;
                }
            }
            Mode::Active => {}
        }
        let role = if seg.dir == self.request_direction() {
            Role::Request
        } else {
            Role::Response
        };
        self.walk(role, seg, out);
    }

    /// Bytes in both directions went unseen since the last segment (the tracer stopped capturing
    /// for a while). Requests waiting for a response are dropped, since their outcome is unknown,
    /// and each direction resyncs at the first segment that starts like a message again.
    /// Returns how many unfinished requests were dropped.
    pub fn gap(&mut self) -> usize {
        // Searching, nothing is held and nothing is waiting: the search goes on at the next
        // request line, with its budget untouched (the gap says nothing for or against HTTP).
        // A connection found not to carry HTTP, or upgraded away from it, stays so.
        if !matches!(self.mode, Mode::Active) {
            return 0;
        }
        // A response under way is dropped too: its end, and for an interim one its final
        // status, went by unseen.
        let dropped = self.pending.len();
        self.pending.clear();
        for role in [Role::Request, Role::Response] {
            // Whatever message was under way ended (or not) in the unseen bytes, so no count or
            // buffered head from before the gap may frame what comes after it.
            self.reset_stream(role);
            let stream = self.stream(role);
            stream.state = State::Desync;
            // As after attaching: until a head is parsed again, the stream may be inside a
            // message that began unseen.
            stream.in_sync = false;
        }
        release(&mut self.scratch);
        dropped
    }

    /// The connection closed (`reset` for ECONNRESET/EPIPE-like ends): a response framed by the
    /// close ends here; every other unfinished exchange ends as [`Outcome::Closed`]. The matcher
    /// is then back to its initial state.
    pub fn close(&mut self, ts_ns: u64, reset: bool, out: &mut Vec<HttpExchange>) {
        if matches!(self.mode, Mode::Active) {
            self.close_response(ts_ns, reset, out);
            while let Some(p) = self.pending.pop_front() {
                self.emit(p, Outcome::Closed { reset }, ts_ns, out);
            }
        }
        *self = Self::new();
    }

    fn request_direction(&self) -> Direction {
        match self.side {
            Side::Server => Direction::Ingress,
            Side::Client => Direction::Egress,
        }
    }

    /// Searching for the first request line. Returns true when `seg` starts one: the side is
    /// then known and the segment is to be parsed.
    fn search(&mut self, seg: &Segment<'_>) -> bool {
        if looks_like_request(seg.head) {
            self.side = match seg.dir {
                Direction::Ingress => Side::Server,
                Direction::Egress => Side::Client,
            };
            self.mode = Mode::Active;
            // Both directions are most likely at a message boundary: a peer sends its next
            // request after reading the previous response. If the response direction turns
            // out to be mid-message, it resyncs without dropping this request (`in_sync`).
            self.req = Stream::default();
            self.resp = Stream::default();
            return true;
        }
        if let Mode::Searching {
            segments,
            bytes,
            saw_response,
        } = &mut self.mode
        {
            *saw_response |= looks_like_response(seg.head);
            *segments += 1;
            *bytes = bytes.saturating_add(seg.len);
            if !*saw_response && (*segments >= SEARCH_MAX_SEGMENTS || *bytes >= SEARCH_MAX_BYTES) {
                self.mode = Mode::NotHttp;
            }
        }
        false
    }

    fn stream(&mut self, role: Role) -> &mut Stream {
        match role {
            Role::Request => &mut self.req,
            Role::Response => &mut self.resp,
        }
    }

    /// Walks one segment through `role`'s state machine, message after message.
    fn walk(&mut self, role: Role, seg: &Segment<'_>, out: &mut Vec<HttpExchange>) {
        // The decoder guarantees `head.len() <= len`; clamp anyway so accounting cannot underflow.
        let captured = seg
            .head
            .len()
            .min(usize::try_from(seg.len).unwrap_or(usize::MAX));
        let head = &seg.head[..captured];
        let uncaptured = seg.len - head.len() as u64;
        self.segment_start(role, head, out);
        let mut pos = 0;
        while pos < head.len() {
            if !matches!(self.mode, Mode::Active) {
                return;
            }
            match self.stream(role).state {
                State::Desync => return,
                state @ (State::Idle | State::Head) => {
                    if state == State::Idle {
                        // Line breaks between messages (some clients add CRLF after a body)
                        // belong to no message.
                        pos += head[pos..]
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        if pos == head.len() {
                            break;
                        }
                    }
                    match self.head_step(role, seg, (head, pos), uncaptured, out) {
                        Some(taken) => pos += taken,
                        None => return,
                    }
                }
                State::Body(mut body) => {
                    let rest = &head[pos..];
                    match body.advance(rest) {
                        Advance::More => {
                            self.stream(role).state = State::Body(body);
                            self.account(role, rest.len() as u64, seg.ts_ns);
                            pos = head.len();
                        }
                        Advance::Done(n) => {
                            self.account(role, n as u64, seg.ts_ns);
                            pos += n;
                            self.finish_message(role, out);
                        }
                        Advance::Invalid => {
                            self.framing_error(role, out);
                            return;
                        }
                    }
                }
            }
        }
        if matches!(self.mode, Mode::Active) {
            self.after_captured(role, seg, uncaptured, out);
        }
    }

    /// Rules that apply where a segment starts: resync, and ends of messages whose framing is
    /// uncertain (the next head ends them).
    fn segment_start(&mut self, role: Role, head: &[u8], out: &mut Vec<HttpExchange>) {
        let starts_head = match role {
            Role::Request => looks_like_request(head),
            Role::Response => looks_like_response(head),
        };
        if !starts_head {
            return;
        }
        let stream = self.stream(role);
        let (owner, msg_start_ns) = (stream.owner, stream.msg_start_ns);
        let owner_alive = owner.is_some_and(|seq| self.pending.iter().any(|p| p.seq == seq));
        // A client sends its next request once it has read the whole response (pipelining
        // aside), so a request newer than this response's start means the response is over.
        let overtaken = role == Role::Response
            && owner.is_some_and(|seq| {
                self.pending
                    .iter()
                    .any(|p| p.seq > seq && p.req_start_ns > msg_start_ns)
            });
        match self.stream(role).state {
            State::Desync => self.reset_stream(role),
            State::Body(Body::Unknown | Body::ChunkedBlind | Body::UntilClose) => {
                self.finish_message(role, out);
            }
            // A body nobody waits for any more (the response came early, or the response has no
            // matching request so HEAD-ness was a guess): trust the new head over the count.
            State::Body(Body::Length(_) | Body::Chunked(_)) if !owner_alive => {
                self.reset_stream(role);
            }
            // Counted bytes went missing (lost events): end the response where it was last seen.
            State::Body(Body::Length(_) | Body::Chunked(_)) if overtaken => {
                self.finish_message(role, out);
            }
            _ => {}
        }
    }

    /// Parses, or keeps buffering, the head that starts at `pos` in `captured`, the
    /// segment's captured bytes. Returns how many bytes the head took, or `None` when it took
    /// the whole segment (a head cut by the capture) or the stream lost sync.
    fn head_step(
        &mut self,
        role: Role,
        seg: &Segment<'_>,
        (captured, pos): (&[u8], usize),
        uncaptured: u64,
        out: &mut Vec<HttpExchange>,
    ) -> Option<usize> {
        let ts = seg.ts_ns;
        let bytes = &captured[pos..];
        if role == Role::Request && self.req.state == State::Idle {
            self.last_request_start_ns = Some(seg.start_ns);
        }
        let stream = self.stream(role);
        if stream.state == State::Idle {
            *stream = Stream {
                buf: std::mem::take(&mut stream.buf),
                msg_start_ns: seg.start_ns,
                msg_offset: pos as u64,
                in_sync: stream.in_sync,
                ..Stream::default()
            };
        }
        let prev = stream.buf.len();
        let parsed = if prev == 0 {
            // The common case: the head starts in this segment; parse it in place.
            parse_head(role, bytes)
        } else {
            let room = MAX_HEAD.saturating_sub(prev);
            stream
                .buf
                .extend_from_slice(&bytes[..bytes.len().min(room)]);
            parse_head(role, &stream.buf)
        };
        match parsed {
            Parsed::Complete(head, n) => {
                let taken = n.saturating_sub(prev).min(bytes.len());
                let stream = self.stream(role);
                release(&mut stream.buf);
                stream.in_sync = true;
                self.account(role, taken as u64, ts);
                self.on_head(head, false, seg, out);
                Some(taken)
            }
            Parsed::Partial if uncaptured == 0 && prev + bytes.len() <= MAX_HEAD => {
                let stream = self.stream(role);
                if prev == 0 {
                    stream.buf.extend_from_slice(bytes);
                }
                stream.state = State::Head;
                self.account(role, bytes.len() as u64, ts);
                Some(bytes.len())
            }
            Parsed::Partial => {
                // The head goes on past what was captured (or past our bound): take what is
                // readable, and the whole segment as head.
                let Self {
                    req, resp, scratch, ..
                } = self;
                let stream = match role {
                    Role::Request => req,
                    Role::Response => resp,
                };
                let src = if prev == 0 { bytes } else { &stream.buf[..] };
                let cut = parse_cut_head(role, src, scratch);
                release(&mut stream.buf);
                release(scratch);
                self.account(role, (bytes.len() as u64).saturating_add(uncaptured), ts);
                match cut {
                    Some(head) => {
                        self.stream(role).in_sync = true;
                        self.on_head(head, true, seg, out);
                        self.forget_answered_unseen(role, uncaptured);
                    }
                    None => self.lose_sync(role),
                }
                None
            }
            Parsed::Invalid => {
                self.lose_sync(role);
                None
            }
        }
    }

    /// A head was parsed (`cut`: only its captured part). Its bytes are already accounted to
    /// the stream; this attaches the message to an exchange and sets up the body.
    fn on_head(&mut self, head: Head, cut: bool, seg: &Segment<'_>, out: &mut Vec<HttpExchange>) {
        let (role, next) = match head {
            Head::Request(h) => (Role::Request, self.on_request_head(h, cut, seg, out)),
            Head::Response(h) => (Role::Response, self.on_response_head(h, cut, seg)),
        };
        match next {
            Next::NoBody => self.finish_message(role, out),
            Next::Body(body) => {
                self.stream(role).state = State::Body(body);
                if body == Body::ChunkedBlind && ends_with_last_chunk(seg) {
                    self.finish_message(role, out);
                }
            }
            Next::Upgrade => {
                self.finish_message(role, out);
                self.upgrade();
            }
            Next::Invalid => self.framing_error(role, out),
        }
    }

    fn on_request_head(
        &mut self,
        head: ReqHead,
        cut: bool,
        seg: &Segment<'_>,
        out: &mut Vec<HttpExchange>,
    ) -> Next {
        // A response of uncertain length is over once the peer sends its next request
        // (pipelined requests sent while a response is under way are rare).
        if self.resp.owner.is_some()
            && matches!(
                self.resp.state,
                State::Body(Body::Unknown | Body::ChunkedBlind)
            )
        {
            self.finish_message(Role::Response, out);
        }
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let framing = head.framing;
        self.pending.push_back(Pending {
            seq,
            is_head: head.method == "HEAD",
            is_connect: head.method == "CONNECT",
            method: head.method,
            request: head.request,
            minor_version: head.minor_version,
            req_start_ns: self.req.msg_start_ns,
            req_offset: self.req.msg_offset,
            req_end_ns: seg.ts_ns,
            req_bytes: self.req.msg_bytes,
            status: None,
            resp_start_ns: None,
            resp_bytes: 0,
            end_ns: seg.ts_ns,
        });
        self.req.owner = Some(seq);
        if cut {
            return if framing.chunked {
                Next::Body(Body::ChunkedBlind)
            } else if framing.content_length.unwrap_or(0) == 0
                && last_bytes(seg).ends_with(b"\r\n\r\n")
            {
                // The syscall ended exactly at a head end, and no length was seen: most likely a
                // bodiless request. If a Content-Length was in the unseen part, its body will
                // not parse as a request and the stream resyncs.
                Next::NoBody
            } else {
                Next::Body(Body::Unknown)
            };
        }
        if framing.chunked {
            Next::Body(Body::Chunked(Chunk::START))
        } else if framing.other_coding || framing.invalid {
            Next::Invalid
        } else {
            match framing.content_length {
                Some(n) if n > 0 => Next::Body(Body::Length(n)),
                _ => Next::NoBody,
            }
        }
    }

    fn on_response_head(&mut self, head: RespHead, cut: bool, seg: &Segment<'_>) -> Next {
        let status = head.status;
        let interim = (100..200).contains(&status) && status != 101;
        let stream = &mut self.resp;
        // Responses come in request order: this one answers the oldest unanswered request.
        let owner = self.pending.iter_mut().find(|p| p.status.is_none());
        let (is_head, is_connect) = owner
            .as_ref()
            .map_or((false, false), |p| (p.is_head, p.is_connect));
        if let Some(p) = owner {
            p.resp_bytes = p.resp_bytes.saturating_add(stream.msg_bytes);
            p.end_ns = seg.ts_ns;
            if !interim {
                p.status = Some(status);
                p.resp_start_ns = Some(stream.msg_start_ns);
            }
            stream.owner = Some(p.seq);
        }
        let framing = head.framing;
        if status == 101 || (is_connect && (200..300).contains(&status)) {
            Next::Upgrade
        } else if interim || is_head || status == 204 || status == 304 {
            Next::NoBody
        } else if cut {
            Next::Body(if framing.chunked {
                Body::ChunkedBlind
            } else {
                Body::Unknown
            })
        } else if framing.chunked {
            Next::Body(Body::Chunked(Chunk::START))
        } else if framing.other_coding {
            Next::Body(Body::UntilClose)
        } else if framing.invalid {
            Next::Invalid
        } else {
            match framing.content_length {
                Some(0) => Next::NoBody,
                Some(n) => Next::Body(Body::Length(n)),
                None => Next::Body(Body::UntilClose),
            }
        }
    }

    /// The captured bytes of a segment are walked; now account for the bytes after them, which
    /// were moved but not captured.
    fn after_captured(
        &mut self,
        role: Role,
        seg: &Segment<'_>,
        uncaptured: u64,
        out: &mut Vec<HttpExchange>,
    ) {
        let ts = seg.ts_ns;
        let State::Body(body) = self.stream(role).state else {
            if uncaptured > 0 && self.stream(role).state != State::Desync {
                // A message starts in bytes we cannot see.
                self.lose_sync(role);
            }
            return;
        };
        match body {
            Body::Length(remaining) => {
                if uncaptured == 0 {
                    return;
                }
                let taken = remaining.min(uncaptured);
                self.account(role, taken, ts);
                if taken == remaining {
                    self.finish_message(role, out);
                    if uncaptured > taken {
                        self.lose_sync(role);
                    }
                } else {
                    self.stream(role).state = State::Body(Body::Length(remaining - taken));
                }
            }
            Body::Chunked(chunk) => {
                if uncaptured == 0 {
                    return;
                }
                self.account(role, uncaptured, ts);
                let next = match chunk {
                    Chunk::Data(left) if left > uncaptured => {
                        Body::Chunked(Chunk::Data(left - uncaptured))
                    }
                    Chunk::Data(left) if left == uncaptured => Body::Chunked(Chunk::DataCr),
                    _ => Body::ChunkedBlind,
                };
                self.stream(role).state = State::Body(next);
                if next == Body::ChunkedBlind && ends_with_last_chunk(seg) {
                    self.finish_message(role, out);
                }
            }
            Body::ChunkedBlind => {
                self.account(role, uncaptured, ts);
                self.forget_answered_unseen(role, uncaptured);
                if ends_with_last_chunk(seg) {
                    self.finish_message(role, out);
                }
            }
            Body::Unknown => {
                self.account(role, uncaptured, ts);
                self.forget_answered_unseen(role, uncaptured);
            }
            Body::UntilClose => self.account(role, uncaptured, ts),
        }
    }

    /// A response whose end cannot be told (its head or its chunk boundaries cut by the
    /// capture) ran into `uncaptured` unseen bytes: the responses to the requests pipelined
    /// behind its own may be among them, so those requests are dropped rather than matched to
    /// later responses (a server answering a batch of pipelined requests in one write shows
    /// the first few whole and the rest only as a count).
    fn forget_answered_unseen(&mut self, role: Role, uncaptured: u64) {
        if role != Role::Response || uncaptured == 0 {
            return;
        }
        let owner = self.resp.owner;
        self.pending.retain(|p| Some(p.seq) == owner);
    }

    /// Adds `n` bytes at `ts` to the current message of `role` and its exchange.
    fn account(&mut self, role: Role, n: u64, ts: u64) {
        let stream = match role {
            Role::Request => &mut self.req,
            Role::Response => &mut self.resp,
        };
        stream.msg_bytes = stream.msg_bytes.saturating_add(n);
        stream.last_ns = ts;
        let Some(seq) = stream.owner else { return };
        let Some(p) = self.pending.iter_mut().find(|p| p.seq == seq) else {
            return;
        };
        match role {
            Role::Request => {
                p.req_bytes = p.req_bytes.saturating_add(n);
                p.req_end_ns = ts;
            }
            Role::Response => {
                p.resp_bytes = p.resp_bytes.saturating_add(n);
                p.end_ns = ts;
            }
        }
    }

    /// The current message of `role` is over; a final response completes its exchange.
    fn finish_message(&mut self, role: Role, out: &mut Vec<HttpExchange>) {
        let stream = self.stream(role);
        let owner = stream.owner.take();
        stream.state = State::Idle;
        stream.msg_bytes = 0;
        if role == Role::Response
            && let Some(seq) = owner
            // An interim (1xx) response leaves its exchange waiting for the final one.
            && let Some(idx) = self.pending.iter().position(|p| p.seq == seq && p.status.is_some())
            && let Some(p) = self.pending.remove(idx)
        {
            let end_ns = p.end_ns;
            self.emit(p, Outcome::Complete, end_ns, out);
        }
    }

    /// A body's framing broke: the message ends where it was last followed.
    fn framing_error(&mut self, role: Role, out: &mut Vec<HttpExchange>) {
        self.finish_message(role, out);
        self.lose_sync(role);
    }

    /// Framing of `role` is lost until a segment starts like a head.
    fn lose_sync(&mut self, role: Role) {
        self.reset_stream(role);
        let stream = self.stream(role);
        let was_in_sync = std::mem::take(&mut stream.in_sync);
        stream.state = State::Desync;
        if role == Role::Response && was_in_sync {
            // The responses of the waiting requests may be in the bytes being skipped.
            self.pending.clear();
        }
    }

    /// Back to a message boundary, forgetting the current message.
    fn reset_stream(&mut self, role: Role) {
        let stream = self.stream(role);
        release(&mut stream.buf);
        *stream = Stream {
            buf: std::mem::take(&mut stream.buf),
            in_sync: stream.in_sync,
            ..Stream::default()
        };
    }

    fn upgrade(&mut self) {
        self.mode = Mode::Upgraded;
        self.pending.clear();
        self.req = Stream::default();
        self.resp = Stream::default();
        self.scratch = Vec::new();
    }

    /// Ends the response under way at close time, if any.
    fn close_response(&mut self, ts_ns: u64, reset: bool, out: &mut Vec<HttpExchange>) {
        let (Some(seq), State::Body(body)) = (self.resp.owner, self.resp.state) else {
            return;
        };
        let Some(idx) = self
            .pending
            .iter()
            .position(|p| p.seq == seq && p.status.is_some())
        else {
            return;
        };
        let Some(p) = self.pending.remove(idx) else {
            return;
        };
        let (outcome, end_ns) = match body {
            // A reset may have cut any body short.
            _ if reset => (Outcome::Closed { reset: true }, ts_ns),
            Body::UntilClose => (Outcome::Complete, ts_ns),
            // The end was uncertain; the last bytes seen are the best guess.
            Body::Unknown | Body::ChunkedBlind => {
                let end_ns = p.end_ns;
                (Outcome::Complete, end_ns)
            }
            Body::Length(_) | Body::Chunked(_) => (Outcome::Closed { reset: false }, ts_ns),
        };
        self.emit(p, outcome, end_ns, out);
    }

    fn emit(&self, p: Pending, outcome: Outcome, end_ns: u64, out: &mut Vec<HttpExchange>) {
        out.push(HttpExchange {
            side: self.side,
            method: p.method,
            request: p.request,
            minor_version: p.minor_version,
            status: p.status,
            req_start_ns: p.req_start_ns,
            req_offset: p.req_offset,
            req_end_ns: p.req_end_ns,
            resp_start_ns: p.resp_start_ns,
            end_ns,
            req_bytes: p.req_bytes,
            resp_bytes: p.resp_bytes,
            outcome,
        });
    }
}

impl Body {
    /// Walks captured body bytes.
    fn advance(&mut self, bytes: &[u8]) -> Advance {
        match self {
            Body::Length(remaining) => {
                let taken = (*remaining).min(bytes.len() as u64);
                *remaining -= taken;
                if *remaining == 0 {
                    // `taken <= bytes.len()`, so it fits a usize.
                    Advance::Done(usize::try_from(taken).unwrap_or(bytes.len()))
                } else {
                    Advance::More
                }
            }
            Body::Chunked(chunk) => match chunk.advance(bytes) {
                Some((n, true)) => Advance::Done(n),
                Some((_, false)) => Advance::More,
                None => Advance::Invalid,
            },
            Body::ChunkedBlind | Body::Unknown | Body::UntilClose => Advance::More,
        }
    }
}

impl Chunk {
    const START: Chunk = Chunk::Size {
        value: 0,
        digits: 0,
    };

    fn after_size(value: u64) -> Chunk {
        if value == 0 {
            Chunk::TrailerStart { total: 0 }
        } else {
            Chunk::Data(value)
        }
    }

    /// Walks `bytes`; returns how many were taken and whether the body ended there, or `None`
    /// when the bytes are not chunked coding.
    fn advance(&mut self, bytes: &[u8]) -> Option<(usize, bool)> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            let next = match *self {
                Chunk::Data(left) => {
                    // Skip data in one step: it is usually most of the bytes.
                    let avail = bytes.len() - i;
                    let take = usize::try_from(left).map_or(avail, |l| l.min(avail));
                    i += take;
                    let left = left - take as u64;
                    *self = if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    };
                    continue;
                }
                Chunk::Size { value, digits } => match (char::from(b).to_digit(16), b) {
                    (Some(d), _) => {
                        // Leading zeros are legal, so bound the digit count as well as the value.
                        if digits >= 32 || value > u64::MAX >> 4 {
                            return None;
                        }
                        Chunk::Size {
                            value: (value << 4) | u64::from(d),
                            digits: digits + 1,
                        }
                    }
                    (None, _) if digits == 0 => return None,
                    (None, b';' | b' ' | b'\t') => Chunk::Ext { value, len: 0 },
                    (None, b'\r') => Chunk::SizeLf { value },
                    (None, b'\n') => Chunk::after_size(value),
                    (None, _) => return None,
                },
                Chunk::Ext { value, len } => match b {
                    b'\r' => Chunk::SizeLf { value },
                    b'\n' => Chunk::after_size(value),
                    _ if len >= MAX_CHUNK_EXT => return None,
                    _ => Chunk::Ext {
                        value,
                        len: len + 1,
                    },
                },
                Chunk::SizeLf { value } => match b {
                    b'\n' => Chunk::after_size(value),
                    _ => return None,
                },
                Chunk::DataCr => match b {
                    b'\r' => Chunk::DataLf,
                    b'\n' => Chunk::START,
                    _ => return None,
                },
                Chunk::DataLf => match b {
                    b'\n' => Chunk::START,
                    _ => return None,
                },
                Chunk::TrailerStart { total } => match b {
                    b'\r' => Chunk::EndLf,
                    b'\n' => return Some((i + 1, true)),
                    _ => Chunk::TrailerLine { total: total + 1 },
                },
                Chunk::TrailerLine { total } => match b {
                    _ if total >= MAX_TRAILERS => return None,
                    b'\n' => Chunk::TrailerStart { total: total + 1 },
                    _ => Chunk::TrailerLine { total: total + 1 },
                },
                Chunk::EndLf => match b {
                    b'\n' => return Some((i + 1, true)),
                    _ => return None,
                },
            };
            i += 1;
            *self = next;
        }
        Some((i, false))
    }
}

/// The last bytes the segment moved, as far as they were captured.
fn last_bytes<'a>(seg: &Segment<'a>) -> &'a [u8] {
    if seg.head.len() as u64 >= seg.len {
        seg.head
    } else {
        seg.tail
    }
}

/// Does the segment end with the last-chunk and an empty trailer section? Preceded by the CRLF
/// that ends chunk data, so body bytes that happen to end in "0\r\n\r\n" rarely match.
fn ends_with_last_chunk(seg: &Segment<'_>) -> bool {
    let last = last_bytes(seg);
    last.ends_with(b"\r\n0\r\n\r\n") || (seg.len == 5 && last == b"0\r\n\r\n")
}

/// Drops a buffer's contents, and its allocation when it grew large.
fn release(buf: &mut Vec<u8>) {
    if buf.capacity() > KEEP_CAPACITY {
        *buf = Vec::new();
    } else {
        buf.clear();
    }
}

fn request_config() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    // We observe, we do not enforce: a header line the peer accepted should not lose the message.
    config.ignore_invalid_headers_in_requests(true);
    config
}

fn response_config() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    config
        .ignore_invalid_headers_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .allow_spaces_after_header_name_in_responses(true)
        .allow_multiple_spaces_in_response_status_delimiters(true);
    config
}

fn parse_head(role: Role, buf: &[u8]) -> Parsed {
    match role {
        Role::Request => {
            let mut headers =
                [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_PARSED_HEADERS];
            let mut req = httparse::Request::new(&mut []);
            match request_config().parse_request_with_uninit_headers(&mut req, buf, &mut headers) {
                Ok(httparse::Status::Complete(n)) => {
                    Parsed::Complete(Head::Request(ReqHead::from_parsed(&req)), n)
                }
                Ok(httparse::Status::Partial) => Parsed::Partial,
                Err(_) => Parsed::Invalid,
            }
        }
        Role::Response => match plain_response_head(buf) {
            Some((head, len)) => {
                // Under the fuzzer every head taken this way is checked against httparse.
                #[cfg(fuzzing)]
                assert_eq!(
                    parse_response_head(buf),
                    Some((head, len)),
                    "the plain-head path and httparse disagree on {buf:?}"
                );
                Parsed::Complete(Head::Response(head), len)
            }
            None => parse_response_with_httparse(buf),
        },
    }
}

fn parse_response_with_httparse(buf: &[u8]) -> Parsed {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_PARSED_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    match response_config().parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => {
            let status = resp.code.unwrap_or_default();
            let framing = Framing::from_headers(resp.headers);
            Parsed::Complete(Head::Response(RespHead { status, framing }), n)
        }
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// httparse's reading of a complete response head (what `plain_response_head` must agree
/// with).
#[cfg(any(test, fuzzing))]
fn parse_response_head(buf: &[u8]) -> Option<(RespHead, usize)> {
    match parse_response_with_httparse(buf) {
        Parsed::Complete(Head::Response(head), len) => Some((head, len)),
        _ => None,
    }
}

/// The status and framing of a complete response head in the form nearly every server sends,
/// found without httparse; `None` for anything else, which httparse then decides.
///
/// A response head is parsed for two things, its status and its framing, yet httparse checks
/// every byte of every header (about 2000 instructions for nginx's eight, an eighth of the
/// agent's work per request). Here the line ends are found eight bytes at a time, and only
/// the framing headers' values are looked at. The result is httparse's, with the agent's
/// configuration (`response_config`), for every head this accepts: a strict status line;
/// lines that end in CRLF with no other CR, LF or NUL (the bytes that make httparse fail a
/// head rather than skip a malformed line) nor any other byte below 0x10 but HTAB; no line
/// folded onto the one before (or starting with white space); no more lines than httparse
/// may return headers; and framing headers named exactly, followed by a colon, with valid
/// values. A header line that httparse would skip as malformed is not one of the framing
/// headers so named, so it cannot change the framing either way. Unit tests compare the two
/// on mutated heads, and the http1 fuzz target on every head it takes.
fn plain_response_head(buf: &[u8]) -> Option<(RespHead, usize)> {
    let rest = buf.strip_prefix(b"HTTP/1.")?;
    let (&[minor, b' ', d0, d1, d2], rest) = rest.split_first_chunk::<5>()? else {
        return None;
    };
    if !matches!(minor, b'0' | b'1') || ![d0, d1, d2].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let status = [d0, d1, d2]
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    // The reason phrase: HTAB, SP, VCHAR or obs-text, up to CRLF.
    let reason_end = memchr::memchr(b'\r', rest)?;
    let reason = match rest.first()? {
        b' ' => &rest[1..reason_end],
        b'\r' => &[][..],
        _ => return None,
    };
    if reason
        .iter()
        .any(|&b| !(b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80))
        || rest.get(reason_end + 1) != Some(&b'\n')
    {
        return None;
    }
    let mut at = buf.len() - rest.len() + reason_end + 2;
    let mut framing = Framing::default();
    for _ in 0..=MAX_PARSED_HEADERS {
        let cr = next_control_byte(buf, at)?;
        if buf[cr] != b'\r' || buf.get(cr + 1) != Some(&b'\n') {
            return None;
        }
        let line = &buf[at..cr];
        at = cr + 2;
        let Some(&first) = line.first() else {
            return Some((RespHead { status, framing }, at));
        };
        if first == b' ' || first == b'\t' {
            return None;
        }
        let content_length = match first | 0x20 {
            b'c' => true,
            b't' => false,
            _ => continue,
        };
        let name: &[u8] = if content_length {
            b"content-length"
        } else {
            b"transfer-encoding"
        };
        if !starts_with_name(line, name) {
            continue;
        }
        let value = line[name.len()..].strip_prefix(b":")?;
        if value
            .iter()
            .any(|&b| !(b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80))
        {
            return None;
        }
        if content_length {
            framing.add_content_length(value);
        } else {
            framing.add_transfer_encoding(value);
        }
    }
    None
}

/// Whether `line` starts with `name` (8 to 24 lowercase letters and '-') in any case, eight
/// bytes at a time: OR 0x20 makes an uppercase letter lowercase and leaves a lowercase one and
/// '-' as they are, and of all other bytes only CR becomes one of them ('-'), which a line
/// does not have (see `next_control_byte`).
fn starts_with_name(line: &[u8], name: &[u8]) -> bool {
    const LOWER: u64 = 0x2020_2020_2020_2020;
    if line.len() < name.len() || !(8..=24).contains(&name.len()) {
        return false;
    }
    let same = |at: usize| {
        let word = |b: &[u8]| u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"));
        word(line) | LOWER == word(name)
    };
    // Three words, overlapping as the length needs: the first, the second, the last.
    let last = name.len() - 8;
    same(0) && same(last.min(8)) && same(last)
}

/// Where the first byte below 0x10 other than HTAB is in `buf[from..]`: a line's CR, or a bare
/// LF, a NUL or another control character, which `plain_response_head` leaves to httparse.
/// Eight bytes a step: a search per line with `memchr3` cost as much as httparse (a head's
/// lines are too short for it to get up to speed).
fn next_control_byte(buf: &[u8], mut from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    while let Some(word) = buf.get(from..from + 8) {
        let word = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        // The high bit of each byte below 0x10, and maybe of bytes above the first such:
        // only the lowest is used.
        let low = word.wrapping_sub(ONES * 0x10) & !word & (ONES * 0x80);
        if low == 0 {
            from += 8;
            continue;
        }
        let i = from + (low.trailing_zeros() / 8) as usize;
        if buf[i] != b'\t' {
            return Some(i);
        }
        from = i + 1;
    }
    (from..buf.len()).find(|&i| buf[i] < 0x10 && buf[i] != b'\t')
}

/// Parses a head of which only `bytes` (no end of head) can be seen: the start line and the
/// complete header lines. `None` when not even a start line is recognisable.
fn parse_cut_head(role: Role, bytes: &[u8], scratch: &mut Vec<u8>) -> Option<Head> {
    if let Some(last_lf) = bytes.iter().rposition(|&b| b == b'\n') {
        // End the head after the last complete line so that httparse accepts it.
        scratch.clear();
        scratch.extend_from_slice(&bytes[..=last_lf]);
        scratch.extend_from_slice(b"\r\n");
        return match parse_head(role, scratch) {
            Parsed::Complete(head, _) => Some(head),
            Parsed::Partial | Parsed::Invalid => None,
        };
    }
    // Not even the start line is complete: keep what its captured part tells.
    match role {
        Role::Request => {
            let mut req = httparse::Request::new(&mut []);
            req.parse(bytes).ok()?;
            let method = req.method?;
            let target = match req.path {
                Some(path) => path.to_owned(),
                None => String::from_utf8_lossy(bytes.get(method.len() + 1..).unwrap_or_default())
                    .into_owned(),
            };
            Some(Head::Request(ReqHead {
                method: method_of(method),
                request: RequestText::from_target(target),
                minor_version: req.version.unwrap_or(1),
                framing: Framing::default(),
            }))
        }
        Role::Response => {
            let mut resp = httparse::Response::new(&mut []);
            resp.parse(bytes).ok()?;
            Some(Head::Response(RespHead {
                status: resp.code?,
                framing: Framing::default(),
            }))
        }
    }
}

impl ReqHead {
    fn from_parsed(req: &httparse::Request<'_, '_>) -> Self {
        // The kept headers are found first so that the text is allocated once, at its size.
        let mut kept = [("", &[][..]); MAX_KEPT_HEADERS];
        let mut n = 0;
        for h in req.headers.iter() {
            if n == MAX_KEPT_HEADERS {
                break;
            }
            if let Some(name) = kept_name(h.name) {
                kept[n] = (name, header_value(h.value));
                n += 1;
            }
        }
        let request = RequestText::new(req.path.unwrap_or_default(), &kept[..n]);
        ReqHead {
            method: method_of(req.method.unwrap_or_default()),
            request,
            minor_version: req.version.unwrap_or(1),
            framing: Framing::from_headers(req.headers),
        }
    }
}

/// A method as sent (methods are case-sensitive), borrowed from [`KNOWN_METHODS`] when known.
fn method_of(method: &str) -> Cow<'static, str> {
    KNOWN_METHODS
        .iter()
        .find(|known| **known == method)
        .map_or_else(
            || Cow::Owned(method.to_owned()),
            |known| Cow::Borrowed(*known),
        )
}

/// A header value, trimmed, bounded to [`MAX_HEADER_VALUE`] bytes; a multi-byte character the
/// bound split is left out rather than shown as U+FFFD.
fn header_value(value: &[u8]) -> &[u8] {
    let value = value.trim_ascii();
    if value.len() <= MAX_HEADER_VALUE {
        return value;
    }
    let cut = &value[..MAX_HEADER_VALUE];
    match std::str::from_utf8(cut) {
        Err(e) if e.error_len().is_none() => &cut[..e.valid_up_to()],
        _ => cut,
    }
}

impl Framing {
    fn from_headers(headers: &[httparse::Header<'_>]) -> Self {
        let mut framing = Framing::default();
        for h in headers {
            framing.add_header(h.name, h.value);
        }
        framing
    }

    /// Takes header `name: value` into account, in the order the head has them.
    fn add_header(&mut self, name: &str, value: &[u8]) {
        if name.eq_ignore_ascii_case("content-length") {
            self.add_content_length(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            self.add_transfer_encoding(value);
        }
    }

    fn add_transfer_encoding(&mut self, value: &[u8]) {
        // Codings accumulate over repeated headers; only the final one frames the body.
        if let Some(last) = value
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .rfind(|c| !c.is_empty())
        {
            self.chunked = last.eq_ignore_ascii_case(b"chunked");
            self.other_coding = !self.chunked;
        }
    }

    /// Accepts `n` and lists of equal values (`n, n`, sent by some proxies); anything else
    /// (signs, overflow, conflicting values) makes the framing invalid.
    fn add_content_length(&mut self, value: &[u8]) {
        for part in value.split(|&b| b == b',') {
            let part = part.trim_ascii();
            let parsed = (!part.is_empty() && part.iter().all(u8::is_ascii_digit))
                .then(|| {
                    part.iter().try_fold(0u64, |acc, &d| {
                        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
                    })
                })
                .flatten();
            match (parsed, self.content_length) {
                (Some(n), None) => self.content_length = Some(n),
                (Some(n), Some(seen)) if n == seen => {}
                _ => self.invalid = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    // Golden fixtures: tracer-user/tests/fixtures/http1/NAME.seg is fed to a fresh matcher and
    // its output compared with NAME.expected. On a mismatch (or a missing .expected) the output
    // is written to NAME.actual and the test fails; review it and rename it to accept it.
    //
    // .seg format, one item per line ('#' starts a comment line; blank lines are ignored):
    //   < TS [cap=N] PAYLOAD   a syscall in which the process read PAYLOAD (Ingress) at TS ns
    //   > TS [cap=N] PAYLOAD   a syscall in which the process wrote PAYLOAD (Egress)
    //   | PAYLOAD              more bytes of the segment on the line above
    //   close TS               the connection closed;  reset TS: closed by a reset
    // PAYLOAD is taken literally (single spaces separate the fields before it) except for the
    // escapes \r \n \t \\ \xHH, and \{N} for N filler bytes ('.'), used for large bodies.
    // cap=N: only the first N bytes were captured in `head`; `len` is the whole payload and
    // `tail` its last 16 bytes, as the kernel side reports them.
    //
    // The other tests build segments in code with `seg` (fully captured) and `cut` (captured
    // prefix only).

    use super::*;
    use crate::protocols::fixture::{self, Item, Rng, check_golden, cut, parse_fixture, tail_of};

    const IN: Direction = Direction::Ingress;
    const EG: Direction = Direction::Egress;

    /// A fully captured segment.
    fn seg(dir: Direction, ts_ns: u64, bytes: &[u8]) -> Segment<'_> {
        Segment {
            dir,
            ts_ns,
            start_ns: ts_ns,
            len: bytes.len() as u64,
            head: bytes,
            tail: tail_of(bytes),
        }
    }

    /// Feeds segments; collects what finished.
    #[derive(Default)]
    struct Run {
        conn: Http1Conn,
        out: Vec<HttpExchange>,
    }

    impl Run {
        fn feed(&mut self, s: Segment<'_>) -> &mut Self {
            self.conn.feed(&s, &mut self.out);
            self
        }
        fn close(&mut self, ts: u64, reset: bool) -> &mut Self {
            self.conn.close(ts, reset, &mut self.out);
            self
        }
        fn statuses(&self) -> Vec<Option<u16>> {
            self.out.iter().map(|e| e.status).collect()
        }
        fn targets(&self) -> Vec<&str> {
            self.out.iter().map(HttpExchange::target).collect()
        }
    }

    const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    const GET_B: &[u8] = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n";
    const OK2: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    #[test]
    fn looks_like_request_and_response() {
        assert!(looks_like_request(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_request(b"OPTIONS * HTTP/1.1\r\n"));
        assert!(looks_like_request(b"DELETE "));
        assert!(!looks_like_request(b"GET"));
        assert!(!looks_like_request(b"get / HTTP/1.1"));
        assert!(!looks_like_request(b"GETX / HTTP/1.1"));
        assert!(!looks_like_request(b"PUT  it there"));
        assert!(!looks_like_request(b"\x16\x03\x01\x02\x00"));
        assert!(!looks_like_request(b""));
        assert!(looks_like_response(b"HTTP/1.1 200 OK\r\n"));
        assert!(looks_like_response(b"HTTP/1.0 404 "));
        assert!(!looks_like_response(b"HTTP/2 200"));
        assert!(!looks_like_response(b"HTTP/1.1"));
        assert!(!looks_like_response(b"PRI * HTTP/2.0\r\n"));
    }

    #[test]
    fn requests_read_make_a_server_with_keepalive() {
        let mut r = Run::default();
        r.feed(seg(IN, 10, GET))
            .feed(seg(EG, 20, OK2))
            .feed(seg(IN, 30, GET_B))
            .feed(seg(EG, 40, OK2));
        assert_eq!(r.targets(), ["/a", "/b"]);
        let e = &r.out[0];
        assert_eq!(e.side, Side::Server);
        assert_eq!(
            (&*e.method, e.minor_version, e.status, &e.outcome),
            ("GET", 1, Some(200), &Outcome::Complete)
        );
        assert_eq!(
            (e.req_start_ns, e.req_end_ns, e.resp_start_ns, e.end_ns),
            (10, 10, Some(20), 20)
        );
        assert_eq!(
            (e.req_bytes, e.resp_bytes),
            (GET.len() as u64, OK2.len() as u64)
        );
        assert_eq!(e.request_headers().collect::<Vec<_>>(), [("host", "x")]);
        assert_eq!(r.out[1].req_start_ns, 30);
    }

    #[test]
    fn known_methods_are_constants_and_others_are_kept_as_sent() {
        let mut r = Run::default();
        r.feed(seg(IN, 1, GET))
            .feed(seg(EG, 2, OK2))
            .feed(seg(IN, 3, b"PROPFIND /d HTTP/1.1\r\nHost: x\r\n\r\n"))
            .feed(seg(EG, 4, OK2));
        assert_eq!(r.out.len(), 2);
        assert!(matches!(r.out[0].method, Cow::Borrowed("GET")));
        assert!(matches!(&r.out[1].method, Cow::Owned(m) if m == "PROPFIND"));
        assert_eq!(method_of("get"), "get", "methods are case-sensitive");
        assert!(KNOWN_METHODS.iter().all(|m| method_of(m) == *m));
    }

    #[test]
    fn requests_written_make_a_client() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET)).feed(seg(IN, 2, OK2));
        assert_eq!(r.out.len(), 1);
        assert_eq!(r.out[0].side, Side::Client);
    }

    #[test]
    fn attaching_mid_body_resyncs_at_the_next_request() {
        let mut r = Run::default();
        // The middle of a request body, then the response to it, then a fresh exchange.
        r.feed(seg(IN, 1, b"ta\": 42, \"more\": [1, 2, 3]}"))
            .feed(seg(EG, 2, OK2))
            .feed(seg(IN, 3, GET))
            .feed(seg(EG, 4, OK2));
        assert_eq!(r.targets(), ["/a"]);
        assert_eq!(r.out[0].req_start_ns, 3);
        assert!(!r.conn.is_not_http());
    }

    #[test]
    fn attaching_mid_response_waits_for_a_status_line() {
        let mut r = Run::default();
        // Client side: a response body being read, then the next request and its response.
        r.feed(seg(IN, 1, b"<html>tail of a page</html>"))
            .feed(seg(EG, 2, GET))
            .feed(seg(IN, 3, b"more of the old body"))
            .feed(seg(IN, 4, OK2));
        assert_eq!(r.statuses(), [Some(200)]);
        assert_eq!(r.out[0].resp_start_ns, Some(4));
    }

    #[test]
    fn binary_protocol_is_given_up_after_a_few_segments() {
        let mut r = Run::default();
        let blob = [0x16u8, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00];
        for ts in 0..SEARCH_MAX_SEGMENTS - 1 {
            r.feed(seg(if ts % 2 == 0 { EG } else { IN }, u64::from(ts), &blob));
            assert!(!r.conn.is_not_http());
        }
        r.feed(seg(EG, 100, &blob));
        assert!(r.conn.is_not_http());
        // From now on even HTTP is ignored.
        r.feed(seg(IN, 101, GET)).feed(seg(EG, 102, OK2));
        assert!(r.out.is_empty());
    }

    #[test]
    fn binary_protocol_is_given_up_after_64_kib() {
        let mut r = Run::default();
        let big = vec![0u8; 70_000];
        r.feed(cut(IN, 1, &big, 256));
        assert!(r.conn.is_not_http());
    }

    #[test]
    fn a_response_seen_while_searching_prevents_giving_up() {
        let mut r = Run::default();
        r.feed(seg(
            IN,
            0,
            b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",
        ));
        for ts in 1..40 {
            r.feed(seg(IN, ts, &[b'x'; 4000]));
        }
        assert!(!r.conn.is_not_http());
        r.feed(seg(EG, 50, GET)).feed(seg(IN, 51, OK2));
        assert_eq!(r.statuses(), [Some(200)]);
    }

    #[test]
    fn headers_split_over_three_segments() {
        let req = b"POST /upload?x=1 HTTP/1.1\r\nHost: example\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
        let mut r = Run::default();
        r.feed(seg(IN, 1, &req[..20]))
            .feed(seg(IN, 2, &req[20..50]))
            .feed(seg(IN, 3, &req[50..]));
        assert_eq!(r.conn.buffered_bytes(), 0);
        r.feed(seg(EG, 4, OK2));
        let e = &r.out[0];
        assert_eq!((&*e.method, e.target()), ("POST", "/upload?x=1"));
        assert_eq!(
            (e.req_start_ns, e.req_end_ns, e.req_bytes),
            (1, 3, req.len() as u64)
        );
        assert_eq!(
            e.request_headers().collect::<Vec<_>>(),
            [("host", "example")]
        );
    }

    #[test]
    fn head_split_inside_the_final_crlf() {
        let mut r = Run::default();
        let n = GET.len();
        r.feed(seg(EG, 1, &GET[..n - 1]))
            .feed(seg(EG, 2, &GET[n - 1..]))
            .feed(seg(IN, 3, OK2));
        assert_eq!(
            (
                r.out[0].req_start_ns,
                r.out[0].req_end_ns,
                r.out[0].req_bytes
            ),
            (1, 2, n as u64)
        );
    }

    /// A server answers a batch of pipelined requests in one write, of which the capture shows
    /// the first responses whole and cuts one: the requests whose responses went unseen are
    /// dropped, neither matched to the next batch's responses nor reported unanswered at the
    /// close. (They were: 27 requests, 25 responses seen, the cut one took the rest of the
    /// write as its body, and the last request was "closed before response".)
    #[test]
    fn pipelined_batch_answered_beyond_the_capture_drops_the_unseen() {
        const REQ: &[u8] = b"GET /p HTTP/1.1\r\nHost: t\r\n\r\n";
        const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let mut r = Run::default();
        for batch in 0..3u64 {
            r.feed(seg(IN, 10 * batch + 1, &REQ.repeat(27))).feed(cut(
                EG,
                10 * batch + 2,
                &RESP.repeat(27),
                1024,
            ));
        }
        r.close(100, false);
        // Of each batch, the 25 whole responses and the one cut (its end unseen): 26 of 27.
        assert_eq!(r.out.len(), 3 * 26);
        for (i, e) in r.out.iter().enumerate() {
            let batch = i as u64 / 26;
            assert_eq!(
                (e.req_start_ns, e.end_ns, &e.outcome),
                (10 * batch + 1, 10 * batch + 2, &Outcome::Complete),
                "{i}"
            );
        }
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let mut r = Run::default();
        let three = [GET, GET_B, b"GET /c HTTP/1.1\r\n\r\n"].concat();
        let resps = [
            OK2,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\n\r\nbad",
        ]
        .concat();
        r.feed(seg(EG, 1, &three));
        assert!(r.out.is_empty());
        // Responses arrive split at an arbitrary point, across message boundaries.
        r.feed(seg(IN, 2, &resps[..50]))
            .feed(seg(IN, 3, &resps[50..]));
        assert_eq!(r.targets(), ["/a", "/b", "/c"]);
        assert_eq!(r.statuses(), [Some(200), Some(404), Some(500)]);
        assert_eq!(
            (r.out[0].end_ns, r.out[1].end_ns, r.out[2].end_ns),
            (2, 3, 3)
        );
        assert_eq!(r.out[2].req_bytes, 19);
        assert_eq!(
            r.out.iter().map(|e| e.resp_bytes).sum::<u64>(),
            resps.len() as u64
        );
        // Each says where it began in the write.
        let began: Vec<_> = r
            .out
            .iter()
            .map(|e| (e.req_start_ns, e.req_offset))
            .collect();
        let b = GET.len() as u64;
        assert_eq!(began, [(1, 0), (1, b), (1, b + GET_B.len() as u64)]);
    }

    /// A head split across reads began where its first bytes lay in the first.
    #[test]
    fn a_split_head_began_in_its_first_read() {
        let mut r = Run::default();
        let two = [GET, GET_B].concat();
        let cut = GET.len() + 5;
        r.feed(seg(IN, 1, &two[..cut]))
            .feed(seg(IN, 2, &two[cut..]))
            .feed(seg(EG, 3, &[OK2, OK2].concat()));
        let began: Vec<_> = r
            .out
            .iter()
            .map(|e| (e.req_start_ns, e.req_offset))
            .collect();
        assert_eq!(began, [(1, 0), (1, GET.len() as u64)]);
    }

    #[test]
    fn request_body_by_content_length_across_segments() {
        let mut r = Run::default();
        r.feed(seg(
            IN,
            1,
            b"PUT /k HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123",
        ))
        .feed(seg(IN, 2, b"456"))
        .feed(seg(IN, 3, b"789"))
        .feed(seg(EG, 4, b"HTTP/1.1 204 No Content\r\n\r\n"));
        let e = &r.out[0];
        assert_eq!(
            (e.req_end_ns, e.req_bytes, e.status),
            (3, 17 + 20 + 2 + 10, Some(204))
        );
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;name=value\r\nhello\r\n\
        1A\r\nabcdefghijklmnopqrstuvwxyz\r\n\
        0\r\nExpires: never\r\nX-Sum: 1\r\n\r\n";

    #[test]
    fn chunked_response_with_extensions_and_trailers_split_anywhere() {
        for split in 0..=CHUNKED.len() {
            for split2 in [split, (split + 7).min(CHUNKED.len())] {
                let mut r = Run::default();
                r.feed(seg(EG, 1, GET));
                for (ts, part) in [
                    (2, &CHUNKED[..split]),
                    (3, &CHUNKED[split..split2]),
                    (4, &CHUNKED[split2..]),
                ] {
                    r.feed(seg(IN, ts, part));
                }
                assert_eq!(r.out.len(), 1, "split at {split}/{split2}");
                let e = &r.out[0];
                assert_eq!(
                    (e.status, e.resp_bytes),
                    (Some(200), CHUNKED.len() as u64),
                    "split at {split}/{split2}"
                );
                let last = if split2 < CHUNKED.len() {
                    4
                } else if split < CHUNKED.len() {
                    3
                } else {
                    2
                };
                assert_eq!(e.end_ns, last, "split at {split}/{split2}");
            }
        }
    }

    #[test]
    fn chunked_response_then_next_response_in_one_read() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, &[GET, GET_B].concat()))
            .feed(seg(IN, 2, &[CHUNKED, OK2].concat()));
        assert_eq!(r.statuses(), [Some(200), Some(200)]);
        assert_eq!(r.out[1].resp_bytes, OK2.len() as u64);
    }

    #[test]
    fn chunked_request_body() {
        let mut r = Run::default();
        let first = b"POST /c HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n";
        r.feed(seg(IN, 1, first))
            .feed(seg(IN, 2, b"0\r\n\r\n"))
            .feed(seg(EG, 3, OK2));
        let e = &r.out[0];
        assert_eq!((e.req_end_ns, e.req_bytes), (2, first.len() as u64 + 5));
        assert_eq!(e.status, Some(200));
    }

    #[test]
    fn body_larger_than_capture_is_counted_from_len() {
        let mut body = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
        let head_len = body.len();
        body.resize(head_len + 60_000, b'z');
        let rest = vec![b'z'; 40_000];
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET))
            .feed(cut(IN, 2, &body, 256))
            .feed(cut(IN, 3, &rest[..30_000], 256));
        assert!(r.out.is_empty());
        r.feed(cut(IN, 4, &rest[30_000..], 256))
            .feed(seg(EG, 5, GET_B))
            .feed(seg(IN, 6, OK2));
        assert_eq!(r.targets(), ["/a", "/b"]);
        assert_eq!(
            (r.out[0].end_ns, r.out[0].resp_bytes),
            (4, head_len as u64 + 100_000)
        );
        assert_eq!(r.out[1].resp_start_ns, Some(6));
    }

    #[test]
    fn chunked_body_beyond_capture_ends_by_tail() {
        // A 5000-byte chunk and the last-chunk in one write, captured to 256 bytes.
        let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n".to_vec();
        resp.resize(resp.len() + 5000, b'q');
        resp.extend_from_slice(b"\r\n0\r\n\r\n");
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET)).feed(cut(IN, 2, &resp, 256));
        assert_eq!(r.statuses(), [Some(200)]);
        assert_eq!(
            (r.out[0].end_ns, r.out[0].resp_bytes),
            (2, resp.len() as u64)
        );
    }

    #[test]
    fn chunk_data_beyond_capture_keeps_exact_boundaries() {
        // The uncaptured bytes are all inside one chunk's data: framing stays exact.
        let mut first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2710\r\n".to_vec();
        let head = first.len();
        first.resize(head + 6000, b'q');
        let mut second = vec![b'q'; 4000];
        second.extend_from_slice(b"\r\n4\r\nlast\r\n0\r\n\r\n");
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET)).feed(cut(IN, 2, &first, 100));
        assert_eq!(
            r.conn.resp.state,
            State::Body(Body::Chunked(Chunk::Data(4000)))
        );
        r.feed(seg(IN, 3, &second));
        assert_eq!(r.out.len(), 1);
        assert_eq!(r.out[0].resp_bytes, (first.len() + second.len()) as u64);
    }

    #[test]
    fn blind_chunked_body_without_visible_terminator_ends_at_next_request_or_close() {
        let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n".to_vec();
        resp.resize(resp.len() + 0x100, b'q');
        // A trailer hides the terminator from the tail check.
        resp.extend_from_slice(b"\r\n0\r\nX-Checksum: abcdef\r\n\r\n");
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET)).feed(cut(IN, 2, &resp, 64));
        assert!(r.out.is_empty());
        r.feed(seg(EG, 3, GET_B));
        assert_eq!(
            (r.out[0].status, r.out[0].end_ns, r.out[0].resp_bytes),
            (Some(200), 2, resp.len() as u64)
        );
        r.feed(cut(IN, 4, &resp, 64)).close(9, false);
        assert_eq!(r.out.len(), 2);
        assert_eq!(
            (r.out[1].outcome.clone(), r.out[1].end_ns),
            (Outcome::Complete, 4)
        );
    }

    #[test]
    fn counted_response_with_lost_bytes_ends_at_the_next_status_line() {
        let mut r = Run::default();
        // Only 10 of the 1000 body bytes are seen (events lost), then the client moves on.
        r.feed(seg(EG, 1, GET))
            .feed(seg(
                IN,
                2,
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789",
            ))
            .feed(seg(EG, 3, GET_B))
            .feed(seg(IN, 4, OK2));
        assert_eq!(r.targets(), ["/a", "/b"]);
        assert_eq!(
            (r.out[0].outcome.clone(), r.out[0].end_ns),
            (Outcome::Complete, 2)
        );
        assert_eq!(r.out[1].resp_start_ns, Some(4));
        // Without a newer request, a body that looks like a status line is still body.
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET))
            .feed(seg(IN, 2, b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n"))
            .feed(seg(IN, 3, OK2));
        assert_eq!(
            (r.out.len(), r.out[0].end_ns, r.out[0].resp_bytes),
            (1, 3, 39 + 40)
        );
    }

    #[test]
    fn truncated_chunked_body_ends_closed() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET))
            .feed(seg(
                IN,
                2,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\nonly a few",
            ))
            .close(3, false);
        assert_eq!(r.statuses(), [Some(200)]);
        assert_eq!(
            (r.out[0].outcome.clone(), r.out[0].end_ns),
            (Outcome::Closed { reset: false }, 3)
        );
    }

    #[test]
    fn response_without_length_lasts_until_close() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, b"GET / HTTP/1.0\r\n\r\n"))
            .feed(seg(IN, 2, b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nsome"))
            .feed(seg(IN, 3, b" body"));
        assert!(r.out.is_empty());
        r.close(7, false);
        let e = &r.out[0];
        assert_eq!(
            (e.minor_version, e.status, e.end_ns, e.resp_bytes),
            (0, Some(200), 7, 41)
        );
        assert_eq!(e.outcome, Outcome::Complete);
    }

    #[test]
    fn response_until_close_cut_by_reset_is_closed() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET))
            .feed(seg(
                IN,
                2,
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial",
            ))
            .close(5, true);
        assert_eq!(
            (r.out[0].status, r.out[0].outcome.clone()),
            (Some(200), Outcome::Closed { reset: true })
        );
    }

    #[test]
    fn head_response_has_no_body() {
        let mut r = Run::default();
        r.feed(seg(IN, 1, b"HEAD /big HTTP/1.1\r\n\r\n"))
            .feed(seg(
                EG,
                2,
                b"HTTP/1.1 200 OK\r\nContent-Length: 123456\r\n\r\n",
            ))
            .feed(seg(IN, 3, GET))
            .feed(seg(EG, 4, OK2));
        assert_eq!(r.statuses(), [Some(200), Some(200)]);
        assert_eq!(r.out[0].end_ns, 2);
        assert_eq!(r.out[1].resp_start_ns, Some(4));
    }

    #[test]
    fn no_body_for_204_and_304() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, &[GET, GET_B].concat()))
            .feed(seg(IN, 2, b"HTTP/1.1 204 No Content\r\nContent-Length: 50\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"));
        assert_eq!(r.statuses(), [Some(204), Some(304)]);
    }

    #[test]
    fn continue_interim_response_is_skipped() {
        let mut r = Run::default();
        let head = b"POST /f HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
        let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
        let created = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        r.feed(seg(IN, 1, head))
            .feed(seg(EG, 2, cont))
            .feed(seg(IN, 3, b"data"))
            .feed(seg(EG, 4, created));
        let e = &r.out[0];
        assert_eq!(
            (e.status, e.resp_start_ns, e.req_end_ns, e.end_ns),
            (Some(201), Some(4), 3, 4)
        );
        assert_eq!(
            (e.req_bytes, e.resp_bytes),
            (head.len() as u64 + 4, (cont.len() + created.len()) as u64)
        );
    }

    #[test]
    fn switching_protocols_completes_and_stops_parsing() {
        let mut r = Run::default();
        r.feed(seg(
            EG,
            1,
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        ))
        .feed(seg(
            IN,
            2,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
        ));
        assert_eq!(r.statuses(), [Some(101)]);
        assert_eq!(
            (r.out[0].outcome.clone(), r.out[0].end_ns),
            (Outcome::Complete, 2)
        );
        assert!(r.conn.is_not_http());
        r.feed(seg(EG, 3, GET))
            .feed(seg(IN, 4, OK2))
            .close(5, false);
        assert_eq!(r.out.len(), 1);
    }

    #[test]
    fn connect_tunnel_stops_parsing() {
        let mut r = Run::default();
        r.feed(seg(
            EG,
            1,
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        ))
        .feed(seg(IN, 2, b"HTTP/1.1 200 Connection established\r\n\r\n"))
        .feed(seg(EG, 3, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"));
        assert_eq!(r.statuses(), [Some(200)]);
        assert_eq!(r.out[0].target(), "example.com:443");
        assert!(r.conn.is_not_http());
    }

    #[test]
    fn early_response_before_request_body_still_matches() {
        let mut r = Run::default();
        r.feed(seg(
            IN,
            1,
            b"POST /big HTTP/1.1\r\nContent-Length: 1000000\r\n\r\nxxxx",
        ))
        .feed(seg(
            EG,
            2,
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n",
        ));
        assert_eq!(r.statuses(), [Some(413)]);
        assert_eq!((r.out[0].req_end_ns, r.out[0].end_ns), (1, 2));
        // The client gives up on the body and sends another request: it is not taken as body.
        r.feed(seg(IN, 3, GET)).feed(seg(EG, 4, OK2));
        assert_eq!(r.targets(), ["/big", "/a"]);
    }

    #[test]
    fn close_mid_response_and_before_any_response() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, &[GET, GET_B].concat()))
            .feed(seg(
                IN,
                2,
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234",
            ))
            .close(9, false);
        assert_eq!(r.statuses(), [Some(200), None]);
        for e in &r.out {
            assert_eq!(
                (e.outcome.clone(), e.end_ns),
                (Outcome::Closed { reset: false }, 9)
            );
        }
        assert_eq!(
            (r.out[0].resp_start_ns, r.out[0].resp_bytes),
            (Some(2), 17 + 20 + 2 + 5)
        );
        assert_eq!((r.out[1].resp_start_ns, r.out[1].resp_bytes), (None, 0));
    }

    #[test]
    fn reset_marks_unfinished_exchanges() {
        let mut r = Run::default();
        r.feed(seg(IN, 1, GET)).close(3, true);
        assert_eq!(r.out[0].outcome, Outcome::Closed { reset: true });
        assert_eq!((r.out[0].status, r.out[0].end_ns), (None, 3));
        // The matcher starts over after a close.
        assert!(!r.conn.is_not_http());
        assert_eq!(r.conn.buffered_bytes(), 0);
    }

    #[test]
    fn only_the_headers_later_stages_use_are_kept_trimmed_and_bounded() {
        let mut req = b"GET / HTTP/1.1\r\nHOST:   cats.example  \r\nAuthorization: Bearer t\r\nCookie: s=1\r\n".to_vec();
        // 1023 ASCII bytes then a 3-byte character straddling the 1 KiB bound.
        req.extend_from_slice(b"User-Agent: ");
        req.extend_from_slice(&[b'a'; 1023]);
        req.extend_from_slice("€tail\r\n".as_bytes());
        for i in 0..100 {
            req.extend_from_slice(format!("H{i}: v{i}\r\n").as_bytes());
        }
        for _ in 0..20 {
            req.extend_from_slice(b"b3: 1\r\n");
        }
        req.extend_from_slice(b"\r\n");
        let mut r = Run::default();
        r.feed(seg(IN, 1, &req)).feed(seg(EG, 2, OK2));
        let h: Vec<_> = r.out[0].request_headers().collect();
        assert_eq!(h.len(), MAX_KEPT_HEADERS, "bounded in count");
        assert_eq!(h[0], ("host", "cats.example"), "lowercased and trimmed");
        assert_eq!(h[1].0, "user-agent");
        assert_eq!(
            h[1].1,
            "a".repeat(1023),
            "bounded, cut on a character boundary"
        );
        assert!(h[2..].iter().all(|(n, _)| *n == "b3"));
        assert!(!h.iter().any(|(n, _)| *n == "authorization"
            || *n == "cookie"
            || n.starts_with('h') && *n != "host"));
    }

    #[test]
    fn head_cut_by_capture_keeps_what_was_seen() {
        // A request with a large cookie, captured to 128 bytes; no body.
        let mut req = b"GET /profile?tab=1 HTTP/1.1\r\nHost: app\r\nCookie: ".to_vec();
        req.resize(req.len() + 3000, b'c');
        req.extend_from_slice(b"\r\nAccept: */*\r\n\r\n");
        let mut r = Run::default();
        r.feed(cut(IN, 1, &req, 128)).feed(seg(EG, 2, OK2));
        let e = &r.out[0];
        assert_eq!(
            (e.target(), e.req_bytes, e.status),
            ("/profile?tab=1", req.len() as u64, Some(200))
        );
        assert_eq!(e.request_headers().collect::<Vec<_>>(), [("host", "app")]);
    }

    #[test]
    fn request_line_cut_by_capture() {
        let mut req = b"GET /search?q=".to_vec();
        req.resize(req.len() + 2000, b'q');
        req.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
        let mut r = Run::default();
        r.feed(cut(EG, 1, &req, 64)).feed(seg(IN, 2, OK2));
        let e = &r.out[0];
        assert_eq!(
            (&*e.method, e.target().len(), e.status),
            ("GET", 64 - 4, Some(200))
        );
    }

    #[test]
    fn response_head_cut_by_capture_ends_at_next_request() {
        let mut resp = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nSet-Cookie: ".to_vec();
        resp.resize(resp.len() + 500, b's');
        resp.extend_from_slice(b"\r\nContent-Length: 5\r\n\r\nhello");
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET))
            .feed(cut(IN, 2, &resp, 100))
            .feed(seg(EG, 3, GET_B));
        assert_eq!(r.statuses(), [Some(200)]);
        assert_eq!(
            (r.out[0].end_ns, r.out[0].resp_bytes),
            (2, resp.len() as u64)
        );
        r.feed(seg(IN, 4, OK2));
        assert_eq!(r.statuses(), [Some(200), Some(200)]);
    }

    #[test]
    fn invalid_chunk_size_resyncs() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET)).feed(seg(
            IN,
            2,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n",
        ));
        // The exchange is reported with what was seen; the stream then waits for a status line.
        assert_eq!(r.statuses(), [Some(200)]);
        r.feed(seg(IN, 3, b"garbage"))
            .feed(seg(EG, 4, GET_B))
            .feed(seg(IN, 5, OK2));
        assert_eq!(r.targets(), ["/a", "/b"]);
    }

    #[test]
    fn chunk_size_overflow_and_huge_extensions_are_rejected() {
        let mut chunk = Chunk::START;
        assert_eq!(chunk.advance(b"fffffffffffffffff\r\n"), None);
        let mut chunk = Chunk::START;
        assert_eq!(
            chunk.advance(&[[b'0'; 40].as_slice(), b"1\r\n"].concat()),
            None
        );
        let mut chunk = Chunk::START;
        assert_eq!(
            chunk.advance(&[b"1;".as_slice(), &[b'e'; 5000]].concat()),
            None
        );
        let mut chunk = Chunk::START;
        assert_eq!(chunk.advance(b"\r\n"), None);
        let mut chunk = Chunk::START;
        assert_eq!(chunk.advance(b"ffffffffffffffff\r\n"), Some((18, false)));
        assert_eq!(chunk, Chunk::Data(u64::MAX));
    }

    #[test]
    fn content_length_overflow_and_conflicts_are_malformed() {
        let mut r = Run::default();
        r.feed(seg(
            IN,
            1,
            b"POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\nbody",
        ))
        .feed(seg(IN, 2, b"more body"))
        .feed(seg(
            EG,
            3,
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        ));
        // The request is still answered; its body could not be followed.
        assert_eq!(r.statuses(), [Some(400)]);
        let mut f = Framing::default();
        f.add_content_length(b"5, 5");
        assert_eq!((f.content_length, f.invalid), (Some(5), false));
        f.add_content_length(b"6");
        assert!(f.invalid);
        let mut f = Framing::default();
        f.add_content_length(b"+5");
        assert!(f.invalid);
    }

    #[test]
    fn huge_header_without_crlf_is_bounded() {
        let mut r = Run::default();
        r.feed(seg(IN, 1, b"GET / HTTP/1.1\r\nX-Big: "));
        for ts in 2..100 {
            r.feed(seg(IN, ts, &[b'b'; 1000]));
            assert!(r.conn.buffered_bytes() <= MAX_HEAD);
        }
        r.feed(seg(IN, 200, b"\r\n\r\n"))
            .feed(seg(EG, 201, GET))
            .feed(seg(IN, 202, GET))
            .feed(seg(EG, 203, OK2));
        // The oversized head is kept as a cut head; later traffic still parses.
        assert_eq!(r.statuses().last(), Some(&Some(200)));
        assert!(r.conn.buffered_bytes() <= MAX_HEAD);
    }

    #[test]
    fn garbage_response_drops_waiting_requests_instead_of_mismatching() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET)).feed(seg(IN, 2, OK2));
        r.feed(seg(EG, 3, GET_B))
            .feed(seg(IN, 4, b"\x00\x01garbage\r\n\r\n"));
        r.feed(seg(EG, 5, b"GET /c HTTP/1.1\r\n\r\n"))
            .feed(seg(IN, 6, OK2));
        assert_eq!(r.targets(), ["/a", "/c"]);
    }

    #[test]
    fn leftover_bytes_before_the_first_response_do_not_drop_the_request() {
        let mut r = Run::default();
        // Attached while a response was under way: its rest shows up after the request.
        r.feed(seg(EG, 1, GET))
            .feed(seg(IN, 2, b"\x00\x01old body\r\n"))
            .feed(seg(IN, 3, OK2));
        assert_eq!(r.targets(), ["/a"]);
    }

    #[test]
    fn unsolicited_response_is_framed_but_not_reported() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET))
            .feed(seg(IN, 2, &[OK2, OK2].concat()));
        assert_eq!(r.out.len(), 1);
        r.feed(seg(EG, 3, GET_B)).feed(seg(IN, 4, OK2));
        assert_eq!(r.targets(), ["/a", "/b"]);
    }

    #[test]
    fn waiting_requests_are_bounded() {
        let mut r = Run::default();
        for ts in 0..1000 {
            r.feed(seg(IN, ts, GET));
        }
        assert_eq!(r.conn.pending.len(), MAX_PENDING);
        r.close(2000, false);
        assert_eq!(r.out.len(), MAX_PENDING);
    }

    #[test]
    fn gap_between_exchanges_changes_nothing() {
        let mut r = Run::default();
        r.feed(seg(IN, 1, GET)).feed(seg(EG, 2, OK2));
        assert_eq!(r.conn.gap(), 0);
        r.feed(seg(IN, 10, GET_B)).feed(seg(EG, 11, OK2));
        assert_eq!(r.targets(), ["/a", "/b"]);
        assert_eq!(r.statuses(), [Some(200), Some(200)]);
        let e = &r.out[1];
        assert_eq!(
            (
                e.side,
                e.req_start_ns,
                e.resp_start_ns,
                e.end_ns,
                e.resp_bytes
            ),
            (Side::Server, 10, Some(11), 11, OK2.len() as u64)
        );
    }

    #[test]
    fn gap_drops_requests_whose_response_went_unseen() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET));
        assert_eq!(r.conn.gap(), 1);
        r.feed(seg(EG, 10, GET_B)).feed(seg(
            IN,
            11,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        ));
        assert_eq!(r.targets(), ["/b"]);
        assert_eq!(r.statuses(), [Some(404)]);
        assert_eq!(
            (r.out[0].req_start_ns, r.out[0].resp_start_ns),
            (10, Some(11))
        );
        // A response cut by the gap is dropped as well: where it ended went unseen.
        r.feed(seg(EG, 20, GET)).feed(seg(
            IN,
            21,
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst",
        ));
        assert_eq!(r.conn.gap(), 1);
        r.feed(seg(EG, 30, GET_B)).feed(seg(IN, 31, OK2));
        assert_eq!(r.targets(), ["/b", "/b"]);
        assert_eq!(
            (r.out[1].req_start_ns, r.out[1].resp_bytes),
            (30, OK2.len() as u64)
        );
    }

    #[test]
    fn gap_ending_inside_a_message_skips_to_the_next_head() {
        // Client side: the rest of a response body comes first.
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET)).feed(seg(IN, 2, OK2));
        r.conn.gap();
        r.feed(seg(IN, 10, b"tail of a page</html>\r\n"))
            .feed(seg(EG, 11, GET_B))
            .feed(seg(IN, 12, OK2));
        assert_eq!(r.targets(), ["/a", "/b"]);
        assert_eq!(r.out[1].resp_start_ns, Some(12));
        // Server side: the rest of a request body, the response to it, the next exchange.
        let mut r = Run::default();
        r.feed(seg(IN, 1, GET)).feed(seg(EG, 2, OK2));
        r.conn.gap();
        r.feed(seg(IN, 10, b"\"items\": [1, 2, 3]}"))
            .feed(seg(
                EG,
                11,
                b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            ))
            .feed(seg(IN, 12, GET_B))
            .feed(seg(EG, 13, OK2));
        assert_eq!(r.targets(), ["/a", "/b"]);
        assert_eq!(r.statuses(), [Some(200), Some(200)]);
        assert_eq!((r.out[1].req_start_ns, r.out[1].end_ns), (12, 13));
    }

    #[test]
    fn response_to_a_request_sent_during_a_gap_is_not_reported() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET)).feed(seg(IN, 2, OK2));
        r.conn.gap();
        // Its body comes in a later read, and is not taken for anything else.
        r.feed(seg(
            IN,
            10,
            b"HTTP/1.1 500 Oops\r\nContent-Length: 12\r\n\r\nbad",
        ))
        .feed(seg(IN, 11, b" request!"))
        .feed(seg(EG, 12, GET_B))
        .feed(seg(IN, 13, OK2));
        assert_eq!(r.targets(), ["/a", "/b"]);
        assert_eq!(r.statuses(), [Some(200), Some(200)]);
        assert_eq!(
            (r.out[1].resp_start_ns, r.out[1].resp_bytes),
            (Some(13), OK2.len() as u64)
        );
    }

    #[test]
    fn gap_while_searching_or_given_up_changes_nothing() {
        let mut r = Run::default();
        assert_eq!(r.conn.gap(), 0);
        // Body bytes of a connection attached mid-stream, gaps in between: still searching.
        for ts in 0..u64::from(SEARCH_MAX_SEGMENTS) - 1 {
            r.feed(seg(IN, ts, b"<p>some page</p>"));
            assert_eq!(r.conn.gap(), 0);
            assert!(r.conn.is_searching() && !r.conn.is_not_http());
        }
        r.feed(seg(EG, 20, GET)).feed(seg(IN, 21, OK2));
        assert_eq!(r.targets(), ["/a"]);
        // Upgraded away from HTTP/1.x: it stays so.
        r.feed(seg(EG, 30, GET)).feed(seg(
            IN,
            31,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        ));
        assert!(r.conn.is_not_http());
        assert_eq!(r.conn.gap(), 0);
        assert!(r.conn.is_not_http());
        r.feed(seg(EG, 40, GET)).feed(seg(IN, 41, OK2));
        assert_eq!(r.out.len(), 2);
    }

    #[test]
    fn keepalive_and_pipelining_survive_repeated_gaps() {
        let mut r = Run::default();
        for round in 0..4u64 {
            let ts = 100 * round;
            r.feed(seg(EG, ts + 1, &[GET, GET_B].concat()))
                .feed(seg(IN, ts + 2, &[OK2, CHUNKED].concat()))
                .feed(seg(EG, ts + 3, GET))
                .feed(seg(IN, ts + 4, OK2));
            assert_eq!(r.conn.gap(), 0);
        }
        assert_eq!(r.out.len(), 12);
        assert_eq!(r.targets()[..3], ["/a", "/b", "/a"]);
        // A gap inside a pipeline: the request whose response it hid is dropped.
        let mut r = Run::default();
        r.feed(seg(EG, 1, &[GET, GET_B].concat()))
            .feed(seg(IN, 2, OK2));
        assert_eq!(r.conn.gap(), 1);
        r.feed(seg(EG, 10, b"GET /c HTTP/1.1\r\n\r\n"))
            .feed(seg(IN, 11, OK2));
        assert_eq!(r.targets(), ["/a", "/c"]);
        // A chunked response cut by a gap: the rest of it, ending like a chunked body, then the
        // next exchange, which it must not swallow.
        r.feed(seg(EG, 20, GET)).feed(seg(
            IN,
            21,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nqqqq",
        ));
        assert_eq!(r.conn.gap(), 1);
        r.feed(seg(IN, 30, b"qqqq\r\n0\r\n\r\n"))
            .feed(seg(EG, 31, GET_B))
            .feed(seg(IN, 32, OK2));
        assert_eq!(r.targets(), ["/a", "/c", "/b"]);
        assert_eq!(
            (r.out[2].resp_start_ns, r.out[2].resp_bytes),
            (Some(32), OK2.len() as u64)
        );
    }

    #[test]
    fn gap_forgets_partial_heads() {
        let mut r = Run::default();
        r.feed(seg(EG, 1, GET))
            .feed(seg(IN, 2, b"HTTP/1.1 200 OK\r\nContent-Le"));
        assert!(r.conn.buffered_bytes() > 0);
        assert_eq!(r.conn.gap(), 1);
        assert_eq!(r.conn.buffered_bytes(), 0);
        // The rest of that head is not taken for a head.
        r.feed(seg(IN, 10, b"ngth: 2\r\n\r\nok"))
            .feed(seg(EG, 11, GET_B))
            .feed(seg(IN, 12, OK2));
        assert_eq!(r.targets(), ["/b"]);
        r.feed(seg(EG, 20, b"GET /c HTTP/1.1\r\nHo"));
        assert!(r.conn.buffered_bytes() > 0);
        assert_eq!(r.conn.gap(), 0);
        assert_eq!(r.conn.buffered_bytes(), 0);
        r.feed(seg(EG, 30, b"st: x\r\n\r\n"))
            .feed(seg(EG, 31, GET))
            .feed(seg(IN, 32, OK2));
        assert_eq!(r.targets(), ["/b", "/a"]);
    }

    /// A keep-alive conversation (either side, no pipelining) cut into random syscalls, with gaps
    /// at random points that also hide a few syscalls. Exactly the exchanges none of whose
    /// bytes were hidden, and with no gap between their first and last byte, are reported,
    /// each with its own response.
    #[test]
    fn random_gaps_report_exactly_the_untouched_exchanges() {
        let mut rng = Rng(0x6a09_e667_f3bc_c908);
        for round in 0..300 {
            let server = round % 2 == 1;
            let (req_dir, resp_dir) = if server { (IN, EG) } else { (EG, IN) };
            let mut conn = Http1Conn::new();
            let mut out = Vec::new();
            let mut ts = 0u64;
            // Per exchange: target, response bytes, first and last response syscall time, and
            // whether a gap touched it.
            let mut expect: Vec<(String, u64, u64, u64, bool)> = Vec::new();
            let mut gaps = fixture::Gaps::default();
            for i in 0..40 {
                let target = format!("/r{i}");
                let req = if rng.below(3) == 0 {
                    let body = vec![b'x'; 1 + rng.below(300)];
                    [
                        format!(
                            "POST {target} HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        )
                        .into_bytes(),
                        body,
                    ]
                    .concat()
                } else {
                    format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n").into_bytes()
                };
                let body = vec![b'y'; rng.below(400)];
                let resp = if rng.below(2) == 0 {
                    [
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                            .into_bytes(),
                        body,
                    ]
                    .concat()
                } else {
                    let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                    if !body.is_empty() {
                        r.extend(format!("{:x}\r\n", body.len()).as_bytes());
                        r.extend(&body);
                        r.extend(b"\r\n");
                    }
                    r.extend(b"0\r\n\r\n");
                    r
                };
                let mut touched = false;
                let (mut first, mut last) = (0, 0);
                for (dir, msg, is_resp) in [(req_dir, &req, false), (resp_dir, &resp, true)] {
                    let mut at = 0;
                    while at < msg.len() {
                        // The first syscall of a message holds the start of its first line: a
                        // stream out of sync resyncs at a syscall that starts like a head.
                        let min = if at == 0 { 16 } else { 1 };
                        let end = (at + min + rng.below(msg.len())).min(msg.len());
                        // A gap starts before this syscall now and then, hiding a few.
                        ts += 10;
                        let step = gaps.step(&mut rng);
                        let hidden = step == fixture::GapStep::Hidden;
                        if step == fixture::GapStep::GapEnds {
                            conn.gap();
                            // A gap before the request's first byte touches nothing.
                            touched |= is_resp || at > 0;
                        }
                        if hidden {
                            touched = true;
                        } else {
                            conn.feed(&seg(dir, ts, &msg[at..end]), &mut out);
                        }
                        if is_resp {
                            if at == 0 {
                                first = ts;
                            }
                            last = ts;
                        }
                        at = end;
                    }
                }
                expect.push((target, resp.len() as u64, first, last, touched));
            }
            let want: Vec<_> = expect
                .iter()
                .filter(|x| !x.4)
                .map(|x| (x.0.clone(), Some(200), x.1, Some(x.2), x.3))
                .collect();
            let got: Vec<_> = out
                .iter()
                .map(|e| {
                    (
                        e.target().to_owned(),
                        e.status,
                        e.resp_bytes,
                        e.resp_start_ns,
                        e.end_ns,
                    )
                })
                .collect();
            assert_eq!(got, want, "round {round}");
            assert!(!conn.is_not_http(), "round {round}");
        }
    }

    #[test]
    fn random_bytes_never_panic_and_stay_bounded() {
        let pieces: [&[u8]; 13] = [
            GET,
            OK2,
            CHUNKED,
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 184467440737095516150\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n",
            b"ffffffffffffffff\r\n",
            b"\r\n0\r\n\r\n",
            b"HEAD / HTTP/1.1\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\n",
            b"HTTP/1.1 101 Switching\r\n\r\n",
            b"X-H: v\r\n",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut conn = Http1Conn::new();
        let mut out = Vec::new();
        let (mut fed, mut segments, mut exchanges) = (0usize, 0usize, 0usize);
        let mut data = Vec::new();
        while fed < 6 << 20 {
            data.clear();
            let max = if rng.below(64) == 0 { 32 * 1024 } else { 600 };
            let size = 1 + rng.below(max);
            // Mostly HTTP-shaped pieces with random bytes and mutations mixed in, so that the
            // parser gets deep into its states rather than giving up at once.
            while data.len() < size {
                if rng.below(4) == 0 {
                    let n = rng.below(64);
                    data.extend((0..n).map(|_| rng.next() as u8));
                } else {
                    data.extend_from_slice(pieces[rng.below(pieces.len())]);
                }
            }
            data.truncate(size);
            if rng.below(4) == 0 {
                let at = rng.below(data.len());
                data[at] = rng.next() as u8;
            }
            let cap = if rng.below(3) == 0 {
                rng.below(data.len() + 1)
            } else {
                data.len()
            };
            let dir = if rng.below(2) == 0 { IN } else { EG };
            conn.feed(&cut(dir, fed as u64, &data, cap), &mut out);
            fed += data.len();
            segments += 1;
            assert!(
                conn.buffered_bytes() <= 2 * MAX_HEAD + 2,
                "buffered {}",
                conn.buffered_bytes()
            );
            assert!(conn.pending.len() <= MAX_PENDING);
            if conn.is_not_http() || rng.below(500) == 0 {
                conn.close(fed as u64, rng.below(2) == 0, &mut out);
            }
            exchanges += out.len();
            out.clear();
        }
        // The input was HTTP-like enough to drive whole exchanges through.
        assert!(
            segments > 5_000 && exchanges > 500,
            "{segments} segments, {exchanges} exchanges"
        );
    }

    #[test]
    fn pure_random_bytes_are_given_up() {
        let mut rng = Rng(42);
        let mut conn = Http1Conn::new();
        let mut out = Vec::new();
        let mut data = [0u8; 1500];
        for ts in 0..1000 {
            data.iter_mut().for_each(|b| *b = rng.next() as u8);
            let len = 1 + rng.below(data.len());
            conn.feed(
                &seg(if ts % 3 == 0 { EG } else { IN }, ts, &data[..len]),
                &mut out,
            );
        }
        assert!(conn.is_not_http());
        assert!(out.is_empty());
    }

    fn render(exchanges: &[HttpExchange], not_http: bool) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        for (i, e) in exchanges.iter().enumerate() {
            let status = e.status.map_or("-".to_string(), |s| s.to_string());
            let _ = writeln!(
                s,
                "#{} {:?} {} {} HTTP/1.{} -> {status} {:?}",
                i + 1,
                e.side,
                e.method,
                e.target(),
                e.minor_version,
                e.outcome
            );
            let _ = writeln!(
                s,
                "   request  start={} end={} bytes={}",
                e.req_start_ns, e.req_end_ns, e.req_bytes
            );
            let resp_start = e.resp_start_ns.map_or("-".to_string(), |t| t.to_string());
            let _ = writeln!(
                s,
                "   response start={resp_start} end={} bytes={}",
                e.end_ns, e.resp_bytes
            );
            for (name, value) in e.request_headers() {
                let _ = writeln!(s, "   header {name}: {value}");
            }
        }
        let _ = writeln!(s, "not_http: {not_http}");
        s
    }

    fn run_fixture(text: &str) -> String {
        let mut conn = Http1Conn::new();
        let mut out = Vec::new();
        // `close` starts the matcher over, so remember whether it had given up before.
        let mut not_http = false;
        for item in parse_fixture(text) {
            match item {
                Item::Segment(f) => conn.feed(&f.segment(None), &mut out),
                Item::Close { ts, reset } => {
                    not_http |= conn.is_not_http();
                    conn.close(ts, reset, &mut out);
                }
            }
            not_http |= conn.is_not_http();
        }
        render(&out, not_http)
    }

    #[test]
    fn golden_fixtures() {
        check_golden("http1", 12, run_fixture);
    }

    /// Response heads as servers send them (nginx, Python's http.server, chunked, lists of
    /// lengths, no reason phrase, odd case, obs-text), some with a body after the head.
    const PLAIN_RESPONSES: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 12:00:00 GMT\r\nContent-Type: text/html\r\nContent-Length: 6\r\nLast-Modified: Fri, 27 Nov 2026 11:00:00 GMT\r\nConnection: keep-alive\r\nETag: \"6567a1b0-6\"\r\nAccept-Ranges: bytes\r\n\r\nhello\n",
        b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.7\r\nDate: Fri, 27 Nov 2026 12:00:00 GMT\r\nContent-type: text/plain\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nTRANSFER-ENCODING: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\ncontent-LENGTH:5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
        b"HTTP/1.1 204\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nX-Empty:\r\n\r\n",
        b"HTTP/1.1 404 Nicht gefunden \xc3\xa4\t!\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello",
        b"HTTP/1.1 200 OK\r\nX-Bad\x1fName: skipped\r\n: no name\r\nno colon\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nCookie-Like: a=\x80\xff\r\nContent-Length: 3 \t\r\n\r\n",
    ];

    #[test]
    fn plain_response_heads_are_taken_as_httparse_reads_them() {
        for head in PLAIN_RESPONSES {
            let plain = plain_response_head(head);
            assert!(plain.is_some(), "not taken: {}", head.escape_ascii());
            assert_eq!(plain, parse_response_head(head), "{}", head.escape_ascii());
        }
        let (nginx, len) = plain_response_head(PLAIN_RESPONSES[0]).unwrap();
        assert_eq!((nginx.status, nginx.framing.content_length), (200, Some(6)));
        assert_eq!(len, PLAIN_RESPONSES[0].len() - 6);
        assert!(
            plain_response_head(PLAIN_RESPONSES[2])
                .unwrap()
                .0
                .framing
                .chunked
        );
        assert!(
            plain_response_head(PLAIN_RESPONSES[5])
                .unwrap()
                .0
                .framing
                .invalid
        );
    }

    #[test]
    fn unusual_response_heads_are_left_to_httparse() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r",
            b"\r\nHTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1  200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 5\n\n",
            b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\x01\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: \0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Bad\x01Name: y\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length\r: 5\r\n\r\n",
            b"HTTP/2.0 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 O\x7fK\r\n\r\n",
        ] {
            assert_eq!(plain_response_head(head), None, "{}", head.escape_ascii());
        }
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_PARSED_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(plain_response_head(&many), None);
        assert_eq!(
            parse_response_head(&many),
            None,
            "httparse: too many headers"
        );
    }

    /// Heads near the common form, made by mutating real ones: wherever the plain path takes
    /// one, httparse reads it the same. (The http1 fuzz target checks every head it meets the
    /// same way.)
    #[test]
    fn plain_response_head_agrees_with_httparse_on_mutated_heads() {
        const BYTES: &[u8] = b"\r\n\0 \t:,;0123456789aAcCtT-\x7f\x80\xff\x01";
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let (mut taken, mut left) = (0, 0);
        for base in PLAIN_RESPONSES {
            for _ in 0..4000 {
                let mut head = base.to_vec();
                for _ in 0..1 + next(3) {
                    if head.is_empty() {
                        break;
                    }
                    let at = next(head.len());
                    let byte = BYTES[next(BYTES.len())];
                    match next(4) {
                        0 => head.insert(at, byte),
                        1 => drop(head.remove(at)),
                        2 => head.truncate(at.max(1)),
                        _ => head[at] = byte,
                    }
                }
                match plain_response_head(&head) {
                    Some(plain) => {
                        taken += 1;
                        assert_eq!(
                            Some(plain),
                            parse_response_head(&head),
                            "{}",
                            head.escape_ascii()
                        );
                    }
                    None => left += 1,
                }
            }
        }
        assert!(
            taken > 10_000 && left > 10_000,
            "{taken} taken, {left} left"
        );
    }
}
