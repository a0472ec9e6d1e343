//! Redis (RESP2/RESP3) command/reply matching for one connection.
//!
//! Each direction is walked by a streaming RESP framer (`Framer`) that never buffers a frame:
//! it keeps the open aggregates as a stack of remaining element counts, the current line
//! (bounded) and, inside a bulk string, how many bytes are left. Bulk payloads are skipped by
//! count, so a 100 MB `GET` reply costs the same as a small one, and bytes past the captured
//! prefix of a syscall are skipped by `len` as long as they fall inside a bulk payload.
//!
//! Replies come back in command order, so commands wait in a FIFO (`pending`) and every
//! top-level reply frame completes the oldest one. Pipelines and MULTI/EXEC need nothing more:
//! queued commands get `+QUEUED` and EXEC gets the array of results. RESP3 push frames (`>`)
//! and attributes (`|`) are not replies and are skipped. Pub/sub and MONITOR turn the
//! connection into a message stream: matching stops after the command that started it
//! (`CLIENT REPLY`: as soon as the replies reach it). `*0`, `*-1` and blank inline lines get no
//! reply and take no place in the FIFO.
//!
//! The first command is found by its start (`probe_request`); when syscalls split that start,
//! the pieces are kept (at most `PROBE_MAX` bytes) until it is decided. HTTP and TLS are given
//! up on at once, anything else after `SEARCH_MAX_SEGMENTS` segments or `SEARCH_MAX_BYTES`.
//!
//! Matching must never pair a command with another command's reply. When framing is lost (the
//! capture cut a syscall where frames start, or garbage), the commands whose replies may be in
//! the lost bytes are dropped; the reply stream resyncs if the first reply syscall after the
//! client wrote a new command starts like a frame (a client reads a reply before it writes the
//! next command, unless it pipelines across the loss). A lost run of commands (request bytes
//! that were not captured, or skipped while searching) is queued as a marker; when the replies
//! reach it the reply stream is lost in turn, so the commands before it are still matched. A
//! reply frame that began while no command was waiting answers none of the later ones.
//!
//! When the tracer knows it stopped capturing for a while (`gap`), both directions are lost at
//! once: the waiting commands are dropped, replies wait for a command written after the gap
//! (`Sync::Lost`), and commands resync at a syscall that starts like one. Request bytes that
//! cannot be framed before that are the rest of a command that began unseen; they are queued as
//! a lost run as usual, unless a reply syscall comes before the next command is written: the
//! client is then reading their reply, so the next command is matched. After a command that
//! may stop matching (pub/sub, MONITOR), a gap stops matching, as any loss does.

use std::collections::VecDeque;

use super::{DbExchange, DbSystem, Direction, Outcome, Segment, Side};

/// Commands awaiting a reply that are reported; later ones (deep pipelines) are only counted
/// so that FIFO matching stays right.
const MAX_PENDING: usize = 256;
/// Longest line (simple string, error, number, inline command) followed; longer is garbage.
/// Redis itself refuses inline commands over 64 KiB.
const MAX_LINE: u64 = 64 * 1024;
/// Line bytes kept (error messages, lengths); the rest of a long line is skipped.
const KEEP_LINE: usize = 512;
/// Deepest aggregate nesting followed. Redis replies nest a few levels (COMMAND DOCS: ~6).
const MAX_DEPTH: usize = 32;
/// Largest element count or bulk length accepted (Redis caps bulk strings at 512 MB by
/// default; anything near u64 is garbage).
const MAX_COUNT: u64 = 1 << 40;
/// Bytes kept of the command name and subcommand.
const WORD_LEN: usize = 32;
/// Arguments shown as `?` in the statement before `...`.
const MAX_STATEMENT_ARGS: u64 = 20;
/// Error messages are cut to this many bytes.
const MAX_ERROR: usize = 256;
/// While nothing looked like a Redis command yet, give up after this many segments or bytes.
const SEARCH_MAX_SEGMENTS: u32 = 8;
const SEARCH_MAX_BYTES: u64 = 64 * 1024;

/// Commands recognised when looking for the start of Redis in a stream: upper case, sorted
/// (binary search). Module commands (`JSON.SET`) are matched once the connection is known.
#[rustfmt::skip]
const COMMANDS: &[&str] = &[
    "ACL", "APPEND", "ASKING", "AUTH", "BGREWRITEAOF", "BGSAVE", "BITCOUNT", "BITFIELD",
    "BITFIELD_RO", "BITOP", "BITPOS", "BLMOVE", "BLMPOP", "BLPOP", "BRPOP", "BRPOPLPUSH", "BZMPOP",
    "BZPOPMAX", "BZPOPMIN", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "COPY", "DBSIZE", "DEBUG",
    "DECR", "DECRBY", "DEL", "DISCARD", "DUMP", "ECHO", "EVAL", "EVALSHA", "EVALSHA_RO", "EVAL_RO",
    "EXEC", "EXISTS", "EXPIRE", "EXPIREAT", "EXPIRETIME", "FAILOVER", "FCALL", "FCALL_RO",
    "FLUSHALL", "FLUSHDB", "FUNCTION", "GEOADD", "GEODIST", "GEOHASH", "GEOPOS", "GEORADIUS",
    "GEORADIUSBYMEMBER", "GEOSEARCH", "GEOSEARCHSTORE", "GET", "GETBIT", "GETDEL", "GETEX",
    "GETRANGE", "GETSET", "HDEL", "HELLO", "HEXISTS", "HGET", "HGETALL", "HINCRBY",
    "HINCRBYFLOAT", "HKEYS", "HLEN", "HMGET", "HMSET", "HRANDFIELD", "HSCAN", "HSET", "HSETNX",
    "HSTRLEN", "HVALS", "INCR", "INCRBY", "INCRBYFLOAT", "INFO", "KEYS", "LASTSAVE", "LATENCY",
    "LCS", "LINDEX", "LINSERT", "LLEN", "LMOVE", "LMPOP", "LPOP", "LPOS", "LPUSH", "LPUSHX",
    "LRANGE", "LREM", "LSET", "LTRIM", "MEMORY", "MGET", "MIGRATE", "MODULE", "MONITOR", "MOVE",
    "MSET", "MSETNX", "MULTI", "OBJECT", "PERSIST", "PEXPIRE", "PEXPIREAT", "PEXPIRETIME", "PFADD",
    "PFCOUNT", "PFMERGE", "PING", "PSETEX", "PSUBSCRIBE", "PTTL", "PUBLISH", "PUBSUB",
    "PUNSUBSCRIBE", "QUIT", "RANDOMKEY", "READONLY", "READWRITE", "RENAME", "RENAMENX",
    "REPLICAOF", "RESET", "RESTORE", "ROLE", "RPOP", "RPOPLPUSH", "RPUSH", "RPUSHX", "SADD",
    "SAVE", "SCAN", "SCARD", "SCRIPT", "SDIFF", "SDIFFSTORE", "SELECT", "SET", "SETBIT", "SETEX",
    "SETNX", "SETRANGE", "SHUTDOWN", "SINTER", "SINTERCARD", "SINTERSTORE", "SISMEMBER",
    "SLAVEOF", "SLOWLOG", "SMEMBERS", "SMISMEMBER", "SMOVE", "SORT", "SORT_RO", "SPOP",
    "SPUBLISH", "SRANDMEMBER", "SREM", "SSCAN", "SSUBSCRIBE", "STRLEN", "SUBSCRIBE", "SUNION",
    "SUNIONSTORE", "SUNSUBSCRIBE", "SWAPDB", "TIME", "TOUCH", "TTL", "TYPE", "UNLINK",
    "UNSUBSCRIBE", "UNWATCH", "WAIT", "WAITAOF", "WATCH", "XACK", "XADD", "XAUTOCLAIM", "XCLAIM",
    "XDEL", "XGROUP", "XINFO", "XLEN", "XPENDING", "XRANGE", "XREAD", "XREADGROUP", "XREVRANGE",
    "XSETID", "XTRIM", "ZADD", "ZCARD", "ZCOUNT", "ZDIFF", "ZDIFFSTORE", "ZINCRBY", "ZINTER",
    "ZINTERCARD", "ZINTERSTORE", "ZLEXCOUNT", "ZMPOP", "ZMSCORE", "ZPOPMAX", "ZPOPMIN",
    "ZRANDMEMBER", "ZRANGE", "ZRANGEBYLEX", "ZRANGEBYSCORE", "ZRANGESTORE", "ZRANK", "ZREM",
    "ZREMRANGEBYLEX", "ZREMRANGEBYRANK", "ZREMRANGEBYSCORE", "ZREVRANGE", "ZREVRANGEBYLEX",
    "ZREVRANGEBYSCORE", "ZREVRANK", "ZSCAN", "ZSCORE", "ZUNION", "ZUNIONSTORE",
];

/// Commands that are safe to recognise in inline (telnet) form: an inline command is just a
/// line of words, so only verbs unlikely to start another protocol's text are accepted.
const INLINE_COMMANDS: &[&str] = &[
    "PING", "AUTH", "HELLO", "SELECT", "INFO", "QUIT", "DBSIZE", "ECHO",
];

/// Commands whose second word names the operation (`CLIENT SETNAME`).
const CONTAINER_COMMANDS: &[&str] = &[
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "DEBUG", "FUNCTION", "LATENCY", "MEMORY",
    "MODULE", "OBJECT", "PUBSUB", "SCRIPT", "SLOWLOG", "XGROUP", "XINFO",
];

/// Commands after whose reply the connection carries a message stream.
const STOP_COMMANDS: [&str; 4] = ["SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR"];

/// Bytes of a possible first command kept while syscalls split it (searching only).
const PROBE_MAX: usize = 256;

/// What the start of a stream says about it being a Redis command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    /// A RESP array of bulk strings whose first element is a known command, or an inline
    /// command from a small safe set.
    Yes,
    /// Not decided: every byte so far fits a command start, and more bytes are needed.
    Maybe,
    No,
}

/// Does `buf` start like a Redis command: a RESP array of bulk strings whose first element is a
/// known command, or an inline command from a small safe set?
pub fn looks_like_redis_request(buf: &[u8]) -> bool {
    probe_request(buf) == Probe::Yes
}

fn probe_request(buf: &[u8]) -> Probe {
    match buf.split_first() {
        None => Probe::Maybe,
        Some((b'*', rest)) => probe_array(rest),
        Some(_) => probe_inline(buf),
    }
}

/// `*` already stripped: `COUNT\r\n$LEN\r\nNAME\r\n`.
fn probe_array(buf: &[u8]) -> Probe {
    let (count, rest) = match probe_number(buf) {
        Ok(found) => found,
        Err(p) => return p,
    };
    if !(1..=1 << 20).contains(&count) {
        return Probe::No;
    }
    let rest = match rest {
        [] => return Probe::Maybe,
        [b'$', rest @ ..] => rest,
        _ => return Probe::No,
    };
    let (len, rest) = match probe_number(rest) {
        Ok(found) => found,
        Err(p) => return p,
    };
    let Some(len) = usize::try_from(len)
        .ok()
        .filter(|n| (1..=WORD_LEN).contains(n))
    else {
        return Probe::No;
    };
    let Some(name) = rest.get(..len) else {
        // The name goes on in the next bytes: is it the start of a known command?
        let fits = COMMANDS
            .iter()
            .any(|c| c.len() == len && c.as_bytes()[..rest.len()].eq_ignore_ascii_case(rest));
        return if fits { Probe::Maybe } else { Probe::No };
    };
    if !is_known_command(name) {
        return Probe::No;
    }
    match &rest[len..] {
        [] | [b'\r'] | [b'\r', b'\n', ..] => Probe::Yes,
        _ => Probe::No,
    }
}

