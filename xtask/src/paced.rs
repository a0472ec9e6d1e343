//! `cargo xtask paced-load`: an open-loop HTTP/1.1 load generator for loopback servers.
//!
//! wrk and its kin are closed-loop: a connection sends its next request when the previous
//! response has arrived, so a server that stalls is offered less load, and the stall hides in
//! the measurement (coordinated omission). Here request k of the run is due at start + k/rate
//! whatever happened before; requests go round-robin over keep-alive connections, and latency is
//! measured from when a request was due, not from when it could be sent. That gives a fixed,
//! known offered load: what a check like "every request of a 20,000 req/s run became a span"
//! needs.
//!
//! A few worker threads each own some of the connections. A worker sleeps (`thread::sleep`, no
//! spinning) until its next request is due, or for one [`TICK`] while responses are
//! outstanding; when it wakes, it reads what has arrived (epoll, without waiting) and sends what
//! is due. It never wakes for a socket: on a VM a wake-up can cost more than the request itself,
//! and waking at most once per tick rather than once per response and once per request is what
//! keeps the generator to about half a core at 20,000 requests/s on 2 vCPUs (most of it the
//! kernel's loopback TCP path, which runs the server's receive side in the sender's context).

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    fmt,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

/// How often a worker looks for responses while some are outstanding, and the shortest it
/// sleeps: the resolution of the latencies (a response is timed when it is read, up to a tick
/// after it arrived) and the most a request is held back to go out with others.
const TICK: Duration = Duration::from_micros(100);
/// A request sent later than this after its due time is counted as late.
const LATE: Duration = Duration::from_millis(1);
/// How long after the end of the run outstanding responses may still arrive.
const DRAIN: Duration = Duration::from_secs(2);
/// Head start between spawning the workers and the first request, so that request 0 is not
/// late because a thread was still starting.
const START_LEAD: Duration = Duration::from_millis(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A reconnection blocks its worker (and so the other connections it drives): keep it short.
/// On loopback a connection is accepted or refused at once, unless the listen queue is full.
const RECONNECT_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_HEAD: usize = 64 * 1024;
const MAX_LINE: usize = 8 * 1024;

/// What to offer: `rate` requests per second in total, for `duration`, over `connections`
/// keep-alive connections to a loopback `addr`.
#[derive(Clone, Debug)]
pub struct PacedLoad {
    pub addr: SocketAddr,
    pub path: String,
    /// Requests per second, over all connections.
    pub rate: u32,
    pub connections: u32,
    pub duration: Duration,
}

#[derive(Clone, Debug)]
pub struct PacedResult {
    /// Requests issued at their turn (each then counts in `ok` or in `errors`).
    pub sent: u64,
    /// 2xx responses read completely.
    pub ok: u64,
    /// Failed requests (connection refused or reset, malformed or non-2xx response, no
    /// response before the end of the drain time), plus connections that broke between
    /// requests.
    pub errors: u64,
    /// Requests sent more than 1 ms after their due time.
    pub late: u64,
    /// Median latency of the `ok` requests (NaN if none): from the request's due time to the
    /// response's last byte, as read by the generator (at most a [`TICK`] after it arrived, so
    /// never an under-estimate).
    pub p50_us: f64,
    /// 99th percentile of the same.
    pub p99_us: f64,
    /// `sent` per second of the run's duration: requests that could not go out before the end
    /// (because the server or the generator fell behind) make it fall short of the rate asked.
    pub achieved_rate: f64,
    /// From the first request's due time until the last response was read (or given up).
    pub elapsed: Duration,
}

impl fmt::Display for PacedResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent={} ok={} errors={} late={} p50_us={:.1} p99_us={:.1} rate={:.1} elapsed_s={:.3}",
            self.sent,
            self.ok,
            self.errors,
            self.late,
            self.p50_us,
            self.p99_us,
            self.achieved_rate,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Arguments of `cargo xtask paced-load`.
#[derive(clap::Args)]
pub struct PacedLoadArgs {
    /// Server address; must be loopback (127.0.0.0/8 or [::1]).
    #[arg(long)]
    addr: SocketAddr,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Requests per second, over all connections.
    #[arg(long)]
    rate: u32,
    /// Keep-alive connections (each has at most one request outstanding).
    #[arg(long, default_value_t = 50)]
    connections: u32,
    /// Length of the run.
    #[arg(long, default_value_t = 8)]
    duration_secs: u64,
    /// Worker threads [default: the fewer of the connections and twice the cores].
    #[arg(long)]
    workers: Option<usize>,
}

/// `cargo xtask paced-load`: runs the load and prints one line of results.
pub fn paced_load(args: &PacedLoadArgs) -> anyhow::Result<()> {
    let load = PacedLoad {
        addr: args.addr,
        path: args.path.clone(),
        rate: args.rate,
        connections: args.connections,
        duration: Duration::from_secs(args.duration_secs),
    };
    let workers = args.workers.unwrap_or_else(|| default_workers(&load));
    let result = run_with_workers(&load, workers)?;
    println!("{result}");
    Ok(())
}

/// Offers `load` and reports what came back. Returns once every response has been read, or at
/// most [`DRAIN`] after the end of the run.
pub fn run(load: &PacedLoad) -> anyhow::Result<PacedResult> {
    run_with_workers(load, default_workers(load))
}

/// A worker per core: each more cost about a tenth of a core at 20k req/s on two vCPUs (its
/// wakeups), with no fewer late requests.
fn default_workers(load: &PacedLoad) -> usize {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    (load.connections as usize).min(cores)
}

/// [`run`] with `workers` threads (at most one per connection).
pub fn run_with_workers(load: &PacedLoad, workers: usize) -> anyhow::Result<PacedResult> {
    // This tool only ever loads the machine it runs on.
    ensure!(
        load.addr.ip().is_loopback(),
        "refusing to load {}: only loopback addresses (127.0.0.0/8, ::1) are allowed",
        load.addr
    );
    ensure!(
        load.path.starts_with('/') && !load.path.bytes().any(|b| b == b' ' || b.is_ascii_control()),
        "the path must start with '/' and have no spaces or control characters: {:?}",
        load.path
    );
    ensure!(load.rate > 0, "the rate must be positive");
    ensure!(workers > 0, "there must be at least one worker");
    ensure!(
        load.connections > 0,
        "there must be at least one connection"
    );
    let total = u64::try_from(u128::from(load.rate) * load.duration.as_nanos() / 1_000_000_000)
        .context("the run is too long")?;
    ensure!(total > 0, "at this rate and duration, no request is due");

    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: xtask-paced-load\r\n\r\n",
        load.path, load.addr
    )
    .into_bytes();
    let workers = workers.min(load.connections as usize);

    // Connect before the clock starts: connection setup is not part of the offered load, and a
    // server that is not there is a mistake to report, not a run of errors.
    let mut owned: Vec<Vec<(u64, Conn)>> = (0..workers).map(|_| Vec::new()).collect();
    for c in 0..load.connections {
        let stream = connect(load.addr, CONNECT_TIMEOUT)
            .with_context(|| format!("cannot connect to {}", load.addr))?;
        owned[c as usize % workers].push((u64::from(c), Conn::new(stream)));
    }

    let start = Instant::now() + START_LEAD;
    let schedule = Schedule {
        start,
        end: start + load.duration,
        rate: u64::from(load.rate),
        total,
        stride: u64::from(load.connections),
    };
    let workers = owned
        .into_iter()
        .map(|conns| Worker::new(load.addr, &request, schedule, conns))
        .collect::<io::Result<Vec<_>>>()
        .context("cannot set up a worker")?;
    let stats = thread::scope(|s| {
        let handles: Vec<_> = workers
            .into_iter()
            .map(|worker| s.spawn(move || worker.run()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a paced-load worker panicked"))
            .collect::<io::Result<Vec<Stats>>>()
    })
    .context("paced load")?;
    let elapsed = start.elapsed();

    let mut all = Stats::default();
    for st in stats {
        all.sent += st.sent;
        all.ok += st.ok;
        all.errors += st.errors;
        all.late += st.late;
        all.latencies_ns.extend(st.latencies_ns);
    }
    all.latencies_ns.sort_unstable();
    Ok(PacedResult {
        sent: all.sent,
        ok: all.ok,
        errors: all.errors,
        late: all.late,
        p50_us: percentile_us(&all.latencies_ns, 0.50),
        p99_us: percentile_us(&all.latencies_ns, 0.99),
        achieved_rate: all.sent as f64 / load.duration.as_secs_f64(),
        elapsed,
    })
}

/// Nearest-rank percentile of sorted nanoseconds, in microseconds.
fn percentile_us(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted_ns.len() as f64).ceil() as usize;
    sorted_ns[rank.clamp(1, sorted_ns.len()) - 1] as f64 / 1e3
}

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    // Each request is one small write: Nagle could only hold one back, waiting for an ACK.
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    end: Instant,
    rate: u64,
    /// Requests in the whole run.
    total: u64,
    /// Requests between two on the same connection: the number of connections.
    stride: u64,
}

