//! The connection tracker: per traced socket, the two byte streams in order, fed to the protocol
//! parser; finished exchanges come out with what is known of the connection and process.
//!
//! State is bounded: a connection leaves on close, on its process's exit, after an idle
//! timeout, or (least recently used first) when the table is full.
//!
//! `link` gives each exchange its span identity: parent/child inside a process, and joining
//! the trace context a request carried in.

pub mod link;

use rustc_hash::FxHashMap as HashMap;
use std::{
    collections::{HashSet, VecDeque},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use tracer_common::{CTX_INJECTED, EventHeader, is_tls_plaintext};

use self::link::{Identity, LinkStats, Linker};
use crate::{
    events::Event,
    protocols::{
        DbExchange, Direction, Exchange, HttpExchange, Segment, Side,
        http1::{Http1Conn, looks_like_request},
        is_tls_handshake,
        postgres::{PgConn, looks_like_postgres_client_start},
        redis::{RedisConn, looks_like_redis_request},
    },
};

/// Who was on a connection when an exchange finished: what a span needs besides the exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    pub pid: u32,
    /// Shared with the process's entry: every exchange carries them.
    pub comm: Arc<str>,
    pub service_name: Arc<str>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// TCP sequence number of the request's first byte, when the kernel read it: the same
    /// number on both ends of the connection (see `spans::link_key`).
    pub request_seq: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// Only connections with one of these local or remote ports are parsed. Empty: all.
    pub ports: Vec<u16>,
    /// Overrides the service name taken from the process's command name.
    pub service_name: Option<String>,
    /// A connection with no traffic for this long is forgotten.
    pub idle_timeout_ns: u64,
    /// At most this many connections are tracked; the least recently active go first.
    pub max_conns: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            ports: Vec::new(),
            service_name: None,
            idle_timeout_ns: 300_000_000_000,
            max_conns: 65_536,
        }
    }
}

/// Counters of the tracker's own health.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    pub exchanges: u64,
    pub conns_opened: u64,
    pub conns_closed: u64,
    pub conns_evicted: u64,
    /// Data for a socket whose open record was never seen (lost, or opened before a restart).
    pub conns_adopted: u64,
    /// Connections whose bytes matched no protocol parser (or stopped matching one).
    pub not_parsed: u64,
    /// Connections that turned out to carry TLS, whose plaintext came from the OpenSSL probes.
    pub tls_conns: u64,
    /// Connections whose first bytes were a TLS handshake record: those without plaintext
    /// use a TLS library the probes do not know (or a process not traced from its start).
    pub tls_handshakes: u64,
    /// Requests dropped unfinished by a gap in their connection's capture (shedding).
    pub gap_requests: u64,
    /// Holes that events lost to a full ring buffer left in connections' byte streams (found
    /// by TCP sequence numbers where there are any).
    pub holes: u64,
    /// Requests dropped unfinished at such holes.
    pub hole_requests: u64,
}

struct Process {
    comm: Arc<str>,
    service_name: Arc<str>,
}

/// Request starts remembered per connection for their sequence numbers (pipelining depth).
const MAX_SEQS: usize = 64;

struct Conn {
    conn_id: u64,
    local: SocketAddr,
    remote: SocketAddr,
    /// Requests started and not finished yet: their first-byte time, the thread that sent or
    /// read them, and the TCP sequence number of that byte when known.
    starts: VecDeque<Start>,
    /// Filtered out by port: its events are dropped without parsing.
    ignored: bool,
    proto: Proto,
    /// The OpenSSL probes reported plaintext for this socket: its syscall bytes are
    /// ciphertext and are skipped.
    tls: bool,
    /// Its first bytes were a TLS handshake record: not a connection of no known protocol
    /// when the search for one gives up (its plaintext may come from the OpenSSL probes).
    tls_handshake: bool,
    reset: bool,
    last_ns: u64,
    release: Release,
    /// Per direction (egress, ingress), the TCP sequence number the next bytes should start at,
    /// when known: where the last record of that direction ended; and the kernel's count of
    /// lost events when that record was written.
    next_seq: [Option<u32>; 2],
    dir_losses: [u16; 2],
    /// The kernel's count of lost events when its last record was written
    /// (`EventHeader::losses`).
    losses: u16,
}

impl Conn {
    /// Bytes went unseen both ways (see `ConnTracker::gap`); returns the requests dropped.
    fn gap(&mut self) -> usize {
        self.starts.clear();
        match &mut self.proto {
            Proto::Detecting(http) | Proto::Http(http) => http.gap(),
            Proto::Db { parser, .. } => parser.gap(),
            Proto::Opaque => 0,
        }
    }
}

/// What decides whether the kernel's context injector can let go of a client connection.
#[derive(Default)]
struct Release {
    /// Direction of the first bytes seen: a client speaks first on the protocols parsed here.
    first_dir: Option<Direction>,
    /// Requests this client sent, all with a trace context of their own so far.
    own_context_requests: u8,
    /// A request this client sent had no context of its own: the injector has work here.
    needs_injection: bool,
    /// Reported by `take_clients_to_release` already.
    reported: bool,
}

/// Requests in a row, from a client connection's first, that carry their own trace context
/// (an instrumented client) before the injector stops watching the connection.
const OWN_CONTEXT_RELEASE: u8 = 8;

#[derive(Clone, Copy, Debug)]
struct Start {
    ts_ns: u64,
    tid: u32,
    seq: Option<u32>,
}

/// What a connection was found to carry. Detection is by the bytes, never by the port.
enum Proto {
    /// Nothing recognised yet. HTTP/1.x keeps its own search (it knows how to start
    /// mid-stream); the database protocols are tried on each segment as it goes.
    Detecting(Box<Http1Conn>),
    Http(Box<Http1Conn>),
    Db {
        parser: Box<DbConn>,
        /// Which way requests go: the direction of the segment the protocol was found in.
        request_dir: Direction,
    },
    /// Not a protocol we parse: bytes are dropped unread.
    Opaque,
}

/// The database protocol parsers, behind one interface.
enum DbConn {
    Redis(RedisConn),
    Postgres(PgConn),
}

impl DbConn {
    /// A parser for the protocol whose request `head` starts, if any.
    fn detect(head: &[u8]) -> Option<DbConn> {
        if looks_like_redis_request(head) {
            return Some(DbConn::Redis(RedisConn::new()));
        }
        if looks_like_postgres_client_start(head) {
            return Some(DbConn::Postgres(PgConn::new()));
        }
        None
    }

    fn feed(&mut self, seg: &Segment<'_>, out: &mut Vec<DbExchange>) {
        match self {
            DbConn::Redis(p) => p.feed(seg, out),
            DbConn::Postgres(p) => p.feed(seg, out),
        }
    }

    fn close(&mut self, ts_ns: u64, reset: bool, out: &mut Vec<DbExchange>) {
        match self {
            DbConn::Redis(p) => p.close(ts_ns, reset, out),
            DbConn::Postgres(p) => p.close(ts_ns, reset, out),
        }
    }

