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
use tokio::{sync::mpsc::error::TryRecvError, time::Instant};

use super::{EncodedChunk, ExportStats, SpanQueue};

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

/// What a Zipkin queue carries: items of one or more spans, each span written as a member of a
/// batch's JSON array.
pub trait JsonSpans: Send + 'static {
    /// Spans in the item.
    fn span_count(&self) -> usize;
    /// Appends span `i`'s JSON object.
    fn write_span(&self, i: usize, out: &mut Vec<u8>);
}

/// Spans built here, encoded when queued.
impl JsonSpans for EncodedChunk {
    fn span_count(&self) -> usize {
        self.len()
    }

    fn write_span(&self, i: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(self.span(i));
    }
}

/// A span the relay received as JSON.
impl JsonSpans for serde_json::Value {
    fn span_count(&self) -> usize {
        1
    }

    fn write_span(&self, _: usize, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("a JSON value always serializes");
    }
}

/// A batch as it fills: `[span,span,...` (the closing bracket comes with [`Batch::json`]).
struct Batch {
    json: Vec<u8>,
    spans: usize,
    size: usize,
}

impl Batch {
    fn new(size: usize) -> Self {
        Self {
            json: Vec::new(),
            spans: 0,
            size: size.max(1),
        }
    }

    fn is_full(&self) -> bool {
        self.spans >= self.size
    }

    /// Appends the spans of `item` from its `from`th on, as many as fit; gives the item back,
    /// with where to resume, when some did not fit.
    fn take<T: JsonSpans>(
        &mut self,
        queue: &SpanQueue<T>,
        item: T,
        from: usize,
    ) -> Option<(T, usize)> {
        let count = item.span_count();
        let to = count.min(from + (self.size - self.spans));
        for i in from..to {
            self.json.push(if self.spans == 0 { b'[' } else { b',' });
            item.write_span(i, &mut self.json);
            self.spans += 1;
        }
        let rest = if to < count {
            Some((item, to))
        } else {
            queue.done(item);
            None
        };
        queue.taken(to - from);
        rest
    }

    /// The batch's JSON array.
    fn json(&mut self) -> &[u8] {
        if self.spans == 0 {
            self.json.push(b'[');
        }
        self.json.push(b']');
        &self.json
    }

    fn clear(&mut self) {
        self.json.clear();
        self.spans = 0;
    }
}

/// Sends what arrives on `queue` to Zipkin until its channel closes: spans built here, or (for
/// the relay) spans received as JSON.
pub async fn run<T: JsonSpans>(
    config: ZipkinConfig,
    mut queue: SpanQueue<T>,
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
            while let Some(item) = queue.rx.recv().await {
                let n = item.span_count();
                stats.failed.fetch_add(n as u64, Relaxed);
                queue.done(item);
                queue.taken(n);
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
    let mut batch = Batch::new(exporter.config.batch_size);
    // An item with more spans than the batch had room for: the rest starts the next batch.
    let mut rest: Option<(T, usize)> = None;
    loop {
        if let Some((item, from)) = rest.take() {
            rest = batch.take(&queue, item, from);
        }
        while batch.spans == 0 {
            let Some(item) = queue.rx.recv().await else {
                return;
            };
            rest = batch.take(&queue, item, 0);
        }
        // Fill the batch by looking at the queue now and then, not by waiting on it: a task
        // waiting on the queue is woken for every item (a thread wakeup each, under load
        // dozens to tens of thousands a second).
        let deadline = Instant::now() + exporter.config.flush_interval;
        while !batch.is_full() {
            match queue.rx.try_recv() {
                Ok(item) => rest = batch.take(&queue, item, 0),
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(deadline.min(now + BATCH_POLL)).await;
                }
            }
        }
        let spans = batch.spans;
        exporter.send(batch.json(), spans).await;
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
    /// Sends a batch of `spans` spans, written as `json`.
    async fn send(&mut self, json: &[u8], spans: usize) {
        let n = spans as u64;
        let gzipped = self.config.gzip.then(|| gzip(json));
        let mut backoff = FIRST_BACKOFF;
        loop {
            let result = match &gzipped {
                Some(body) => match self.post(body.clone(), true).await {
                    // Zipkin takes gzip; a collector that does not says so with 400/415.
                    Sent::Rejected(why) => {
                        let plain = self.post(json.to_vec(), false).await;
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
                None => self.post(json.to_vec(), false).await,
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

    fn chunk_of(spans: &[crate::spans::Span]) -> EncodedChunk {
        let mut chunk = EncodedChunk::default();
        for s in spans {
            chunk.push(|out| serde_json::to_writer(out, s).unwrap());
        }
        chunk
    }

    /// The JSON of the batches that `items` make, `size` spans at most each.
    fn batches<T: JsonSpans>(items: Vec<T>, size: usize) -> Vec<Vec<u8>> {
        let queue = SpanQueue::new(tokio::sync::mpsc::channel(1).1);
        let mut batch = Batch::new(size);
        let mut out = Vec::new();
        for item in items {
            let mut rest = batch.take(&queue, item, 0);
            while batch.is_full() {
                out.push(batch.json().to_vec());
                batch.clear();
                if let Some((item, from)) = rest.take() {
                    rest = batch.take(&queue, item, from);
                }
            }
            assert!(rest.is_none());
        }
        if batch.spans > 0 {
            out.push(batch.json().to_vec());
        }
        out
    }

    #[test]
    fn a_batch_of_encoded_spans_is_the_json_array_of_the_spans() {
        let spans = [span(), span()];
        assert_eq!(
            batches(vec![chunk_of(&spans)], 10),
            [serde_json::to_vec(&spans).unwrap()]
        );
        assert_eq!(Batch::new(1).json(), b"[]");
        let values: Vec<serde_json::Value> = spans
            .iter()
            .map(|s| serde_json::to_value(s).unwrap())
            .collect();
        let json = batches(values, 10);
        assert_eq!(json.len(), 1);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&json[0]).unwrap(),
            serde_json::to_value(&spans).unwrap()
        );
    }

    #[test]
    fn chunks_are_split_and_joined_into_batches_of_batch_size() {
        let spans: Vec<_> = (0..8)
            .map(|i| {
                let mut s = span();
                s.name = format!("span {i}");
                s
            })
            .collect();
        let expect = |groups: &[std::ops::Range<usize>]| -> Vec<Vec<u8>> {
            groups
                .iter()
                .map(|r| serde_json::to_vec(&spans[r.clone()]).unwrap())
                .collect()
        };
        // One chunk larger than two batches.
        assert_eq!(
            batches(vec![chunk_of(&spans[..7])], 3),
            expect(&[0..3, 3..6, 6..7])
        );
        // Small chunks joined; one split across a batch boundary.
        assert_eq!(
            batches(
                vec![
                    chunk_of(&spans[..1]),
                    chunk_of(&spans[1..3]),
                    chunk_of(&spans[3..5]),
                    chunk_of(&[]),
                    chunk_of(&spans[5..8]),
                ],
                3
            ),
            expect(&[0..3, 3..6, 6..8])
        );
        // Exactly full batches leave nothing over.
        assert_eq!(
            batches(vec![chunk_of(&spans[..4]), chunk_of(&spans[4..8])], 4),
            expect(&[0..4, 4..8])
        );
    }
}
