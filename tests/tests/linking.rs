//! End-to-end: spans linked into traces inside a process, and joining incoming trace context.

mod common;

use std::{collections::HashMap, io::Write, time::Duration};

use common::{Client, PythonServer, Tracer, require_root};
use serde_json::Value;
use tracer_e2e::Collector;

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

/// A front tier that calls a back tier for every request, under concurrency, on kept-alive
/// connections served by a thread pool: every call the front makes is the child of the request
/// it was serving.
#[test]
fn calls_made_while_serving_are_children() {
    require_root();
    let collector = Collector::start();
    let back = PythonServer::start();
    let front = PythonServer::start();
    let (fp, bp) = (front.pid().to_string(), back.pid().to_string());
    let tracer = Tracer::start(&[
        "run",
        "--pid",
        &fp,
        "--pid",
        &bp,
        "--zipkin",
        &collector.url(),
        "--flush-interval-ms",
        "200",
    ]);

    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 25;
    let path = format!("/proxy/{}/hello", back.port);
    std::thread::scope(|s| {
        for _ in 0..CLIENTS {
            s.spawn(|| {
                let mut c = Client::connect(front.port);
                for _ in 0..PER_CLIENT {
                    assert_eq!(c.get(&path).status, 200);
                }
            });
        }
    });
    let total = CLIENTS * PER_CLIENT;
    let spans = collector.wait_for_spans(3 * total, Duration::from_secs(15));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_eq!(
        spans.len(),
        3 * total,
        "front SERVER + front CLIENT + back SERVER per request"
    );

    let front_port = u64::from(front.port);
    let by_id: HashMap<&str, &Value> = spans.iter().map(|s| (str_of(s, "id"), s)).collect();
    let front_servers: Vec<&Value> = spans
        .iter()
        .filter(|s| {
            s["kind"] == "SERVER" && s["localEndpoint"]["port"].as_u64() == Some(front_port)
        })
        .collect();
    let clients: Vec<&Value> = spans.iter().filter(|s| s["kind"] == "CLIENT").collect();
    assert_eq!(front_servers.len(), total);
    assert_eq!(clients.len(), total);
    let mut correct = 0;
    for client in &clients {
        let Some(parent) = client["parentId"].as_str().and_then(|p| by_id.get(p)) else {
            continue;
        };
        let (ps, pd) = (
            parent["timestamp"].as_u64().unwrap(),
            parent["duration"].as_u64().unwrap(),
        );
        let (cs, cd) = (
            client["timestamp"].as_u64().unwrap(),
            client["duration"].as_u64().unwrap(),
        );
        if parent["kind"] == "SERVER"
            && parent["localEndpoint"]["port"].as_u64() == Some(front_port)
            && str_of(parent, "traceId") == str_of(client, "traceId")
            && ps <= cs
            && cs + cd <= ps + pd + 1
        {
            correct += 1;
        }
    }
    let accuracy = correct as f64 / clients.len() as f64;
    eprintln!(
        "in-process parent accuracy: {correct}/{} = {:.4}",
        clients.len(),
        accuracy
    );
    assert_eq!(
        correct,
        clients.len(),
        "every call must be the child of the request that made it"
    );
    // Every front request is its own trace root.
    assert!(front_servers.iter().all(|s| s.get("parentId").is_none()));
    assert!(
        stopped.stderr.contains(&format!("{total} linked")),
        "{}",
        stopped.stderr
    );
}