    /// Bytes went unseen both ways; returns the requests dropped (see `Http1Conn::gap`).
    fn gap(&mut self) -> usize {
        match self {
            DbConn::Redis(p) => p.gap(),
            DbConn::Postgres(p) => p.gap(),
        }
    }

    /// The bytes stopped being (or never were) this protocol's requests and replies.
    fn gave_up(&self) -> bool {
        match self {
            DbConn::Redis(p) => p.is_not_redis(),
            DbConn::Postgres(p) => p.is_not_postgres(),
        }
    }
}

impl Proto {
    fn new() -> Self {
        Proto::Detecting(Box::default())
    }
}

pub struct ConnTracker {
    config: TrackerConfig,
    conns: HashMap<(u32, u32), Conn>,
    processes: HashMap<u32, Arc<Process>>,
    stats: TrackerStats,
    http_out: Vec<HttpExchange>,
    db_out: Vec<DbExchange>,
    linker: Linker,
    /// Processes seen for the first time since the last `take_new_processes`.
    new_processes: Vec<u32>,
    /// Processes that exited or exec'd since the last `take_gone_processes`, and when.
    gone: Vec<(u32, u64)>,
    /// Client connections found since the last `take_clients_to_release` to need no context
    /// injection, by (local, remote) address.
    clients_to_release: Vec<(SocketAddr, SocketAddr)>,
    /// Processes whose capture is shed now.
    shed: HashSet<u32>,
}

/// A finished exchange, the connection it happened on, and its span identity.
pub type Finished = (Exchange, ConnInfo, Identity);

const UNSPECIFIED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

impl ConnTracker {
    pub fn new(config: TrackerConfig) -> Self {
        Self {
            config,
            conns: HashMap::default(),
            processes: HashMap::default(),
            stats: TrackerStats::default(),
            http_out: Vec::new(),
            db_out: Vec::new(),
            linker: Linker::new(),
            new_processes: Vec::new(),
            gone: Vec::new(),
            clients_to_release: Vec::new(),
            shed: HashSet::default(),
        }
    }

    pub fn stats(&self) -> &TrackerStats {
        &self.stats
    }

    pub fn link_stats(&self) -> &LinkStats {
        self.linker.stats()
    }

