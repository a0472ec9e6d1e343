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