/// `123\r\n` at the start of `buf`: the number and what follows, or what is missing.
fn probe_number(buf: &[u8]) -> Result<(u64, &[u8]), Probe> {
    let digits = buf.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits > 10 {
        return Err(Probe::No);
    }
    match &buf[digits..] {
        [] => Err(Probe::Maybe),
        [b'\r'] if digits > 0 => Err(Probe::Maybe),
        [b'\r', b'\n', rest @ ..] if digits > 0 => {
            let n = buf[..digits]
                .iter()
                .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
            Ok((n, rest))
        }
        _ => Err(Probe::No),
    }
}

/// An inline command: `WORD args...\r\n`, printable, WORD one of `INLINE_COMMANDS`.
fn probe_inline(buf: &[u8]) -> Probe {
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = &buf[..line_end.unwrap_or(buf.len())];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if !line.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) {
        return Probe::No;
    }
    let word_end = line.iter().position(|&b| b == b' ');
    let word = &line[..word_end.unwrap_or(line.len())];
    if word_end.is_none() && line_end.is_none() {
        // The word may go on.
        let fits = INLINE_COMMANDS.iter().any(|c| {
            c.as_bytes()
                .get(..word.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(word))
        });
        return if fits { Probe::Maybe } else { Probe::No };
    }
    if !INLINE_COMMANDS
        .iter()
        .any(|c| word.eq_ignore_ascii_case(c.as_bytes()))
    {
        return Probe::No;
    }
    if line_end.is_none() {
        return Probe::Maybe;
    }
    Probe::Yes
}

fn is_known_command(name: &[u8]) -> bool {
    if name.len() > WORD_LEN {
        return false;
    }
    let mut upper = [0u8; WORD_LEN];
    let upper = &mut upper[..name.len()];
    upper.copy_from_slice(name);
    upper.make_ascii_uppercase();
    COMMANDS
        .binary_search_by(|c| c.as_bytes().cmp(&*upper))
        .is_ok()
}

/// A stream start that is certainly another protocol: an HTTP/1.x request or status line, or
/// a TLS handshake record. Redis itself drops connections that send HTTP.
fn surely_not_redis(head: &[u8]) -> bool {
    let line = &head[..head.iter().position(|&b| b == b'\n').unwrap_or(head.len())];
    super::http1::looks_like_response(head)
        || (super::http1::looks_like_request(head) && line.windows(6).any(|w| w == b" HTTP/"))
        || matches!(head, [0x16, 0x03, 0x00..=0x04, ..])
}

fn parse_int(digits: &[u8]) -> Option<i64> {
    let (neg, digits) = match digits.strip_prefix(b"-") {
        Some(d) => (true, d),
        None => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0i64, |acc, &d| acc * 10 + i64::from(d - b'0'));
    Some(if neg { -n } else { n })
}

/// Per-connection Redis matcher: feed it the connection's syscalls in order.
#[derive(Debug)]
pub struct RedisConn {
    mode: Mode,
    /// Meaningful once `mode` is `Active`.
    side: Side,
    req: Stream,
    resp: Stream,
    /// Commands awaiting a reply, oldest first. At most `MAX_PENDING` `Cmd` entries, and no two
    /// other entries in a row (see `command_done`, `push_unknown`): bounded.
    pending: VecDeque<Entry>,
    /// `Cmd` entries in `pending` (the bound applies to these).
    reported: usize,
    /// A command after which replies stop alternating with commands is queued: later commands
    /// are not queued (matching stops when the replies reach it).
    stopping: bool,
    /// The reply frame under way began while no command was waiting: it answers a command
    /// we did not see (sent before we attached, or not framed), never a later one.
    resp_orphan: bool,
    /// Reply framing state beyond the framer.
    resp_sync: Sync,
    /// The command whose reply was under way when the reply stream lost framing: it ends at
    /// the next command or the close.
    blind: Option<Pending>,
    /// A gap was reported and no command was written since (see `gap`).
    after_gap: bool,
}

#[derive(Debug)]
enum Mode {
    Searching(Search),
    Active,
    NotRedis,
    /// Pub/sub, MONITOR or `CLIENT REPLY`: the connection no longer alternates commands and
    /// replies.
    Stopped,
}

/// Looking for the first command.
#[derive(Debug)]
struct Search {
    segments: u32,
    bytes: u64,
    /// Direction of the last segment skipped: when it is the direction commands turn out to go,
    /// a command we could not recognise may still be waiting for its reply.
    last_skipped: Option<Direction>,
    /// The start of a possible first command that syscalls split (all of it captured): it is
    /// decided with the next segment in `probe_dir`.
    probe: Vec<u8>,
    probe_dir: Direction,
    probe_start_ns: u64,
    probe_ts_ns: u64,
}

impl Search {
    fn new() -> Self {
        Self {
            segments: 0,
            bytes: 0,
            last_skipped: None,
            probe: Vec::new(),
            probe_dir: Direction::Egress,
            probe_start_ns: 0,
            probe_ts_ns: 0,
        }
    }
}

/// The first command was found: the bytes of it seen before the current segment.
struct Found {
    probe: Vec<u8>,
    probe_start_ns: u64,
    probe_ts_ns: u64,
    unknown_before: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sync {
    InSync,
    /// Reply bytes cannot be framed; `armed` once a command was written after the loss, so
    /// the next reply syscall that starts like a frame starts a frame.
    Lost {
        armed: bool,
    },
}

#[derive(Debug)]
enum Entry {
    Cmd(Pending),
    /// Commands beyond `MAX_PENDING`: their replies are skipped.
    Skip(u64),
    /// An unknown number of commands (their bytes were not captured).
    Unknown,
}

/// When a command makes replies stop alternating with commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Never,
    /// After its reply (SUBSCRIBE and friends, MONITOR).
    AfterReply,
    /// As soon as the replies reach it: `CLIENT REPLY OFF|SKIP` have no reply, and the
    /// replies after it are switched off.
    Before,
}

#[derive(Debug)]
struct Pending {
    operation: String,
    statement: String,
    stop: Stop,
    req_start_ns: u64,
    /// See `DbExchange::req_offset`.
    req_offset: u64,
    req_end_ns: u64,
    req_bytes: u64,
    resp_start_ns: Option<u64>,
    resp_bytes: u64,
    end_ns: u64,
    error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Request,
    Response,
}

/// One direction: the framer plus the current top-level frame's timing and size.
#[derive(Debug, Default)]
struct Stream {
    framer: Framer,
    start_ns: u64,
    /// Where the current frame began in the syscall dated `start_ns` (a held probe replayed
    /// counts from its first syscall's first byte).
    start_offset: u64,
    bytes: u64,
}

/// Streaming RESP framer state.
#[derive(Debug, Default)]
struct Framer {
    state: FState,
    /// Remaining elements of each open aggregate, innermost last; `true` for an attribute
    /// (which does not count as an element of its parent).
    stack: Vec<(u64, bool)>,
    /// The current line (type byte first), up to `KEEP_LINE` bytes.
    line: Vec<u8>,
    /// Bytes of the current line so far (kept or not).
    line_len: u64,
    /// What the current top-level frame told so far.
    info: FrameInfo,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum FState {
    /// Between top-level frames.
    #[default]
    Boundary,
    /// Inside a line (a type byte and its header, a simple value, or an inline command).
    Line,
    /// Inside a bulk payload: bytes left including the final CRLF.
    Bulk { left: u64 },
    /// Framing lost.
    Invalid,
}

/// What a top-level frame said, as much as is needed.
#[derive(Debug, Default)]
struct FrameInfo {
    kind: u8,
    /// Elements of a top-level command array, or words of an inline command.
    argc: u64,
    /// The first two words (command and subcommand), bounded.
    words: [Word; 2],
    /// Index of the next top-level element (for `words`).
    elem: u64,
    /// The bulk being read is a word we keep (`words[i]`).
    keep_bulk: Option<usize>,
    /// Error message of an error reply (`-` line or `!` blob).
    error: Option<Vec<u8>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Word {
    buf: [u8; WORD_LEN],
    len: u8,
    /// Some of the word was not kept (too long, or not captured): it names nothing.
    cut: bool,
}

impl Word {
    fn push(&mut self, bytes: &[u8]) {
        let at = usize::from(self.len);
        let n = bytes.len().min(WORD_LEN - at);
        self.buf[at..at + n].copy_from_slice(&bytes[..n]);
        // `n <= WORD_LEN`, which fits a u8.
        self.len += n as u8;
        self.cut |= n < bytes.len();
    }
    /// The word, unless it was cut.
    fn get(&self) -> &[u8] {
        if self.cut {
            return &[];
        }
        self.kept()
    }
    fn kept(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
    /// Cut, and what was kept fits the start of one of `words`.
    fn may_be(&self, words: &[&str]) -> bool {
        self.cut
            && words.iter().any(|w| {
                w.as_bytes()
                    .get(..self.kept().len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(self.kept()))
            })
    }
}

/// Result of framing some bytes.
enum Step {
    /// All bytes were taken; the frame goes on.
    More,
    /// A top-level frame ended after this many bytes.
    Done(usize),
    Invalid,
}

impl Framer {
    fn at_boundary(&self) -> bool {
        self.state == FState::Boundary
    }

    fn reset(&mut self) {
        self.state = FState::Boundary;
        self.stack.clear();
        self.line.clear();
        self.line_len = 0;
        self.info = FrameInfo::default();
    }

    /// Walks `bytes` until the current top-level frame ends (or the bytes do).
    fn advance(&mut self, role: Role, bytes: &[u8]) -> Step {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                FState::Invalid => return Step::Invalid,
                FState::Boundary => {
                    // Redis skips empty lines between inline commands; so do we.
                    if role == Role::Request && matches!(bytes[i], b'\r' | b'\n') {
                        i += 1;
                        continue;
                    }
                    self.info = FrameInfo::default();
                    self.info.kind = bytes[i];
                    self.state = FState::Line;
                    self.line.clear();
                    self.line_len = 0;
                }
                FState::Line => {
                    let rest = &bytes[i..];
                    let (chunk, end) = match rest.iter().position(|&b| b == b'\n') {
                        Some(p) => (&rest[..=p], true),
                        None => (rest, false),
                    };
                    i += chunk.len();
                    let room = KEEP_LINE.saturating_sub(self.line.len());
                    self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    self.line_len += chunk.len() as u64;
                    if self.line_len > MAX_LINE {
                        self.state = FState::Invalid;
                        return Step::Invalid;
                    }
                    if end && self.end_line(role) {
                        return Step::Done(i);
                    }
                    if self.state == FState::Invalid {
                        return Step::Invalid;
                    }
                }
                FState::Bulk { left } => {
                    let avail = (bytes.len() - i) as u64;
                    let take = left.min(avail);
                    // `take <= avail`, a usize.
                    let chunk = &bytes[i..i + take as usize];
                    self.bulk_bytes(chunk, left);
                    i += chunk.len();
                    if take == left {
                        // The payload must end in CRLF; anything else is not RESP.
                        if chunk.last() != Some(&b'\n') {
                            self.state = FState::Invalid;
                            return Step::Invalid;
                        }
                        if self.element_done() {
                            return Step::Done(i);
                        }
                    } else {
                        self.state = FState::Bulk { left: left - take };
                    }
                }
            }
        }
        Step::More
    }

