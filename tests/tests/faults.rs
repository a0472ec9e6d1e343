//! Faults of the collector never stop capture: it is down when the tracer starts, answers
//! 500s, is slow, or drops connections mid-run. Spans wait in the bounded queue, export
//! resumes when the collector is back, and nothing is lost while the queue has room.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{Client, PythonServer, Tracer, require_root};
use tracer_e2e::Collector;

/// Sends `n` requests on one kept-alive connection, all answered 200.
fn send(server: &PythonServer, n: usize) {
    let mut client = Client::connect(server.port);
    for _ in 0..n {
        assert_eq!(client.get("/hello").status, 200);
    }
}

#[test]
fn collector_faults_do_not_lose_queued_spans() {
    require_root();
    let collector = Collector::start();
    let server = PythonServer::start();
    let pid = server.pid().to_string();

    // Down at start: every POST fails (500), capture goes on.
    collector.set_fault("500", 0);
    let tracer = Tracer::attach_exporting(
        &pid,
        &collector.url(),
        &[
            "--flush-interval-ms",
            "100",
            "--batch-size",
            "10",
            "--stats-interval",
            "1",
        ],
    );
    send(&server, 20);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        collector.spans().is_empty(),
        "nothing accepted while the collector fails"
    );

    // Slow (each POST takes a second) and then dropping connections: more requests meanwhile.
    collector.set_fault("slow", 1000);
    send(&server, 20);
    collector.set_fault("drop", 0);
    send(&server, 20);
    std::thread::sleep(Duration::from_millis(500));

    // Back: everything queued arrives, exactly once per request.
    collector.set_fault("none", 0);
    let spans = collector.wait_for_spans(60, Duration::from_secs(60));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    // Retries of a batch whose POST was accepted but whose answer was lost may repeat spans;
    // count distinct ids.
    let mut ids: Vec<&str> = spans.iter().map(|s| s["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        60,
        "every request exported once the collector is back: {} spans",
        spans.len()
    );
    assert!(
        stopped.stderr.contains("cannot export to"),
        "the outage was reported:\n{}",
        stopped.stderr
    );
    assert!(
        stopped.stderr.contains("collector is back"),
        "the recovery was reported:\n{}",
        stopped.stderr
    );
    let summary = stopped
        .stderr
        .lines()
        .rfind(|l| l.starts_with("tracer: "))
        .unwrap();
    assert!(
        summary.contains("0 dropped (queue full), 0 failed"),
        "{summary}"
    );
}

/// A queue smaller than the outage drops the excess, counts it, and keeps capturing.
#[test]
fn a_full_queue_drops_and_counts() {
    require_root();
    let collector = Collector::start();
    let server = PythonServer::start();
    let pid = server.pid().to_string();
    collector.set_fault("503", 0);
    let tracer = Tracer::attach_exporting(
        &pid,
        &collector.url(),
        &[
            "--flush-interval-ms",
            "100",
            "--batch-size",
            "5",
            "--queue-size",
            "10",
        ],
    );
    send(&server, 50);
    std::thread::sleep(Duration::from_millis(500));
    collector.set_fault("none", 0);
    let spans = collector.wait_for_spans(15, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let stopped = tracer.stop();
    let summary = stopped
        .stderr
        .lines()
        .rfind(|l| l.starts_with("tracer: "))
        .unwrap()
        .to_string();
    let number_before = |word: &str| -> u64 {
        let words: Vec<&str> = summary
            .split([' ', ',', ';'])
            .filter(|w| !w.is_empty())
            .collect();
        words
            .windows(2)
            .find(|w| w[1] == word)
            .and_then(|w| w[0].parse().ok())
            .unwrap()
    };
    let (exported, dropped) = (number_before("exported"), number_before("dropped"));
    assert!(dropped > 0, "the queue overflowed: {summary}");
    assert_eq!(
        exported + dropped,
        50,
        "every request either exported or counted as dropped: {summary}"
    );
    assert!(spans.len() as u64 >= exported, "{summary}");
}

/// The BPF programs of tracer loaded in the kernel now (names are cut to 15 bytes).
fn tracer_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("tracer_")))
        .count()
}

