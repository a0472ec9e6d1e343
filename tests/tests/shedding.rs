//! End-to-end: a CPU-bound traced server is captured within the overhead budget. nginx with one
//! worker under wrk (closed loop: as many requests as the worker can serve) is shed part of the
//! time, and the stats line counts the socket calls not captured and the time shed; every span
//! exported is a whole and correct request (no gap made a wrong one); and once the load stops,
//! capture is whole again: every later request is a span.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{Tracer, require_root, tempdir};
use tracer_e2e::{free_port, http_request};

/// The number before `label` in the stats line.
fn stat_before(stats: &str, label: &str) -> f64 {
    let at = stats
        .find(label)
        .unwrap_or_else(|| panic!("no `{label}` in: {stats}"));
    stats[..at]
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before `{label}` in: {stats}"))
}

/// Stops the tracer; returns what it printed, its stats line, and the governor's debug lines
/// (its view of each period, for failure messages).
fn stop_and_read(tracer: Tracer) -> (common::Stopped, String, String) {
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let stats = stopped
        .stderr
        .lines()
        .find(|l| l.contains("shedding"))
        .unwrap_or_else(|| panic!("no stats line: {}", stopped.stderr))
        .to_string();
    let governor = stopped
        .stderr
        .lines()
        .filter(|l| l.contains("capture share"))
        .collect::<Vec<_>>()
        .join("\n");
    (stopped, stats, governor)
}

#[test]
fn a_saturated_server_is_shed_within_its_budget_and_counted() {
    require_root();
    let dir = tempdir();
    let html = dir.join("html");
    std::fs::create_dir_all(&html).unwrap();
    // Gzipped on the fly at the highest level, each response costs the worker tens of
    // microseconds: one CPU-bound thread under wrk however fast or slow the machine.
    let page: String = (0..300u32)
        .map(|i| format!("{} ", i.wrapping_mul(2_654_435_761) % 100_000))
        .collect();
    std::fs::write(html.join("index.html"), page).unwrap();
    let port = free_port();
    let conf = dir.join("nginx.conf");
    let log = dir.join("access.log");
    // One worker, so that one thread is CPU-bound under wrk; a line of access log per request
    // counts what nginx served.
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ log_format count '.'; access_log {log} count; keepalive_requests 1000000; gzip on; gzip_comp_level 1; gzip_min_length 0; gzip_types text/html; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port}; root {h}; }} }}\n",
            d = dir.display(),
            log = log.display(),
            h = html.display()
        ),
    )
    .unwrap();
    let _nginx = common::spawn_nginx(&conf, port);
    // The governor's view of each period, for the failure messages below.
    let tracer = Tracer::run_nginx_json(
        port,
        &["--queue-size", "1000000"],
        &[("RUST_LOG", "info,tracer_user::governor=debug")],
    );

    let wrk = Command::new("wrk")
        .args(["-t2", "-c50", "-d4s", "-H", "Accept-Encoding: gzip"])
        .arg(format!("http://127.0.0.1:{port}/index.html"))
        .output()
        .expect("wrk (Debian package wrk)");
    assert!(wrk.status.success(), "{wrk:?}");
    // A line per request (nginx writes it as the request ends).
    std::thread::sleep(Duration::from_millis(200));
    let under_load =
        std::fs::read(&log).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count()) as u64;

    // The load is gone: within a period or two the process is captured whole again.
    std::thread::sleep(Duration::from_secs(1));
    const AFTER: usize = 10;
    for i in 0..AFTER {
        let (status, _) = http_request(
            &format!("127.0.0.1:{port}"),
            "GET",
            &format!("/index.html?after={i}"),
            None,
            &[],
        )
        .unwrap();
        assert_eq!(status, 200);
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while tracer.stdout().matches("after=").count() < AFTER && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (stopped, stats, governor) = stop_and_read(tracer);

    let mut spans = 0u64;
    let mut after = 0;
    let mut cut_off = 0;
    for line in stopped.stdout.lines().filter(|l| l.starts_with('{')) {
        let span: serde_json::Value = serde_json::from_str(line).unwrap();
        let tags = &span["tags"];
        assert_eq!(span["kind"], "SERVER", "{line}");
        assert_eq!(span["name"], "GET /index.html", "{line}");
        // wrk stops with a request in flight on some of its connections: nginx never answers
        // those. At most one a connection; every other span is a whole 200.
        if tags["error"] == "connection closed before response" {
            cut_off += 1;
        } else {
            assert_eq!(tags["http.status_code"], "200", "{line}");
        }
        let duration_us = span["duration"].as_u64().unwrap();
        assert!(duration_us < 1_000_000, "a gap made a long span: {line}");
        if tags["http.query"]
            .as_str()
            .is_some_and(|q| q.contains("after="))
        {
            after += 1;
        } else {
            spans += 1;
        }
    }
    assert!(
        cut_off <= 50,
        "{cut_off} requests cut off by wrk's 50 connections"
    );
    let not_captured = stat_before(&stats, "socket calls not captured");
    let shed_s = stat_before(&stats, "s shed");
    eprintln!(
        "{under_load} requests under load, {spans} spans; {not_captured} calls not captured, {shed_s} s shed"
    );
    assert!(
        not_captured > 0.0 && shed_s > 0.5,
        "a CPU-bound nginx worker was not shed: {stats}\n{}",
        governor
    );
    assert!(
        spans < under_load,
        "shed, yet every request is a span: {stats}"
    );
    // Captured a share of every period, and whole for the first period or two.
    assert!(
        spans * 50 > under_load,
        "{spans} spans of {under_load} requests: {stats}"
    );
    assert_eq!(
        after, AFTER,
        "requests after the load were not all captured: {stats}"
    );
    assert!(stats.contains(" 0 lost,"), "{stats}");
}

