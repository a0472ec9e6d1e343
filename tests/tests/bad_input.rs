//! End-to-end: malformed and adversarial HTTP between a traced client and a traced server
//! (tests/servers/adversarial.py): huge heads, heads without CRLF or with bare LFs, binary
//! garbage, NUL and high bytes, overflowing lengths and chunk sizes, truncated chunks, 100k
//! pipelined requests, malformed trace context headers, and broken responses of each kind.
//! The parsers' own unit tests and fuzz targets cover the bytes; this covers the whole agent
//! and the kernel's programs (the injector parses every request head a traced client sends).

mod common;

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Tracer, memory_kib, metric, require_root, tempdir, wait_for_file, wait_until};
use serde_json::Value;
use tracer_e2e::{ChildGuard, free_port, repo_root};

/// The agent's resident memory target (as with 10k open connections, `scale.rs`).
const RSS_LIMIT_KIB: u64 = 64 * 1024;

fn is_id(v: &Value, lens: &[usize]) -> bool {
    v.as_str().is_some_and(|s| {
        lens.contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            && s.bytes().any(|b| b != b'0')
    })
}

/// The agent neither crashes nor grows, the bytes arrive as sent (save the header the
/// injector adds to requests it understands, at most one a request), every span it exports
/// has valid ids and bounded tags, and a plain request after it all is traced and linked as
/// ever.
#[test]
fn adversarial_http_never_crashes_corrupts_or_bloats_the_agent() {
    require_root();
    let dir = tempdir();
    let script = repo_root().join("tests/servers/adversarial.py");
    let (port_file, log, go) = (dir.join("port"), dir.join("log"), dir.join("go"));
    let server = ChildGuard(
        Command::new("python3")
            .arg(&script)
            .arg("server")
            .arg(&port_file)
            .arg(&log)
            .spawn()
            .expect("start the adversarial server"),
    );
    let port = wait_for_file(&port_file, Duration::from_secs(10))
        .trim()
        .to_string();
    let mut client = ChildGuard(
        Command::new("python3")
            .arg(&script)
            .args(["client", &port])
            .arg(&go)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the adversarial client"),
    );
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let (server_pid, client_pid) = (server.0.id().to_string(), client.0.id().to_string());
    let tracer = Tracer::start(&[
        "run",
        "--pid",
        &server_pid,
        "--pid",
        &client_pid,
        "--port",
        &port,
        "--output",
        "json",
        "--metrics",
        &metrics_addr,
    ]);
    std::fs::write(&go, b"go").unwrap();
    let out = common::client_output(&mut client);
    let after_spans = |text: &str| {
        text.lines()
            .filter(|l| l.contains("\"http.path\":\"/after\""))
            .count()
    };
    wait_until(Duration::from_secs(10), "the /after spans", || {
        after_spans(&tracer.stdout()) == 2
    });
    // The garbage connections are left unparsed, and counted (the metrics refresh each second).
    wait_until(
        Duration::from_secs(5),
        "unparsed connections counted",
        || metric(metrics_port, "tracer_connections_unparsed_total") >= 2,
    );
    let (_, peak_kib) = memory_kib(tracer.pid());
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(!stopped.stderr.contains("panicked"), "{}", stopped.stderr);
    assert!(
        peak_kib <= RSS_LIMIT_KIB,
        "the agent peaked at {peak_kib} KiB"
    );

    // The bytes, both ways.
    let results: Value = serde_json::from_str(out.trim()).expect("client results");
    let received: HashMap<u64, Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["port"].as_u64().unwrap(), v))
        .collect();
    for case in results["cases"].as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let server_saw = &received[&case["port"].as_u64().unwrap()];
        assert_eq!(
            (&server_saw["bytes"], &server_saw["sha256"]),
            (&case["sent_bytes"], &case["sent_sha256"]),
            "{name}: the server received what the client sent: {server_saw} {case}"
        );
        let added = server_saw["context_headers"].as_i64().unwrap()
            - case["context_headers"].as_i64().unwrap();
        assert!(
            (0..=server_saw["heads"].as_i64().unwrap()).contains(&added),
            "{name}: {added} headers added to {} requests",
            server_saw["heads"]
        );
        if let Some(expected) = case.get("expected_sha256") {
            assert_eq!(&case["received_sha256"], expected, "{name}");
        }
        if name == "pipelined-100k" {
            assert_eq!(server_saw["heads"], 100_000);
            assert_eq!(
                case["received_bytes"],
                100_000 * 40,
                "every request answered"
            );
        }
    }

    // The spans: ids valid, tags bounded, the 200s the server sent reported as such.
    let spans: Vec<Value> = stopped
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a span per line"))
        .collect();
    for span in &spans {
        assert!(is_id(&span["traceId"], &[16, 32]), "{span}");
        assert!(is_id(&span["id"], &[16]), "{span}");
        if span.get("parentId").is_some() {
            assert!(is_id(&span["parentId"], &[16]), "{span}");
        }
        for (key, value) in span["tags"].as_object().unwrap() {
            // 256 bytes and an ellipsis at most.
            assert!(
                value.as_str().unwrap().len() <= 259,
                "{key} unbounded: {span}"
            );
        }
        let path = span["tags"]["http.path"].as_str().unwrap_or("");
        if path == "/p" && span["kind"] == "SERVER" {
            assert_eq!(span["tags"]["http.status_code"], "200", "{span}");
        }
    }
    let pipelined = spans
        .iter()
        .filter(|s| s["tags"]["http.path"] == "/p")
        .count();
    assert!(
        (1..=200_000).contains(&pipelined),
        "{pipelined} spans of the pipelined requests"
    );
    // Client and server tell the same story of each broken response. The client shut down its
    // sending side after its request, so its socket closed when the server's FIN came, before
    // it had read the response: its connection must last until it has (it used to end there,
    // the response then read as another connection's, the request "closed before response").
    let outcome = |kind: &str, path: &str| {
        spans
            .iter()
            .find(|s| s["kind"] == kind && s["tags"]["http.path"] == path)
            .map(|s| {
                (
                    s["tags"]["http.status_code"].clone(),
                    s["tags"]["error"].clone(),
                )
            })
    };
    for case in results["cases"].as_array().unwrap() {
        let Some(name) = case["case"].as_str().unwrap().strip_prefix("response-") else {
            continue;
        };
        let path = format!("/case/{name}");
        let client = outcome("CLIENT", &path);
        assert!(client.is_some(), "no client span of {path}: {spans:#?}");
        assert_eq!(client, outcome("SERVER", &path), "{path}");
    }
    // The plain request at the end: a client span, and the server's, its child through the
    // header the kernel wrote.
    assert!(
        results["after"]
            .as_str()
            .unwrap()
            .starts_with("HTTP/1.1 200 OK")
    );
    let after: Vec<&Value> = spans
        .iter()
        .filter(|s| s["tags"]["http.path"] == "/after")
        .collect();
    let (Some(client_span), Some(server_span)) = (
        after.iter().find(|s| s["kind"] == "CLIENT"),
        after.iter().find(|s| s["kind"] == "SERVER"),
    ) else {
        panic!("no client and server span of /after: {after:#?}");
    };
    assert_eq!(client_span["tags"]["http.status_code"], "200");
    assert_eq!(server_span["tags"]["http.status_code"], "200");
    assert_eq!(server_span["traceId"], client_span["traceId"]);
    assert_eq!(server_span["parentId"], client_span["id"]);
}