/// SIGKILL leaves nothing attached (programs and links die with the agent's file
/// descriptors), and a new tracer then works.
#[test]
fn sigkill_leaves_nothing_behind() {
    require_root();
    let before = tracer_programs();
    let server = PythonServer::start();
    let pid = server.pid().to_string();
    let mut tracer = Tracer::start(&["attach", "--pid", &pid, "--output", "json"]);
    assert!(
        tracer_programs() > before,
        "the tracer's programs are loaded while it runs"
    );
    tracer.kill();
    // Program teardown after the last fd closes is asynchronous (RCU): allow a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tracer_programs() > before {
        assert!(
            std::time::Instant::now() < deadline,
            "programs left loaded after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = Tracer::start(&["attach", "--pid", &pid, "--output", "json"]);
    send(&server, 2);
    std::thread::sleep(Duration::from_millis(1500));
    let stopped = again.stop();
    assert_eq!(
        stopped.stdout.lines().count(),
        2,
        "a restarted tracer captures: {}",
        stopped.stderr
    );
}

/// A stop asked for while the tracer loads and attaches (a second or two) ends the run as soon
/// as it starts, also when the tracer was started with SIGINT ignored, as a script's
/// background job is: the signal was lost then, and the tracer ran on for good.
#[test]
fn a_stop_while_loading_ends_the_run() {
    use std::os::unix::process::CommandExt as _;
    require_root();
    let target = tracer_e2e::ChildGuard(
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap(),
    );
    let mut command = std::process::Command::new(common::tracer_bin());
    command.args([
        "run",
        "--pid",
        &target.0.id().to_string(),
        "--output",
        "json",
    ]);
    // SAFETY: signal() is async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        });
    }
    let tracer = Tracer::spawn(&mut command);
    // The programs are loaded and being attached: the run has not started.
    tracer.wait_for_stderr("attached", Duration::from_secs(30));
    // SAFETY: signals our own, unreaped child.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGINT) };
    let stopped = tracer.wait_for_exit(Duration::from_secs(30));
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("tracer: interrupted"),
        "{}",
        stopped.stderr
    );
}

/// `attach` to a process that exits ends by itself with a clear message and the spans of
/// what the process did before.
#[test]
fn attach_ends_when_the_process_exits() {
    require_root();
    let server = PythonServer::start();
    let dir = common::tempdir();
    let go = dir.join("go");
    // A client that makes one request once the tracer is there, then exits.
    let script = format!(
        r#"
import http.client, os, time
while not os.path.exists({go:?}): time.sleep(0.02)
c = http.client.HTTPConnection("127.0.0.1", {port})
c.request("GET", "/hello"); c.getresponse().read()
"#,
        port = server.port,
        go = go.to_str().unwrap()
    );
    let mut client = common::python_client(&script);
    let pid = client.0.id().to_string();
    let tracer = Tracer::start(&["attach", "--pid", &pid, "--output", "json"]);
    std::fs::write(&go, b"go").unwrap();
    common::client_output(&mut client);
    let stopped = tracer.wait_for_exit(Duration::from_secs(10));
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("the traced process exited"),
        "{}",
        stopped.stderr
    );
    assert_eq!(
        stopped.stdout.lines().count(),
        1,
        "the request before the exit: {}",
        stopped.stdout
    );
}

