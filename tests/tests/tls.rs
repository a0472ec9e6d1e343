//! End-to-end: TLS traffic seen in plaintext through the OpenSSL uprobes. Real servers (nginx
//! with a self-signed certificate, Python's ssl module) and clients (curl, Python's ssl), the
//! real tracer, spans read back from the collector. The spans must look exactly like the
//! plaintext ones, and the ciphertext the syscall probes see must not add any.

mod common;

use std::{process::Command, time::Duration};

use common::{PythonServer, Tracer, require_root, self_signed_certificate, tempdir};
use serde_json::Value;
use tracer_e2e::{Collector, python, repo_root};

fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["tags"][key].as_str()
}

/// (kind, name, status) of every span, sorted.
fn shapes(spans: &[Value]) -> Vec<(String, String, String)> {
    let mut got: Vec<_> = spans
        .iter()
        .map(|s| {
            (
                s["kind"].as_str().unwrap_or("-").to_string(),
                s["name"].as_str().unwrap().to_string(),
                tag(s, "http.status_code").unwrap_or("-").to_string(),
            )
        })
        .collect();
    got.sort();
    got
}

fn assert_client_encloses_server(spans: &[Value]) {
    // A send is dated by its return. On two CPUs the reader of a loopback send often runs
    // before the writer returns from SSL_write (the wakeup preempts it), so the server's end
    // may trail the client's by that wait; the start has no such slack.
    const END_SLACK_US: u64 = 2_000;
    for server in spans.iter().filter(|s| s["kind"] == "SERVER") {
        let (ss, sd) = (
            server["timestamp"].as_u64().unwrap(),
            server["duration"].as_u64().unwrap(),
        );
        let client = spans
            .iter()
            .filter(|s| {
                s["kind"] == "CLIENT" && s["tags"]["http.path"] == server["tags"]["http.path"]
            })
            .find(|c| {
                let (cs, cd) = (
                    c["timestamp"].as_u64().unwrap(),
                    c["duration"].as_u64().unwrap(),
                );
                cs <= ss + 1 && ss + sd <= cs + cd + END_SLACK_US
            });
        assert!(
            client.is_some(),
            "no CLIENT span encloses {server}: {spans:#?}"
        );
    }
}

/// nginx serving HTTPS (a self-signed certificate) to curl, both traced by `tracer run`: the
/// same spans as over plaintext, and an incoming traceparent in an encrypted request is read.
#[test]
fn nginx_https_and_curl() {
    require_root();
    let collector = Collector::start();
    let dir = tempdir();
    let (cert, key) = self_signed_certificate(&dir);
    let (_nginx, port) = common::start_https_nginx(&dir, &cert, &key);

    let tracer = Tracer::run_for(&["nginx", "curl"], port, &collector.url());
    let base = format!("https://127.0.0.1:{port}");
    common::curl_index_big_err(&base);
    let spans = collector.wait_for_spans(6, Duration::from_secs(10));
    assert_eq!(
        shapes(&spans),
        [
            ("CLIENT", "GET /big.txt", "200"),
            ("CLIENT", "GET /err", "503"),
            ("CLIENT", "GET /index.html", "200"),
            ("SERVER", "GET /big.txt", "200"),
            ("SERVER", "GET /err", "503"),
            ("SERVER", "GET /index.html", "200"),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())),
        "{spans:#?}"
    );
    for s in &spans {
        let service = if s["kind"] == "SERVER" {
            "nginx"
        } else {
            "curl"
        };
        assert_eq!(s["localEndpoint"]["serviceName"], service);
        let server_port = if s["kind"] == "SERVER" {
            &s["localEndpoint"]["port"]
        } else {
            &s["remoteEndpoint"]["port"]
        };
        assert_eq!(server_port.as_u64(), Some(u64::from(port)));
        assert_eq!(
            tag(s, "http.host"),
            Some(format!("127.0.0.1:{port}").as_str())
        );
    }
    let big = spans
        .iter()
        .find(|s| s["kind"] == "SERVER" && s["name"] == "GET /big.txt")
        .unwrap();
    assert_eq!(
        tag(big, "http.response.size").map(|n| n.parse::<u64>().unwrap() > 200_000),
        Some(true)
    );
    assert_client_encloses_server(&spans);

    // Trace context arrives encrypted; the server span joins the caller's trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    collector.reset();
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}\\n", "-H"])
        .arg(format!("traceparent: 00-{trace_id}-{parent}-01"))
        .arg(format!("{base}/index.html"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200\n");
    let spans = collector.wait_for_spans(2, Duration::from_secs(10));
    let server = spans
        .iter()
        .find(|s| s["kind"] == "SERVER")
        .unwrap_or_else(|| panic!("no server span: {spans:#?}"));
    assert_eq!(server["traceId"], trace_id);
    assert_eq!(server["parentId"], parent);

    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("TLS: OpenSSL probes on"),
        "{}",
        stopped.stderr
    );
    // Two connections, both ends traced: four TLS connections, each decrypted, none counted
    // as carrying no known protocol (its handshake is none of those parsed).
    assert!(
        stopped.stderr.contains(
            "0 not parsed (no known protocol), 4 began with a TLS handshake, 4 decrypted (OpenSSL)"
        ),
        "{}",
        stopped.stderr
    );
    // Nothing else was reported: the ciphertext made no spans of its own.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(collector.spans().len(), 2, "{:#?}", collector.spans());
}