    /// Processes seen for the first time (or again after their pid was reused) since the last
    /// call: the agent looks for OpenSSL in them.
    pub fn take_new_processes(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.new_processes)
    }

    /// Processes that exited or ran execve since the last call: the kernel's socket table
    /// must forget their fds (they were closed without a close syscall).
    pub fn take_gone_processes(&mut self) -> Vec<(u32, u64)> {
        std::mem::take(&mut self.gone)
    }

    /// Client connections found since the last call to need nothing from the kernel's HTTP/1.x
    /// context injector, whose watch costs a socket on every send: they carry a database
    /// protocol, TLS or unparsed bytes, or HTTP requests that bring their own trace context
    /// (an instrumented client: `OWN_CONTEXT_RELEASE` in a row from the first).
    pub fn take_clients_to_release(&mut self) -> Vec<(SocketAddr, SocketAddr)> {
        std::mem::take(&mut self.clients_to_release)
    }

    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// Applies one event; finished exchanges are appended to `out`.
    pub fn handle(&mut self, event: &Event<'_>, out: &mut Vec<Finished>) {
        let hdr = *event.header();
        let key = (hdr.tgid, hdr.fd);
        match event {
            Event::ConnOpen {
                local,
                remote,
                comm,
                ..
            } => {
                // Name the process now, while it surely exists (curl may be gone by the time
                // its exchange finishes); the kernel's comm is the fallback.
                self.process_named(hdr.tgid, comm);
                // The fd was reused without a close we saw: finish the old connection first.
                if let Some(old) = self.conns.remove(&key) {
                    self.finish(key, old, hdr.ts_ns, Some(hdr.losses), out);
                }
                self.ensure_capacity(out);
                let ignored = !self.port_allowed(local, remote);
                self.conns
                    .insert(key, Conn::new(&hdr, *local, *remote, ignored));
                self.stats.conns_opened += 1;
            }
            Event::Data {
                len,
                ingress,
                syscall,
                head,
                tail,
                ctx,
                seq,
                start_ns,
                ..
            } => {
                let stale = self
                    .conns
                    .get(&key)
                    .is_some_and(|c| c.conn_id != hdr.conn_id);
                if stale && let Some(old) = self.conns.remove(&key) {
                    self.finish(key, old, hdr.ts_ns, Some(hdr.losses), out);
                }
                if !self.conns.contains_key(&key) {
                    self.ensure_capacity(out);
                    self.stats.conns_adopted += 1;
                    let ignored = !self.config.ports.is_empty();
                    self.conns
                        .insert(key, Conn::new(&hdr, UNSPECIFIED, UNSPECIFIED, ignored));
                }
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                conn.last_ns = hdr.ts_ns;
                // Events were lost since its last record (any of them may have been its own).
                let lost_since = std::mem::replace(&mut conn.losses, hdr.losses) != hdr.losses;
                if conn.ignored {
                    return;
                }
                let dir = if *ingress {
                    Direction::Ingress
                } else {
                    Direction::Egress
                };
                let plaintext = is_tls_plaintext(*syscall);
                if conn.release.first_dir.is_none() && !plaintext {
                    conn.tls_handshake = is_tls_handshake(head);
                    self.stats.tls_handshakes += u64::from(conn.tls_handshake);
                }
                conn.release.first_dir.get_or_insert(dir);
                if plaintext && !conn.tls {
                    // What was parsed so far was the TLS handshake: start over on plaintext.
                    conn.tls = true;
                    conn.proto = Proto::new();
                    conn.starts.clear();
                    self.linker.conn_closed(key);
                    self.stats.tls_conns += 1;
                    report_release(
                        &mut conn.release,
                        (conn.local, conn.remote),
                        &mut self.clients_to_release,
                    );
                } else if conn.tls && !plaintext {
                    return;
                }
                if matches!(conn.proto, Proto::Opaque) {
                    return;
                }
                // Events lost to a full ring buffer leave holes the parsers cannot see: a lost
                // response would have the next one answer its request, and every later request
                // on the connection its neighbour's. A loss since the connection's last record
                // may be one of its own; the TCP sequence numbers tell: a record that begins
                // past where the last of its direction ended follows unseen bytes, and what the
                // connection was waiting for is dropped there, as at a gap in capture. (A jump
                // with no loss is calls not captured on purpose, whole turns of a shed process,
                // which the parsers follow.) Without a number to check (TLS plaintext, whose
                // number is its ciphertext's; Unix sockets), any such loss is taken for a hole.
                let hole = match (plaintext, *seq) {
                    (false, Some(seq)) => {
                        let d = dir as usize;
                        let jumped =
                            conn.next_seq[d].is_some_and(|next| seq.wrapping_sub(next) as i32 > 0);
                        // The unseen bytes went after the direction's last record.
                        let lost_in_direction =
                            std::mem::replace(&mut conn.dir_losses[d], hdr.losses) != hdr.losses;
                        // A send the kernel added a trace context header to moved more bytes
                        // than it reports: where it ended is not known.
                        conn.next_seq[d] =
                            (ctx.flags & CTX_INJECTED == 0).then(|| seq.wrapping_add(*len as u32));
                        jumped && lost_in_direction
                    }
                    _ => lost_since,
                };
                if hole {
                    self.stats.holes += 1;
                    self.stats.hole_requests += conn.gap() as u64;
                    self.linker.conn_gap(key);
                }
                let segment = Segment {
                    dir,
                    ts_ns: hdr.ts_ns,
                    start_ns: *start_ns,
                    len: *len,
                    head,
                    tail,
                };
                // A TLS call's is that of the first ciphertext byte it moved: the same number
                // on both ends where a call writes or reads a request from its first record.
                let start = Start {
                    ts_ns: *start_ns,
                    tid: hdr.tid,
                    seq: *seq,
                };
                let mut fed = false;
                if matches!(conn.proto, Proto::Detecting(_))
                    && let Some(parser) = DbConn::detect(head)
                {
                    conn.proto = Proto::Db {
                        parser: Box::new(parser),
                        request_dir: segment.dir,
                    };
                    report_release(
                        &mut conn.release,
                        (conn.local, conn.remote),
                        &mut self.clients_to_release,
                    );
                }
                if let Proto::Detecting(http) = &mut conn.proto {
                    http.feed(&segment, &mut self.http_out);
                    fed = true;
                    if http.is_not_http() {
                        stop_parsing(key.0, conn, &mut self.stats, &mut self.clients_to_release);
                        return;
                    }
                    if http.is_searching() {
                        return;
                    }
                    // The request line was found in this very segment.
                    if let Proto::Detecting(http) =
                        std::mem::replace(&mut conn.proto, Proto::Opaque)
                    {
                        conn.proto = Proto::Http(http);
                    }
                }
                match &mut conn.proto {
                    Proto::Http(http) => {
                        if looks_like_request(head) {
                            // Keyed by the time the parser gives the request's first byte.
                            let whole = head.len() as u64 == *len;
                            self.linker.request_started(
                                key, *ingress, hdr.tid, *start_ns, head, whole, ctx,
                            );
                            if !*ingress {
                                let injected = ctx.flags & CTX_INJECTED != 0;
                                client_request_sent(
                                    &mut conn.release,
                                    (conn.local, conn.remote),
                                    injected,
                                    head,
                                    &mut self.clients_to_release,
                                );
                            }
                        } else if *ingress {
                            self.linker.request_continued(key, head);
                        }
                        if !fed {
                            http.feed(&segment, &mut self.http_out);
                        }
                        // A segment where a request began, at its start or after another's
                        // end (pipelined), not the many of a long body.
                        if http.last_request_start_ns() == Some(*start_ns) {
                            push_start(&mut conn.starts, start);
                        }
                        if http.is_not_http() {
                            // Upgraded: WebSocket, a CONNECT tunnel.
                            stop_parsing(
                                key.0,
                                conn,
                                &mut self.stats,
                                &mut self.clients_to_release,
                            );
                        }
                    }
                    Proto::Db {
                        parser,
                        request_dir,
                    } => {
                        if segment.dir == *request_dir {
                            push_start(&mut conn.starts, start);
                        }
                        parser.feed(&segment, &mut self.db_out);
                        if parser.gave_up() {
                            conn.proto = Proto::Opaque;
                            self.stats.not_parsed += 1;
                        }
                    }
                    Proto::Detecting(_) | Proto::Opaque => {}
                }
                self.drain(key.0, key, out);
            }
            Event::ConnGap(_) => {
                if let Some(conn) = self
                    .conns
                    .get_mut(&key)
                    .filter(|c| c.conn_id == hdr.conn_id)
                {
                    self.stats.gap_requests += conn.gap() as u64;
                    self.linker.conn_gap(key);
                    // Calls went uncaptured: the next bytes may begin anywhere.
                    conn.next_seq = [None; 2];
                }
            }
            Event::ConnReset(_) => {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.reset = true;
                }
            }
            Event::ConnClose(_) => {
                // The socket-layer hooks may report a socket's close after its fd was reused
                // (TCP_CLOSE can come late): that close is not the new connection's.
                if self
                    .conns
                    .get(&key)
                    .is_some_and(|c| c.conn_id == hdr.conn_id)
                    && let Some(conn) = self.conns.remove(&key)
                {
                    self.stats.conns_closed += 1;
                    self.finish(key, conn, hdr.ts_ns, Some(hdr.losses), out);
                }
            }
            // After exec the pid is another program (name, libraries), and the fds it closed
            // on exec went without a close: start over as for an exit. Sockets it kept are
            // adopted again on their next I/O.
            Event::ProcessExit(_) | Event::ProcessExec(_) => {
                let keys: Vec<_> = self
                    .conns
                    .keys()
                    .filter(|k| k.0 == hdr.tgid)
                    .copied()
                    .collect();
                for k in keys {
                    if let Some(conn) = self.conns.remove(&k) {
                        self.stats.conns_closed += 1;
                        self.finish(k, conn, hdr.ts_ns, Some(hdr.losses), out);
                    }
                }
                // The pid may be reused by an unrelated program: forget its name.
                self.processes.remove(&hdr.tgid);
                self.linker.process_exited(hdr.tgid);
                if self.gone.len() < 4096 {
                    self.gone.push((hdr.tgid, hdr.ts_ns));
                }
                if matches!(event, Event::ProcessExec(_)) && self.new_processes.len() < 4096 {
                    self.new_processes.push(hdr.tgid);
                }
            }
            // For the agent's loop, which takes the socket out after this drain.
            Event::InjectRelease(_) => {}
        }
    }

    /// Whether process `tgid`'s capture is shed now (see `crate::governor`). A connection of
    /// it that closes meanwhile drops the requests it was waiting on, as a gap would: their
    /// responses may well have gone by unseen, and must not be reported missing.
    pub fn set_shed(&mut self, tgid: u32, shed: bool) {
        if shed {
            self.shed.insert(tgid);
        } else {
            self.shed.remove(&tgid);
        }
    }

    /// Forgets connections idle for longer than the timeout (their pending exchanges are
    /// dropped: a request that got no answer in minutes is not a latency to report).
    pub fn sweep(&mut self, now_ns: u64) {
        let timeout = self.config.idle_timeout_ns;
        let before = self.conns.len();
        self.conns
            .retain(|_, c| now_ns.saturating_sub(c.last_ns) < timeout);
        self.stats.conns_evicted += (before - self.conns.len()) as u64;
    }

    fn ensure_capacity(&mut self, out: &mut Vec<Finished>) {
        if self.conns.len() < self.config.max_conns {
            return;
        }
        // Full: evict the least recently active tenth at once, so this scan is rare.
        let mut by_age: Vec<((u32, u32), u64)> =
            self.conns.iter().map(|(k, c)| (*k, c.last_ns)).collect();
        by_age.sort_unstable_by_key(|(_, last)| *last);
        let n = (self.config.max_conns / 10).max(1);
        for (key, last) in by_age.into_iter().take(n) {
            if let Some(conn) = self.conns.remove(&key) {
                self.stats.conns_evicted += 1;
                self.finish(key, conn, last, None, out);
            }
        }
    }

    fn port_allowed(&self, local: &SocketAddr, remote: &SocketAddr) -> bool {
        self.config.ports.is_empty()
            || self.config.ports.contains(&local.port())
            || self.config.ports.contains(&remote.port())
    }

    /// Ends connection `key` at `ts_ns`, told by an event written when `losses` events had
    /// been lost (none when it is evicted).
    fn finish(
        &mut self,
        key: (u32, u32),
        mut conn: Conn,
        ts_ns: u64,
        losses: Option<u16>,
        out: &mut Vec<Finished>,
    ) {
        if conn.ignored {
            return;
        }
        if self.shed.contains(&key.0) {
            self.stats.gap_requests += conn.gap() as u64;
        } else if losses.is_some_and(|losses| losses != conn.losses) {
            // Events were lost since its last record: the response its request waits for,
            // which no later record of its own will show missing, may be among them (its
            // close as well, when a new connection in its fd slot ends it). It must not be
            // reported as never sent.
            self.stats.hole_requests += conn.gap() as u64;
        }
        match &mut conn.proto {
            Proto::Http(http) => http.close(ts_ns, conn.reset, &mut self.http_out),
            Proto::Db { parser, .. } => parser.close(ts_ns, conn.reset, &mut self.db_out),
            Proto::Detecting(_) | Proto::Opaque => {}
        }
        // Put it back briefly so that drain() finds its addresses.
        self.conns.insert(key, conn);
        self.drain(key.0, key, out);
        self.conns.remove(&key);
        self.linker.conn_closed(key);
    }

    /// Moves parsed exchanges of `key` into `out` with their connection info.
    fn drain(&mut self, tgid: u32, key: (u32, u32), out: &mut Vec<Finished>) {
        if self.http_out.is_empty() && self.db_out.is_empty() {
            return;
        }
        let process = self.process(tgid);
        let Some(conn) = self.conns.get_mut(&key) else {
            self.http_out.clear();
            self.db_out.clear();
            return;
        };
        let info = |request_seq| ConnInfo {
            pid: tgid,
            comm: process.comm.clone(),
            service_name: process.service_name.clone(),
            local: conn.local,
            remote: conn.remote,
            request_seq,
        };
        // Requests written or read in one syscall (pipelined) share its start, and were all
        // sent by its thread; each began at its sequence number plus where its parser says it
        // began in the syscall. A TLS call's number is its first ciphertext byte's, which says
        // nothing of where later plaintext lies.
        let mut request_start = |start_ns: u64, offset: u64| {
            let start = start_at(&mut conn.starts, start_ns);
            let seq = start
                .and_then(|s| s.seq)
                .filter(|_| offset == 0 || !conn.tls)
                .map(|seq| seq.wrapping_add(offset as u32));
            (start, seq)
        };
        for exchange in self.http_out.drain(..) {
            self.stats.exchanges += 1;
            let (_, request_seq) = request_start(exchange.req_start_ns, exchange.req_offset);
            let identity = self.linker.finished(key, &exchange);
            out.push((Exchange::Http(exchange), info(request_seq), identity));
        }
        for exchange in self.db_out.drain(..) {
            self.stats.exchanges += 1;
            let (start, request_seq) = request_start(exchange.req_start_ns, exchange.req_offset);
            let identity = match exchange.side {
                Side::Client => self
                    .linker
                    .call_identity(start.map(|s| s.tid), exchange.req_start_ns),
                Side::Server => self.linker.new_root(),
            };
            out.push((Exchange::Db(exchange), info(request_seq), identity));
        }
    }

    fn process(&mut self, tgid: u32) -> Arc<Process> {
        self.process_named(tgid, &[0; 16])
    }

    /// The process `tgid`, named the first time: by `hint` (the process's comm as the kernel
    /// saw it at the event) when there is one, else from /proc.
    fn process_named(&mut self, tgid: u32, hint: &[u8; 16]) -> Arc<Process> {
        let override_name = &self.config.service_name;
        let new_processes = &mut self.new_processes;
        self.processes
            .entry(tgid)
            .or_insert_with(|| {
                if new_processes.len() < 4096 {
                    new_processes.push(tgid);
                }
                let from_kernel =
                    String::from_utf8_lossy(hint.split(|b| *b == 0).next().unwrap_or_default())
                        .into_owned();
                // The kernel's name was read when the event happened; /proc is read now,
                // which may be after an exec made the process another program.
                let comm = (!from_kernel.is_empty())
                    .then_some(from_kernel)
                    .or_else(|| {
                        std::fs::read_to_string(format!("/proc/{tgid}/comm"))
                            .map(|s| s.trim_end().to_string())
                            .ok()
                    })
                    .unwrap_or_else(|| format!("pid-{tgid}"));
                let comm = Arc::<str>::from(comm);
                let service_name = override_name
                    .as_deref()
                    .map_or_else(|| comm.clone(), Arc::from);
                Arc::new(Process { comm, service_name })
            })
            .clone()
    }
}

