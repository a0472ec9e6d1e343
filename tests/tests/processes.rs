//! End-to-end: the traced process changes under the tracer. It execs another program (same
//! pid), or dies and its pid goes to an unrelated program: spans must name the program that
//! actually served each request, and no connection state may carry over from the old one.

mod common;

use std::{
    io::Write,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{Client, Tracer, require_root, tempdir, wait_for_file};
use serde_json::Value;
use tracer_e2e::{ChildGuard, Collector, free_port, python, repo_root, wait_for_port};

fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["tags"][key].as_str()
}

/// A copy of the Python interpreter under another name: a different program (and command
/// name) that still runs the test server.
fn python_named(dir: &Path, name: &str) -> PathBuf {
    let out = Command::new(python())
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python");
    let exe = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let copy = dir.join(name);
    std::fs::copy(&exe, &copy).expect("copy the python binary");
    copy
}

fn start_server(program: &Path, port: u16, exec: Option<&Path>) -> ChildGuard {
    let dir = tempdir();
    let port_file = dir.join("port");
    let mut cmd = Command::new(program);
    cmd.arg(repo_root().join("tests/servers/http_server.py"))
        .args(["--port", &port.to_string(), "--port-file"])
        .arg(&port_file)
        .stdin(Stdio::null());
    if let Some(exec) = exec {
        cmd.arg("--exec").arg(exec);
    }
    let child = ChildGuard(cmd.spawn().expect("start server"));
    wait_for_file(&port_file, Duration::from_secs(10));
    child
}

/// Traces a server under `tracer attach` while it execs another program on the same pid
/// (`GET /exec`, or `/exec-keep` when `keep_connection`: the new program goes on serving the
/// connection the request came on, instead of binding the port again for a new one), with a
/// request before and two after. Returns the spans' (name, service) pairs, sorted, after
/// checking that every span names the one pid.
fn spans_across_exec(keep_connection: bool) -> Vec<(String, String)> {
    let collector = Collector::start();
    let dir = tempdir();
    let catserver = python_named(&dir, "catserver");
    let port = free_port();
    let server = start_server(Path::new(&python()), port, Some(&catserver));
    let pid = server.0.id();
    let tracer = Tracer::attach_exporting(
        &pid.to_string(),
        &collector.url(),
        &["--flush-interval-ms", "200"],
    );
    let mut client = Client::connect(port);
    assert_eq!(client.get("/hello").status, 200);
    let route = if keep_connection {
        "/exec-keep"
    } else {
        "/exec"
    };
    assert_eq!(client.get(route).status, 200);
    // The agent hears of the exec at its next drain, within milliseconds; the new program
    // takes longer than that to start.
    std::thread::sleep(Duration::from_millis(300));
    if !keep_connection {
        // The new program binds the port again.
        drop(client);
        wait_for_port(port, Duration::from_secs(10));
        client = Client::connect(port);
    } else {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "catserver"
    );
    assert_eq!(client.get("/hello").status, 200);
    assert_eq!(client.get("/status/404").status, 404);

    let spans = collector.wait_for_spans(4, Duration::from_secs(10));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let mut got: Vec<(String, String)> = spans
        .iter()
        .map(|s| {
            assert_eq!(tag(s, "process.pid"), Some(pid.to_string().as_str()));
            (
                s["name"].as_str().unwrap().to_string(),
                s["localEndpoint"]["serviceName"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    got.sort();
    got
}

fn pairs(expected: [(&str, &str); 4]) -> Vec<(String, String)> {
    expected
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .to_vec()
}

/// `tracer attach` to a server that execs another program on the same pid and port: spans
/// before the exec name the first program, spans after it the second, and the tracer keeps
/// tracing the pid.
#[test]
fn exec_is_followed_and_renamed() {
    require_root();
    assert_eq!(
        spans_across_exec(false),
        pairs([
            ("GET /exec", "python3"),
            ("GET /hello", "catserver"),
            ("GET /hello", "python3"),
            ("GET /status/{id}", "catserver"),
        ])
    );
}

/// A connection that survives the exec (same pid, fd and socket, served by the new program)
/// belongs to the new program from its first request after the exec: the kernel's record of
/// it, and the socket's own copy of that record, are dropped with the old program's.
#[test]
fn a_connection_kept_across_exec_is_the_new_programs() {
    require_root();
    assert_eq!(
        spans_across_exec(true),
        pairs([
            ("GET /exec-keep", "python3"),
            ("GET /hello", "catserver"),
            ("GET /hello", "python3"),
            ("GET /status/{id}", "catserver"),
        ])
    );
}

/// A traced server is killed with a connection open (no close syscall is ever seen for it),
/// and its pid is given to another server, which gets its connection on the same fd: the
/// new server's spans carry its own name and its own addresses, never the dead one's.
#[test]
fn pid_reuse_does_not_mix_processes() {
    require_root();
    let collector = Collector::start();
    let dir = tempdir();
    let alpha = python_named(&dir, "alpha");
    let beta = python_named(&dir, "beta");
    let (port_a, port_b) = (free_port(), free_port());
    let tracer = Tracer::start(&[
        "run",
        "--comm",
        "alpha",
        "--comm",
        "beta",
        "--zipkin",
        &collector.url(),
        "--flush-interval-ms",
        "200",
    ]);
    let mut server_a = start_server(&alpha, port_a, None);
    let pid = server_a.0.id();
    let mut client_a = Client::connect(port_a);
    assert_eq!(client_a.get("/hello").status, 200);
    // Killed with the connection open: its fd is closed by the exit, not by a syscall.
    server_a.0.kill().unwrap();
    server_a.0.wait().unwrap();
    drop(client_a);
    std::thread::sleep(Duration::from_millis(300));

    // Hand the same pid to beta: the next pid the kernel gives is ns_last_pid + 1. Other
    // processes may take it first; try a few times.
    let mut server_b = None;
    for _ in 0..20 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let child = start_server(&beta, port_b, None);
        if child.0.id() == pid {
            server_b = Some(child);
            break;
        }
        drop(child);
        std::thread::sleep(Duration::from_millis(100));
    }
    let _server_b = server_b.expect("could not give the pid to the second server");
    // Its accepted connection gets the same fd number as alpha's had (same program layout).
    let mut client_b = Client::connect(port_b);
    assert_eq!(client_b.get("/status/201").status, 201);
    assert_eq!(client_b.get("/hello").status, 200);
    let mut raw = TcpStream::connect(("127.0.0.1", port_b)).unwrap();
    raw.write_all(b"GET /hello HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut sink = Vec::new();
    std::io::Read::read_to_end(&mut raw, &mut sink).unwrap();

    let spans = collector.wait_for_spans(4, Duration::from_secs(10));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    for s in &spans {
        assert_eq!(tag(s, "process.pid"), Some(pid.to_string().as_str()));
        let service = s["localEndpoint"]["serviceName"].as_str().unwrap();
        let port = s["localEndpoint"]["port"].as_u64().unwrap();
        if s["name"] == "GET /status/{id}" || service == "beta" {
            assert_eq!((service, port), ("beta", u64::from(port_b)), "{s}");
        } else {
            assert_eq!((service, port), ("alpha", u64::from(port_a)), "{s}");
        }
    }
    let by_service = |name: &str| {
        spans
            .iter()
            .filter(|s| s["localEndpoint"]["serviceName"] == name)
            .count()
    };
    assert_eq!(
        (by_service("alpha"), by_service("beta")),
        (1, 3),
        "{spans:#?}"
    );
}
