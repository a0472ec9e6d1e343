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

#[test]
fn metrics_count_requests_errors_and_durations() {
    require_root();
    let server = PythonServer::start();
    let pid = server.pid().to_string();
    let addr = format!("127.0.0.1:{}", tracer_e2e::free_port());
    let tracer = Tracer::start(&[
        "attach",
        "--pid",
        &pid,
        "--output",
        "json",
        "--service-name",
        "cats",
        "--metrics",
        &addr,
    ]);
    let mut client = Client::connect(server.port);
    for _ in 0..5 {
        assert_eq!(client.get("/hello").status, 200);
    }
    for _ in 0..2 {
        assert_eq!(client.get("/status/503").status, 503);
    }
    let hello = r#"service="cats",kind="server",protocol="http",route="GET /hello""#;
    let status = r#"service="cats",kind="server",protocol="http",route="GET /status/{id}""#;
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(&addr);
        if sample(&text, &format!("tracer_requests_total{{{status}}}")) == Some(2.0) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the requests:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
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
