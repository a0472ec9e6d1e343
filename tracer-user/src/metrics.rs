//! `--metrics ADDR`: Prometheus metrics of the agent itself (events, losses, connections,
//! spans, export queue, per-probe errors) and of what it traces (RED: request counts, errors
//! and duration histograms per service, kind and route).
//!
//! The event loop renders the exposition text once a second into a shared string; the HTTP
//! endpoint only serves the latest copy, so a scrape never touches capture state.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use http_body_util::Full;
use hyper::{Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use log::warn;

use crate::spans::{Span, SpanKind};
use rustc_hash::FxHashMap;

/// Upper bounds (seconds) of the duration histogram buckets.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Label sets kept; past this, new routes are counted under route="{other}" so that a flood
/// of distinct paths cannot grow the agent's memory or the scrape without bound.
const MAX_SERIES: usize = 5_000;

#[derive(Clone, Debug, Default)]
struct Series {
    count: u64,
    errors: u64,
    sum_seconds: f64,
    buckets: [u64; BUCKETS.len()],
}

/// (service, kind, protocol, route) of a series.
type SeriesKey = (String, &'static str, &'static str, String);

/// Request rate, errors and duration per (service, kind, protocol, route).
#[derive(Default)]
pub struct Red {
    /// By the series' labels joined with NULs (looked up without building a key each time).
    series: FxHashMap<String, (SeriesKey, Series)>,
    /// Scratch for that lookup key.
    lookup: String,
}

impl Red {
    pub fn observe(&mut self, span: &Span) {
        let Self { series, lookup } = self;
        let service = span
            .local_endpoint
            .service_name
            .as_deref()
            .unwrap_or_default();
        let kind = match span.kind {
            SpanKind::Server => "server",
            SpanKind::Client => "client",
        };
        let protocol = match span.tags.get("db.system") {
            Some("postgresql") => "postgresql",
            Some("redis") => "redis",
            _ => "http",
        };
        let mut route = span.name.as_str();
        let key_of = |lookup: &mut String, route: &str| {
            lookup.clear();
            for part in [service, kind, protocol, route] {
                lookup.push_str(part);
                lookup.push('\0');
            }
        };
        key_of(lookup, route);
        if !series.contains_key(lookup.as_str()) && series.len() >= MAX_SERIES {
            route = "{other}";
            key_of(lookup, route);
        }
        if !series.contains_key(lookup.as_str()) {
            let labels = (service.to_string(), kind, protocol, route.to_string());
            series.insert(lookup.clone(), (labels, Series::default()));
        }
        let Some((_, s)) = series.get_mut(lookup.as_str()) else {
            return;
        };
        let seconds = span.duration as f64 / 1e6;
        s.count += 1;
        s.sum_seconds += seconds;
        if span.tags.contains_key("error") {
            s.errors += 1;
        }
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                s.buckets[i] += 1;
            }
        }
    }

    pub fn render(&self, out: &mut String) {
        let mut all: Vec<&(SeriesKey, Series)> = self.series.values().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let keys: Vec<&SeriesKey> = all.iter().map(|(k, _)| k).collect();
        let by_key: HashMap<&SeriesKey, &Series> = all.iter().map(|(k, s)| (k, s)).collect();
        let _ = writeln!(
            out,
            "# HELP tracer_requests_total Requests and database calls seen, by service, span kind, protocol and route."
        );
        let _ = writeln!(out, "# TYPE tracer_requests_total counter");
        for k in &keys {
            let _ = writeln!(
                out,
                "tracer_requests_total{{{}}} {}",
                labels(k),
                by_key[*k].count
            );
        }
        let _ = writeln!(
            out,
            "# HELP tracer_request_errors_total Requests that failed (HTTP 5xx, a database error, reset, no response)."
        );
        let _ = writeln!(out, "# TYPE tracer_request_errors_total counter");
        for k in &keys {
            let _ = writeln!(
                out,
                "tracer_request_errors_total{{{}}} {}",
                labels(k),
                by_key[*k].errors
            );
        }
        let _ = writeln!(
            out,
            "# HELP tracer_request_duration_seconds Request durations, first request byte to last response byte."
        );
        let _ = writeln!(out, "# TYPE tracer_request_duration_seconds histogram");
        for k in &keys {
            let s = by_key[*k];
            let l = labels(k);
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "tracer_request_duration_seconds_bucket{{{l},le=\"{bound}\"}} {}",
                    s.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "tracer_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(
                out,
                "tracer_request_duration_seconds_sum{{{l}}} {}",
                s.sum_seconds
            );
            let _ = writeln!(
                out,
                "tracer_request_duration_seconds_count{{{l}}} {}",
                s.count
            );
        }
    }
}

fn labels((service, kind, protocol, route): &SeriesKey) -> String {
    format!(
        "service=\"{}\",kind=\"{kind}\",protocol=\"{protocol}\",route=\"{}\"",
        escape(service),
        escape(route)
    )
}

/// Label values escaped as the exposition format wants.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends one counter or gauge.
pub fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Serves `GET /metrics` with the latest rendering from `text` on `listener`.
pub fn serve(listener: tokio::net::TcpListener, text: Arc<RwLock<String>>) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let text = text.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let text = text.clone();
                    async move {
                        let mut r = if req.uri().path() == "/metrics" {
                            let body = text.read().map(|t| t.clone()).unwrap_or_default();
                            let mut r = Response::new(Full::new(Bytes::from(body)));
                            r.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static(
                                    "text/plain; version=0.0.4",
                                ),
                            );
                            r
                        } else {
                            Response::new(Full::new(Bytes::from_static(b"see /metrics\n")))
                        };
                        if req.uri().path() != "/metrics" {
                            *r.status_mut() = StatusCode::NOT_FOUND;
                        }
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    warn!("metrics connection: {e}");
                }
            });
        }
    });
}

/// Binds the metrics address up front, so a taken port is a start-up error, not a log line.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("--metrics {addr}: cannot listen: {e}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::tests_support::span;

    #[test]
    fn red_metrics_count_errors_and_bucket_durations() {
        let mut red = Red::default();
        let mut slow = span();
        slow.duration = 300_000;
        slow.tags.insert("error", "503");
        red.observe(&span());
        red.observe(&slow);
        let mut out = String::new();
        red.render(&mut out);
        let l = r#"service="cats",kind="server",protocol="http",route="GET /hello""#;
        assert!(
            out.contains(&format!("tracer_requests_total{{{l}}} 2")),
            "{out}"
        );
        assert!(out.contains(&format!("tracer_request_errors_total{{{l}}} 1")));
        assert!(out.contains(&format!(
            "tracer_request_duration_seconds_bucket{{{l},le=\"0.0025\"}} 1"
        )));
        assert!(out.contains(&format!(
            "tracer_request_duration_seconds_bucket{{{l},le=\"0.5\"}} 2"
        )));
        assert!(out.contains(&format!("tracer_request_duration_seconds_count{{{l}}} 2")));
    }

    #[test]
    fn series_are_bounded() {
        let mut red = Red::default();
        for i in 0..MAX_SERIES + 100 {
            let mut s = span();
            s.name = format!("GET /r{i}");
            red.observe(&s);
        }
        assert_eq!(red.series.len(), MAX_SERIES + 1);
        let mut out = String::new();
        red.render(&mut out);
        assert!(out.contains(r#"route="{other}"} 100"#));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