/// A request that an instrumented caller already traced joins that trace (W3C and B3), and an
/// unsampled decision is respected.
#[test]
fn incoming_context_is_joined() {
    require_root();
    let collector = Collector::start();
    let server = PythonServer::start();
    let pid = server.pid().to_string();
    let tracer = Tracer::attach_exporting(&pid, &collector.url(), &["--flush-interval-ms", "200"]);
    // Each piece is one write; a pause between pieces makes the server read them apart, as
    // it would from a client that sends its headers in several writes.
    let send = |pieces: &[&str]| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_nodelay(true).unwrap();
        let last = pieces.len() - 1;
        for (i, piece) in pieces.iter().enumerate() {
            let piece = match (i, i == last) {
                (0, true) => {
                    format!("GET /hello HTTP/1.1\r\nHost: x\r\n{piece}Connection: close\r\n\r\n")
                }
                (0, false) => format!("GET /hello HTTP/1.1\r\nHost: x\r\n{piece}"),
                (_, true) => format!("{piece}Connection: close\r\n\r\n"),
                _ => piece.to_string(),
            };
            s.write_all(piece.as_bytes()).unwrap();
            if i != last {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    };
    send(&["traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"]);
    send(&["b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n"]);
    // B3 headers read in three pieces, after a first read without any context.
    send(&[
        "",
        "X-B3-TraceId: 463ac35c9f6413ad48485a3953bb6124\r\n",
        "X-B3-SpanId: a2fb4a1d1a96d312\r\nX-B3-Sampled: 1\r\n",
    ]);
    // Unsampled, and said only in the head's second read.
    send(&[
        "",
        "traceparent: 00-11111111111111111111111111111111-2222222222222222-00\r\n",
    ]);
    send(&[""]);
    collector.wait_for_spans(4, Duration::from_secs(10));
    // Past the flush interval: an exported unsampled span would have arrived by now.
    std::thread::sleep(Duration::from_millis(600));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let spans = collector.spans();
    assert_eq!(
        spans.len(),
        4,
        "the unsampled request must not be exported: {spans:#?}"
    );
    let find = |trace: &str| {
        spans
            .iter()
            .find(|s| str_of(s, "traceId") == trace)
            .unwrap_or_else(|| panic!("no trace {trace}"))
    };
    assert_eq!(
        str_of(find("4bf92f3577b34da6a3ce929d0e0e4736"), "parentId"),
        "00f067aa0ba902b7"
    );
    assert_eq!(
        str_of(find("80f198ee56343ba864fe8b2a57d3eff7"), "parentId"),
        "e457b5a2e4d86bd1"
    );
    assert_eq!(
        str_of(find("463ac35c9f6413ad48485a3953bb6124"), "parentId"),
        "a2fb4a1d1a96d312"
    );
    assert!(
        spans
            .iter()
            .all(|s| str_of(s, "traceId") != "11111111111111111111111111111111")
    );
}

/// The trace context header the kernel writes never corrupts a request: a head split over
/// several writes and a request that already has a context are left alone, only the first of
/// pipelined requests gets one, 40 KB and 1 MiB bodies arrive intact (and 2 MiB sent from a
/// non-blocking socket in partial sends), and the ids written are
/// those of the exported client spans. Nor does it delay one: a client that leaves Nagle's
/// algorithm on gets its answers as fast as without the header (a request sent as two
/// segments waited for a delayed ACK, about 40 ms, each).
#[test]
fn injection_never_corrupts_requests() {
    require_root();
    let collector = Collector::start();
    let server = PythonServer::start();
    let dir = common::tempdir();
    let go = dir.join("go");
    let client = std::process::Command::new("python3")
        .arg(tracer_e2e::repo_root().join("tests/servers/inject_client.py"))
        .arg(server.port.to_string())
        .arg(&go)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the injection client");
    let mut client = tracer_e2e::ChildGuard(client);
    let pid = client.0.id().to_string();
    let tracer = Tracer::attach_exporting(&pid, &collector.url(), &["--flush-interval-ms", "200"]);
    std::fs::write(&go, b"go").unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(client.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    let status = client.0.wait().unwrap();
    assert!(status.success(), "client failed: {out}");
    let results: Value = serde_json::from_str(out.trim()).expect("client results");
    let spans = collector.wait_for_spans(32, Duration::from_secs(10));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);

    let header = |case: &str, name: &str| -> Vec<String> {
        results[case]["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
            .map(|h| h[1].as_str().unwrap().to_string())
            .collect()
    };
    for case in [
        "plain",
        "split",
        "pipe1",
        "pipe2",
        "own",
        "large",
        "nonblocking",
        "medium",
    ] {
        assert_eq!(
            header(case, "x-case"),
            vec![case.to_string()],
            "{case}: {results:#}"
        );
        assert_eq!(header(case, "host"), vec!["t".to_string()], "{case}");
    }
    let client_spans: Vec<&Value> = spans.iter().filter(|s| s["kind"] == "CLIENT").collect();
    assert_eq!(client_spans.len(), 32, "{spans:#?}");
    for case in ["plain", "pipe1", "large", "nonblocking", "medium"] {
        let tp = header(case, "traceparent");
        assert_eq!(
            tp.len(),
            1,
            "{case} gets exactly one traceparent: {results:#}"
        );
        let parts: Vec<&str> = tp[0].split('-').collect();
        assert_eq!(parts.len(), 4, "{}", tp[0]);
        assert!(
            client_spans
                .iter()
                .any(|s| s["traceId"] == parts[1] && s["id"] == parts[2]),
            "{case}: the injected ids {} are an exported client span's",
            tp[0]
        );
    }
    assert!(
        header("split", "traceparent").is_empty(),
        "a head split over writes is not touched"
    );
    assert!(
        header("pipe2", "traceparent").is_empty(),
        "only the first request of a send gets one"
    );
    assert_eq!(
        header("own", "traceparent"),
        vec!["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string()],
        "a request's own context is kept and not duplicated"
    );
    assert_eq!(results["large"]["body_len"], 1 << 20);
    assert_eq!(
        results["large"]["body_sha256"], results["large"]["sent_sha256"],
        "the body arrives intact"
    );
    assert_eq!(results["plain"]["request_line"], "GET /inspect HTTP/1.1");
    assert_eq!(results["nonblocking"]["body_len"], 2 << 20);
    assert_eq!(
        results["nonblocking"]["body_sha256"], results["nonblocking"]["sent_sha256"],
        "the body sent in pieces arrives intact"
    );
    assert_eq!(results["medium"]["body_len"], 40000);
    assert_eq!(
        results["medium"]["body_sha256"], results["medium"]["sent_sha256"],
        "the body arrives intact"
    );
    let nagle = &results["nagle"];
    assert!(
        nagle["traceparents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n == 1),
        "every request of the Nagle client got one header: {nagle}"
    );
    let median_ms = |v: &Value| {
        let mut ms: Vec<f64> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        ms.sort_by(f64::total_cmp);
        ms[ms.len() / 2]
    };
    assert!(
        median_ms(&nagle["latencies_ms"]) < 20.0,
        "a Nagle client's requests wait for delayed ACKs: {nagle}"
    );
    assert!(
        median_ms(&results["medium"]["latencies_ms"]) < 20.0,
        "a Nagle client's 40 KB requests wait for delayed ACKs: {}",
        results["medium"]["latencies_ms"]
    );
}

/// Injection never makes a read fail. A socket in the kernel's socket map reads through
/// `tcp_bpf_recvmsg`, which returns EAGAIN to a blocking read that a signal interrupts (where
/// the kernel restarts it otherwise): so blocking sockets are left out of the map, and one
/// switched to blocking after it connected is taken out at its first send. A client whose
/// reads a 5 ms timer interrupts while it waits for 200 ms answers sees no read fail on any of
/// its connections, and only the non-blocking one (a socket with a timeout) gets headers. (With
/// the blocking socket in the map, as before, each interrupted wait failed: about 40 a request.)
#[test]
fn injection_never_fails_a_blocking_read() {
    require_root();
    let server = PythonServer::start();
    let dir = common::tempdir();
    let go = dir.join("go");
    let mut client = tracer_e2e::ChildGuard(
        std::process::Command::new("python3")
            .arg(tracer_e2e::repo_root().join("tests/servers/signal_client.py"))
            .arg(server.port.to_string())
            .arg(&go)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the signal client"),
    );
    let pid = client.0.id().to_string();
    let tracer = Tracer::start(&["attach", "--pid", &pid, "--output", "json"]);
    std::fs::write(&go, b"go").unwrap();
    let out = common::client_output(&mut client);
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let results: Value = serde_json::from_str(out.trim()).expect("client results");
    for case in ["blocking", "blocking_after_connect", "timeout"] {
        assert_eq!(
            results[case]["eagain"], 0,
            "{case}: a read failed with EAGAIN: {results}"
        );
    }
    assert_eq!(results["blocking"]["traceparent"], false, "{results}");
    assert_eq!(
        results["blocking_after_connect"]["traceparent"], false,
        "{results}"
    );
    assert_eq!(
        results["timeout"]["traceparent"], true,
        "the non-blocking socket gets headers: {results}"
    );
    assert!(
        stopped
            .stderr
            .contains("2 connections watched, 0 released (no HTTP/1.x, or own context), 2 left alone (blocking sockets)"),
        "{}",
        stopped.stderr
    );
    // Every request is a client span all the same.
    let spans: Vec<Value> = stopped
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        spans.iter().filter(|s| s["kind"] == "CLIENT").count(),
        18,
        "{spans:#?}"
    );
}

/// A client connection opened before the tracer attached (a kept-alive pool) carries trace
/// context too: the tracer puts existing connections in the socket map at attach (non-blocking
/// ones: the client has a timeout, see `injection_never_fails_a_blocking_read`).
#[test]
fn connections_opened_before_attach_get_context() {
    require_root();
    let collector = Collector::start();
    let server = PythonServer::start();
    let dir = common::tempdir();
    let go = dir.join("go");
    // Connects and sends one request at once, then another after the tracer attached.
    let script = format!(
        r#"
import http.client, json, os, time
c = http.client.HTTPConnection("127.0.0.1", {port}, timeout=10)
c.request("GET", "/inspect"); before = json.loads(c.getresponse().read())
while not os.path.exists({go:?}): time.sleep(0.02)
c.request("GET", "/inspect"); after = json.loads(c.getresponse().read())
print(json.dumps({{"before": before, "after": after}}), flush=True)
"#,
        port = server.port,
        go = go.to_str().unwrap()
    );
    let mut client = common::python_client(&script);
    // Let it connect and finish its first request before the tracer exists.
    std::thread::sleep(Duration::from_millis(500));
    let pid = client.0.id().to_string();
    let tracer = Tracer::attach_exporting(&pid, &collector.url(), &["--flush-interval-ms", "200"]);
    std::fs::write(&go, b"go").unwrap();
    let out = common::client_output(&mut client);
    let results: Value = serde_json::from_str(out.trim()).unwrap();
    let spans = collector.wait_for_spans(1, Duration::from_secs(10));
    let stopped = tracer.stop();
    assert!(
        stopped
            .stderr
            .contains("connections opened before the tracer"),
        "{}",
        stopped.stderr
    );
    let traceparent = |doc: &Value| -> Vec<String> {
        doc["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case("traceparent"))
            .map(|h| h[1].as_str().unwrap().to_string())
            .collect()
    };
    assert!(traceparent(&results["before"]).is_empty());
    let after = traceparent(&results["after"]);
    assert_eq!(after.len(), 1, "{results:#}");
    let parts: Vec<&str> = after[0].split('-').collect();
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(
        (str_of(&spans[0], "traceId"), str_of(&spans[0], "id")),
        (parts[1], parts[2])
    );
}

/// `--inject-port` and `--inject-net` limit injection to chosen destinations: requests to
/// other destinations are sent untouched.
#[test]
fn injection_respects_destination_filters() {
    require_root();
    let server = PythonServer::start();
    let other_port = tracer_e2e::free_port().to_string();
    let own_port = server.port.to_string();
    let cases: [(&[&str], bool); 4] = [
        (&["--inject-port", &other_port], false),
        (&["--inject-port", &own_port], true),
        (&["--inject-net", "10.0.0.0/8"], false),
        (&["--inject-net", "127.0.0.0/8"], true),
    ];
    for (filter, injected) in cases {
        let dir = common::tempdir();
        let go = dir.join("go");
        let script = format!(
            r#"
import http.client, json, os, time
while not os.path.exists({go:?}): time.sleep(0.02)
c = http.client.HTTPConnection("127.0.0.1", {port}, timeout=10)
c.request("GET", "/inspect"); print(c.getresponse().read().decode(), flush=True)
"#,
            port = server.port,
            go = go.to_str().unwrap()
        );
        let mut client = common::python_client(&script);
        let pid = client.0.id().to_string();
        let mut args = vec!["attach", "--pid", &pid, "--output", "json"];
        args.extend_from_slice(filter);
        let tracer = Tracer::start(&args);
        std::fs::write(&go, b"go").unwrap();
        let out = common::client_output(&mut client);
        tracer.stop();
        let doc: Value = serde_json::from_str(out.trim()).unwrap();
        let has = doc["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0].as_str().unwrap().eq_ignore_ascii_case("traceparent"));
        assert_eq!(has, injected, "{filter:?}: {doc}");
    }
}

/// A client connection that needs no context injection — it carries something other than
/// HTTP/1.x (a database protocol, TLS, anything unparsed), or requests that bring their own
/// trace context (an instrumented client) — leaves the injector's socket map once the agent has
/// seen enough of it: its sends stop taking the kernel's sk_msg path, which cost about a
/// microsecond each. An HTTP connection without context of its own stays, and the opaque
/// one's bytes all arrive.
#[test]
fn connections_without_http_leave_the_injector() {
    require_root();
    let server = PythonServer::start();
    let dir = common::tempdir();
    let go = dir.join("go");
    let script = format!(
        r#"
import http.client, os, socket, threading, time
while not os.path.exists({go:?}): time.sleep(0.02)
listener = socket.create_server(("127.0.0.1", 0))
got = []
def sink():
    c, _ = listener.accept(); n = 0
    while data := c.recv(65536): n += len(data)
    got.append(n)
t = threading.Thread(target=sink); t.start()
s = socket.create_connection(listener.getsockname(), timeout=10)
for _ in range(100):
    s.sendall(b"PING\r\n"); time.sleep(0.02)
s.close(); t.join()
own = http.client.HTTPConnection("127.0.0.1", {port}, timeout=10)
for i in range(10):
    own.request("GET", "/inspect", headers={{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"}})
    own.getresponse().read()
time.sleep(1)
c = http.client.HTTPConnection("127.0.0.1", {port}, timeout=10)
c.request("GET", "/inspect"); c.getresponse().read()
print(got[0], flush=True)
"#,
        port = server.port,
        go = go.to_str().unwrap()
    );
    let mut client = common::python_client(&script);
    let pid = client.0.id().to_string();
    let tracer = Tracer::start(&["attach", "--pid", &pid, "--output", "json"]);
    std::fs::write(&go, b"go").unwrap();
    let out = common::client_output(&mut client);
    let stopped = tracer.stop();
    assert_eq!(
        out.trim(),
        "600",
        "every byte of the opaque connection arrived"
    );
    assert!(
        stopped
            .stderr
            .contains("injection: 1 headers, 3 connections watched, 2 released"),
        "{}",
        stopped.stderr
    );
}
