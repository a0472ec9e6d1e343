//! Zipkin v2 HTTP export: JSON batches POSTed to `/api/v2/spans`, gzipped unless the collector
//! refuses it, retried with capped exponential backoff while the collector is down or answers
//! 5xx. The batch being retried stays in memory; new spans wait in the bounded queue behind it,
//! so an outage loses nothing until that queue is full, and then loses counted spans.

use std::{
    io::Write as _,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use flate2::{Compression, write::GzEncoder};
use log::{info, warn};
use rand::Rng as _;
use reqwest::{StatusCode, Url, header};
use tokio::{sync::mpsc, time::Instant};

use super::{EncodedSpan, ExportStats};

/// Sent with every batch, so that a tracer tracing the collector's host can tell its own
/// export traffic apart and not trace it (which would feed back a span per batch).
pub const USER_AGENT: &str = concat!("tracer/", env!("CARGO_PKG_VERSION"));

/// How often a filling batch looks at the queue.
const BATCH_POLL: Duration = Duration::from_millis(50);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct ZipkinConfig {
    /// The full span endpoint (`.../api/v2/spans`).
    pub url: Url,
    pub batch_size: usize,
    /// Longest time a span waits for its batch to fill.
    pub flush_interval: Duration,
    pub queue_capacity: usize,
    pub gzip: bool,
    pub request_timeout: Duration,
}

enum Sent {
    Accepted,
    /// The collector will never take this batch (4xx): retrying cannot help.
    Rejected(String),
    /// Worth retrying: network error, timeout, 5xx, 429.
    Failed(String),
}

/// A span as a member of a batch's JSON array.
pub trait JsonSpan: Send + 'static {
    fn write_json(&self, out: &mut Vec<u8>);
}

/// Spans built here, encoded when queued.
impl JsonSpan for EncodedSpan {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

/// Spans the relay received as JSON.
impl JsonSpan for serde_json::Value {
    fn write_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("a JSON value always serializes");
    }
}

/// `[span,span,...]`
fn batch_json<T: JsonSpan>(batch: &[T]) -> Vec<u8> {
    let mut json = Vec::with_capacity(batch.len() * 640 + 2);
    json.push(b'[');
    for (i, span) in batch.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        span.write_json(&mut json);
    }
    json.push(b']');
    json
}

/// Sends what arrives on `rx` to Zipkin until `rx` closes: spans built here, or (for the relay)
/// spans received as JSON.
pub async fn run<T: JsonSpan>(
    config: ZipkinConfig,
    mut rx: mpsc::Receiver<T>,
    stats: Arc<ExportStats>,
) {
    let client = match reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .timeout(config.request_timeout)
        .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            // Only a broken TLS backend gets here; keep draining so capture is unaffected.
            warn!("cannot create the HTTP client for Zipkin: {e}; spans will be counted as failed");
            while let Some(_span) = rx.recv().await {
                stats.failed.fetch_add(1, Relaxed);
            }
            return;
        }
    };
    let mut exporter = BatchSender {
        client,
        config,
        stats,
        outage: None,
    };
    let batch_size = exporter.config.batch_size.max(1);
    let mut batch = Vec::with_capacity(batch_size);
    loop {
        if rx.recv_many(&mut batch, batch_size).await == 0 {
            return;
        }
        // Fill the batch by looking at the queue now and then, not by waiting on it: a task
        // waiting on the queue is woken for every span (a thread wakeup each, under load
        // tens of thousands a second).
        let deadline = Instant::now() + exporter.config.flush_interval;
        while batch.len() < batch_size {
            let room = batch_size - batch.len();
            if rx.len() >= room || rx.is_closed() {
                rx.recv_many(&mut batch, room).await;
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                // What is there, without waiting for more.
                while batch.len() < batch_size {
                    match rx.try_recv() {
                        Ok(span) => batch.push(span),
                        Err(_) => break,
                    }
                }
                break;
            }
            tokio::time::sleep_until(deadline.min(now + BATCH_POLL)).await;
        }
        exporter.send(&batch).await;
        batch.clear();
    }
}