/// The start recorded for a request that began at `ts_ns`, left for the others that began in
/// the same syscall. Starts older than it never finished and are dropped.
fn start_at(starts: &mut VecDeque<Start>, ts_ns: u64) -> Option<Start> {
    while starts.front().is_some_and(|s| s.ts_ns < ts_ns) {
        starts.pop_front();
    }
    starts.front().filter(|s| s.ts_ns == ts_ns).copied()
}

/// The connection carries no protocol parsed here (any more): its bytes are left alone, and a
/// client's is reported for the injector to stop watching.
fn stop_parsing(
    tgid: u32,
    conn: &mut Conn,
    stats: &mut TrackerStats,
    clients_to_release: &mut Vec<(SocketAddr, SocketAddr)>,
) {
    conn.proto = Proto::Opaque;
    if !conn.tls_handshake {
        stats.not_parsed += 1;
        log::debug!(
            "pid {tgid}: {} -> {} not parsed (no known protocol)",
            conn.local,
            conn.remote
        );
    }
    report_release(
        &mut conn.release,
        (conn.local, conn.remote),
        clients_to_release,
    );
}

/// Adds a connection to `out` once, if it is a client's whose addresses are known.
fn report_release(
    release: &mut Release,
    addrs: (SocketAddr, SocketAddr),
    out: &mut Vec<(SocketAddr, SocketAddr)>,
) {
    if release.first_dir == Some(Direction::Egress)
        && !release.reported
        && addrs.1 != UNSPECIFIED
        && out.len() < 4096
    {
        release.reported = true;
        out.push(addrs);
    }
}