    /// Keeps the part of a bulk payload the frame info needs. `left` counts the final CRLF.
    fn bulk_bytes(&mut self, chunk: &[u8], left: u64) {
        let payload_left = left.saturating_sub(2);
        let payload = &chunk[..chunk
            .len()
            .min(usize::try_from(payload_left).unwrap_or(usize::MAX))];
        if let Some(w) = self.info.keep_bulk {
            self.info.words[w].push(payload);
        } else if self.info.kind == b'!' && self.stack.is_empty() {
            let err = self.info.error.get_or_insert_with(Vec::new);
            let room = MAX_ERROR.saturating_sub(err.len());
            err.extend_from_slice(&payload[..payload.len().min(room)]);
        }
    }

    /// The start of the error message of a top-level error reply under way, when framing
    /// is lost in it.
    fn partial_error(&self) -> Option<String> {
        if !self.stack.is_empty() {
            return None;
        }
        let msg = match (self.state, self.info.kind) {
            (FState::Line, b'-') => self.line.get(1..)?,
            (FState::Bulk { .. }, b'!') => self.info.error.as_deref()?,
            _ => return None,
        };
        let msg = msg.strip_suffix(b"\r").unwrap_or(msg);
        Some(String::from_utf8_lossy(&msg[..msg.len().min(MAX_ERROR)]).into_owned())
    }

    /// Skips up to `n` bytes that were not captured. Returns the bytes skipped and whether a
    /// top-level frame ended there; only bulk payloads can be skipped blind.
    fn skip(&mut self, n: u64) -> (u64, bool) {
        let FState::Bulk { left } = self.state else {
            return (0, false);
        };
        let take = left.min(n);
        if let Some(w) = self.info.keep_bulk
            && left > 2
        {
            // Payload bytes of a kept word go by unseen (skipping starts with them).
            self.info.words[w].cut = true;
        }
        if take < left {
            self.state = FState::Bulk { left: left - take };
            return (take, false);
        }
        (take, self.element_done())
    }

    /// A line ended (it is in `self.line`, LF included). Returns true when the top-level frame
    /// ended with it.
    fn end_line(&mut self, role: Role) -> bool {
        let line = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some((&kind, body)) = line.split_first() else {
            self.state = FState::Invalid;
            return false;
        };
        let depth = self.stack.len();
        if role == Role::Request {
            if depth == 0 && kind != b'*' {
                return self.inline_command();
            }
            // Commands are arrays of bulk strings, nothing else.
            if depth > 0 && kind != b'$' {
                self.state = FState::Invalid;
                return false;
            }
        }
        let truncated = self.line_len > self.line.len() as u64;
        match kind {
            b'$' | b'=' | b'!' => {
                let Some(len) = parse_count(body, truncated) else {
                    self.state = FState::Invalid;
                    return false;
                };
                match len {
                    None => self.element_done(),
                    Some(len) => {
                        if role == Role::Request && depth == 1 && self.info.elem < 2 {
                            self.info.keep_bulk = Some(self.info.elem as usize);
                        } else {
                            self.info.keep_bulk = None;
                        }
                        self.state = FState::Bulk { left: len + 2 };
                        false
                    }
                }
            }
            b'*' | b'%' | b'~' | b'>' | b'|' => {
                let Some(count) = parse_count(body, truncated) else {
                    self.state = FState::Invalid;
                    return false;
                };
                let count = count.unwrap_or(0);
                let count = if matches!(kind, b'%' | b'|') {
                    count.saturating_mul(2)
                } else {
                    count
                };
                if depth == 0 && kind == b'*' {
                    self.info.argc = count;
                }
                if count == 0 {
                    return self.element_done();
                }
                if depth >= MAX_DEPTH {
                    self.state = FState::Invalid;
                    return false;
                }
                self.stack.push((count, kind == b'|'));
                self.state = FState::Line;
                self.line.clear();
                self.line_len = 0;
                false
            }
            b'-' => {
                if depth == 0 {
                    self.info.error = Some(body[..body.len().min(MAX_ERROR)].to_vec());
                }
                self.element_done()
            }
            b'+' | b':' | b'_' | b',' | b'#' | b'(' => self.element_done(),
            _ => {
                self.state = FState::Invalid;
                false
            }
        }
    }

    /// An inline command line ended at the top level. A line of blanks is a command of no
    /// words, which Redis ignores (`argc` 0).
    fn inline_command(&mut self) -> bool {
        let line = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut words = line
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|w| !w.is_empty());
        if words
            .clone()
            .next()
            .is_some_and(|w| !w[0].is_ascii_alphabetic())
        {
            self.state = FState::Invalid;
            return false;
        }
        let mut info = FrameInfo {
            kind: b'i',
            ..FrameInfo::default()
        };
        // Only the kept prefix is split; a longer line's remaining words are not counted, and
        // its last kept word may be cut.
        let cut = self.line_len > self.line.len() as u64;
        for (i, w) in words.by_ref().take(2).enumerate() {
            info.words[i].push(w);
            info.argc += 1;
        }
        info.argc += words.count() as u64;
        if cut {
            info.words[1].cut = true;
            if info.argc <= 1 {
                info.words[0].cut = true;
            }
        }
        self.info = info;
        self.state = FState::Boundary;
        true
    }

    /// An element (scalar or finished aggregate) ended; closes the aggregates it completes.
    /// Returns true when that ends the top-level frame.
    fn element_done(&mut self) -> bool {
        self.info.keep_bulk = None;
        if self.stack.len() == 1 {
            self.info.elem += 1;
        }
        loop {
            match self.stack.last_mut() {
                None => {
                    self.state = FState::Boundary;
                    return true;
                }
                Some((left, _)) => {
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    let (_, attr) = self.stack.pop().unwrap_or((0, false));
                    if attr {
                        // An attribute precedes the element it annotates and is not counted.
                        if self.stack.is_empty() {
                            // A top-level attribute: the reply itself follows.
                            self.state = FState::Boundary;
                            return true;
                        }
                        break;
                    }
                }
            }
        }
        self.state = FState::Line;
        self.line.clear();
        self.line_len = 0;
        false
    }
}

/// A length or count header: `Some(None)` for a null (`-1`), `None` for garbage, including
/// RESP3 streamed types (`$?`), which Redis does not send.
fn parse_count(body: &[u8], truncated: bool) -> Option<Option<u64>> {
    match parse_int(body) {
        Some(-1) => Some(None),
        Some(n) if !truncated && (0..=MAX_COUNT as i64).contains(&n) => Some(Some(n as u64)),
        _ => None,
    }
}

impl Default for RedisConn {
    fn default() -> Self {
        Self::new()
    }
}

impl RedisConn {
    pub fn new() -> Self {
        Self {
            mode: Mode::Searching(Search::new()),
            side: Side::Client,
            req: Stream::default(),
            resp: Stream::default(),
            pending: VecDeque::new(),
            reported: 0,
            stopping: false,
            resp_orphan: false,
            resp_sync: Sync::InSync,
            blind: None,
            after_gap: false,
        }
    }

    /// True once the connection was found not to carry Redis commands, or stopped carrying
    /// command/reply pairs (pub/sub, MONITOR); `feed` is then a no-op.
    pub fn is_not_redis(&self) -> bool {
        matches!(self.mode, Mode::NotRedis | Mode::Stopped)
    }

    /// Feed one syscall's bytes; push every exchange that finished into `out`.
    pub fn feed(&mut self, seg: &Segment<'_>, out: &mut Vec<DbExchange>) {
        if seg.len == 0 {
            return;
        }
        match self.mode {
            Mode::NotRedis | Mode::Stopped => return,
            Mode::Searching(_) => {
                let Some(found) = self.search(seg) else {
                    return;
                };
                self.side = match seg.dir {
                    Direction::Egress => Side::Client,
                    Direction::Ingress => Side::Server,
                };
                self.mode = Mode::Active;
                if found.unknown_before {
                    // A command we did not recognise was written last: its reply may come.
                    self.push_unknown();
                }
                if !found.probe.is_empty() {
                    let prefix = Segment::whole(
                        seg.dir,
                        found.probe_ts_ns,
                        found.probe_start_ns,
                        &found.probe,
                    );
                    self.walk_requests(&prefix, out);
                }
            }
            Mode::Active => {}
        }
        let request_dir = match self.side {
            Side::Client => Direction::Egress,
            Side::Server => Direction::Ingress,
        };
        if seg.dir == request_dir {
            self.walk_requests(seg, out);
        } else {
            self.walk_replies(seg, out);
        }
    }

    /// Searching: is `seg` (with the probe before it) the start of the first command?
    fn search(&mut self, seg: &Segment<'_>) -> Option<Found> {
        let Mode::Searching(s) = &mut self.mode else {
            return None;
        };
        let (head, uncaptured) = captured(seg);
        s.segments = s.segments.saturating_add(1);
        s.bytes = s.bytes.saturating_add(seg.len);
        if !s.probe.is_empty() {
            let mut probe = std::mem::take(&mut s.probe);
            if s.probe_dir == seg.dir {
                probe.extend_from_slice(&head[..head.len().min(PROBE_MAX)]);
                match probe_request(&probe) {
                    Probe::Yes => {
                        probe.truncate(probe.len() - head.len().min(PROBE_MAX));
                        return Some(Found {
                            probe,
                            probe_start_ns: s.probe_start_ns,
                            probe_ts_ns: s.probe_ts_ns,
                            unknown_before: s.last_skipped == Some(seg.dir),
                        });
                    }
                    Probe::Maybe if uncaptured == 0 && probe.len() <= PROBE_MAX => {
                        s.probe = probe;
                        s.probe_ts_ns = seg.ts_ns;
                        return None;
                    }
                    _ => {}
                }
            }
            // Not a command after all: skipped bytes.
            s.last_skipped = Some(s.probe_dir);
            probe.clear();
            s.probe = probe;
        }
        match probe_request(head) {
            Probe::Yes => {
                return Some(Found {
                    probe: Vec::new(),
                    probe_start_ns: 0,
                    probe_ts_ns: 0,
                    unknown_before: s.last_skipped == Some(seg.dir),
                });
            }
            Probe::Maybe if uncaptured == 0 && head.len() <= PROBE_MAX => {
                s.probe.extend_from_slice(head);
                s.probe_dir = seg.dir;
                s.probe_start_ns = seg.start_ns;
                s.probe_ts_ns = seg.ts_ns;
                return None;
            }
            _ => {}
        }
        s.last_skipped = Some(seg.dir);
        if surely_not_redis(head)
            || s.segments >= SEARCH_MAX_SEGMENTS
            || s.bytes >= SEARCH_MAX_BYTES
        {
            self.mode = Mode::NotRedis;
        }
        None
    }