struct BatchSender {
    client: reqwest::Client,
    config: ZipkinConfig,
    stats: Arc<ExportStats>,
    /// When the current run of failures began, for one warning per outage and one recovery
    /// message.
    outage: Option<(Instant, u64)>,
}

impl BatchSender {
    async fn send<T: JsonSpan>(&mut self, batch: &[T]) {
        let n = batch.len() as u64;
        let json = batch_json(batch);
        let gzipped = self.config.gzip.then(|| gzip(&json));
        let mut backoff = FIRST_BACKOFF;
        loop {
            let result = match &gzipped {
                Some(body) => match self.post(body.clone(), true).await {
                    // Zipkin takes gzip; a collector that does not says so with 400/415.
                    Sent::Rejected(why) => {
                        let plain = self.post(json.clone(), false).await;
                        if matches!(plain, Sent::Accepted) {
                            info!(
                                "the collector refused gzip ({why}); sending uncompressed from now on"
                            );
                            self.config.gzip = false;
                        }
                        plain
                    }
                    other => other,
                },
                None => self.post(json.clone(), false).await,
            };
            match result {
                Sent::Accepted => {
                    self.stats.exported.fetch_add(n, Relaxed);
                    self.stats.batches.fetch_add(1, Relaxed);
                    if let Some((since, attempts)) = self.outage.take() {
                        info!(
                            "collector is back after {:.1?} and {attempts} failed attempts",
                            since.elapsed()
                        );
                    }
                    return;
                }
                Sent::Rejected(why) => {
                    let failed = self.stats.failed.fetch_add(n, Relaxed) + n;
                    warn!(
                        "the collector rejected a batch of {n} spans: {why} ({failed} spans failed so far)"
                    );
                    return;
                }
                Sent::Failed(why) => {
                    let (_, attempts) = self.outage.get_or_insert((Instant::now(), 0));
                    *attempts += 1;
                    if attempts.is_power_of_two() {
                        warn!(
                            "cannot export to {}: {why}; retrying (attempt {attempts})",
                            self.config.url
                        );
                    }
                    self.stats.retries.fetch_add(1, Relaxed);
                    // Jitter keeps a fleet of agents from retrying in lockstep after an outage.
                    let jitter = rand::rng().random_range(0.5..1.0);
                    tokio::time::sleep(backoff.mul_f64(jitter)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn post(&self, body: Vec<u8>, gzipped: bool) -> Sent {
        let mut request = self
            .client
            .post(self.config.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        if gzipped {
            request = request.header(header::CONTENT_ENCODING, "gzip");
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    Sent::Accepted
                } else if status.is_client_error()
                    && !matches!(
                        status,
                        StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT
                    )
                {
                    let text = response.text().await.unwrap_or_default();
                    Sent::Rejected(format!("{status}: {}", first_line(&text)))
                } else {
                    Sent::Failed(status.to_string())
                }
            }
            Err(e) => Sent::Failed(error_chain(&e)),
        }
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(data.len() / 4), Compression::fast());
    encoder
        .write_all(data)
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

fn first_line(s: &str) -> &str {
    let line = s.lines().next().unwrap_or("").trim();
    &line[..line.floor_char_boundary(200)]
}

/// reqwest's Display shows only the outermost error ("error sending request"); the cause
/// ("connection refused") is what an operator needs.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::tests_support::span;

    #[test]
    fn a_batch_of_encoded_spans_is_the_json_array_of_the_spans() {
        let spans = [span(), span()];
        let encoded: Vec<EncodedSpan> = spans
            .iter()
            .map(|s| EncodedSpan(serde_json::to_vec(s).unwrap().into_boxed_slice()))
            .collect();
        assert_eq!(batch_json(&encoded), serde_json::to_vec(&spans).unwrap());
        assert_eq!(batch_json::<EncodedSpan>(&[]), b"[]");
        let values: Vec<serde_json::Value> = spans
            .iter()
            .map(|s| serde_json::to_value(s).unwrap())
            .collect();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&batch_json(&values)).unwrap(),
            serde_json::to_value(&spans).unwrap()
        );
    }
}
