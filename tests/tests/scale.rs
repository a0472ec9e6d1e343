//! End-to-end: ten thousand concurrent connections and connection churn against nginx, traced.
//! The agent's connection table follows the sockets (closed ones leave it), every request is a
//! span, and the agent's memory stays under the project's 64 MiB target.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use common::{Tracer, memory_kib, metric, require_root, tempdir, wait_until};
use tracer_e2e::{ChildGuard, Collector, free_port, repo_root};

const OPEN: usize = 10_000;
const CHURN: usize = 20_000;
/// The target for the agent's resident memory with 10k open connections.
const RSS_LIMIT_KIB: u64 = 64 * 1024;

#[test]
fn ten_thousand_connections_and_churn_stay_bounded() {
    require_root();
    let collector = Collector::start();
    let dir = tempdir();
    let html = dir.join("html");
    std::fs::create_dir_all(&html).unwrap();
    std::fs::write(html.join("index.html"), "hi\n").unwrap();
    let port = free_port();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\nworker_rlimit_nofile 40000;\ndaemon off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 30000; }}\n\
             http {{ access_log off; keepalive_timeout 600s; keepalive_requests 100000; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port} backlog=4096; root {h}; }} }}\n",
            d = dir.display(),
            h = html.display()
        ),
    )
    .unwrap();
    let _nginx = common::spawn_nginx(&conf, port);

    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let port_s = port.to_string();
    let tracer = Tracer::start(&[
        "run",
        "--comm",
        "nginx",
        "--port",
        &port_s,
        "--zipkin",
        &collector.url(),
        "--metrics",
        &metrics_addr,
        "--queue-size",
        "40000",
        // The churn may keep nginx's worker CPU-bound for a while; this test counts a span for
        // every request, so nothing may be shed (`shedding.rs` tests shedding).
        "--overhead-budget",
        "0",
    ]);
    let baseline = memory_kib(tracer.pid());

    let mut client = ChildGuard(
        Command::new("python3")
            .arg(repo_root().join("tests/servers/many_conns.py"))
            .args([&port_s, &OPEN.to_string(), &CHURN.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 many_conns.py"),
    );
    let mut out = BufReader::new(client.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("open {OPEN}"));

    // Every connection is in the table while it is open.
    wait_until(Duration::from_secs(20), "10k open connections", || {
        metric(metrics_port, "tracer_connections_open") >= OPEN as u64
    });
    let (rss_open, _) = memory_kib(tracer.pid());

    client.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "closed");
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("churned {CHURN}"));
    assert!(client.0.wait().unwrap().success());

    // Closed connections leave the table; every request became one span.
    wait_until(
        Duration::from_secs(20),
        "connections to leave the table",
        || metric(metrics_port, "tracer_connections_open") <= 10,
    );
    let total = (OPEN + CHURN) as u64;
    let accepted = || collector.stats()["accepted_spans"].as_u64().unwrap_or(0);
    wait_until(
        Duration::from_secs(60),
        "every span at the collector",
        || accepted() >= total,
    );
    std::thread::sleep(Duration::from_millis(500));
    let (rss_end, hwm) = memory_kib(tracer.pid());
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    eprintln!(
        "agent memory: {} KiB at start, {rss_open} KiB with {OPEN} connections open, {rss_end} KiB after {CHURN} more, peak {hwm} KiB",
        baseline.0
    );
    assert_eq!(accepted(), total, "one span per request");
    assert!(
        hwm <= RSS_LIMIT_KIB,
        "agent peak RSS {hwm} KiB is over the {RSS_LIMIT_KIB} KiB target"
    );
    assert!(
        stopped.stderr.contains("0 dropped"),
        "spans were dropped: {}",
        stopped.stderr
    );
}

/// A server that answers each request and then sends bytes nobody asked for (as a TLS server's
/// close_notify), and a client that reads the answer alone and closes: with bytes unread, its
/// close resets the connection, and its socket reaches TCP_CLOSE while it is still open.
const UNREAD_SERVER: &str = r#"
import socket, sys, threading
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
def serve(conn):
    with conn:
        while True:
            request = conn.recv(4096)
            if not request:
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhi\n")
            conn.sendall(b"\x15\x03\x03\x00\x1a" + b"\x00" * 26)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

const UNREAD_CLIENT: &str = r#"
import socket, sys, time
port, rounds = int(sys.argv[1]), int(sys.argv[2])
answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhi\n"
for i in range(rounds):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
    got = b""
    while len(got) < len(answer):
        got += s.recv(len(answer) - len(got))
    # Wait for the unasked bytes, so that they are unread at the close.
    time.sleep(0.002)
    print(i, s.getsockname()[1], flush=True)
    s.close()
"#;

