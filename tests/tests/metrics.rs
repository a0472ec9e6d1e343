//! `--metrics`: Prometheus metrics of the agent and RED metrics of the traced service.

mod common;

use std::time::{Duration, Instant};

use common::{Client, PythonServer, Tracer, require_root};

fn scrape(addr: &str) -> String {
    let (status, body) =
        tracer_e2e::http_request(addr, "GET", "/metrics", None, &[]).expect("scrape");
    assert_eq!(status, 200);
    String::from_utf8(body).unwrap()
}

/// The value of the sample line that starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The tracer attached to `server` with `--metrics` on a free port and `extra`; and the
/// metrics address.
fn attach_with_metrics(server: &PythonServer, extra: &[&str]) -> (Tracer, String) {
    let pid = server.pid().to_string();
    let addr = format!("127.0.0.1:{}", tracer_e2e::free_port());
    let mut args = vec![
        "attach",
        "--pid",
        &pid,
        "--output",
        "json",
        "--metrics",
        &addr,
    ];
    args.extend(extra);
    (Tracer::start(&args), addr)
}

/// The metrics at `addr` once `ready` says so (10 s at most).
fn scrape_until(addr: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(addr);
        if ready(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the requests:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_count_requests_errors_and_durations() {
    require_root();
    let server = PythonServer::start();
    let (tracer, addr) = attach_with_metrics(&server, &["--service-name", "cats"]);
    let mut client = Client::connect(server.port);
    for _ in 0..5 {
        assert_eq!(client.get("/hello").status, 200);
    }
    for _ in 0..2 {
        assert_eq!(client.get("/status/503").status, 503);
    }
    let hello = r#"service="cats",kind="server",protocol="http",route="GET /hello""#;
    let status = r#"service="cats",kind="server",protocol="http",route="GET /status/{id}""#;
    let text = scrape_until(&addr, |text| {
        sample(text, &format!("tracer_requests_total{{{status}}}")) == Some(2.0)
    });
    tracer.stop();
    assert_eq!(
        sample(&text, &format!("tracer_requests_total{{{hello}}}")),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("tracer_request_errors_total{{{hello}}}")),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, &format!("tracer_request_errors_total{{{status}}}")),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!("tracer_request_duration_seconds_count{{{hello}}}")
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!("tracer_request_duration_seconds_bucket{{{hello},le=\"+Inf\"}}")
        ),
        Some(5.0)
    );
    assert!(
        sample(&text, "tracer_events_total ").unwrap() >= 14.0,
        "{text}"
    );
    assert_eq!(sample(&text, "tracer_events_lost_total "), Some(0.0));
    assert_eq!(sample(&text, "tracer_requests_total "), Some(7.0));
    assert!(text.contains("# TYPE tracer_request_duration_seconds histogram"));
    // Per probe: runs missed always; runs and their time only with --probe-stats.
    assert_eq!(
        sample(
            &text,
            r#"tracer_probe_missed_runs_total{probe="tracer_sock_recv"}"#
        ),
        Some(0.0),
        "{text}"
    );
    assert!(!text.contains("tracer_probe_runs_total"), "{text}");
}

/// `--probe-stats`: the kernel counts each probe's runs and their time, and the agent shows
/// them per probe in its metrics and at exit.
#[test]
fn probe_stats_show_what_each_probe_costs() {
    require_root();
    let server = PythonServer::start();
    let (tracer, addr) = attach_with_metrics(&server, &["--probe-stats"]);
    let mut client = Client::connect(server.port);
    for _ in 0..20 {
        assert_eq!(client.get("/hello").status, 200);
    }
    let text = scrape_until(&addr, |text| {
        sample(text, "tracer_requests_total ") == Some(20.0)
    });
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    // The server's reads and writes, and the client's (every socket call on the host runs the
    // socket-layer probes, traced or not).
    for probe in ["tracer_sock_recv", "tracer_sock_send"] {
        let runs = sample(
            &text,
            &format!("tracer_probe_runs_total{{probe=\"{probe}\"}}"),
        );
        assert!(runs.is_some_and(|r| r >= 40.0), "{probe}: {runs:?}\n{text}");
        let seconds = sample(
            &text,
            &format!("tracer_probe_run_seconds_total{{probe=\"{probe}\"}}"),
        )
        .unwrap();
        // More than nothing, and less than a millisecond a run.
        let runs = runs.unwrap();
        assert!(
            seconds > 0.0 && seconds < runs / 1000.0,
            "{probe}: {seconds} s\n{text}"
        );
        assert_eq!(
            sample(
                &text,
                &format!("tracer_probe_missed_runs_total{{probe=\"{probe}\"}}")
            ),
            Some(0.0)
        );
    }
    let summary = stopped
        .stderr
        .lines()
        .find(|l| l.starts_with("tracer: probes: "))
        .unwrap_or_else(|| panic!("no probe summary: {}", stopped.stderr));
    assert!(
        summary.contains("tracer_sock_recv ") && summary.contains(" ns a run"),
        "{summary}"
    );
}

#[test]
fn a_taken_metrics_port_is_a_start_error() {
    require_root();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = common::run_tracer_to_exit(
        &["run", "--comm", "nothing", "--metrics", &addr],
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let line = out.stderr.trim();
    assert!(line.contains("--metrics") && !line.contains('\n'), "{line}");
}