impl Schedule {
    fn due(&self, k: u64) -> Instant {
        // From k, not by adding up intervals, so that rounding never drifts.
        let ns = u128::from(k) * 1_000_000_000 / u128::from(self.rate);
        self.start + Duration::from_nanos(ns as u64)
    }
}

#[derive(Default)]
struct Stats {
    sent: u64,
    ok: u64,
    errors: u64,
    late: u64,
    latencies_ns: Vec<u64>,
}

struct Conn {
    /// None after a failure or a close by the server: the next request reconnects.
    stream: Option<TcpStream>,
    /// The outstanding request, if any (never more than one: no pipelining).
    job: Option<Job>,
    /// Received bytes the parser could not use yet (an incomplete head or chunk line).
    pending: Vec<u8>,
    /// Whether epoll watches for room to write the rest of a request.
    watching_out: bool,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream: Some(stream),
            job: None,
            pending: Vec::new(),
            watching_out: false,
        }
    }

    fn close(&mut self) {
        // Closing the socket also takes it out of the epoll set.
        self.stream = None;
        self.pending.clear();
        self.watching_out = false;
    }
}

struct Job {
    k: u64,
    due: Instant,
    written: usize,
    response: ResponseParser,
}

struct Worker<'a> {
    addr: SocketAddr,
    request: &'a [u8],
    schedule: Schedule,
    conns: Vec<Conn>,
    /// Each idle connection's next request, as (k, index in `conns`): ordered by k, hence by
    /// due time. A connection still waiting for a response has no entry; it gets one when the
    /// response is complete, so its next request waits for it.
    queue: BinaryHeap<Reverse<(u64, usize)>>,
    /// Connections with a request outstanding.
    outstanding: u64,
    poller: Poller,
    stats: Stats,
}

