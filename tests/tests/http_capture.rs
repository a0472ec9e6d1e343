//! End-to-end: real servers and clients, the real tracer (root, BPF), spans read back from a
//! Zipkin-compatible collector through its query API.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{Client, PythonServer, Response, Tracer, require_root, run_tracer_to_exit, tempdir};
use serde_json::Value;
use tracer_e2e::{Collector, repo_root};

fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["tags"][key].as_str()
}

fn by_name(spans: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for s in spans {
        map.entry(s["name"].as_str().unwrap().to_string())
            .or_default()
            .push(s.clone());
    }
    map
}

/// The span's duration fits inside what the client measured around the same request.
fn assert_within_client_latency(span: &Value, response: &Response) {
    let duration = span["duration"].as_u64().unwrap();
    let client = response.latency.as_micros() as u64;
    assert!(
        duration <= client + 1000,
        "span {} lasted {duration} µs, longer than the client's own measurement {client} µs",
        span["name"]
    );
}

/// `tracer attach` to a running ThreadingHTTPServer, with a keep-alive connection opened before
/// the attach: every request after the attach is exactly one correct SERVER span.
#[test]
fn attach_traces_python_keepalive_server() {
    require_root();
    let collector = Collector::start();
    let server = PythonServer::start();
    let mut early = Client::connect(server.port);
    assert_eq!(early.get("/hello").status, 200, "request before attach");

    let pid = server.pid().to_string();
    let tracer = Tracer::attach_exporting(
        &pid,
        &collector.url(),
        &[
            "--service-name",
            "cats-api",
            "--flush-interval-ms",
            "200",
            "--capture-bytes",
            "512",
        ],
    );

    // The first span must reach the collector quickly.
    let first = early.get("/hello");
    let t0 = std::time::Instant::now();
    let got = collector.wait_for_spans(1, Duration::from_secs(3));
    assert_eq!(got.len(), 1, "first span after attach");
    eprintln!("first span exported after {:?}", t0.elapsed());

    let mut responses = vec![("GET /hello", first)];
    responses.push(("GET /status/{id}", early.get("/status/500")));
    responses.push(("GET /chunked/{id}", early.get("/chunked/200")));
    responses.push(("GET /bytes/{id}", early.get("/bytes/100000")));
    responses.push(("GET /slow-body/{id}", early.get("/slow-body/300")));
    responses.push((
        "GET /users/{id}",
        early.get("/users/12345?token=s3cret&page=2"),
    ));
    responses.push((
        "POST /echo-size",
        early.request("POST", "/echo-size", &vec![b'p'; 50_000]),
    ));
    responses.push(("HEAD /hello", early.request("HEAD", "/hello", &[])));
    let mut fresh = Client::connect(server.port);
    let fresh_response = fresh.get("/status/204");
    drop(fresh);
    for (name, r) in &responses {
        assert!(r.status == 200 || r.status == 500, "{name}: {r:?}");
    }

    let spans = collector.wait_for_spans(responses.len() + 1, Duration::from_secs(10));
    let stopped = tracer.stop();
    assert!(
        stopped.status.success(),
        "tracer exit: {}\n{}",
        stopped.status,
        stopped.stderr
    );
    assert_eq!(spans.len(), responses.len() + 1, "spans: {spans:#?}");
    let names = by_name(&spans);

    for (name, response) in &responses {
        let group = &names
            .get(*name)
            .unwrap_or_else(|| panic!("no span {name} in {:?}", names.keys()));
        // /status/{id} is asked twice (a 500 on the early connection, a 204 on a fresh one).
        let status = response.status.to_string();
        let matching: Vec<_> = group
            .iter()
            .filter(|s| s["remoteEndpoint"]["port"].as_u64() == Some(u64::from(early.local.port())))
            .filter(|s| tag(s, "http.status_code") == Some(status.as_str()))
            .collect();
        assert_eq!(matching.len(), 1, "{name} {status}: {group:#?}");
        let span = matching[0];
        assert_eq!(span["kind"], "SERVER", "{name}");
        assert_eq!(span["localEndpoint"]["serviceName"], "cats-api");
        assert_eq!(span["localEndpoint"]["ipv4"], "127.0.0.1");
        assert_eq!(
            span["localEndpoint"]["port"].as_u64(),
            Some(u64::from(server.port))
        );
        assert_eq!(tag(span, "process.pid"), Some(pid.as_str()));
        assert_within_client_latency(span, response);
    }
    assert_eq!(names["GET /status/{id}"].len(), 2, "the 500 and the 204");
    let no_content = spans
        .iter()
        .find(|s| tag(s, "http.status_code") == Some("204"))
        .expect("204 span");
    assert_within_client_latency(no_content, &fresh_response);

    // 5xx is an error; 2xx is not.
    let failed = &names["GET /status/{id}"][0];
    assert!(
        tag(failed, "error").is_some(),
        "500 must carry an error tag: {failed}"
    );
    assert!(tag(&names["GET /hello"][0], "error").is_none());

    // The span ends at the response's last byte, even past the captured prefix.
    let slow = names["GET /slow-body/{id}"][0]["duration"]
        .as_u64()
        .unwrap();
    assert!(
        slow >= 300_000,
        "slow body span {slow} µs must cover the 300 ms gap inside the body"
    );
    let chunked = names["GET /chunked/{id}"][0]["duration"].as_u64().unwrap();
    assert!(
        chunked >= 200_000,
        "chunked span {chunked} µs must cover the 200 ms gap between chunks"
    );

    // Credentials never leave the host.
    let all = serde_json::to_string(&spans).unwrap();
    assert!(!all.contains("s3cret"), "a credential leaked: {all}");

    // The query API serves what was stored.
    let id = spans[0]["traceId"].as_str().unwrap();
    let trace = collector.trace(id).expect("trace by id");
    assert_eq!(trace.len(), 1);
    assert!(collector.services().contains(&"cats-api".to_string()));
}