/// A server that forks a child per request (socketserver's ForkingMixIn): the children, born
/// after the attach, are traced too.
#[test]
fn forked_children_are_traced() {
    require_root();
    let dir = common::tempdir();
    let port_file = dir.join("port");
    let script = format!(
        r#"
import http.server, os, socketserver
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *a): pass
    def do_GET(self):
        body = str(os.getpid()).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
class S(socketserver.ForkingMixIn, http.server.HTTPServer): pass
s = S(("127.0.0.1", 0), H)
open({pf:?}, "w").write(str(s.server_address[1]))
s.serve_forever()
"#,
        pf = port_file.to_str().unwrap()
    );
    let server = std::process::Command::new("python3")
        .args(["-c", &script])
        .spawn()
        .unwrap();
    let server = tracer_e2e::ChildGuard(server);
    let port: u16 = common::wait_for_file(&port_file, Duration::from_secs(10))
        .trim()
        .parse()
        .unwrap();
    let pid = server.0.id().to_string();
    let tracer = Tracer::start(&["attach", "--pid", &pid, "--output", "json"]);
    let mut child_pids = Vec::new();
    for _ in 0..3 {
        let (status, body) =
            tracer_e2e::http_request(&format!("127.0.0.1:{port}"), "GET", "/x", None, &[]).unwrap();
        assert_eq!(status, 200);
        child_pids.push(String::from_utf8(body).unwrap());
    }
    std::thread::sleep(Duration::from_millis(1500));
    let stopped = tracer.stop();
    let spans: Vec<serde_json::Value> = stopped
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut got: Vec<String> = spans
        .iter()
        .map(|s| s["tags"]["process.pid"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    child_pids.sort();
    assert_eq!(
        got, child_pids,
        "one SERVER span from each forked child: {}",
        stopped.stderr
    );
    assert!(spans.iter().all(|s| s["kind"] == "SERVER"));
}

/// The scheduling policy of thread `tid` of process `pid` (`/proc/.../stat` field 41).
fn sched_policy(pid: u32, tid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(38)?.parse().ok()
}

/// With `--capture-priority idle` the capture thread yields the CPU to other programs
/// (SCHED_IDLE), yet a host whose every CPU is busy with other work cannot starve it into
/// losing requests: its watchdog lets it compete when the ring's data stops moving.
#[test]
fn busy_cpus_do_not_starve_capture() {
    const SCHED_IDLE: u32 = 5;
    require_root();
    let collector = Collector::start();
    let server = PythonServer::start();
    let pid = server.pid().to_string();
    let tracer = Tracer::attach_exporting(
        &pid,
        &collector.url(),
        &["--flush-interval-ms", "100", "--capture-priority", "idle"],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sched_policy(tracer.pid(), tracer.pid()) != Some(SCHED_IDLE) {
        assert!(
            std::time::Instant::now() < deadline,
            "the capture thread never yielded (policy {:?})",
            sched_policy(tracer.pid(), tracer.pid())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Two busy loops per CPU, at normal priority, for at most a minute each.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs: Vec<tracer_e2e::ChildGuard> = (0..2 * cpus)
        .map(|_| {
            tracer_e2e::ChildGuard(
                std::process::Command::new("timeout")
                    .args(["60", "sh", "-c", "while :; do :; done"])
                    .spawn()
                    .expect("start a busy loop"),
            )
        })
        .collect();
    send(&server, 200);
    let spans = collector.wait_for_spans(200, Duration::from_secs(45));
    drop(hogs);
    let stopped = tracer.stop();
    assert_eq!(spans.len(), 200, "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains(" 0 lost"),
        "no event lost: {}",
        stopped.stderr
    );
}

/// A yielding capture thread keeps up with a load that starts from nothing: nginx saturated by
/// wrk with every request captured (budget off) is a backlog within milliseconds, which its
/// watchdog must see before the ring is full and let the thread compete.
#[test]
fn a_yielding_capture_thread_keeps_up_with_a_sudden_load() {
    require_root();
    let dir = common::tempdir();
    let (_nginx, port) = common::start_nginx(&dir, "", "");
    let tracer = Tracer::run_nginx_json(
        port,
        &[
            "--queue-size",
            "1000000",
            "--overhead-budget",
            "0",
            "--capture-priority",
            "idle",
        ],
        &[("RUST_LOG", "info,tracer_user::yielding=debug")],
    );
    wrk(3, &format!("http://127.0.0.1:{port}/index.html"));
    std::thread::sleep(Duration::from_millis(500));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    for (said, what) in [
        ("competing normally", "the load made a backlog"),
        (" 0 lost", "no event lost"),
    ] {
        assert!(stopped.stderr.contains(said), "{what}: {}", stopped.stderr);
    }
}

/// A tracer started while a server is saturated loses nothing as it starts: every program is
/// loaded before any is attached, just before the ring buffer is first read, and the capture
/// thread competes for the CPU normally until its event loop runs and has caught up. (Attached
/// before the seconds the verifier took over the other programs, the ones that report socket
/// calls filled the 16 MiB ring with nobody reading it: 185,000 and 275,000 events lost in two
/// runs of this test; with a watchdog that inherited SCHED_IDLE and waited a second to run,
/// 3,500 to 26,000 in four of eleven; with a capture thread that lowered itself and lost the
/// CPU before it set its watchdog watching, 36,000 in one CI run, and 28,000 and over 6,800 in two
/// of thirteen runs here with two more busy loops.)
#[test]
fn a_start_under_load_loses_no_events() {
    require_root();
    let dir = common::tempdir();
    let (_nginx, port) = common::start_nginx(&dir, "", "");
    let url = format!("http://127.0.0.1:{port}/index.html");
    let loaded = Arc::new(AtomicBool::new(false));
    let load = {
        let loaded = loaded.clone();
        // Until the tracer has run under it a while, however long it takes to load.
        std::thread::spawn(move || {
            for _ in 0..30 {
                wrk(2, &url);
                if loaded.load(Ordering::Relaxed) {
                    break;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // The watchdog's decisions, for a failure to show.
    let tracer = Tracer::run_nginx_json(
        port,
        &[],
        &[("RUST_LOG", "info,tracer_user::yielding=debug")],
    );
    std::thread::sleep(Duration::from_secs(3));
    loaded.store(true, Ordering::Relaxed);
    load.join().expect("wrk");
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(stopped.stderr.contains(" 0 lost"), "{}", stopped.stderr);
    assert!(
        !stopped.stderr.contains("requests: 0;"),
        "{}",
        stopped.stderr
    );
}

/// wrk's load on `url` for `seconds`: two threads, 50 connections.
fn wrk(seconds: u32, url: &str) {
    let wrk = std::process::Command::new("wrk")
        .args(["-t2", "-c50", &format!("-d{seconds}s"), url])
        .output()
        .expect("wrk (Debian package wrk)");
    assert!(wrk.status.success(), "{wrk:?}");
}

/// The requests the Python server answered so far (its `/count`, which it does not count).
fn served(server: &PythonServer) -> u64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream
        .write_all(b"GET /count HTTP/1.0\r\n\r\n")
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (_, body) = response.split_once("\r\n\r\n").expect("a response");
    body.trim().parse().expect("a count")
}

/// A client that goes away with requests in flight resets connections mid-response: the
/// server's last write may return its count after the reset ended the connection. That tail
/// (the Python server writes its body apart from its head: "hello\n") must not start a new
/// connection of its own, where it once read as a Redis inline command (a span "HELLO"). Every
/// span is a request the server answered, exactly.
#[test]
fn connections_reset_mid_response_make_no_phantom_requests() {
    require_root();
    let server = PythonServer::start();
    let pid = server.pid().to_string();
    let before = served(&server);
    let tracer = Tracer::start(&["attach", "--pid", &pid, "--output", "json"]);
    // wrk stops with a request in flight on most of its 50 connections: six times, each
    // time 50 connections reset while the server answers.
    for _ in 0..6 {
        wrk(1, &format!("http://127.0.0.1:{}/hello", server.port));
    }
    std::thread::sleep(Duration::from_millis(500));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let answered = served(&server) - before;
    let spans: Vec<serde_json::Value> = stopped
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON span per line"))
        .collect();
    let names: std::collections::BTreeSet<&str> =
        spans.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(
        names,
        ["GET /hello"].into(),
        "only the requests sent are spans"
    );
    assert_eq!(
        spans.len() as u64,
        answered,
        "a span for each request the server answered: {}",
        stopped.stderr
    );
}

/// Events lost to a full ring buffer never pair a request with another's response, nor report
/// an answered request unanswered. Kept-alive connections alternate a page (200) and an error
/// (503) while the tracer is frozen, again and again, long enough for the ring to overflow: a
/// lost response would otherwise answer the next request on its connection, and every one
/// after it, each span with its neighbour's status and timing (with the binary before the fix:
/// 161 and 135 spans with the wrong status, or none, in two runs). Every record carries the
/// kernel's count of lost events, and where it changed the TCP sequence number of the record's
/// first byte tells the agent whether bytes of its connection went unseen; it drops what they
/// cut, and counts it. A connection ended after a loss, with nothing of its own since, drops
/// what it waited for too.
#[test]
fn lost_events_never_pair_a_request_with_another_response() {
    require_root();
    let dir = common::tempdir();
    let (_nginx, port) = common::start_nginx(&dir, "", "");
    // The smallest ring, every request captured, the capture thread competing normally: a
    // freeze of the agent is the only reason for loss.
    let tracer = Tracer::run_nginx_json(
        port,
        &[
            "--ring-buffer-mib",
            "1",
            "--overhead-budget",
            "0",
            "--capture-priority",
            "normal",
        ],
        &[],
    );
    // Clients that read each response before they stop (wrk closes connections with requests
    // in flight: spans rightly without a response).
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(port);
                for i in 0..1_000_000u32 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Before nginx's keepalive_requests (1000) would close it.
                    if i % 500 == 499 {
                        client = Client::connect(port);
                    }
                    let (path, status) = if i % 2 == 0 {
                        ("/index.html", 200)
                    } else {
                        ("/err", 503)
                    };
                    assert_eq!(client.get(path).status, status);
                }
            })
        })
        .collect();
    let pid = tracer.pid().to_string();
    // Each freeze fills the ring, and each fill and each drain after it is a moment when
    // some records fit and others (larger: responses) do not.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(150));
        let kill = |signal: &str| {
            let status = std::process::Command::new("kill")
                .args([signal, &pid])
                .status()
                .expect("kill");
            assert!(status.success());
        };
        kill("-STOP");
        std::thread::sleep(Duration::from_millis(250));
        kill("-CONT");
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("client");
    }
    std::thread::sleep(Duration::from_millis(500));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        !stopped.stderr.contains(" 0 lost"),
        "the freezes made the ring overflow: {}",
        stopped.stderr
    );
    let right: std::collections::BTreeSet<(String, String)> = [
        ("/index.html".to_string(), "200".to_string()),
        ("/err".to_string(), "503".to_string()),
    ]
    .into();
    let mut by_path: std::collections::BTreeMap<(String, String), usize> = Default::default();
    let mut wrong = Vec::new();
    for line in stopped.stdout.lines() {
        let span: serde_json::Value = serde_json::from_str(line).expect("a JSON span per line");
        let tag = |key: &str| span["tags"][key].as_str().unwrap_or("-").to_string();
        let pair = (tag("http.path"), tag("http.status_code"));
        if !right.contains(&pair) && wrong.len() < 5 {
            wrong.push(line);
        }
        *by_path.entry(pair).or_default() += 1;
    }
    assert!(
        wrong.is_empty(),
        "spans with another request's response (or none): {by_path:?}, such as\n{}\n{}",
        wrong.join("\n"),
        stopped.stderr
    );
    assert!(
        right
            .iter()
            .all(|pair| by_path.get(pair).is_some_and(|&n| n > 1000)),
        "both kinds of request captured in numbers: {by_path:?}"
    );
}