impl<'a> Worker<'a> {
    /// `conns` are (connection number, connection): connection c sends requests c,
    /// c + connections, c + 2 * connections...
    fn new(
        addr: SocketAddr,
        request: &'a [u8],
        schedule: Schedule,
        conns: Vec<(u64, Conn)>,
    ) -> io::Result<Self> {
        let poller = Poller::new(conns.len())?;
        let mut queue = BinaryHeap::with_capacity(conns.len());
        for (i, (c, conn)) in conns.iter().enumerate() {
            if let Some(stream) = &conn.stream {
                poller.add(stream, i)?;
            }
            if *c < schedule.total {
                queue.push(Reverse((*c, i)));
            }
        }
        let share = (schedule.total / schedule.stride + 1) * conns.len() as u64;
        Ok(Self {
            addr,
            request,
            schedule,
            conns: conns.into_iter().map(|(_, conn)| conn).collect(),
            queue,
            outstanding: 0,
            poller,
            stats: Stats {
                latencies_ns: Vec::with_capacity(share as usize),
                ..Stats::default()
            },
        })
    }

    fn run(mut self) -> io::Result<Stats> {
        let give_up = self.schedule.end + DRAIN;
        let mut scratch = vec![0u8; 16 * 1024];
        loop {
            // Responses first, so that a connection whose response is in can send its next
            // request in this same wake-up; idle connections the server closed are noticed
            // here too, before a request is written into them.
            let ready = self.poller.ready()?;
            for j in 0..ready {
                let event = self.poller.events[j];
                let (flags, i) = (event.events as i32, event.u64 as usize);
                if flags & libc::EPOLLOUT != 0 {
                    self.flush(i);
                }
                if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
                    self.receive(i, &mut scratch);
                }
            }
            let now = Instant::now();
            if now < self.schedule.end {
                while let Some(&Reverse((k, i))) = self.queue.peek() {
                    if self.schedule.due(k) > now {
                        break;
                    }
                    self.queue.pop();
                    self.send(i, k);
                }
            } else {
                // The run is over: what is still due is not sent.
                self.queue.clear();
            }
            if self.queue.is_empty() && self.outstanding == 0 {
                break;
            }
            if now >= give_up {
                self.stats.errors += self.outstanding;
                break;
            }
            let mut wake = self
                .queue
                .peek()
                .map_or(give_up, |&Reverse((k, _))| self.schedule.due(k));
            if self.outstanding > 0 {
                wake = wake.min(now + TICK);
            }
            // Never less than a tick: requests due within one go out together.
            thread::sleep(wake.saturating_duration_since(Instant::now()).max(TICK));
        }
        Ok(self.stats)
    }

    fn send(&mut self, i: usize, k: u64) {
        let due = self.schedule.due(k);
        self.stats.sent += 1;
        if self.conns[i].stream.is_none() {
            let reconnected = connect(self.addr, RECONNECT_TIMEOUT)
                .and_then(|stream| self.poller.add(&stream, i).map(|()| stream));
            match reconnected {
                Ok(stream) => self.conns[i].stream = Some(stream),
                Err(_) => {
                    self.stats.errors += 1;
                    self.next_after(i, k);
                    return;
                }
            }
        }
        if Instant::now().saturating_duration_since(due) > LATE {
            self.stats.late += 1;
        }
        self.conns[i].job = Some(Job {
            k,
            due,
            written: 0,
            response: ResponseParser::default(),
        });
        self.outstanding += 1;
        self.flush(i);
    }

    /// Writes what is left of the outstanding request. A request is small and goes into an
    /// empty socket buffer, so this is one write; but if the buffer is full, the rest goes when
    /// epoll says there is room.
    fn flush(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        let (Some(stream), Some(job)) = (&mut conn.stream, &mut conn.job) else {
            return;
        };
        while job.written < self.request.len() {
            match stream.write(&self.request[job.written..]) {
                Ok(0) => return self.fail(i),
                Ok(n) => job.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !conn.watching_out && self.poller.watch(stream, i, true).is_err() {
                        return self.fail(i);
                    }
                    conn.watching_out = true;
                    return;
                }
                Err(_) => return self.fail(i),
            }
        }
        if conn.watching_out {
            if self.poller.watch(stream, i, false).is_err() {
                return self.fail(i);
            }
            conn.watching_out = false;
        }
    }

    /// Reads the connection's response, as much of it as has arrived: the next look is a tick
    /// away.
    fn receive(&mut self, i: usize, scratch: &mut [u8]) {
        loop {
            let conn = &mut self.conns[i];
            let Some(stream) = &mut conn.stream else {
                return;
            };
            let n = match stream.read(scratch) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.fail(i),
            };
            let Some(job) = &mut conn.job else {
                // Between requests, a close is ordinary keep-alive behaviour (the server's idle
                // timeout or request limit); bytes nobody asked for are not.
                if n > 0 {
                    self.stats.errors += 1;
                }
                conn.close();
                return;
            };
            if n == 0 {
                if job.response.state == State::UntilEof {
                    job.response.state = State::Done;
                    return self.complete(i);
                }
                return self.fail(i);
            }
            let data = &scratch[..n];
            // Body bytes are consumed straight from the read buffer; only what the parser
            // cannot use yet (part of a head or chunk line) is kept.
            let parsed = if conn.pending.is_empty() {
                job.response
                    .advance(data)
                    .map(|used| conn.pending.extend_from_slice(&data[used..]))
            } else {
                conn.pending.extend_from_slice(data);
                job.response.advance(&conn.pending).map(|used| {
                    conn.pending.drain(..used);
                })
            };
            match parsed {
                Err(_) => return self.fail(i),
                // Whatever came with the response stays in `pending`, for `complete` to see.
                Ok(()) if job.response.state == State::Done => return self.complete(i),
                Ok(()) => {}
            }
        }
    }

    fn complete(&mut self, i: usize) {
        let now = Instant::now();
        let conn = &mut self.conns[i];
        let job = conn
            .job
            .take()
            .expect("a response completes an outstanding request");
        self.outstanding -= 1;
        // With one request outstanding, bytes after the response cannot belong to anything:
        // the exchange is out of step, and this connection cannot be trusted any more.
        let stray = !conn.pending.is_empty();
        if (200..300).contains(&job.response.status) && !stray {
            self.stats.ok += 1;
            let latency = now.saturating_duration_since(job.due);
            self.stats.latencies_ns.push(latency.as_nanos() as u64);
        } else {
            self.stats.errors += 1;
        }
        if job.response.close || stray {
            conn.close();
        }
        self.next_after(i, job.k);
    }

    /// The outstanding request failed: count it, drop the connection (the next request on it
    /// reconnects) and go on with the schedule.
    fn fail(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        conn.close();
        if let Some(job) = conn.job.take() {
            self.outstanding -= 1;
            self.stats.errors += 1;
            self.next_after(i, job.k);
        }
    }

    fn next_after(&mut self, i: usize, k: u64) {
        let next = k + self.schedule.stride;
        if next < self.schedule.total {
            self.queue.push(Reverse((next, i)));
        }
    }
}