/// No header can carry the context inside TLS: the two halves of each HTTPS hop carry the same
/// link key (addresses and the TCP sequence number of the request's first record), and the
/// relay joins them. curl sends three requests on one connection to nginx; each server span
/// comes out as the child of its client span.
#[test]
fn tls_hops_link_through_the_relay() {
    require_root();
    let collector = Collector::start();
    let dir = tempdir();
    let (cert, key) = self_signed_certificate(&dir);
    let (_nginx, port) = common::start_https_nginx(&dir, &cert, &key);
    let (relay, relay_url) = common::start_relay(&collector.url());
    let tracer = Tracer::run_for(&["nginx", "curl"], port, &relay_url);
    let base = format!("https://127.0.0.1:{port}");
    common::curl_index_big_err(&base);
    let spans = collector.wait_for_spans(6, Duration::from_secs(15));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    relay.stop();
    assert_eq!(spans.len(), 6, "{spans:#?}");
    for server in spans.iter().filter(|s| s["kind"] == "SERVER") {
        let path = &server["tags"]["http.path"];
        let client = spans
            .iter()
            .find(|s| s["kind"] == "CLIENT" && &s["tags"]["http.path"] == path)
            .unwrap_or_else(|| panic!("no client span of {path}: {spans:#?}"));
        assert_eq!(server["parentId"], client["id"], "{spans:#?}");
        assert_eq!(server["traceId"], client["traceId"], "{spans:#?}");
    }
    assert!(
        spans.iter().all(|s| s["tags"].get("tracer.link").is_none()),
        "the relay strips link keys: {spans:#?}"
    );
}

/// Python's ssl module on both ends (SSL_read_ex/SSL_write_ex): a server traced from before,
/// and a client started after the tracer that loads its own copy of libssl (a different file
/// from the system's), which the tracer must find in the process's memory map.
#[test]
fn python_tls_with_a_private_libssl_copy() {
    require_root();
    let collector = Collector::start();
    let dir = tempdir();
    let (cert, key) = self_signed_certificate(&dir);
    let server = PythonServer::start_tls(&cert, &key);
    let port_s = server.port.to_string();
    let tracer = Tracer::run_for(&["python3"], server.port, &collector.url());
    // A private copy of the system libssl, found first through LD_LIBRARY_PATH.
    let system = [
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
        "/lib/x86_64-linux-gnu/libssl.so.3",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("libssl.so.3");
    let private = dir.join("lib");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::copy(system, private.join("libssl.so.3")).unwrap();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let parent = "b7ad6b7169203331";
    let out = Command::new(python())
        .arg(repo_root().join("tests/servers/tls_client.py"))
        .arg(&port_s)
        .arg("5")
        .args(["--wait", "2.5", "--traceparent"])
        .arg(format!("00-{trace_id}-{parent}-01"))
        .env("LD_LIBRARY_PATH", &private)
        .output()
        .expect("tls client");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200\n200\n200\n200\n500\n"
    );

    let spans = collector.wait_for_spans(10, Duration::from_secs(10));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped
            .stderr
            .contains(&format!("{}/libssl.so.3", private.display())),
        "the private libssl copy was not found: {}",
        stopped.stderr
    );
    assert_eq!(spans.len(), 10, "{spans:#?}");
    let mut expected = Vec::new();
    for kind in ["CLIENT", "SERVER"] {
        for _ in 0..4 {
            expected.push((
                kind.to_string(),
                "GET /bytes/{id}".to_string(),
                "200".to_string(),
            ));
        }
        expected.push((
            kind.to_string(),
            "GET /status/{id}".to_string(),
            "500".to_string(),
        ));
    }
    expected.sort();
    assert_eq!(shapes(&spans), expected);
    assert_client_encloses_server(&spans);
    for s in &spans {
        assert_eq!(s["localEndpoint"]["serviceName"], "python3");
    }
    // The first request carried a traceparent: its server span joined that trace.
    let joined: Vec<_> = spans
        .iter()
        .filter(|s| s["kind"] == "SERVER" && s["traceId"] == trace_id)
        .collect();
    assert_eq!(joined.len(), 1, "{spans:#?}");
    assert_eq!(joined[0]["parentId"], parent);
}

/// A client with OpenSSL linked in statically (no libssl.so mapped): the tracer finds
/// SSL_read/SSL_write in the executable when the process first shows up.
#[test]
fn statically_linked_openssl() {
    require_root();
    let collector = Collector::start();
    let dir = tempdir();
    let (cert, key) = self_signed_certificate(&dir);
    let server = PythonServer::start_tls(&cert, &key);
    // A short name: the command name is what --comm matches (15 bytes at most).
    let client = dir.join("sslstatic");
    let out = Command::new("gcc")
        .args(["-O2", "-D_GNU_SOURCE", "-o"])
        .arg(&client)
        .arg(repo_root().join("tests/servers/static_tls_client.c"))
        .args([
            "-Wl,-Bstatic",
            "-lssl",
            "-lcrypto",
            "-Wl,-Bdynamic",
            "-ldl",
            "-pthread",
        ])
        .output()
        .expect("gcc (packages gcc and libssl-dev)");
    assert!(out.status.success(), "building the static client: {out:?}");
    let port_s = server.port.to_string();
    let tracer = Tracer::run_for(&["sslstatic", "python3"], server.port, &collector.url());
    let out = Command::new(&client)
        .args([port_s.as_str(), "3", "2500"])
        .output()
        .expect("static client");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200\n200\n200\n");
    let spans = collector.wait_for_spans(6, Duration::from_secs(10));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("/exe (4 functions)"),
        "the executable's OpenSSL was not found: {}",
        stopped.stderr
    );
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let clients: Vec<_> = spans.iter().filter(|s| s["kind"] == "CLIENT").collect();
    assert_eq!(clients.len(), 3, "{spans:#?}");
    for c in clients {
        assert_eq!(c["localEndpoint"]["serviceName"], "sslstatic");
        assert_eq!(c["name"], "GET /bytes/{id}");
        assert_eq!(tag(c, "http.status_code"), Some("200"));
    }
    assert_client_encloses_server(&spans);
}