    /// Bytes in both directions went unseen since the last segment (the tracer stopped capturing
    /// for a while). Requests waiting for a response are dropped, since their outcome is unknown,
    /// and each direction resyncs at the first segment that starts like a message again.
    /// Returns how many unfinished requests were dropped.
    pub fn gap(&mut self) -> usize {
        match &mut self.mode {
            // Once given up, or in a message stream, nothing is matched any more.
            Mode::NotRedis | Mode::Stopped => return 0,
            Mode::Searching(s) => {
                // A command start split across syscalls does not go on after unseen bytes. The
                // last segment skipped was answered (or was an answer) during the gap: a
                // command found after it is taken to be the oldest waiting, as on attaching.
                // The search budget is left as it is: the gap says nothing about the protocol.
                s.probe.clear();
                s.last_skipped = None;
                return 0;
            }
            Mode::Active => {}
        }
        let dropped = self
            .pending
            .iter()
            .filter(|e| matches!(e, Entry::Cmd(_)))
            .count()
            + usize::from(self.blind.is_some());
        let framer = &mut self.req.framer;
        if let (FState::Bulk { left }, Some(w)) = (framer.state, framer.info.keep_bulk)
            && left > 2
        {
            // The rest of the command's name (or subcommand) went by unseen.
            framer.info.words[w].cut = true;
        }
        if !framer.at_boundary() && may_stop(&framer.info) {
            self.stopping = true;
        }
        if self.stopping {
            // A command that makes replies stop alternating with commands was written: the
            // connection may carry a message stream by now, which must not be matched.
            self.stop();
            return dropped;
        }
        self.pending.clear();
        self.reported = 0;
        self.blind = None;
        self.resp_orphan = false;
        // Neither stream is at a known frame boundary: commands resync at a syscall that starts
        // like one, replies once a command was written after the gap.
        self.req.framer.reset();
        self.req.framer.state = FState::Invalid;
        self.resp.framer.reset();
        self.resp_sync = Sync::Lost { armed: false };
        self.after_gap = true;
        dropped
    }

    /// The connection closed: commands still waiting end as [`Outcome::Closed`] (a reply cut
    /// by lost framing ends where it was last seen). The matcher is then back to its initial
    /// state.
    pub fn close(&mut self, ts_ns: u64, reset: bool, out: &mut Vec<DbExchange>) {
        if matches!(self.mode, Mode::Active) {
            if let Some(p) = self.blind.take() {
                let end = p.end_ns;
                emit(self.side, p, Outcome::Complete, end, out);
            }
            for entry in std::mem::take(&mut self.pending) {
                if let Entry::Cmd(p) = entry {
                    emit(self.side, p, Outcome::Closed { reset }, ts_ns, out);
                }
            }
        }
        *self = Self::new();
    }

    fn walk_requests(&mut self, seg: &Segment<'_>, out: &mut Vec<DbExchange>) {
        let (head, uncaptured) = captured(seg);
        if self.req.framer.state == FState::Invalid {
            if !looks_like_redis_request(head) && !head.starts_with(b"*") {
                // Commands we cannot frame: their replies must not go to later commands.
                self.push_unknown();
                return;
            }
            self.req.framer.reset();
        }
        if let Sync::Lost { armed: false } = self.resp_sync {
            // Replies to commands from now on come after the replies being skipped.
            self.resp_sync = Sync::Lost { armed: true };
            self.after_gap = false;
            // The client wrote again, so the reply of unknown length under way is over; it
            // ended with the last reply bytes before.
            if let Some(p) = self.blind.take() {
                let end = p.end_ns;
                emit(self.side, p, Outcome::Complete, end, out);
            }
        }
        let mut pos = 0;
        while pos < head.len() {
            if self.req.framer.at_boundary() {
                self.req.start_ns = seg.start_ns;
                self.req.start_offset = pos as u64;
                self.req.bytes = 0;
            }
            match self.req.framer.advance(Role::Request, &head[pos..]) {
                Step::More => {
                    self.req.bytes += (head.len() - pos) as u64;
                    pos = head.len();
                }
                Step::Done(n) => {
                    self.req.bytes += n as u64;
                    pos += n;
                    self.command_done(seg.ts_ns);
                    if !matches!(self.mode, Mode::Active) {
                        return;
                    }
                }
                Step::Invalid => {
                    self.lose_requests();
                    return;
                }
            }
        }
        let mut left = uncaptured;
        while left > 0 {
            let (n, done) = self.req.framer.skip(left);
            self.req.bytes += n;
            left -= n;
            if done {
                self.command_done(seg.ts_ns);
                if !matches!(self.mode, Mode::Active) {
                    return;
                }
            } else if n == 0 {
                // Commands start in bytes we cannot see.
                self.lose_requests();
                return;
            }
        }
    }

    /// The request stream cannot be framed: an unknown number of commands went by.
    fn lose_requests(&mut self) {
        if !self.req.framer.at_boundary() && may_stop(&self.req.framer.info) {
            // The command being lost may have started a message stream: stop when the
            // replies reach it.
            self.stopping = true;
        }
        self.req.framer.reset();
        self.req.framer.state = FState::Invalid;
        self.push_unknown();
    }

    /// Queues the marker of commands that could not be seen. After `Skip` it replaces it: the
    /// replies of both are skipped and reaching it loses the reply stream either way.
    fn push_unknown(&mut self) {
        match self.pending.back_mut() {
            Some(Entry::Unknown) => {}
            Some(back @ Entry::Skip(_)) => *back = Entry::Unknown,
            _ => self.pending.push_back(Entry::Unknown),
        }
    }

    fn command_done(&mut self, ts_ns: u64) {
        let info = &self.req.framer.info;
        if info.argc == 0 || self.stopping {
            // `*0`, `*-1` or a blank line: Redis ignores it and does not reply. After a
            // command that stops matching, nothing more is matched.
            return;
        }
        let mut operation = command_name(info.words[0].get());
        let mut args = info.argc - 1;
        if CONTAINER_COMMANDS.contains(&operation.as_str()) && args > 0 {
            let sub = info.words[1].get();
            if !sub.is_empty()
                && sub
                    .iter()
                    .all(|&b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
            {
                operation.push(' ');
                operation.extend(sub.iter().map(|&b| char::from(b.to_ascii_uppercase())));
                args -= 1;
            }
        }
        if operation.is_empty() {
            operation.push_str("UNKNOWN");
        }
        // A name cut by the capture that may be one of these counts as one: matching a message
        // stream as replies would pair commands with messages.
        let stop = match operation.as_str() {
            op if STOP_COMMANDS.contains(&op) => Stop::AfterReply,
            "UNKNOWN" if info.words[0].may_be(&STOP_COMMANDS) => Stop::AfterReply,
            "CLIENT REPLY" => Stop::Before,
            "CLIENT" if info.words[1].may_be(&["REPLY"]) => Stop::Before,
            _ => Stop::Never,
        };
        let mut statement = operation.clone();
        for _ in 0..args.min(MAX_STATEMENT_ARGS) {
            statement.push_str(" ?");
        }
        if args > MAX_STATEMENT_ARGS {
            statement.push_str(" ...");
        }
        let p = Pending {
            operation,
            statement,
            stop,
            req_start_ns: self.req.start_ns,
            req_offset: self.req.start_offset,
            req_end_ns: ts_ns,
            req_bytes: self.req.bytes,
            resp_start_ns: None,
            resp_bytes: 0,
            end_ns: ts_ns,
            error: None,
        };
        if stop != Stop::Never {
            // Queued even past the bound: it is the last one queued.
            self.stopping = true;
            self.pending.push_back(Entry::Cmd(p));
            self.reported += 1;
            self.stop_if_reached();
        } else if self.reported < MAX_PENDING {
            self.pending.push_back(Entry::Cmd(p));
            self.reported += 1;
        } else {
            match self.pending.back_mut() {
                Some(Entry::Skip(n)) => *n += 1,
                // Replies after an unknown number of commands are lost anyway.
                Some(Entry::Unknown) => {}
                _ => self.pending.push_back(Entry::Skip(1)),
            }
        }
    }

    /// Stops matching when the oldest waiting command switches replies off.
    fn stop_if_reached(&mut self) {
        if matches!(self.pending.front(), Some(Entry::Cmd(p)) if p.stop == Stop::Before) {
            self.stop();
        }
    }

    fn walk_replies(&mut self, seg: &Segment<'_>, out: &mut Vec<DbExchange>) {
        let (head, uncaptured) = captured(seg);
        match self.resp_sync {
            Sync::InSync => {}
            Sync::Lost { armed: false } => {
                if self.after_gap {
                    // The client reads replies before writing a command again: those of the
                    // commands whose rest it wrote after the gap (queued as `Unknown`, the only
                    // entry that can wait here) come now, not after its next command.
                    self.pending.clear();
                }
                if let Some(p) = &mut self.blind {
                    p.resp_bytes = p.resp_bytes.saturating_add(seg.len);
                    p.end_ns = seg.ts_ns;
                }
                return;
            }
            Sync::Lost { armed: true } => {
                if !head.first().is_some_and(|&b| is_reply_type(b)) {
                    // The first reply bytes after the command do not show a frame start: its
                    // reply (and those of the commands after it) cannot be told apart.
                    self.lose_replies(false);
                    return;
                }
                self.resp_sync = Sync::InSync;
                self.resp.framer.reset();
            }
        }
        let mut pos = 0;
        while pos < head.len() {
            if self.resp.framer.at_boundary() {
                self.resp.start_ns = seg.start_ns;
                self.resp.bytes = 0;
                self.resp_orphan = self.pending.is_empty();
                if matches!(self.pending.front(), Some(Entry::Unknown)) {
                    // Replies of commands we never saw: nothing after this can be matched.
                    self.lose_replies(false);
                    return;
                }
            }
            match self.resp.framer.advance(Role::Response, &head[pos..]) {
                Step::More => {
                    self.resp.bytes += (head.len() - pos) as u64;
                    pos = head.len();
                }
                Step::Done(n) => {
                    self.resp.bytes += n as u64;
                    pos += n;
                    self.reply_done(seg.ts_ns, out);
                    if !matches!(self.mode, Mode::Active) || self.resp_sync != Sync::InSync {
                        return;
                    }
                }
                Step::Invalid => {
                    self.lose_replies(false);
                    return;
                }
            }
        }
        let mut left = uncaptured;
        while left > 0 {
            if self.resp.framer.at_boundary() {
                self.resp.start_ns = seg.start_ns;
                self.resp.bytes = 0;
                self.resp_orphan = self.pending.is_empty();
            }
            let (n, done) = self.resp.framer.skip(left);
            self.resp.bytes += n;
            left -= n;
            if done {
                self.reply_done(seg.ts_ns, out);
                if !matches!(self.mode, Mode::Active) || self.resp_sync != Sync::InSync {
                    return;
                }
            } else if n == 0 {
                // A frame (or part of one) we cannot see. If a reply is under way, or the
                // oldest command's reply starts here, it ends at an unknown point.
                let under_way = !self.resp.framer.at_boundary()
                    || matches!(self.pending.front(), Some(Entry::Cmd(_)));
                self.lose_replies(under_way);
                if let Some(p) = &mut self.blind {
                    p.resp_bytes = p.resp_bytes.saturating_add(left);
                    p.end_ns = seg.ts_ns;
                }
                return;
            }
        }
    }

    fn reply_done(&mut self, ts_ns: u64, out: &mut Vec<DbExchange>) {
        let info = std::mem::take(&mut self.resp.framer.info);
        let bytes = self.resp.bytes;
        self.resp.bytes = 0;
        let front_stops =
            matches!(self.pending.front(), Some(Entry::Cmd(p)) if p.stop == Stop::AfterReply);
        // Pushes and attributes are not replies, except that a RESP3 SUBSCRIBE is answered by a
        // push.
        if (info.kind == b'>' && !front_stops) || info.kind == b'|' || self.resp_orphan {
            return;
        }
        match self.pending.pop_front() {
            Some(Entry::Cmd(mut p)) => {
                self.reported = self.reported.saturating_sub(1);
                p.resp_start_ns = Some(self.resp.start_ns);
                p.resp_bytes = bytes;
                p.error = info.error.map(|e| String::from_utf8_lossy(&e).into_owned());
                let stop = p.stop;
                emit(self.side, p, Outcome::Complete, ts_ns, out);
                if stop == Stop::AfterReply {
                    self.stop();
                    return;
                }
            }
            Some(Entry::Skip(n)) if n > 1 => self.pending.push_front(Entry::Skip(n - 1)),
            Some(Entry::Unknown) => {
                self.lose_replies(false);
                return;
            }
            // The last skipped reply; or a reply to a command sent before we attached.
            Some(Entry::Skip(_)) | None => {}
        }
        self.stop_if_reached();
    }

    /// Reply framing is lost. With `under_way`, the oldest command's reply had started: it is
    /// kept to be reported when the loss ends. Every other waiting command is dropped: its
    /// reply may be in the bytes that cannot be framed.
    fn lose_replies(&mut self, under_way: bool) {
        self.blind = None;
        if under_way
            && !self.resp_orphan
            && let Some(Entry::Cmd(mut p)) = self.pending.pop_front()
        {
            p.resp_start_ns = Some(self.resp.start_ns);
            p.resp_bytes = self.resp.bytes;
            p.error = self.resp.framer.partial_error();
            self.blind = Some(p);
        }
        self.pending.clear();
        self.reported = 0;
        self.resp.framer.reset();
        self.resp_sync = Sync::Lost { armed: false };
        if self.stopping {
            // The command that stops matching was dropped: stop now.
            self.stop();
        }
    }

    fn stop(&mut self) {
        self.mode = Mode::Stopped;
        self.pending.clear();
        self.reported = 0;
        self.blind = None;
        self.req = Stream::default();
        self.resp = Stream::default();
    }
}

/// Whether the command partly seen in `info` may be one after which replies stop alternating
/// with commands (`STOP_COMMANDS`, `CLIENT REPLY`).
fn may_stop(info: &FrameInfo) -> bool {
    let is = |w: &Word, name: &str| w.get().eq_ignore_ascii_case(name.as_bytes());
    let [name, sub] = &info.words;
    STOP_COMMANDS.iter().any(|c| is(name, c))
        || name.may_be(&STOP_COMMANDS)
        || (is(name, "CLIENT") && (is(sub, "REPLY") || sub.may_be(&["REPLY"])))
}

fn is_reply_type(b: u8) -> bool {
    matches!(
        b,
        b'+' | b'-'
            | b':'
            | b'$'
            | b'*'
            | b'_'
            | b','
            | b'#'
            | b'!'
            | b'='
            | b'('
            | b'%'
            | b'~'
            | b'>'
            | b'|'
    )
}

/// The captured bytes of a segment and how many more it moved.
fn captured<'a>(seg: &Segment<'a>) -> (&'a [u8], u64) {
    let n = seg
        .head
        .len()
        .min(usize::try_from(seg.len).unwrap_or(usize::MAX));
    (&seg.head[..n], seg.len - n as u64)
}