/// Counts the HTTP requests a client sent with their own trace context, until one comes
/// without (the kernel wrote one, or could not): then the injector is needed for good.
fn client_request_sent(
    release: &mut Release,
    addrs: (SocketAddr, SocketAddr),
    injected: bool,
    head: &[u8],
    out: &mut Vec<(SocketAddr, SocketAddr)>,
) {
    if release.needs_injection || release.reported {
        return;
    }
    if injected || !link::has_own_context(head) {
        release.needs_injection = true;
        return;
    }
    release.own_context_requests += 1;
    if release.own_context_requests >= OWN_CONTEXT_RELEASE {
        report_release(release, addrs, out);
    }
}

fn push_start(starts: &mut VecDeque<Start>, start: Start) {
    if starts.len() >= MAX_SEQS {
        starts.pop_front();
    }
    starts.push_back(start);
}

impl Conn {
    fn new(hdr: &EventHeader, local: SocketAddr, remote: SocketAddr, ignored: bool) -> Self {
        Self {
            conn_id: hdr.conn_id,
            local,
            remote,
            ignored,
            starts: VecDeque::new(),
            proto: Proto::new(),
            tls: false,
            tls_handshake: false,
            reset: false,
            last_ns: hdr.ts_ns,
            release: Release::default(),
            next_seq: [None; 2],
            dir_losses: [hdr.losses; 2],
            losses: hdr.losses,
        }
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{EventKind, ROLE_SERVER};

    use super::*;
    use crate::{
        events::{
            decode,
            tests::{data_record, data_record_with, header_record, open_record},
        },
        protocols::{Outcome, Side},
    };

    fn feed(tracker: &mut ConnTracker, records: &[Vec<u8>]) -> Vec<Finished> {
        let mut out = Vec::new();
        for r in records {
            tracker.handle(&decode(r).unwrap(), &mut out);
        }
        out
    }

    const REQ: &[u8] = b"GET /cats/42 HTTP/1.1\r\nHost: x\r\n\r\n";
    const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    #[test]
    fn server_exchange_carries_connection_info() {
        let mut t = ConnTracker::new(TrackerConfig {
            service_name: Some("cats".into()),
            ..Default::default()
        });
        let out = feed(
            &mut t,
            &[
                open_record(
                    4242,
                    5,
                    1,
                    ROLE_SERVER,
                    [127, 0, 0, 1],
                    8080,
                    [127, 0, 0, 1],
                    50000,
                ),
                data_record(4242, 5, 1, 1_000, true, REQ),
                data_record(4242, 5, 1, 2_000, false, RESP),
            ],
        );
        assert_eq!(out.len(), 1);
        let (ex, info, _) = &out[0];
        let ex = ex.as_http().unwrap();
        assert_eq!(
            (ex.side, &*ex.method, ex.status),
            (Side::Server, "GET", Some(200))
        );
        assert_eq!(info.local.port(), 8080);
        assert_eq!(info.remote.port(), 50000);
        assert_eq!(&*info.service_name, "cats");
        assert_eq!(info.pid, 4242);
    }

    /// A send is dated from before its return (`start_ns`); the identity the kernel injected
    /// and the request's sequence number must still find their exchange.
    #[test]
    fn client_request_keeps_kernel_identity_and_sequence_number() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let injected = tracer_common::TraceCtx {
            trace_id_hi: 1,
            trace_id_lo: 2,
            span_id: 0x33,
            parent_id: 0x44,
            flags: tracer_common::CTX_VALID
                | tracer_common::CTX_SAMPLED
                | tracer_common::CTX_INJECTED,
            _pad: 0,
        };
        let out = feed(
            &mut t,
            &[
                open_record(
                    7,
                    3,
                    1,
                    tracer_common::ROLE_CLIENT,
                    [10, 0, 0, 1],
                    40000,
                    [10, 0, 0, 2],
                    80,
                ),
                crate::events::tests::data_record_with(7, 3, 1, 1_500, false, REQ, |ev| {
                    ev.start_ns = 1_000;
                    ev.seq = 12345;
                    ev.seq_valid = 1;
                    ev.ctx = injected;
                }),
                data_record(7, 3, 1, 2_000, true, RESP),
            ],
        );
        assert_eq!(out.len(), 1);
        let (ex, info, identity) = &out[0];
        let ex = ex.as_http().unwrap();
        assert_eq!(ex.side, Side::Client);
        assert_eq!(ex.req_start_ns, 1_000, "dated from the send's start");
        assert_eq!(info.request_seq, Some(12345));
        assert_eq!((identity.span_id, identity.parent_id), (0x33, Some(0x44)));
    }

    /// A new connection's request, then its close: reported unanswered, as ever.
    fn a_close_reports_its_request_unanswered(t: &mut ConnTracker) {
        let out = feed(
            t,
            &[
                data_record(7, 6, 2, 10_000, true, REQ),
                header_record(EventKind::ConnClose, 7, 6, 2, 11_000),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.as_http().unwrap().status, None);
    }

    /// Target, first-byte time and status of each HTTP exchange in `finished`.
    fn http_summary(finished: &[Finished]) -> Vec<(String, u64, Option<u16>)> {
        finished
            .iter()
            .map(|(ex, _, _)| {
                let ex = ex.as_http().unwrap();
                (ex.target().to_string(), ex.req_start_ns, ex.status)
            })
            .collect()
    }

    /// A connection of pid 7 from 10.0.0.1:`lport` to 10.0.0.2:`rport`.
    fn open_10_0_0_1(fd: u32, lport: u16, rport: u16) -> Vec<u8> {
        open_record(
            7,
            fd,
            1,
            ROLE_SERVER,
            [10, 0, 0, 1],
            lport,
            [10, 0, 0, 2],
            rport,
        )
    }

    /// A gap in a connection's capture (per-turn sampling) drops the request it was
    /// answering, counts it, and leaves other connections alone, a gap reported for an
    /// earlier connection on the same fd too; the exchanges after it are whole and right.
    #[test]
    fn a_capture_gap_drops_what_it_cut_and_nothing_else() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let other_req = b"GET /dogs HTTP/1.1\r\nHost: x\r\n\r\n";
        let before = feed(
            &mut t,
            &[
                data_record(7, 5, 1, 1_000, true, REQ),
                data_record(7, 6, 2, 1_000, true, other_req),
                data_record(8, 5, 1, 1_000, true, other_req),
                header_record(EventKind::ConnGap, 7, 5, 1, 4_000),
                header_record(EventKind::ConnGap, 7, 6, 1, 4_000),
            ],
        );
        assert!(before.is_empty());
        assert_eq!(t.stats().gap_requests, 1);
        let after = feed(
            &mut t,
            &[
                // The response to the request cut by the gap, then a whole exchange.
                data_record(7, 5, 1, 5_000, false, RESP),
                data_record(7, 5, 1, 6_000, true, REQ),
                data_record(7, 5, 1, 7_000, false, RESP),
                data_record(7, 6, 2, 7_000, false, RESP),
                data_record(8, 5, 1, 7_000, false, RESP),
            ],
        );
        assert_eq!(
            http_summary(&after),
            [
                ("/cats/42".to_string(), 6_000, Some(200)),
                ("/dogs".to_string(), 1_000, Some(200)),
                ("/dogs".to_string(), 1_000, Some(200))
            ]
        );
    }