/// A single-threaded Python service that burns some milliseconds of CPU on each request (its
/// third argument) and then asks a backend (kept-alive connection) for the body: CPU-bound
/// under a closed loop, each of its requests making one client call. With a certificate and
/// key as fourth and fifth arguments it serves HTTPS and calls its backend over HTTPS.
const FRONTEND: &str = r#"
import http.client, http.server, ssl, sys, time
backend = int(sys.argv[2])
burn = int(sys.argv[3]) / 1000
tls = len(sys.argv) > 4
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    upstream = None
    def do_GET(self):
        until = time.process_time() + burn
        while time.process_time() < until:
            pass
        if H.upstream is None:
            if tls:
                H.upstream = http.client.HTTPSConnection("127.0.0.1", backend, timeout=10,
                    context=ssl._create_unverified_context())
            else:
                H.upstream = http.client.HTTPConnection("127.0.0.1", backend, timeout=10)
        H.upstream.request("GET", "/index.html")
        body = H.upstream.getresponse().read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
if tls:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[4], sys.argv[5])
    server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// Per-turn sampling keeps traces whole: a shed service's client calls are captured exactly
/// when the request they serve is (no orphan client span, no sampled request without its
/// call), and the context written into captured calls reaches the backend, which is not shed
/// and has every request as a span.
#[test]
fn a_shed_service_keeps_whole_traces() {
    shed_service_keeps_whole_traces(false, Connections::KeptAlive);
}

/// The same over HTTPS, both hops: the OpenSSL probes pick their turns by SSL object, and the
/// socket calls under them must follow. No header can carry the context inside TLS: each
/// captured call and its backend span share their `tracer.link` key instead.
#[test]
fn a_shed_tls_service_keeps_whole_traces() {
    shed_service_keeps_whole_traces(true, Connections::KeptAlive);
}

/// The same over a new HTTPS connection for each request, each request 20 ms of CPU: the
/// thread changes CPUs within requests, and its calls must still follow the request they
/// serve (going by the mark left on the CPU alone orphaned 26-31% of the calls).
#[test]
fn a_shed_tls_service_on_new_connections_keeps_whole_traces() {
    shed_service_keeps_whole_traces(true, Connections::OnePerRequest);
}

#[derive(Clone, Copy, PartialEq)]
enum Connections {
    /// wrk's one connection, kept alive; 4 ms of CPU a request.
    KeptAlive,
    /// Two of wrk's at a time, each closed after its request; 20 ms of CPU a request.
    OnePerRequest,
}