/// A command word in upper case, if it looks like one (letters, digits, `-_.|:`).
fn command_name(word: &[u8]) -> String {
    if word.is_empty()
        || !word
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'|' | b':'))
    {
        return String::new();
    }
    word.iter()
        .map(|b| char::from(b.to_ascii_uppercase()))
        .collect()
}

fn emit(side: Side, p: Pending, outcome: Outcome, end_ns: u64, out: &mut Vec<DbExchange>) {
    out.push(DbExchange {
        system: DbSystem::Redis,
        side,
        operation: p.operation,
        statement: p.statement,
        target: None,
        error: p.error,
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

#[cfg(test)]
mod tests {
    // Golden fixtures: tracer-user/tests/fixtures/redis/NAME.seg (format in `fixture`), captured
    // from a real redis-server through tests/fixtures-capture/record_proxy.py, rendered with
    // `fixture::render_db` and compared with NAME.expected.

    use super::*;
    use crate::protocols::fixture::{self, Item, Rng};

    const IN: Direction = Direction::Ingress;
    const EG: Direction = Direction::Egress;

    /// One event as fed to the matcher: a syscall (bytes and how many were captured) or a close.
    #[derive(Clone, Debug)]
    enum Ev {
        Sys {
            dir: Direction,
            ts: u64,
            bytes: Vec<u8>,
            cap: usize,
        },
        Close {
            ts: u64,
            reset: bool,
        },
    }

    fn sys(dir: Direction, ts: u64, bytes: &[u8]) -> Ev {
        Ev::Sys {
            dir,
            ts,
            bytes: bytes.to_vec(),
            cap: bytes.len(),
        }
    }

    /// A fixture's events, the capture further limited to `max_cap` bytes when given.
    fn load(text: &str, max_cap: Option<usize>) -> Vec<Ev> {
        fixture::parse_fixture(text)
            .into_iter()
            .map(|item| match item {
                Item::Segment(s) => {
                    let cap = s.segment(max_cap).head.len();
                    Ev::Sys {
                        dir: s.dir,
                        ts: s.ts,
                        bytes: s.bytes,
                        cap,
                    }
                }
                Item::Close { ts, reset } => Ev::Close { ts, reset },
            })
            .collect()
    }

    fn load_file(name: &str) -> Vec<Ev> {
        let path = format!(
            "{}/tests/fixtures/redis/{name}.seg",
            env!("CARGO_MANIFEST_DIR")
        );
        load(&std::fs::read_to_string(&path).expect("fixture"), None)
    }

    fn fixture_names() -> Vec<String> {
        let dir = format!("{}/tests/fixtures/redis", env!("CARGO_MANIFEST_DIR"));
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("fixture dir")
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".seg").map(str::to_string)
            })
            .collect();
        names.sort();
        names
    }

    /// Runs events through a fresh matcher: the exchanges, and whether it gave up (before a
    /// close, which resets it).
    fn run_on(conn: &mut RedisConn, evs: &[Ev]) -> (Vec<DbExchange>, bool) {
        let mut out = Vec::new();
        let mut gave_up = false;
        for ev in evs {
            match ev {
                Ev::Sys {
                    dir,
                    ts,
                    bytes,
                    cap,
                } => conn.feed(&fixture::cut(*dir, *ts, bytes, *cap), &mut out),
                Ev::Close { ts, reset } => {
                    gave_up |= conn.is_not_redis();
                    conn.close(*ts, *reset, &mut out);
                }
            }
            gave_up |= conn.is_not_redis();
            assert_bounded(conn);
        }
        (out, gave_up)
    }

    fn run(evs: &[Ev]) -> (Vec<DbExchange>, bool) {
        let out = run_on(&mut RedisConn::new(), evs);
        check_sane(&out.0);
        out
    }

    fn assert_bounded(conn: &RedisConn) {
        assert!(
            conn.reported <= MAX_PENDING + 1,
            "reported {}",
            conn.reported
        );
        assert!(
            conn.pending.len() <= 2 * MAX_PENDING + 2,
            "{}",
            conn.pending.len()
        );
        assert!(conn.req.framer.line.len() <= KEEP_LINE);
        assert!(conn.resp.framer.line.len() <= KEEP_LINE);
        assert!(conn.req.framer.stack.len() <= MAX_DEPTH);
        assert!(conn.resp.framer.stack.len() <= MAX_DEPTH);
        if let Mode::Searching(s) = &conn.mode {
            assert!(s.probe.len() <= PROBE_MAX);
        }
    }

    /// What every exchange must satisfy: ordered timestamps, and a statement made of the
    /// operation and `?` placeholders only (never a value).
    fn check_sane(out: &[DbExchange]) {
        for e in out {
            assert!(e.req_start_ns <= e.req_end_ns, "{e:?}");
            match e.resp_start_ns {
                Some(rs) => assert!(e.req_end_ns <= rs && rs <= e.end_ns, "{e:?}"),
                None => assert!(e.req_end_ns <= e.end_ns, "{e:?}"),
            }
            assert!(!e.operation.is_empty() && e.operation.len() <= 2 * WORD_LEN + 1);
            assert!(
                e.operation.bytes().all(|b| b.is_ascii_uppercase()
                    || b.is_ascii_digit()
                    || b" -_.|:".contains(&b)),
                "{e:?}"
            );
            let args = e.statement.strip_prefix(e.operation.as_str()).expect("op");
            let words: Vec<&str> = args.split(' ').skip(1).collect();
            assert!(words.len() <= MAX_STATEMENT_ARGS as usize + 1, "{e:?}");
            for (i, w) in words.iter().enumerate() {
                assert!(*w == "?" || (*w == "..." && i == words.len() - 1), "{e:?}");
            }
            assert_eq!(e.system, DbSystem::Redis);
            assert_eq!(e.target, None);
        }
    }

    fn render(evs: &[Ev]) -> String {
        let (out, gave_up) = run(evs);
        fixture::render_db(&out, gave_up)
    }

    #[test]
    fn golden_fixtures() {
        fixture::check_golden("redis", 14, |text| render(&load(text, None)));
    }

    /// Every fully captured syscall cut into pieces at the points `cuts` picks (the pieces keep
    /// the syscall's time); partly captured ones stay whole.
    fn split(evs: &[Ev], mut cuts: impl FnMut(usize) -> Vec<usize>) -> Vec<Ev> {
        let mut outv = Vec::new();
        for ev in evs {
            match ev {
                Ev::Sys {
                    dir,
                    ts,
                    bytes,
                    cap,
                } if *cap == bytes.len() && bytes.len() > 1 => {
                    let mut at = 0;
                    let mut points = cuts(bytes.len());
                    points.push(bytes.len());
                    for p in points {
                        if p > at && p <= bytes.len() {
                            outv.push(sys(*dir, *ts, &bytes[at..p]));
                            at = p;
                        }
                    }
                }
                other => outv.push(other.clone()),
            }
        }
        outv
    }

    /// The exchanges without where each began in its syscall, which depends on the cut.
    fn uncut((mut exchanges, gave_up): (Vec<DbExchange>, bool)) -> (Vec<DbExchange>, bool) {
        for e in &mut exchanges {
            e.req_offset = 0;
        }
        (exchanges, gave_up)
    }

    #[test]
    fn byte_by_byte_gives_the_same_exchanges() {
        for name in fixture_names() {
            let evs = load_file(&name);
            let whole = uncut(run(&evs));
            let bytes = uncut(run(&split(&evs, |len| (1..len).collect())));
            assert_eq!(whole, bytes, "{name}");
        }
    }

    #[test]
    fn random_splits_give_the_same_exchanges() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for name in fixture_names() {
            let evs = load_file(&name);
            let whole = uncut(run(&evs));
            for _ in 0..50 {
                let pieces = split(&evs, |len| {
                    let mut v: Vec<usize> = (0..rng.below(4)).map(|_| rng.below(len)).collect();
                    v.sort_unstable();
                    v
                });
                assert_eq!(whole, uncut(run(&pieces)), "{name}");
            }
        }
    }

    /// With less captured, an exchange may be missing, or end where the capture lost the reply
    /// (`blind`), but it is never paired with another command's reply.
    #[test]
    fn truncated_captures_never_mispair() {
        for name in fixture_names() {
            let path = format!(
                "{}/tests/fixtures/redis/{name}.seg",
                env!("CARGO_MANIFEST_DIR")
            );
            let text = std::fs::read_to_string(&path).expect("fixture");
            let (full, _) = run(&load(&text, None));
            let mut caps: Vec<usize> = (0..48).collect();
            caps.extend([50, 64, 100, 128, 200, 256, 300, 512, 700, 1000, 1024]);
            for cap in caps {
                let (cut, _) = run(&load(&text, Some(cap)));
                for e in &cut {
                    let same_cmd: Vec<&DbExchange> = full
                        .iter()
                        .filter(|f| {
                            f.req_start_ns == e.req_start_ns
                                && f.req_end_ns == e.req_end_ns
                                && f.req_bytes == e.req_bytes
                                // A name cut by the capture is UNKNOWN, a cut
                                // subcommand counts as an argument.
                                && (f.statement == e.statement
                                    || e.operation == "UNKNOWN"
                                    || f.operation.starts_with(&format!("{} ", e.operation)))
                        })
                        .collect();
                    assert!(
                        !same_cmd.is_empty(),
                        "{name} cap {cap}: {e:?} not in {full:#?}"
                    );
                    let Some(rs) = e.resp_start_ns else { continue };
                    let ok = same_cmd.iter().any(|f| {
                        f.resp_start_ns == Some(rs)
                            && e.error.as_ref().is_none_or(|err| {
                                f.error
                                    .as_ref()
                                    .is_some_and(|fe| fe.starts_with(err.as_str()))
                            })
                            && (e.outcome != Outcome::Complete
                                || (e.end_ns >= f.end_ns && e.resp_bytes >= f.resp_bytes))
                            && (e.resp_bytes != f.resp_bytes || e.end_ns == f.end_ns)
                    });
                    assert!(
                        ok,
                        "{name} cap {cap}: {e:?} mispaired; full run: {same_cmd:#?}"
                    );
                }
            }
        }
    }

    /// A conversation of ECHO commands with distinct argument lengths (so a command and its
    /// reply are told by their sizes), replies of several shapes, batched, cut into random syscalls with random capture
    /// limits, on either side. Every reported exchange must carry its own reply.
    #[test]
    fn random_conversations_never_mispair() {
        let mut rng = Rng(0x00c0_ffee_d00d_0042);
        for round in 0..400 {
            let server = round % 2 == 1;
            let (req_dir, resp_dir) = if server { (IN, EG) } else { (EG, IN) };
            let truncate = round % 4 >= 2;
            let mut lens: Vec<usize> = (1..=300).collect();
            for i in (1..lens.len()).rev() {
                lens.swap(i, rng.below(i + 1));
            }
            let mut evs = Vec::new();
            let mut ts = 1000u64;
            // Per command: (req bytes, req start, req end, reply bytes, resp start, resp end).
            let mut expect: Vec<(u64, u64, u64, u64, u64, u64)> = Vec::new();
            let mut errors = Vec::new();
            let mut next = 0;
            while next < lens.len() && next < 60 {
                let batch = 1 + rng.below(6);
                let mut wire = Vec::new();
                let mut bounds = Vec::new();
                let mut rwire = Vec::new();
                let mut rbounds = Vec::new();
                for &len in lens[next..(next + batch).min(lens.len())].iter() {
                    let arg = vec![b'a' + (len % 26) as u8; len];
                    let cmd = [
                        format!("*2\r\n$4\r\nECHO\r\n${len}\r\n").as_bytes(),
                        &arg,
                        b"\r\n",
                    ]
                    .concat();
                    // Replies of several shapes: a bulk, an array, a RESP3 map, an error.
                    let bulk = [format!("${len}\r\n").as_bytes(), &arg, b"\r\n"].concat();
                    let reply = match rng.below(4) {
                        0 => bulk,
                        1 => [b"*2\r\n".as_slice(), &bulk, b":7\r\n"].concat(),
                        2 => [b"%1\r\n+k\r\n".as_slice(), &bulk].concat(),
                        _ => [b"-ERR ".as_slice(), &arg, b"\r\n"].concat(),
                    };
                    errors.push(reply[0] == b'-');
                    bounds.push((wire.len(), wire.len() + cmd.len()));
                    rbounds.push((rwire.len(), rwire.len() + reply.len()));
                    wire.extend(cmd);
                    rwire.extend(reply);
                }
                let n = bounds.len();
                next += n;
                let base = expect.len();
                expect.extend((0..n).map(|i| {
                    (
                        (bounds[i].1 - bounds[i].0) as u64,
                        0,
                        0,
                        (rbounds[i].1 - rbounds[i].0) as u64,
                        0,
                        0,
                    )
                }));
                // Writes, then reads, each cut into syscalls; record where each message
                // starts and ends.
                for (dir, data, bnds, reply) in [
                    (req_dir, &wire, &bounds, false),
                    (resp_dir, &rwire, &rbounds, true),
                ] {
                    let mut at = 0;
                    while at < data.len() {
                        let take = 1 + rng.below((data.len() - at).min(700));
                        let end = at + take;
                        ts += 10;
                        let cap = if truncate && rng.below(3) == 0 {
                            rng.below(take + 1)
                        } else {
                            take
                        };
                        evs.push(Ev::Sys {
                            dir,
                            ts,
                            bytes: data[at..end].to_vec(),
                            cap,
                        });
                        for (i, &(s, e)) in bnds.iter().enumerate() {
                            let x = &mut expect[base + i];
                            let (start, stop) = if reply {
                                (&mut x.4, &mut x.5)
                            } else {
                                (&mut x.1, &mut x.2)
                            };
                            if s >= at && s < end {
                                *start = ts;
                            }
                            if e > at && e <= end {
                                *stop = ts;
                            }
                        }
                        at = end;
                    }
                }
            }
            evs.push(Ev::Close {
                ts: ts + 10,
                reset: false,
            });
            let (out, _) = run(&evs);
            let mut last = None;
            for e in &out {
                let i = expect
                    .iter()
                    .position(|x| x.0 == e.req_bytes)
                    .unwrap_or_else(|| panic!("round {round}: unknown command {e:?}"));
                assert!(last < Some(i), "round {round}: out of order {e:?}");
                last = Some(i);
                let x = expect[i];
                assert!(e.operation == "ECHO" || e.operation == "UNKNOWN", "{e:?}");
                assert_eq!(e.side, if server { Side::Server } else { Side::Client });
                assert_eq!(
                    (e.req_start_ns, e.req_end_ns),
                    (x.1, x.2),
                    "round {round}: {e:?}"
                );
                if e.outcome == Outcome::Complete {
                    assert_eq!(e.resp_start_ns, Some(x.4), "round {round}: {e:?} {x:?}");
                    if e.resp_bytes == x.3 {
                        assert_eq!(e.end_ns, x.5, "round {round}: {e:?}");
                        // A reply cut by the capture may not show its error.
                        assert!(
                            e.error.is_some() == errors[i] || (truncate && e.error.is_none()),
                            "round {round}: {e:?}"
                        );
                    } else {
                        // Ended blind: the reply bytes ran on to the next command.
                        assert!(
                            e.resp_bytes > x.3 && e.end_ns >= x.5,
                            "round {round}: {e:?}"
                        );
                        assert!(e.error.is_none() || errors[i], "round {round}: {e:?}");
                    }
                }
            }
            if !truncate {
                assert_eq!(out.len(), expect.len(), "round {round}");
                assert!(out.iter().all(|e| e.outcome == Outcome::Complete));
            }
        }
    }

    fn resp(words: &[&[u8]]) -> Vec<u8> {
        let mut v = format!("*{}\r\n", words.len()).into_bytes();
        for w in words {
            v.extend(format!("${}\r\n", w.len()).as_bytes());
            v.extend(*w);
            v.extend(b"\r\n");
        }
        v
    }

    fn feed_all(conn: &mut RedisConn, evs: &[Ev]) -> Vec<DbExchange> {
        let (out, _) = run_on(conn, evs);
        check_sane(&out);
        out
    }

    #[test]
    fn probe_recognises_command_starts() {
        assert!(looks_like_redis_request(b"*1\r\n$4\r\nPING\r\n"));
        assert!(looks_like_redis_request(b"*3\r\n$3\r\nset\r\n$1\r\nk"));
        assert!(looks_like_redis_request(b"*2\r\n$3\r\nGET"));
        assert!(looks_like_redis_request(b"PING\r\n"));
        assert!(looks_like_redis_request(b"auth secret\r\n"));
        assert!(!looks_like_redis_request(b"*1\r\n$4\r\nPONG\r\n"));
        assert!(!looks_like_redis_request(b"*0\r\n"));
        assert!(!looks_like_redis_request(b"*99999999999\r\n$3\r\nGET\r\n"));
        assert!(!looks_like_redis_request(b"GET / HTTP/1.1\r\n"));
        assert!(!looks_like_redis_request(b"PING"));
        assert!(!looks_like_redis_request(b"+OK\r\n"));
        assert_eq!(probe_request(b""), Probe::Maybe);
        assert_eq!(probe_request(b"*"), Probe::Maybe);
        assert_eq!(probe_request(b"*2\r"), Probe::Maybe);
        assert_eq!(probe_request(b"*2\r\n$3\r\nGE"), Probe::Maybe);
        assert_eq!(probe_request(b"*2\r\n$3\r\nGX"), Probe::No);
        assert_eq!(probe_request(b"PI"), Probe::Maybe);
        assert_eq!(probe_request(b"PING"), Probe::Maybe);
        assert_eq!(probe_request(b"PING x\r"), Probe::Maybe);
        assert_eq!(probe_request(b"PUNG"), Probe::No);
        assert_eq!(probe_request(b"*x"), Probe::No);
        assert!(surely_not_redis(b"GET / HTTP/1.1\r\n"));
        assert!(surely_not_redis(b"HTTP/1.1 200 OK\r\n"));
        assert!(surely_not_redis(&[0x16, 0x03, 0x01, 0x02, 0x00]));
        assert!(!surely_not_redis(b"GET key\r\n"));
    }

    #[test]
    fn command_tables_are_sorted_and_unique() {
        assert!(COMMANDS.windows(2).all(|w| w[0] < w[1]));
        for c in COMMANDS
            .iter()
            .chain(INLINE_COMMANDS)
            .chain(CONTAINER_COMMANDS)
        {
            assert!(c.len() <= WORD_LEN && c.bytes().all(|b| !b.is_ascii_lowercase()));
            assert!(is_known_command(c.as_bytes()), "{c}");
        }
        let mut containers = CONTAINER_COMMANDS.to_vec();
        containers.sort_unstable();
        containers.dedup();
        assert_eq!(containers.len(), CONTAINER_COMMANDS.len());
    }

    #[test]
    fn operation_and_statement_never_carry_values() {
        let mut conn = RedisConn::new();
        let cmds: [&[&[u8]]; 6] = [
            &[b"client", b"setname", b"worker-1"],
            &[b"CLIENT", b"s3cr3t99"],
            &[b"CONFIG", b"SET", b"requirepass", b"s3cr3t"],
            &[b"AUTH", b"s3cr3t"],
            &[b"SET", b"k", b"v", b"EX", b"10"],
            &[
                b"MSET", b"a", b"1", b"b", b"2", b"c", b"3", b"d", b"4", b"e", b"5", b"f", b"6",
                b"g", b"7", b"h", b"8", b"i", b"9", b"j", b"10", b"k", b"11",
            ],
        ];
        let mut evs = Vec::new();
        for (i, c) in cmds.iter().enumerate() {
            evs.push(sys(EG, 10 * i as u64 + 1, &resp(c)));
            evs.push(sys(IN, 10 * i as u64 + 2, b"+OK\r\n"));
        }
        let out = feed_all(&mut conn, &evs);
        let st: Vec<&str> = out.iter().map(|e| e.statement.as_str()).collect();
        assert_eq!(
            st,
            [
                "CLIENT SETNAME ?",
                "CLIENT ?",
                "CONFIG SET ? ?",
                "AUTH ?",
                "SET ? ? ? ?",
                "MSET ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ...",
            ]
        );
        for e in &out {
            assert!(!format!("{e:?}").contains("s3cr3t"), "{e:?}");
        }
    }

    #[test]
    fn auth_fixture_never_leaks_the_password() {
        for name in ["auth", "server_auth"] {
            let (out, _) = run(&load_file(name));
            assert!(out.len() >= 5);
            for e in &out {
                assert!(!format!("{e:?}").contains("s3cr3t"), "{e:?}");
            }
        }
    }

    #[test]
    fn empty_multibulk_gets_no_reply_slot() {
        let mut conn = RedisConn::new();
        let mut first = resp(&[b"PING"]);
        first.extend(b"*0\r\n*-1\r\n");
        first.extend(resp(&[b"GET", b"k"]));
        let out = feed_all(
            &mut conn,
            &[sys(EG, 1, &first), sys(IN, 2, b"+PONG\r\n$1\r\nv\r\n")],
        );
        let ops: Vec<_> = out
            .iter()
            .map(|e| (e.operation.as_str(), e.resp_bytes))
            .collect();
        assert_eq!(ops, [("PING", 7), ("GET", 7)]);
    }

    #[test]
    fn client_reply_off_stops_matching() {
        let mut conn = RedisConn::new();
        let out = feed_all(
            &mut conn,
            &[
                sys(EG, 1, &resp(&[b"GET", b"a"])),
                sys(EG, 2, &resp(&[b"CLIENT", b"REPLY", b"OFF"])),
                sys(EG, 3, &resp(&[b"SET", b"a", b"1"])),
                sys(IN, 4, b"$-1\r\n"),
                sys(EG, 5, &resp(&[b"CLIENT", b"REPLY", b"ON"])),
                sys(IN, 6, b"+OK\r\n"),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].operation, "GET");
        assert!(conn.is_not_redis());
    }

    #[test]
    fn a_command_skipped_while_searching_is_not_paired_with_a_later_reply() {
        // An unknown module command, then (pipelined) GET: the first reply is the module's.
        let mut conn = RedisConn::new();
        let out = feed_all(
            &mut conn,
            &[
                sys(EG, 1, &resp(&[b"MYMOD.DO", b"x"])),
                sys(EG, 2, &resp(&[b"GET", b"a"])),
                sys(IN, 3, b":1\r\n$1\r\nv\r\n"),
                sys(EG, 4, &resp(&[b"GET", b"b"])),
                sys(IN, 5, b"$2\r\nvv\r\n"),
            ],
        );
        let got: Vec<_> = out.iter().map(|e| (e.req_start_ns, e.resp_bytes)).collect();
        assert_eq!(got, [(4, 8)]);
        // The same when the unknown command's reply came before: nothing is lost.
        let mut conn = RedisConn::new();
        let out = feed_all(
            &mut conn,
            &[
                sys(EG, 1, &resp(&[b"MYMOD.DO", b"x"])),
                sys(IN, 2, b":1\r\n"),
                sys(EG, 3, &resp(&[b"GET", b"a"])),
                sys(IN, 4, b"$1\r\nv\r\n"),
            ],
        );
        let got: Vec<_> = out.iter().map(|e| (e.req_start_ns, e.resp_bytes)).collect();
        assert_eq!(got, [(3, 7)]);
    }

    #[test]
    fn a_split_command_name_is_not_a_prefix() {
        // `PING` cut by the capture inside its name: reported, but not as `PI`.
        let mut conn = RedisConn::new();
        let ping = resp(&[b"PING"]);
        let mut evs = vec![sys(EG, 1, &resp(&[b"GET", b"a"])), sys(IN, 2, b"$-1\r\n")];
        evs.push(Ev::Sys {
            dir: EG,
            ts: 3,
            bytes: ping.clone(),
            cap: 10,
        });
        evs.push(sys(IN, 4, b"+PONG\r\n"));
        let out = feed_all(&mut conn, &evs);
        let ops: Vec<_> = out.iter().map(|e| e.operation.as_str()).collect();
        assert_eq!(ops, ["GET", "UNKNOWN"]);
    }

    #[test]
    fn hundred_thousand_pipelined_pings_stay_bounded() {
        let mut conn = RedisConn::new();
        let n = 100_000;
        let reqs = resp(&[b"PING"]).repeat(n);
        let replies = b"+PONG\r\n".repeat(n);
        let mut out = Vec::new();
        conn.feed(&fixture::seg(EG, 1, &reqs), &mut out);
        assert_bounded(&conn);
        assert_eq!(conn.reported, MAX_PENDING);
        assert!(conn.pending.len() <= MAX_PENDING + 1);
        conn.feed(&fixture::seg(IN, 2, &replies), &mut out);
        assert_eq!(out.len(), MAX_PENDING);
        assert!(conn.pending.is_empty());
        // Matching goes on after the skipped replies.
        conn.feed(&fixture::seg(EG, 3, &resp(&[b"GET", b"k"])), &mut out);
        conn.feed(&fixture::seg(IN, 4, b"$-1\r\n"), &mut out);
        assert_eq!(out.len(), MAX_PENDING + 1);
        assert_eq!(out[MAX_PENDING].operation, "GET");
        assert_eq!(out[MAX_PENDING].resp_start_ns, Some(4));
        check_sane(&out);
    }

    #[test]
    fn huge_counts_and_deep_nesting_do_not_panic() {
        let ping = resp(&[b"PING"]);
        let garbage: [&[u8]; 8] = [
            b"*99999999999\r\n",
            b"*999999999999999999999999\r\n",
            b"$99999999999\r\n",
            b"*-5\r\n",
            b"$-2\r\n",
            &b"*1\r\n".repeat(100_000),
            &b"%1\r\n|1\r\n".repeat(10_000),
            &b"A".repeat(100_000),
        ];
        for g in garbage {
            for dir in [EG, IN] {
                let mut conn = RedisConn::new();
                let mut evs = vec![sys(EG, 1, &ping), sys(IN, 2, b"+PONG\r\n")];
                evs.push(sys(dir, 3, g));
                evs.push(sys(dir, 4, g));
                evs.push(sys(EG, 5, &ping));
                evs.push(sys(IN, 6, b"+PONG\r\n"));
                let out = feed_all(&mut conn, &evs);
                assert_eq!(out[0].resp_start_ns, Some(2));
                for e in &out {
                    // Every reply paired is a PONG to a PING.
                    if e.outcome == Outcome::Complete && e.resp_start_ns == Some(6) {
                        assert_eq!(e.req_start_ns, 5);
                    }
                }
            }
        }
        // A reply aggregate that never ends costs nothing.
        let mut conn = RedisConn::new();
        let mut out = Vec::new();
        conn.feed(
            &fixture::seg(EG, 1, &resp(&[b"LRANGE", b"l", b"0", b"-1"])),
            &mut out,
        );
        conn.feed(&fixture::seg(IN, 2, b"*99999999999\r\n"), &mut out);
        for ts in 3..1000 {
            conn.feed(&fixture::seg(IN, ts, b"$3\r\nabc\r\n"), &mut out);
        }
        assert_bounded(&conn);
        assert!(out.is_empty());
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = Rng(0x0bad_f00d_1234_5678);
        let alphabet: &[u8] = b"*$+-:_,#!=(%~>|\r\n0123456789-?abcPINGSET ";
        for round in 0..300 {
            let mut conn = RedisConn::new();
            let mut out = Vec::new();
            let mut ts = 1;
            if round % 2 == 0 {
                conn.feed(&fixture::seg(EG, ts, &resp(&[b"PING"])), &mut out);
            }
            for _ in 0..40 {
                ts += 1;
                let len = 1 + rng.below(200);
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        if round % 3 == 0 {
                            rng.next() as u8
                        } else {
                            alphabet[rng.below(alphabet.len())]
                        }
                    })
                    .collect();
                let dir = if rng.below(2) == 0 { EG } else { IN };
                let cap = if rng.below(4) == 0 {
                    rng.below(len)
                } else {
                    len
                };
                conn.feed(&fixture::cut(dir, ts, &bytes, cap), &mut out);
                assert_bounded(&conn);
            }
            conn.close(ts + 1, round % 5 == 0, &mut out);
            check_sane(&out);
        }
    }

    #[test]
    fn non_redis_gives_up() {
        let (out, gave_up) = run(&load_file("not_redis_http"));
        assert!(out.is_empty() && gave_up);
        // Binary bytes: after a few segments.
        let mut conn = RedisConn::new();
        let mut out = Vec::new();
        for ts in 0..u64::from(SEARCH_MAX_SEGMENTS) {
            assert!(!conn.is_not_redis());
            conn.feed(&fixture::seg(EG, ts, &[0u8, 1, 2, 3]), &mut out);
        }
        assert!(conn.is_not_redis());
        conn.feed(&fixture::seg(EG, 99, &resp(&[b"PING"])), &mut out);
        conn.feed(&fixture::seg(IN, 100, b"+PONG\r\n"), &mut out);
        assert!(out.is_empty());
    }

    /// (operation, request start, reply start, reply bytes) of each exchange.
    fn summary(out: &[DbExchange]) -> Vec<(&str, u64, Option<u64>, u64)> {
        out.iter()
            .map(|e| {
                (
                    e.operation.as_str(),
                    e.req_start_ns,
                    e.resp_start_ns,
                    e.resp_bytes,
                )
            })
            .collect()
    }

    #[test]
    fn gap_between_exchanges_changes_nothing() {
        let mut conn = RedisConn::new();
        let mut out = feed_all(
            &mut conn,
            &[
                sys(EG, 1, &resp(&[b"GET", b"a"])),
                sys(IN, 2, b"$1\r\nv\r\n"),
            ],
        );
        assert_eq!(conn.gap(), 0);
        out.extend(feed_all(
            &mut conn,
            &[
                sys(EG, 10, &resp(&[b"SET", b"a", b"1"])),
                sys(IN, 11, b"+OK\r\n"),
            ],
        ));
        assert_eq!(
            summary(&out),
            [("GET", 1, Some(2), 7), ("SET", 10, Some(11), 5)]
        );
        assert_eq!(out[1].statement, "SET ? ?");
    }

    #[test]
    fn gap_drops_commands_waiting_for_their_reply() {
        let mut conn = RedisConn::new();
        let mut out = feed_all(&mut conn, &[sys(EG, 1, &resp(&[b"GET", b"a"]))]);
        assert_eq!(conn.gap(), 1);
        out.extend(feed_all(
            &mut conn,
            &[
                sys(EG, 10, &resp(&[b"INCR", b"n"])),
                sys(IN, 11, b":42\r\n"),
            ],
        ));
        assert_eq!(summary(&out), [("INCR", 10, Some(11), 5)]);
        // Pipelined commands, and a reply cut by the gap.
        let mut two = resp(&[b"GET", b"a"]);
        two.extend(resp(&[b"GET", b"b"]));
        out.extend(feed_all(
            &mut conn,
            &[sys(EG, 20, &two), sys(IN, 21, b"$10\r\nvalu")],
        ));
        assert_eq!(conn.gap(), 2);
        out.extend(feed_all(
            &mut conn,
            &[sys(EG, 30, &resp(&[b"PING"])), sys(IN, 31, b"+PONG\r\n")],
        ));
        assert_eq!(
            summary(&out),
            [("INCR", 10, Some(11), 5), ("PING", 30, Some(31), 7)]
        );
    }

    #[test]
    fn gap_ending_inside_a_reply_or_a_command() {
        let mut conn = RedisConn::new();
        let mut out = feed_all(
            &mut conn,
            &[sys(EG, 1, &resp(&[b"PING"])), sys(IN, 2, b"+PONG\r\n")],
        );
        conn.gap();
        // The rest of a bulk reply (to a command sent during the gap), then an exchange.
        out.extend(feed_all(
            &mut conn,
            &[
                sys(IN, 10, b"xxxxxxxx\r\n"),
                sys(EG, 11, &resp(&[b"GET", b"a"])),
                sys(IN, 12, b"$1\r\nv\r\n"),
            ],
        ));
        conn.gap();
        // The rest of a command whose start went unseen, its reply, then an exchange.
        out.extend(feed_all(
            &mut conn,
            &[
                sys(EG, 20, b"yyyyyyyyyyyy\r\n"),
                sys(IN, 21, b"+OK\r\n"),
                sys(EG, 22, &resp(&[b"GET", b"b"])),
                sys(IN, 23, b"$2\r\nvv\r\n"),
            ],
        ));
        assert_eq!(
            summary(&out),
            [
                ("PING", 1, Some(2), 7),
                ("GET", 11, Some(12), 7),
                ("GET", 22, Some(23), 8)
            ]
        );
    }

    /// A pipelined batch cut by the gap: the commands after the cut come right after its rest,
    /// before any reply, so the first reply read answers a command that went unseen.
    #[test]
    fn gap_inside_a_pipelined_batch_never_mispairs() {
        let mut conn = RedisConn::new();
        let mut out = feed_all(
            &mut conn,
            &[sys(EG, 1, &resp(&[b"PING"])), sys(IN, 2, b"+PONG\r\n")],
        );
        conn.gap();
        out.extend(feed_all(
            &mut conn,
            &[
                sys(EG, 10, b"zzzz\r\n"),
                sys(EG, 11, &resp(&[b"GET", b"a"])),
                sys(IN, 12, b"+OK\r\n$1\r\nv\r\n"),
                sys(EG, 13, &resp(&[b"GET", b"b"])),
                sys(IN, 14, b"$2\r\nvv\r\n"),
                sys(EG, 15, &resp(&[b"GET", b"c"])),
                sys(IN, 16, b"$3\r\nvvv\r\n"),
            ],
        ));
        for e in &out {
            // Every reply paired has the size of the answer to that very command.
            let expected = match e.req_start_ns {
                1 => 7,
                13 => 8,
                15 => 9,
                _ => panic!("{e:?}"),
            };
            assert_eq!(e.resp_bytes, expected, "{e:?}");
        }
        assert_eq!(out.last().map(|e| e.req_start_ns), Some(15));
    }

    #[test]
    fn reply_to_a_command_sent_during_a_gap_is_not_matched() {
        let mut conn = RedisConn::new();
        let mut out = feed_all(
            &mut conn,
            &[sys(EG, 1, &resp(&[b"PING"])), sys(IN, 2, b"+PONG\r\n")],
        );
        conn.gap();
        out.extend(feed_all(
            &mut conn,
            &[
                sys(IN, 10, b"*2\r\n$1\r\na\r\n"),
                sys(IN, 11, b"$1\r\nb\r\n"),
                sys(EG, 12, &resp(&[b"GET", b"a"])),
                sys(IN, 13, b"$-1\r\n"),
            ],
        ));
        assert_eq!(
            summary(&out),
            [("PING", 1, Some(2), 7), ("GET", 12, Some(13), 5)]
        );
        assert!(!conn.is_not_redis());
    }

    #[test]
    fn gap_while_searching_keeps_searching() {
        let mut conn = RedisConn::new();
        assert_eq!(conn.gap(), 0);
        // The start of a command split across syscalls does not go on after a gap: here the
        // bytes after it start a bulk string, which would make `GET` of a command never sent.
        let mut out = feed_all(&mut conn, &[sys(EG, 1, b"*2\r\n$3\r\nGE")]);
        assert_eq!(conn.gap(), 0);
        out.extend(feed_all(
            &mut conn,
            &[
                sys(EG, 10, b"T\r\n$1\r\nk\r\n"),
                sys(IN, 11, b"+OK\r\n"),
                sys(EG, 12, &resp(&[b"GET", b"b"])),
                sys(IN, 13, b"$1\r\nv\r\n"),
            ],
        ));
        assert_eq!(summary(&out), [("GET", 12, Some(13), 7)]);
        assert!(!conn.is_not_redis());
    }

    #[test]
    fn gap_after_a_command_that_stops_matching_stops() {
        for stop in [
            resp(&[b"SUBSCRIBE", b"news"]),
            resp(&[b"MONITOR"]),
            resp(&[b"CLIENT", b"REPLY", b"OFF"]),
        ] {
            let mut conn = RedisConn::new();
            let mut evs = vec![sys(EG, 1, &resp(&[b"GET", b"a"]))];
            evs.push(sys(EG, 2, &stop));
            let out = feed_all(&mut conn, &evs);
            assert!(out.is_empty());
            // Its reply, if any, and the messages may have come during the gap.
            assert_eq!(conn.gap(), 2);
            assert!(conn.is_not_redis());
            let out = feed_all(
                &mut conn,
                &[
                    sys(EG, 10, &resp(&[b"PING"])),
                    sys(IN, 11, b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"),
                ],
            );
            assert!(out.is_empty());
            assert_eq!(conn.gap(), 0);
            assert!(conn.is_not_redis());
        }
        // A command cut by the gap inside its name, which may be SUBSCRIBE.
        let mut conn = RedisConn::new();
        feed_all(
            &mut conn,
            &[
                sys(EG, 1, &resp(&[b"PING"])),
                sys(IN, 2, b"+PONG\r\n"),
                sys(EG, 3, b"*2\r\n$9\r\nSUBS"),
            ],
        );
        assert_eq!(conn.gap(), 0);
        assert!(conn.is_not_redis());
    }

    #[test]
    fn gap_forgets_partial_frames() {
        let mut conn = RedisConn::new();
        feed_all(
            &mut conn,
            &[
                sys(EG, 1, &resp(&[b"LRANGE", b"l", b"0", b"-1"])),
                sys(
                    IN,
                    2,
                    b"*3\r\n*2\r\n$1\r\na\r\n+very long line that goes on",
                ),
                sys(EG, 3, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\nxx"),
            ],
        );
        assert_eq!(conn.gap(), 1);
        for framer in [&conn.req.framer, &conn.resp.framer] {
            assert!(framer.stack.is_empty() && framer.line.is_empty());
        }
        assert!(conn.pending.is_empty() && conn.blind.is_none());
    }

    /// A conversation without pipelining (either side) of commands and replies cut into
    /// random syscalls, with gaps at random points that also hide a few syscalls. Exactly the
    /// exchanges none of whose bytes were hidden, and with no gap between their first and last
    /// byte, are reported, each with its own reply.
    #[test]
    fn random_gaps_report_exactly_the_untouched_exchanges() {
        let mut rng = Rng(0xbb67_ae85_84ca_a73b);
        for round in 0..300 {
            let server = round % 2 == 1;
            let (req_dir, resp_dir) = if server { (IN, EG) } else { (EG, IN) };
            let mut conn = RedisConn::new();
            let mut out = Vec::new();
            let mut ts = 0u64;
            // Per command: request bytes, reply bytes and first and last reply syscall time,
            // and whether a gap touched it.
            let mut expect: Vec<(u64, u64, u64, u64, bool)> = Vec::new();
            let mut gaps = fixture::Gaps::default();
            for i in 0..40 {
                // Distinct sizes tell the commands apart.
                let arg = vec![b'a' + (i % 26) as u8; 1 + i + 50 * rng.below(4)];
                let cmd = resp(&[b"ECHO", &arg]);
                let reply = match rng.below(3) {
                    0 => [format!("${}\r\n", arg.len()).as_bytes(), &arg, b"\r\n"].concat(),
                    1 => [b"*2\r\n+k\r\n:".as_slice(), &arg, b"\r\n"].concat(),
                    _ => [b"-ERR ".as_slice(), &arg, b"\r\n"].concat(),
                };
                let mut touched = false;
                let (mut first, mut last) = (0, 0);
                for (dir, msg, is_reply) in [(req_dir, &cmd, false), (resp_dir, &reply, true)] {
                    let mut at = 0;
                    while at < msg.len() {
                        // The first syscall of a command holds its name: a name cut by a gap
                        // may be SUBSCRIBE's, which stops matching (see above).
                        let min = if at == 0 && !is_reply { 14 } else { 1 };
                        let end = (at + min + rng.below(msg.len())).min(msg.len());
                        ts += 10;
                        let step = gaps.step(&mut rng);
                        let hidden = step == fixture::GapStep::Hidden;
                        if step == fixture::GapStep::GapEnds {
                            conn.gap();
                            touched |= is_reply || at > 0;
                        }
                        if hidden {
                            touched = true;
                        } else {
                            conn.feed(&fixture::seg(dir, ts, &msg[at..end]), &mut out);
                            assert_bounded(&conn);
                        }
                        if is_reply {
                            if at == 0 {
                                first = ts;
                            }
                            last = ts;
                        }
                        at = end;
                    }
                }
                expect.push((cmd.len() as u64, reply.len() as u64, first, last, touched));
            }
            check_sane(&out);
            let want: Vec<_> = expect
                .iter()
                .filter(|x| !x.4)
                .map(|x| (x.0, x.1, Some(x.2), x.3))
                .collect();
            let got: Vec<_> = out
                .iter()
                .map(|e| (e.req_bytes, e.resp_bytes, e.resp_start_ns, e.end_ns))
                .collect();
            assert_eq!(got, want, "round {round}");
            assert!(!conn.is_not_redis(), "round {round}");
        }
    }
}