/// `tracer run` filtered by command name: nginx (started before the tracer, sendfile bodies)
/// as the server and curl (started after it) as the client, on one keep-alive connection.
#[test]
fn run_traces_nginx_and_curl() {
    require_root();
    let collector = Collector::start();
    let dir = tempdir();
    let (_nginx, port) = common::start_nginx(&dir, "", "");

    let tracer = Tracer::run_for(&["nginx", "curl"], port, &collector.url());
    let base = format!("http://127.0.0.1:{port}");
    common::curl_index_big_err(&base);

    let spans = collector.wait_for_spans(6, Duration::from_secs(10));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_eq!(spans.len(), 6, "{spans:#?}");
    for (kind, service) in [("SERVER", "nginx"), ("CLIENT", "curl")] {
        let mut got: Vec<(String, String)> = spans
            .iter()
            .filter(|s| s["kind"] == kind)
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    tag(s, "http.status_code").unwrap_or("-").to_string(),
                )
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("GET /big.txt".into(), "200".into()),
                ("GET /err".into(), "503".into()),
                ("GET /index.html".into(), "200".into())
            ],
            "{kind} spans"
        );
        for s in spans.iter().filter(|s| s["kind"] == kind) {
            assert_eq!(s["localEndpoint"]["serviceName"], service);
            let server_side_port = if kind == "SERVER" {
                &s["localEndpoint"]["port"]
            } else {
                &s["remoteEndpoint"]["port"]
            };
            assert_eq!(server_side_port.as_u64(), Some(u64::from(port)));
        }
    }
    // Each CLIENT span encloses its SERVER span in time. A send is dated by its return, and on
    // loopback the reader of the response can run before the writer returns (the wakeup may
    // even preempt it), so the server's end may trail the client's by that wait (as in tls.rs).
    for server in spans.iter().filter(|s| s["kind"] == "SERVER") {
        let client = spans
            .iter()
            .find(|s| s["kind"] == "CLIENT" && s["name"] == server["name"])
            .unwrap();
        let (cs, cd) = (
            client["timestamp"].as_u64().unwrap(),
            client["duration"].as_u64().unwrap(),
        );
        let (ss, sd) = (
            server["timestamp"].as_u64().unwrap(),
            server["duration"].as_u64().unwrap(),
        );
        assert!(
            cs <= ss + 1 && ss + sd <= cs + cd + 2_000,
            "client {client} must enclose server {server}"
        );
    }
    assert!(
        tag(
            spans.iter().find(|s| s["name"] == "GET /err").unwrap(),
            "error"
        )
        .is_some()
    );
}

/// Without --zipkin the default output is one readable line per span; --output json prints
/// Zipkin v2 JSON lines.
#[test]
fn stdout_outputs() {
    require_root();
    let server = PythonServer::start();
    let pid = server.pid().to_string();
    for format in ["text", "json"] {
        let tracer = Tracer::start(&["attach", "--pid", &pid, "--output", format]);
        let mut c = Client::connect(server.port);
        assert_eq!(c.get("/hello").status, 200);
        assert_eq!(c.get("/status/404").status, 404);
        drop(c);
        std::thread::sleep(Duration::from_millis(500));
        let stopped = tracer.stop();
        assert!(stopped.status.success(), "{}", stopped.stderr);
        let lines: Vec<&str> = stopped.stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{format}: {}", stopped.stdout);
        if format == "text" {
            assert!(
                lines[0].contains("SERVER")
                    && lines[0].contains("GET /hello")
                    && lines[0].contains("200"),
                "{}",
                lines[0]
            );
            assert!(
                lines[1].contains("GET /status/{id}") && lines[1].contains("404"),
                "{}",
                lines[1]
            );
        } else {
            let span: Value = serde_json::from_str(lines[0]).expect("a JSON span per line");
            assert_eq!(span["name"], "GET /hello");
            assert_eq!(span["traceId"].as_str().unwrap().len(), 32);
        }
    }
}