    /// A record lost to a full ring buffer leaves a hole the sequence numbers show: the
    /// requests waiting when a response went unseen are dropped and counted, never answered
    /// by the responses after it; a gap in capture (shedding) resets what is expected.
    #[test]
    fn bytes_unseen_by_sequence_number_drop_what_they_cut() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let (req_b, req_c) = (
            b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        let not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        // A record written after `losses` events were lost.
        let at_after = |ts, ingress, bytes: &[u8], seq, losses| {
            data_record_with(7, 5, 1, ts, ingress, bytes, |e| {
                e.seq = seq;
                e.seq_valid = 1;
                e.hdr.losses = losses;
            })
        };
        let at = |ts, ingress, bytes: &[u8], seq| at_after(ts, ingress, bytes, seq, 1);
        let (rq, rs) = (REQ.len() as u32, RESP.len() as u32);
        let b = req_b.len() as u32;
        let c = req_c.len() as u32;
        let out = feed(
            &mut t,
            &[
                at_after(1_000, true, REQ, 100, 0),
                at_after(2_000, false, RESP, 9_000, 0),
                at_after(3_000, true, req_b, 100 + rq, 0),
                // The response to /b (a 404) was lost.
                at(5_000, true, req_c, 100 + rq + b),
                at(6_000, false, RESP, 9_000 + rs + not_found.len() as u32),
                at(7_000, true, REQ, 100 + rq + b + c),
                at(8_000, false, RESP, 9_000 + 2 * rs + not_found.len() as u32),
            ],
        );
        assert_eq!(
            http_summary(&out),
            [
                ("/cats/42".to_string(), 1_000, Some(200)),
                ("/cats/42".to_string(), 7_000, Some(200))
            ]
        );
        assert_eq!((t.stats().holes, t.stats().hole_requests), (1, 2));
        // After a gap in capture the next bytes may start anywhere: no hole.
        let out = feed(
            &mut t,
            &[
                header_record(EventKind::ConnGap, 7, 5, 1, 9_000),
                at(10_000, true, REQ, 50_000),
                at(11_000, false, RESP, 90_000),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(t.stats().holes, 1);
        // Bytes not captured with no event lost: turns a shed process did not have captured,
        // whole, that the parser follows (the kernel does not announce each: an injected
        // send's hook takes the turn's gap).
        let out = feed(
            &mut t,
            &[
                at(12_000, true, REQ, 60_000),
                at(13_000, false, RESP, 95_000),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(t.stats().holes, 1);
    }

    /// A connection that closes while its process is shed drops the request it waited on
    /// (its response may have gone by unseen) instead of reporting it unanswered; once
    /// capture is back, a close reports as ever.
    #[test]
    fn a_close_while_shed_reports_nothing_unanswered() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        feed(&mut t, &[data_record(7, 5, 1, 1_000, true, REQ)]);
        t.set_shed(7, true);
        let out = feed(
            &mut t,
            &[header_record(EventKind::ConnClose, 7, 5, 1, 9_000)],
        );
        assert!(out.is_empty());
        assert_eq!(t.stats().gap_requests, 1);
        t.set_shed(7, false);
        a_close_reports_its_request_unanswered(&mut t);
    }

    /// Without a sequence number to check (TLS plaintext, Unix sockets), a record written
    /// after events were lost that the connection's last record had not seen may follow a hole:
    /// what the connection waited for is dropped, not answered by what comes next.
    #[test]
    fn without_sequence_numbers_a_loss_since_the_last_record_is_a_hole() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let after_loss = |ts, ingress, bytes: &'static [u8]| {
            data_record_with(7, 5, 1, ts, ingress, bytes, |e| e.hdr.losses = 1)
        };
        let out = feed(
            &mut t,
            &[
                data_record(7, 5, 1, 1_000, true, REQ),
                // Its response lost; the next request's answered.
                after_loss(3_000, true, REQ),
                after_loss(4_000, false, RESP),
            ],
        );
        let got: Vec<_> = out
            .iter()
            .map(|(ex, _, _)| ex.as_http().unwrap().req_start_ns)
            .collect();
        assert_eq!(got, [3_000], "only the request after the hole, answered");
        assert_eq!((t.stats().holes, t.stats().hole_requests), (1, 1));
    }

    /// A connection that closes after events were lost, with no record of its own since,
    /// drops the request it waited on (the response may have been lost) instead of reporting
    /// it unanswered; one with a record after the loss reports as ever.
    #[test]
    fn a_close_after_lost_events_reports_nothing_unanswered() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        feed(&mut t, &[data_record(7, 5, 1, 1_000, true, REQ)]);
        // Written after an event was lost.
        let mut close = header_record(EventKind::ConnClose, 7, 5, 1, 9_000);
        let at = std::mem::offset_of!(EventHeader, losses);
        close[at..at + 2].copy_from_slice(&1u16.to_ne_bytes());
        let out = feed(&mut t, &[close]);
        assert!(out.is_empty());
        assert_eq!(t.stats().hole_requests, 1);
        a_close_reports_its_request_unanswered(&mut t);
    }