fn shed_service_keeps_whole_traces(tls: bool, connections: Connections) {
    require_root();
    let dir = tempdir();
    let (cert, key) = common::self_signed_certificate(&dir);
    // The backend closes its connection every 50 requests, so the frontend opens new ones
    // as it goes: each most likely in the memory of the socket it closed (with the
    // close_notify alert unread, over TLS), and none may be taken for its predecessor.
    let (_backend, backend_port) = if tls {
        common::start_nginx(
            &dir,
            " ssl",
            &format!(
                "keepalive_requests 50; ssl_certificate {}; ssl_certificate_key {};",
                cert.display(),
                key.display()
            ),
        )
    } else {
        common::start_nginx(&dir, "", "keepalive_requests 50;")
    };
    let port = free_port();
    let burn_ms = match connections {
        Connections::KeptAlive => "4",
        Connections::OnePerRequest => "20",
    };
    let mut frontend = Command::new("python3");
    frontend.args([
        "-c",
        FRONTEND,
        &port.to_string(),
        &backend_port.to_string(),
        burn_ms,
    ]);
    if tls {
        frontend.arg(&cert).arg(&key);
    }
    let _frontend = tracer_e2e::ChildGuard(frontend.spawn().expect("python3"));
    tracer_e2e::wait_for_port(port, Duration::from_secs(10));
    let scheme = if tls { "https" } else { "http" };
    // A budget of 0.2% of a CPU: the frontend's ~1,500 captured calls a second cost more.
    let tracer = Tracer::start_with_env(
        &[
            "run",
            "--comm",
            "python3",
            "--comm",
            "nginx",
            "--output",
            "json",
            "--overhead-budget",
            "0.2",
        ],
        &[("RUST_LOG", "info,tracer_user::governor=debug")],
    );
    let mut wrk = Command::new("wrk");
    match connections {
        Connections::KeptAlive => wrk.args(["-t1", "-c1", "-d6s"]),
        Connections::OnePerRequest => wrk.args(["-t1", "-c2", "-d6s", "-H", "Connection: close"]),
    };
    let wrk = wrk
        .arg(format!("{scheme}://127.0.0.1:{port}/"))
        .output()
        .expect("wrk (Debian package wrk)");
    assert!(wrk.status.success(), "{wrk:?}");
    let requests: usize = String::from_utf8_lossy(&wrk.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in")
                .map(|(n, _)| n.parse().unwrap())
        })
        .expect("wrk's request count");
    std::thread::sleep(Duration::from_secs(2));
    let (stopped, stats, governor) = stop_and_read(tracer);
    let shed_s = stat_before(&stats, "s shed");
    assert!(
        shed_s > 1.0,
        "the CPU-bound frontend was not shed: {stats}\n{}",
        governor
    );

    let spans: Vec<serde_json::Value> = stopped
        .stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |service: &str, kind: &str| -> Vec<&serde_json::Value> {
        spans
            .iter()
            .filter(|s| s["localEndpoint"]["serviceName"] == service && s["kind"] == kind)
            .collect()
    };
    let (served, calls, backend) = (
        of("python3", "SERVER"),
        of("python3", "CLIENT"),
        of("nginx", "SERVER"),
    );
    let id = |s: &serde_json::Value| s["id"].as_str().unwrap().to_string();
    let served_ids: std::collections::HashMap<String, &serde_json::Value> =
        served.iter().map(|s| (id(s), *s)).collect();
    let call_ids: std::collections::HashSet<String> = calls.iter().map(|s| id(s)).collect();
    let summary = format!(
        "{requests} requests; {} frontend server spans, {} client spans, {} backend spans; {stats}",
        served.len(),
        calls.len(),
        backend.len()
    );
    eprintln!("{summary}");
    assert!(
        served.len() > 20 && served.len() < requests * 9 / 10,
        "sampled, yet not a share of the requests: {summary}"
    );
    // Every client call captured is the child of a request captured, but the call of the
    // request wrk may have cut off at its end (no response, so no span).
    let mut orphans = Vec::new();
    for call in &calls {
        let parent = call["parentId"].as_str().unwrap_or_default();
        match served_ids.get(parent) {
            Some(server) => assert_eq!(call["traceId"], server["traceId"], "{call}"),
            None => orphans.push(call.to_string()),
        }
    }
    assert!(
        orphans.len() <= 1,
        "client spans without their parent:\n{}\n{summary}",
        orphans.join("\n")
    );
    // Every request captured has its call (but the one wrk may have cut off at its end).
    let with_call = served
        .iter()
        .filter(|s| calls.iter().any(|c| c["parentId"] == s["id"]))
        .count();
    assert!(
        with_call + 1 >= served.len(),
        "{} of {} sampled requests lack their client call: {summary}",
        served.len() - with_call,
        served.len()
    );
    // Whole requests only: a turn captured in part would parse as another request, or none.
    for span in served.iter().chain(&calls).chain(&backend) {
        let (name, status) = (&span["name"], &span["tags"]["http.status_code"]);
        let cut_off = span["tags"]["error"] == "connection closed before response";
        assert!(
            (name == "GET /" || name == "GET /index.html") && (status == "200" || cut_off),
            "not a whole request: {span}\n{summary}"
        );
    }
    // The backend, not shed, has every request.
    assert!(backend.len() + 1 >= requests, "{summary}");
    let ports: std::collections::HashSet<u64> = calls
        .iter()
        .filter_map(|c| c["localEndpoint"]["port"].as_u64())
        .collect();
    assert!(ports.len() > 1, "the frontend never reconnected: {summary}");
    // For a span that found no partner: the spans of `among` nearest in time, to show what
    // its partner's fields were.
    let nearest = |among: &[&serde_json::Value], s: &serde_json::Value| {
        let at = |s: &serde_json::Value| s["timestamp"].as_i64().unwrap_or_default();
        let mut by_time: Vec<&&serde_json::Value> = among.iter().collect();
        by_time.sort_by_key(|o| (at(o) - at(s)).abs());
        by_time
            .iter()
            .take(3)
            .map(|o| format!("  {o}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if tls {
        // Each captured call is one half of a hop whose other half is a backend span, and no
        // backend span carries a context.
        let link = |s: &serde_json::Value| s["tags"]["tracer.link"].as_str().map(str::to_string);
        let backend_links: std::collections::HashSet<String> =
            backend.iter().filter_map(|b| link(b)).collect();
        let (linked, unlinked): (Vec<&&serde_json::Value>, Vec<_>) = calls
            .iter()
            .partition(|c| link(c).is_some_and(|k| backend_links.contains(&k)));
        assert!(
            linked.len() + 1 >= calls.len(),
            "{} linked: {summary}\nunlinked calls, each with the backend spans nearest in time:\n{}",
            linked.len(),
            unlinked
                .iter()
                .take(5)
                .map(|c| format!("{c}\n{}", nearest(&backend, c)))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            backend.iter().all(|b| b["parentId"].is_null()),
            "a context inside TLS: {summary}"
        );
        return;
    }
    // Those of captured calls joined their trace, and no other carries a context (none was
    // written into a call not captured).
    let joined = backend
        .iter()
        .filter(|b| b["parentId"].as_str().is_some())
        .map(|b| {
            let parent = b["parentId"].as_str().unwrap();
            assert!(
                call_ids.contains(parent),
                "a backend span whose parent is no captured call: {b}\nthe calls nearest in time:\n{}\n{summary}",
                nearest(&calls, b)
            );
        })
        .count();
    assert!(joined + 1 >= calls.len(), "{joined} joined: {summary}");
}

/// A client that alternates 3 s of calls each after 0.5 ms of CPU work (CPU-bound: shed) with
/// 1 s of calls 2 ms apart (captured in full again), each call one send of a 1 MB POST, which
/// takes a third or so of the call's time: its process changes between shed and captured in
/// full several times, each time quite likely in the middle of a send. It waits for its
/// backend spinning, so that it is CPU-bound however fast the backend is. Starts when a line
/// comes on its standard input; prints its count of calls.
const FLAPPING_CLIENT: &str = r#"
import socket, sys, time
port, cycles = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()
body = b"x" * 1000000
request = b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
# Non-blocking from its connect (a timeout does it), as the injector wants it.
s = socket.create_connection(("127.0.0.1", port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.setblocking(False)
def call():
    # Spinning, never sleeping: the thread is CPU-bound whatever the backend's speed.
    left = memoryview(request)
    while left:
        try:
            left = left[s.send(left):]
        except BlockingIOError:
            pass
    got = b""
    while not got.endswith(b"ok\n"):
        try:
            more = s.recv(65536)
        except BlockingIOError:
            continue
        if not more:
            raise SystemExit("closed")
        got += more
calls = 0
for _ in range(cycles):
    for busy in (True, False):
        until = time.monotonic() + (3 if busy else 1)
        while time.monotonic() < until:
            if busy:
                burn = time.process_time() + 0.0005
                while time.process_time() < burn:
                    pass
            call()
            calls += 1
            if not busy:
                time.sleep(0.002)
s.close()
print(calls)
"#;

/// The flapping client's backend, not traced: reads each request in large reads into a large
/// receive buffer, and answers it. Its CPU is mostly free while the client sends, so that the
/// agent can run there: on a kernel without preemption it cannot take the client's CPU in the
/// middle of a send, and its changes of the client's capture mode must land in sends as often
/// as elsewhere. Prints its port, then, when the client closes, the span id of each
/// `traceparent` it received, one a line.
const HEADER_RECORDING_BACKEND: &str = r#"
import socket, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
srv.bind(("127.0.0.1", 0))
srv.listen()
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
buf = bytearray(8 << 20)
parents = []
got = b""
while True:
    while b"\r\n\r\n" not in got:
        n = conn.recv_into(buf, 4096)
        if n == 0:
            print("\n".join(parents), flush=True)
            raise SystemExit(0)
        got += bytes(buf[:n])
    head, rest = got.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
        elif name.lower() == b"traceparent":
            parents.append(value.strip().split(b"-")[2].decode())
    left = length - len(rest)
    while left > 0:
        left -= conn.recv_into(buf, min(left, len(buf)))
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    got = b""
"#;

/// The kernel writes a client span's context into a request inside its send, and the span is
/// reported when the send returns: a process shed or captured in full again in between must
/// neither lose the context (the span then took another id, and the backend's parent was no
/// captured call) nor leave the call uncaptured (the same, with no client span at all). Every
/// context the backend receives must be a client span's.
#[test]
fn a_send_under_way_when_shedding_starts_or_stops_keeps_its_context() {
    require_root();
    let mut backend = Command::new("python3")
        .args(["-c", HEADER_RECORDING_BACKEND])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut backend_out = std::io::BufReader::new(backend.stdout.take().unwrap());
    let mut port = String::new();
    std::io::BufRead::read_line(&mut backend_out, &mut port).unwrap();
    let _backend = tracer_e2e::ChildGuard(backend);
    let mut client = Command::new("python3")
        .args(["-c", FLAPPING_CLIENT, port.trim(), "5"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let client_pid = client.id().to_string();
    let tracer = Tracer::start_with_env(
        &[
            "run",
            "--pid",
            &client_pid,
            "--output",
            "json",
            "--overhead-budget",
            "0.2",
        ],
        &[("RUST_LOG", "info,tracer_user::governor=debug")],
    );
    std::io::Write::write_all(client.stdin.as_mut().unwrap(), b"go\n").unwrap();
    let client = client.wait_with_output().unwrap();
    assert!(client.status.success(), "{client:?}");
    let calls: usize = String::from_utf8_lossy(&client.stdout)
        .trim()
        .parse()
        .unwrap();
    let mut received = String::new();
    std::io::Read::read_to_string(&mut backend_out, &mut received).unwrap();
    let received: Vec<&str> = received.lines().filter(|l| !l.is_empty()).collect();
    std::thread::sleep(Duration::from_secs(2));
    let (stopped, stats, governor) = stop_and_read(tracer);
    // The governor's changes of the client's share from full capture (shed), or back to it.
    let changes: Vec<(&str, bool)> = governor
        .lines()
        .filter(|l| l.contains(&format!("pid {client_pid}:")))
        .filter_map(|l| {
            let (from, to) = l.split_once("capture share ")?.1.split_once(" -> ")?;
            let (from_full, to_full) = (from == "1.000", to.trim() == "1.000");
            (from_full != to_full).then_some((l, to_full))
        })
        .collect();
    let shed = changes.iter().filter(|(_, to_full)| !to_full).count();
    let resumed = changes.len() - shed;
    let client_spans: std::collections::HashSet<String> = stopped
        .stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|s| s["kind"] == "CLIENT")
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let summary = format!(
        "{calls} calls, shed {shed} times, captured in full again {resumed} times; {} client spans, {} contexts received; {stats}",
        client_spans.len(),
        received.len(),
    );
    eprintln!("{summary}");
    // Five times each in a quiet run; three with a busy loop beside it.
    assert!(
        shed >= 2 && resumed >= 2,
        "the client did not flap: {summary}\n{governor}"
    );
    let orphans: Vec<&&str> = received
        .iter()
        .filter(|id| !client_spans.contains(**id))
        .collect();
    assert!(
        orphans.is_empty(),
        "{} contexts received are no client span's: {orphans:?}\n{summary}\nthe changes:\n{}",
        orphans.len(),
        changes
            .iter()
            .map(|(l, _)| *l)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Shed a good part of the time, captured in full the rest: many calls carried a context.
    assert!(
        received.len() * 4 > calls && received.len() < calls,
        "{summary}"
    );
}