/// A collector that is down is an outage, not a usage error: the tracer runs, and stops
/// cleanly, without blocking on it.
#[test]
fn unreachable_collector_does_not_block_capture() {
    require_root();
    let server = PythonServer::start();
    let dead = format!("http://127.0.0.1:{}", tracer_e2e::free_port());
    let pid = server.pid().to_string();
    let tracer = Tracer::attach_exporting(&pid, &dead, &["--flush-interval-ms", "100"]);
    let mut c = Client::connect(server.port);
    for _ in 0..20 {
        assert_eq!(c.get("/hello").status, 200);
    }
    std::thread::sleep(Duration::from_millis(500));
    let t = std::time::Instant::now();
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(
        stopped.stderr.contains("requests: 20"),
        "{}",
        stopped.stderr
    );
}

/// One clear line and a non-zero exit for each user error.
#[test]
fn user_errors_are_one_line() {
    require_root();
    let cases: [(&[&str], &str); 4] = [
        (
            &["attach", "--pid", "999999999"],
            "no process with pid 999999999",
        ),
        (&["run", "--zipkin", "ftp://example"], "zipkin"),
        (&["run", "--zipkin", "not a url"], "zipkin"),
        (&["run", "--comm", "a-name-longer-than-15"], "1 to 15 bytes"),
    ];
    for (args, expected) in cases {
        let out = run_tracer_to_exit(args, Duration::from_secs(10));
        assert!(!out.status.success(), "{args:?} should fail");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?}: one line expected, got:\n{}",
            out.stderr
        );
        assert!(lines[0].starts_with("tracer: "), "{}", lines[0]);
        assert!(
            lines[0].to_lowercase().contains(expected),
            "{args:?}: {}",
            lines[0]
        );
    }
    // Not root: drop every privilege with setpriv.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(common::tracer_bin())
        .args(["run"])
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");
    let _ = repo_root();
}

/// The per-syscall tracepoints, used where the raw syscall tracepoints cannot be attached,
/// capture the same exchanges.
#[test]
fn per_syscall_tracepoint_fallback_captures() {
    captures_with_hooks("1", "attached 28 tracepoints");
}

/// So do the raw (untyped) sys_enter/sys_exit programs, used where the BTF-typed ones do not
/// load.
#[test]
fn raw_tracepoint_fallback_captures() {
    captures_with_hooks("raw", "(sys_enter/sys_exit as raw_tracepoint)");
}

/// And the BTF-typed sys_enter/sys_exit programs, used where the socket-layer tracepoints
/// (Linux 6.3+) are missing.
#[test]
fn syscall_tracepoint_fallback_captures() {
    captures_with_hooks("tp_btf", "(sys_enter/sys_exit as tp_btf)");
}

/// Where the kernel has them (this one does), socket I/O is watched at the socket layer and no
/// syscall tracepoint is attached at all.
#[test]
fn socket_layer_is_the_default() {
    captures_with_hooks(
        "",
        "(socket I/O at the socket layer, no syscall tracepoints)",
    );
}

fn captures_with_hooks(mode: &str, expect: &str) {
    require_root();
    let server = PythonServer::start();
    let pid = server.pid().to_string();
    let env: &[(&str, &str)] = if mode.is_empty() {
        &[]
    } else {
        &[("TRACER_SYSCALL_TRACEPOINTS", mode)]
    };
    let tracer = Tracer::start_with_env(&["attach", "--pid", &pid, "--output", "json"], env);
    assert!(tracer.stderr().contains(expect), "{}", tracer.stderr());
    let mut client = Client::connect(server.port);
    assert_eq!(client.get("/hello").status, 200);
    assert_eq!(client.get("/chunked/10").status, 200);
    std::thread::sleep(Duration::from_millis(1500));
    let stopped = tracer.stop();
    let spans: Vec<Value> = stopped
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = spans.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["GET /hello", "GET /chunked/{id}"],
        "{}",
        stopped.stderr
    );
}