/// A Python `server` script on a free port (its argument), the tracer on python3 (both ends
/// traced, nothing shed, JSON spans, and `extra`), and a Python `client` script (the port and
/// `rounds` its arguments) run to its end. Returns the client's stdout, the tracer still
/// running, and the server's guard.
fn python_pair(
    server: &str,
    client: &str,
    rounds: usize,
    extra: &[&str],
) -> (String, Tracer, ChildGuard) {
    let port = free_port().to_string();
    let server = ChildGuard(
        Command::new("python3")
            .args(["-c", server, &port])
            .spawn()
            .expect("python3"),
    );
    tracer_e2e::wait_for_port(port.parse().unwrap(), Duration::from_secs(10));
    let mut args = vec![
        "run",
        "--comm",
        "python3",
        "--output",
        "json",
        "--overhead-budget",
        "0",
    ];
    args.extend(extra);
    let tracer = Tracer::start(&args);
    let out = Command::new("python3")
        .args(["-c", client, &port, &rounds.to_string()])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{out:?}");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        tracer,
        server,
    )
}

/// The CLIENT spans of a stopped tracer's JSON output.
fn client_spans(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|s| s["kind"] == "CLIENT")
        .collect()
}

/// A socket closed with bytes unread ends its connection at once, and the next socket, which
/// the kernel often makes in the freed one's memory, is a connection of its own: each request's
/// client span has the port its socket had. (A close left waiting for a read that never came
/// kept the connection, and the next socket at its address was taken for it: client spans of a
/// new connection carried the old one's port, and did not link to their server spans.)
#[test]
fn a_socket_closed_with_bytes_unread_ends_its_connection() {
    require_root();
    const ROUNDS: usize = 200;
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let (client, tracer, _server) = python_pair(
        UNREAD_SERVER,
        UNREAD_CLIENT,
        ROUNDS,
        &["--metrics", &metrics_addr],
    );
    let ports: std::collections::HashMap<String, u64> = client
        .lines()
        .map(|l| {
            let (i, port) = l.split_once(' ').unwrap();
            (format!("/{i}"), port.parse().unwrap())
        })
        .collect();
    assert_eq!(ports.len(), ROUNDS);
    // Both ends of every connection closed: none is left in the table.
    wait_until(
        Duration::from_secs(10),
        "closed connections to leave the table",
        || metric(metrics_port, "tracer_connections_open") == 0,
    );
    std::thread::sleep(Duration::from_millis(300));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let clients = client_spans(&stopped.stdout);
    let wrong: Vec<String> = clients
        .iter()
        .filter(|s| {
            let path = s["tags"]["http.path"].as_str().unwrap_or_default();
            ports.get(path) != s["localEndpoint"]["port"].as_u64().as_ref()
        })
        .map(|s| s.to_string())
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} client spans name another socket's port:\n{}",
        wrong.len(),
        clients.len(),
        wrong.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(clients.len(), ROUNDS, "{}", stopped.stderr);
}

/// A server that answers and at once shuts down its side, and a client that shut down its own
/// after the request: the server's FIN closes the client's socket (TCP_CLOSE) while the client
/// reads the answer, sometimes inside that very read, before the read is reported.
const HALF_CLOSE_SERVER: &str = r#"
import socket, sys
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
def serve(conn):
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = conn.recv(4096)
        if not chunk:
            return  # a probe of the port
        request += chunk
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhi\n")
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(4096):
        pass
while True:
    conn, _ = listener.accept()
    with conn:
        try:
            serve(conn)
        except OSError:
            pass
"#;

const HALF_CLOSE_CLIENT: &str = r#"
import socket, sys
port, rounds = int(sys.argv[1]), int(sys.argv[2])
for i in range(rounds):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    assert got.endswith(b"hi\n"), got
    s.close()
print("done", flush=True)
"#;

/// The peer's FIN that closes a half-closed client's socket, coming while the client reads
/// the answer, never ends the connection before that read is reported: every request has its
/// response (ended at the close, it was "closed before response" and the answer went unread).
#[test]
fn a_close_during_the_last_read_keeps_the_answer() {
    require_root();
    const ROUNDS: usize = 1000;
    let (_, tracer, _server) = python_pair(HALF_CLOSE_SERVER, HALF_CLOSE_CLIENT, ROUNDS, &[]);
    std::thread::sleep(Duration::from_millis(500));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let clients = client_spans(&stopped.stdout);
    let unanswered: Vec<String> = clients
        .iter()
        .filter(|s| s["tags"]["http.status_code"] != "200")
        .map(|s| s.to_string())
        .collect();
    assert!(
        unanswered.is_empty(),
        "{} of {} client spans without their answer:\n{}",
        unanswered.len(),
        clients.len(),
        unanswered
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(clients.len(), ROUNDS, "{}", stopped.stderr);
}