    /// Only client connections that turned out not to carry HTTP/1.x are reported (once each),
    /// and only those whose addresses are known: the socket map is keyed by them.
    #[test]
    fn clients_without_http_are_released_once() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let open = |fd, lport| open_10_0_0_1(fd, lport, 6379);
        let redis_cmd = b"*1\r\n$4\r\nPING\r\n";
        feed(
            &mut t,
            &[
                // A Redis client: reported when its first command is seen.
                open(3, 40001),
                data_record(7, 3, 1, 1_000, false, redis_cmd),
                data_record(7, 3, 1, 2_000, true, b"+PONG\r\n"),
                data_record(7, 3, 1, 3_000, false, redis_cmd),
                // A Redis server's connection: the first bytes came in.
                open(4, 40002),
                data_record(7, 4, 1, 1_000, true, redis_cmd),
                // An HTTP client keeps its header.
                open(5, 40003),
                data_record(7, 5, 1, 1_000, false, REQ),
                // A client connection seen without its open: no addresses to name it by.
                data_record(7, 6, 1, 1_000, false, redis_cmd),
            ],
        );
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 40001);
        let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 6379);
        assert_eq!(t.take_clients_to_release(), vec![(local, remote)]);
        feed(&mut t, &[data_record(7, 3, 1, 4_000, false, redis_cmd)]);
        assert!(t.take_clients_to_release().is_empty(), "reported once");
    }

    /// An instrumented client (its requests bring their own context from the first) is
    /// released after `OWN_CONTEXT_RELEASE` of them; one the kernel injected into, or one with a
    /// request that had no context, never is.
    #[test]
    fn clients_with_their_own_context_are_released() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let own = b"GET /a HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
        let open = |fd, lport| open_10_0_0_1(fd, lport, 80);
        let mut records = vec![open(3, 40001), open(4, 40002), open(5, 40003)];
        for i in 0..u64::from(OWN_CONTEXT_RELEASE) {
            let ts = 1_000 * (i + 1);
            records.push(data_record(7, 3, 1, ts, false, own));
            records.push(data_record(7, 3, 1, ts + 500, true, RESP));
            // The second client's first request had no context of its own.
            let first = if i == 0 { REQ } else { own.as_slice() };
            records.push(data_record(7, 4, 1, ts, false, first));
            records.push(data_record(7, 4, 1, ts + 500, true, RESP));
            // The third's requests were given one by the kernel.
            records.push(crate::events::tests::data_record_with(
                7,
                5,
                1,
                ts,
                false,
                REQ,
                |ev| ev.ctx.flags = tracer_common::CTX_VALID | CTX_INJECTED,
            ));
            records.push(data_record(7, 5, 1, ts + 500, true, RESP));
            if i + 2 == u64::from(OWN_CONTEXT_RELEASE) {
                feed(&mut t, &records);
                records.clear();
                assert!(t.take_clients_to_release().is_empty(), "not yet");
            }
        }
        feed(&mut t, &records);
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 40001);
        let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 80);
        assert_eq!(t.take_clients_to_release(), vec![(local, remote)]);
    }

    #[test]
    fn port_filter_ignores_other_connections() {
        let mut t = ConnTracker::new(TrackerConfig {
            ports: vec![9999],
            ..Default::default()
        });
        let out = feed(
            &mut t,
            &[
                open_record(
                    1,
                    5,
                    1,
                    ROLE_SERVER,
                    [127, 0, 0, 1],
                    8080,
                    [127, 0, 0, 1],
                    50000,
                ),
                data_record(1, 5, 1, 1, true, REQ),
                data_record(1, 5, 1, 2, false, RESP),
            ],
        );
        assert!(out.is_empty());
    }

    #[test]
    fn fd_reuse_does_not_mix_connections() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let out = feed(
            &mut t,
            &[
                open_record(
                    1,
                    5,
                    1,
                    ROLE_SERVER,
                    [127, 0, 0, 1],
                    80,
                    [127, 0, 0, 1],
                    1111,
                ),
                data_record(1, 5, 1, 1, true, REQ),
                // Same fd, new socket, no close seen: the first request is closed unanswered.
                open_record(
                    1,
                    5,
                    2,
                    ROLE_SERVER,
                    [127, 0, 0, 1],
                    80,
                    [127, 0, 0, 1],
                    2222,
                ),
                data_record(1, 5, 2, 3, true, REQ),
                data_record(1, 5, 2, 4, false, RESP),
            ],
        );
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0].0.as_http().unwrap().outcome,
            Outcome::Closed { reset: false }
        );
        assert_eq!(out[0].1.remote.port(), 1111);
        assert_eq!(out[1].0.as_http().unwrap().status, Some(200));
        assert_eq!(out[1].1.remote.port(), 2222);
    }

    /// The socket-layer hooks report a close when the socket reaches TCP_CLOSE, which may be
    /// after its fd went to a new connection: that close ends only the old one.
    #[test]
    fn late_close_of_a_reused_fd_spares_the_new_connection() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let open =
            |conn_id, port| open_record(1, 5, conn_id, 0, [127, 0, 0, 1], 80, [127, 0, 0, 1], port);
        let out = feed(
            &mut t,
            &[
                open(1, 1111),
                data_record(1, 5, 1, 1, true, REQ),
                data_record(1, 5, 1, 2, false, RESP),
                open(2, 2222),
                data_record(1, 5, 2, 3, true, REQ),
                header_record(EventKind::ConnClose, 1, 5, 1, 4),
                data_record(1, 5, 2, 5, false, RESP),
                header_record(EventKind::ConnClose, 1, 5, 2, 6),
            ],
        );
        let answered: Vec<_> = out
            .iter()
            .map(|(ex, info, _)| (info.remote.port(), ex.as_http().unwrap().status))
            .collect();
        assert_eq!(answered, [(1111, Some(200)), (2222, Some(200))]);
        assert_eq!(t.open_connections(), 0);
    }

    #[test]
    fn reset_then_close_marks_the_exchange() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let out = feed(
            &mut t,
            &[
                open_record(
                    1,
                    5,
                    1,
                    ROLE_SERVER,
                    [127, 0, 0, 1],
                    80,
                    [127, 0, 0, 1],
                    1111,
                ),
                data_record(1, 5, 1, 1, false, REQ),
                header_record(EventKind::ConnReset, 1, 5, 1, 2),
                header_record(EventKind::ConnClose, 1, 5, 1, 3),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.as_http().unwrap().side, Side::Client);
        assert_eq!(
            out[0].0.as_http().unwrap().outcome,
            Outcome::Closed { reset: true }
        );
        assert_eq!(t.open_connections(), 0);
    }

    #[test]
    fn process_exit_and_idle_sweep_bound_the_table() {
        let mut t = ConnTracker::new(TrackerConfig {
            idle_timeout_ns: 100,
            ..Default::default()
        });
        feed(
            &mut t,
            &[
                open_record(1, 5, 1, 0, [127, 0, 0, 1], 80, [127, 0, 0, 1], 1),
                open_record(1, 6, 2, 0, [127, 0, 0, 1], 80, [127, 0, 0, 1], 2),
                open_record(2, 5, 3, 0, [127, 0, 0, 1], 80, [127, 0, 0, 1], 3),
                header_record(EventKind::ProcessExit, 1, 0, 0, 10),
            ],
        );
        assert_eq!(t.open_connections(), 1);
        t.sweep(1_000);
        assert_eq!(t.open_connections(), 0);
        assert_eq!(t.stats().conns_evicted, 1);
    }

    #[test]
    fn table_size_is_capped() {
        let mut t = ConnTracker::new(TrackerConfig {
            max_conns: 100,
            ..Default::default()
        });
        let records: Vec<_> = (0..1000u32)
            .map(|fd| {
                open_record(
                    1,
                    fd,
                    u64::from(fd) + 1,
                    0,
                    [127, 0, 0, 1],
                    80,
                    [127, 0, 0, 1],
                    1,
                )
            })
            .collect();
        feed(&mut t, &records);
        assert!(t.open_connections() <= 100);
    }

    #[test]
    fn data_without_open_is_adopted() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let out = feed(
            &mut t,
            &[
                data_record(1, 5, 1, 1, true, REQ),
                data_record(1, 5, 1, 2, false, RESP),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(t.stats().conns_adopted, 1);
    }

    #[test]
    fn database_call_is_a_child_of_the_request_being_served() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let out = feed(
            &mut t,
            &[
                data_record(7, 5, 1, 1_000, true, REQ),
                // While serving it, the same thread asks Redis.
                data_record_with(
                    7,
                    6,
                    2,
                    2_000,
                    false,
                    b"*2\r\n$3\r\nGET\r\n$5\r\ncat:1\r\n",
                    |e| {
                        e.seq = 77;
                        e.seq_valid = 1;
                    },
                ),
                data_record(7, 6, 2, 3_000, true, b"$3\r\nTom\r\n"),
                data_record(7, 5, 1, 4_000, false, RESP),
            ],
        );
        assert_eq!(out.len(), 2, "{out:#?}");
        let (db, db_info, db_id) = &out[0];
        let Exchange::Db(db) = db else {
            panic!("expected the Redis call first: {out:#?}");
        };
        assert_eq!((db.side, db.operation.as_str()), (Side::Client, "GET"));
        assert_eq!(db_info.request_seq, Some(77));
        let (http, _, http_id) = &out[1];
        assert!(http.as_http().is_some());
        assert_eq!(db_id.trace_id, http_id.trace_id);
        assert_eq!(db_id.parent_id, Some(http_id.span_id));
    }

    /// However the server's reads cut the command stream, each command's sequence number is
    /// that of its own first byte: what the client's side reports for it.
    #[test]
    fn pipelined_commands_each_get_their_own_sequence_number() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let ping = b"*1\r\n$4\r\nPING\r\n";
        let read = |ts: u64, seq: u32, bytes: &[u8]| {
            data_record_with(3, 8, 4, ts, true, bytes, |e| {
                e.seq = seq;
                e.seq_valid = 1;
            })
        };
        let out = feed(
            &mut t,
            &[
                // Two commands in one read, then the first half of a third.
                read(
                    1_000,
                    500,
                    b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPI",
                ),
                // The third's end and a fourth.
                read(1_100, 544, b"NG\r\n*1\r\n$4\r\nPING\r\n"),
                data_record(3, 8, 4, 2_000, false, b"+PONG\r\n$-1\r\n+PONG\r\n+PONG\r\n"),
            ],
        );
        let seqs: Vec<_> = out
            .iter()
            .map(|(ex, info, _)| (ex.side(), info.request_seq))
            .collect();
        let get = 500 + ping.len() as u32;
        assert_eq!(
            seqs,
            [
                (Side::Server, Some(500)),
                (Side::Server, Some(get)),
                (Side::Server, Some(get + 20)),
                (Side::Server, Some(544 + 4)),
            ],
            "{out:#?}"
        );
    }

    /// Pipelined HTTP requests read in one syscall, and one whose head began in a read that
    /// ended another's body, each get the sequence number of their own first byte.
    #[test]
    fn pipelined_http_requests_each_get_their_own_sequence_number() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let post = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab";
        let read = |ts: u64, seq: u32, bytes: &[u8]| {
            data_record_with(3, 8, 4, ts, true, bytes, |e| {
                e.seq = seq;
                e.seq_valid = 1;
            })
        };
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let mut first = get.to_vec();
        first.extend_from_slice(post);
        let second_seq = 900 + first.len() as u32;
        let mut second = b"cd".to_vec();
        second.extend_from_slice(get);
        let out = feed(
            &mut t,
            &[
                read(1_000, 900, &first),
                read(1_100, second_seq, &second),
                data_record(3, 8, 4, 2_000, false, &ok.repeat(3)),
            ],
        );
        assert_eq!(
            request_seqs(&out),
            [
                (Side::Server, Some(900)),
                (Side::Server, Some(900 + get.len() as u32)),
                (Side::Server, Some(second_seq + 2)),
            ],
            "{out:#?}"
        );
    }

    /// Each exchange's side and the sequence number it is linked by.
    fn request_seqs(out: &[Finished]) -> Vec<(Side, Option<u32>)> {
        out.iter()
            .map(|(ex, info, _)| (ex.side(), info.request_seq))
            .collect()
    }

    /// An OpenSSL call's plaintext on connection `(tgid, fd, conn_id)`; a read's carries
    /// `read_seq`, the sequence number of the first ciphertext byte it read.
    fn ssl_call(
        (tgid, fd, conn_id): (u32, u32, u64),
        ts: u64,
        ingress: bool,
        payload: &[u8],
        read_seq: u32,
    ) -> Vec<u8> {
        data_record_with(tgid, fd, conn_id, ts, ingress, payload, |e| {
            e.syscall = if ingress {
                e.seq = read_seq;
                e.seq_valid = 1;
                tracer_common::SYSCALL_SSL_READ
            } else {
                tracer_common::SYSCALL_SSL_WRITE
            };
        })
    }

    /// Over TLS a call's sequence number is its first ciphertext byte's: a command that began
    /// later in the plaintext it read has none (the offset is in plaintext).
    #[test]
    fn pipelined_commands_over_tls_link_the_first_only() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        let pings = b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n";
        let out = feed(
            &mut t,
            &[
                ssl_call((3, 8, 4), 1_000, true, pings, 7_000),
                ssl_call((3, 8, 4), 2_000, false, b"+PONG\r\n+PONG\r\n", 0),
            ],
        );
        assert_eq!(
            request_seqs(&out),
            [(Side::Server, Some(7_000)), (Side::Server, None)],
            "{out:#?}"
        );
    }

    #[test]
    fn tls_plaintext_replaces_the_ciphertext() {
        let mut t = ConnTracker::new(TrackerConfig::default());
        // The request's call read from the first byte of a record: the kernel gives the
        // record's sequence number.
        let tls = |ts: u64, ingress: bool, payload: &[u8]| {
            ssl_call((9, 4, 3), ts, ingress, payload, 5_000)
        };
        // The handshake, as the syscall probes saw it: OpenSSL reads a record's header and
        // its body apart, and in as many segments the search for HTTP gives up.
        let mut records: Vec<Vec<u8>> = (0..10u64)
            .map(|i| {
                let record: &[u8] = if i % 2 == 0 {
                    b"\x16\x03\x01\x02\x00"
                } else {
                    b"\x01\x00\x01\xfc\x03\x03"
                };
                data_record(9, 4, 3, 100 + i, i < 6, record)
            })
            .collect();
        records.extend([
            tls(1_000, true, REQ),
            // The same request's ciphertext: skipped.
            data_record(9, 4, 3, 1_001, true, b"\x17\x03\x03\x00\x40garbage"),
            tls(2_000, false, RESP),
        ]);
        let out = feed(&mut t, &records);
        assert_eq!(out.len(), 1, "{out:#?}");
        let ex = out[0].0.as_http().unwrap();
        assert_eq!((ex.side, ex.status), (Side::Server, Some(200)));
        assert_eq!(t.stats().tls_conns, 1);
        // The handshake matched no protocol, but the connection is TLS, parsed after all.
        assert_eq!((t.stats().not_parsed, t.stats().tls_handshakes), (0, 1));
        assert_eq!(
            out[0].1.request_seq,
            Some(5_000),
            "the sequence number of the request's first record"
        );
    }
}