/// A worker's connections in an epoll set, asked without waiting which are ready: unlike
/// poll, epoll costs nothing for the connections that are not.
struct Poller {
    epoll: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Poller {
    fn new(connections: usize) -> io::Result<Self> {
        // SAFETY: a plain system call; its result is checked before being owned.
        let epoll = unsafe { owned_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC))? };
        Ok(Self {
            epoll,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; connections.max(1)],
        })
    }

    /// Watches a connection, whose events carry `i`.
    fn add(&self, stream: &TcpStream, i: usize) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, stream, libc::EPOLLIN, i)
    }

    /// Watches a connection for room to write too, or no longer.
    fn watch(&self, stream: &TcpStream, i: usize, writable: bool) -> io::Result<()> {
        let events = if writable {
            libc::EPOLLIN | libc::EPOLLOUT
        } else {
            libc::EPOLLIN
        };
        self.ctl(libc::EPOLL_CTL_MOD, stream, events, i)
    }

    fn ctl(
        &self,
        op: libc::c_int,
        stream: &TcpStream,
        events: libc::c_int,
        i: usize,
    ) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: i as u64,
        };
        // SAFETY: `event` is a valid epoll_event for the call; the kernel copies it.
        let r =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, stream.as_raw_fd(), &mut event) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Fills `events` with the connections ready now, without waiting, and says how many.
    fn ready(&mut self) -> io::Result<usize> {
        // SAFETY: `events` is a valid array of `events.len()` epoll_events to fill in.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        Ok(n as usize)
    }
}

/// # Safety
/// `fd` must be -1 (an error, read from errno) or a new file descriptor nothing else owns.
unsafe fn owned_fd(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: per this function's contract.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Head,
    /// Bytes left of a Content-Length body.
    Body(u64),
    ChunkSize,
    /// Bytes left of a chunk.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailer,
    /// No length given: the body ends when the server closes the connection.
    UntilEof,
    Done,
}

/// Reads one HTTP/1.1 response incrementally, from bytes as they arrive.
#[derive(Debug, Default)]
struct ResponseParser {
    state: State,
    status: u16,
    /// The server closes the connection after this response.
    close: bool,
}

impl ResponseParser {
    /// Consumes what it can of `buf` (the received bytes it has not consumed yet) and returns
    /// how many bytes it used; the caller keeps the rest and passes it again with what comes
    /// next. The response is complete when `state` is `Done`.
    fn advance(&mut self, buf: &[u8]) -> Result<usize, &'static str> {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match self.state {
                State::Head => {
                    let Some(end) = find(rest, b"\r\n\r\n") else {
                        return if rest.len() > MAX_HEAD {
                            Err("response head too long")
                        } else {
                            Ok(pos)
                        };
                    };
                    self.head(&rest[..end])?;
                    pos += end + 4;
                }
                State::Body(left) | State::ChunkData(left) => {
                    if rest.is_empty() {
                        return Ok(pos);
                    }
                    let take = left.min(rest.len() as u64);
                    pos += take as usize;
                    self.state = match (self.state, left - take) {
                        (State::Body(_), 0) => State::Done,
                        (State::Body(_), left) => State::Body(left),
                        (_, 0) => State::ChunkEnd,
                        (_, left) => State::ChunkData(left),
                    };
                }
                State::ChunkSize => {
                    let Some(line) = line(rest)? else {
                        return Ok(pos);
                    };
                    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                    // After the size, only chunk extensions (";name=value") or whitespace.
                    let after = &line[digits..];
                    if digits == 0
                        || digits > 15
                        || !(after.is_empty() || matches!(after[0], b';' | b' ' | b'\t'))
                    {
                        return Err("bad chunk size");
                    }
                    // At most 15 ASCII hex digits: valid UTF-8, and a u64.
                    let size = std::str::from_utf8(&line[..digits])
                        .ok()
                        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                        .ok_or("bad chunk size")?;
                    pos += line.len() + 2;
                    self.state = if size == 0 {
                        State::Trailer
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkEnd => {
                    if rest.len() < 2 {
                        return Ok(pos);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err("chunk data longer than its size");
                    }
                    pos += 2;
                    self.state = State::ChunkSize;
                }
                State::Trailer => {
                    let Some(line) = line(rest)? else {
                        return Ok(pos);
                    };
                    pos += line.len() + 2;
                    if line.is_empty() {
                        self.state = State::Done;
                    }
                }
                State::UntilEof => return Ok(buf.len()),
                State::Done => return Ok(pos),
            }
        }
    }

    /// Reads the status line and the headers that say how the body ends.
    fn head(&mut self, head: &[u8]) -> Result<(), &'static str> {
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let status_line = lines.next().unwrap_or_default();
        let (http10, status) = match status_line.strip_prefix(b"HTTP/1.") {
            Some([minor, b' ', a, b, c, rest @ ..])
                if (rest.is_empty() || rest[0] == b' ')
                    && [a, b, c].iter().all(|d| d.is_ascii_digit()) =>
            {
                let status = [a, b, c]
                    .iter()
                    .fold(0u16, |n, &&d| n * 10 + u16::from(d - b'0'));
                (*minor == b'0', status)
            }
            _ => return Err("bad status line"),
        };
        let mut length: Option<u64> = None;
        let mut encoded = false;
        let mut chunked = false;
        let mut close = http10;
        for line in lines {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Err("bad header line");
            };
            let name = &line[..colon];
            let value = line[colon + 1..].trim_ascii();
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = std::str::from_utf8(value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse().ok())
                    .ok_or("bad Content-Length")?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length");
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                encoded = true;
                // Chunked, if anything, is the last coding applied.
                chunked = value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        close = false;
                    }
                }
            }
        }
        self.status = status;
        self.close = close;
        self.state = match status {
            // An interim response: the real one follows.
            100 | 102..=199 => State::Head,
            101 => return Err("unexpected protocol switch"),
            204 | 304 => State::Done,
            _ if chunked => State::ChunkSize,
            _ if encoded => State::UntilEof,
            _ => match length {
                Some(0) => State::Done,
                Some(n) => State::Body(n),
                None => State::UntilEof,
            },
        };
        if self.state == State::UntilEof {
            self.close = true;
        }
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The line at the start of `buf`, without its CRLF, once it has all arrived.
fn line(buf: &[u8]) -> Result<Option<&[u8]>, &'static str> {
    match find(buf, b"\r\n") {
        Some(end) => Ok(Some(&buf[..end])),
        None if buf.len() > MAX_LINE => Err("line too long"),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader},
        net::TcpListener,
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
    };

    use super::*;

    const CHUNKED_BODY: &[u8] = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n";

    /// A keep-alive HTTP/1.1 server on 127.0.0.1 that counts the requests it answers.
    /// `/chunked` answers with a chunked body, `/close` with `Connection: close` (and closes),
    /// `/big` with a 64 KiB body, `/silent` never answers; anything else with a short
    /// Content-Length body.
    fn server() -> (SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&count);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let counter = Arc::clone(&counter);
                thread::spawn(move || serve(stream, &counter));
            }
        });
        (addr, count)
    }

    fn serve(stream: TcpStream, count: &AtomicU64) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut out = stream;
        loop {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                return;
            }
            let mut has_host = false;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    return;
                }
                if header == "\r\n" {
                    break;
                }
                has_host |= header.to_ascii_lowercase().starts_with("host:");
            }
            assert!(has_host, "HTTP/1.1 requests must have a Host header");
            let path = request_line
                .split(' ')
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            if path == "/silent" {
                continue;
            }
            // Counted before answering: once the client has read a response, it is counted.
            count.fetch_add(1, Ordering::SeqCst);
            let response: Vec<u8> = match path.as_str() {
                "/chunked" => [
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                    CHUNKED_BODY,
                ]
                .concat(),
                "/close" => {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".to_vec()
                }
                "/big" => {
                    let body = vec![b'x'; 64 * 1024];
                    [
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                            .as_bytes(),
                        &body,
                    ]
                    .concat()
                }
                _ => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            };
            if out.write_all(&response).is_err() || path == "/close" {
                return;
            }
        }
    }

    fn load(addr: SocketAddr, path: &str, rate: u32, connections: u32, ms: u64) -> PacedLoad {
        PacedLoad {
            addr,
            path: path.into(),
            rate,
            connections,
            duration: Duration::from_millis(ms),
        }
    }

    /// One second of `rate` requests/s on `path`: every one is sent on time and answered.
    fn assert_all_ok(path: &str, rate: u32, connections: u32, workers: Option<usize>) {
        let (addr, count) = server();
        let load = load(addr, path, rate, connections, 1000);
        let r = match workers {
            Some(workers) => run_with_workers(&load, workers),
            None => run(&load),
        }
        .unwrap();
        let expected = f64::from(rate);
        assert!((r.sent as f64 - expected).abs() <= 0.02 * expected, "{r}");
        assert_eq!(r.ok, r.sent, "{r}");
        assert_eq!(r.errors, 0, "{r}");
        assert_eq!(count.load(Ordering::SeqCst), r.sent, "{r}");
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us, "{r}");
        assert!((r.achieved_rate - expected).abs() <= 0.02 * expected, "{r}");
        assert!(r.elapsed < Duration::from_secs(3), "{r}");
    }

    #[test]
    fn paces_keep_alive_requests_and_reads_every_response() {
        assert_all_ok("/index.html", 2000, 4, None);
    }

    #[test]
    fn reads_chunked_responses() {
        assert_all_ok("/chunked", 2000, 4, None);
    }

    #[test]
    fn reconnects_without_errors_when_the_server_closes() {
        assert_all_ok("/close", 2000, 4, None);
    }

    #[test]
    fn one_worker_drives_many_connections_and_large_bodies() {
        assert_all_ok("/big", 500, 8, Some(1));
    }

    #[test]
    fn refuses_non_loopback_addresses() {
        for addr in [
            "192.0.2.1:80",
            "10.0.0.1:8080",
            "[2001:db8::1]:80",
            "0.0.0.0:80",
        ] {
            let err = run(&load(addr.parse().unwrap(), "/", 10, 1, 100)).unwrap_err();
            assert!(err.to_string().contains("loopback"), "{addr}: {err}");
        }
    }

    #[test]
    fn stops_when_the_server_never_answers() {
        let (addr, _) = server();
        let started = Instant::now();
        let r = run(&load(addr, "/silent", 100, 2, 500)).unwrap();
        // Each connection's first request never completes, so the later ones never go out.
        assert_eq!((r.sent, r.ok, r.errors), (2, 0, 2), "{r}");
        assert!(r.p50_us.is_nan());
        assert!(started.elapsed() < Duration::from_millis(500) + DRAIN + Duration::from_secs(1));
    }

    /// Feeds `bytes` in pieces of `step`, keeping what the parser leaves, as `Worker` does.
    fn parse_in_pieces(bytes: &[u8], step: usize) -> (ResponseParser, usize) {
        let mut parser = ResponseParser::default();
        let mut pending = Vec::new();
        for piece in bytes.chunks(step) {
            pending.extend_from_slice(piece);
            let used = parser.advance(&pending).unwrap();
            pending.drain(..used);
        }
        (parser, pending.len())
    }

    #[test]
    fn parses_chunked_bodies_split_anywhere() {
        let response = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n".as_slice(),
            b"a\r\n0123456789\r\nA;x=\"y\"\r\n0123456789\r\n0\r\n\r\n",
        ]
        .concat();
        for step in 1..=response.len() {
            let (parser, left) = parse_in_pieces(&response, step);
            assert_eq!((parser.state, parser.status, left), (State::Done, 200, 0));
            // Not complete until the very last byte.
            let (parser, _) = parse_in_pieces(&response[..response.len() - 1], step);
            assert_ne!(parser.state, State::Done, "step {step}");
        }
        let with_trailer = [
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".as_slice(),
            CHUNKED_BODY,
        ]
        .concat();
        assert_eq!(parse_in_pieces(&with_trailer, 3).0.state, State::Done);
    }

    #[test]
    fn parses_content_length_and_interim_responses() {
        let response = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nConnection: close\r\n\r\nnot";
        for step in 1..=response.len() {
            let (parser, left) = parse_in_pieces(response, step);
            assert_eq!(
                (parser.state, parser.status, parser.close, left),
                (State::Done, 404, true, 0)
            );
        }
        let mut parser = ResponseParser::default();
        assert_eq!(parser.advance(b"HTTP/1.1 204 No Content\r\n\r\n"), Ok(27));
        assert_eq!(parser.state, State::Done);
        let mut parser = ResponseParser::default();
        parser.advance(b"HTTP/1.0 200 OK\r\n\r\nbody").unwrap();
        assert_eq!((parser.state, parser.close), (State::UntilEof, true));
    }

    #[test]
    fn rejects_malformed_responses() {
        for bad in [
            b"HTTP/2 200 OK\r\n\r\n".as_slice(),
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
        ] {
            let mut parser = ResponseParser::default();
            assert!(
                parser.advance(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
