//! Exporters: where finished spans go. The capture loop only ever calls [`Exporter::submit`],
//! which never blocks: spans wait in a bounded queue, and when it is full they are dropped and
//! counted. A slow terminal, a slow collector or a collector outage therefore costs spans, never
//! capture.

mod zipkin;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::bail;
use log::warn;
use reqwest::Url;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::spans::{Span, text_line};

pub(crate) use self::zipkin::error_chain;
pub use self::zipkin::{USER_AGENT, ZipkinConfig, run as zipkin_forward};

/// Capacity of the queue in front of stdout.
const STDOUT_QUEUE: usize = 10_000;

#[derive(Clone, Debug)]
pub enum Output {
    /// One readable line per span on stdout.
    Text,
    /// One Zipkin v2 JSON span per line on stdout.
    Json,
    /// Batches POSTed to a Zipkin collector.
    Zipkin(ZipkinConfig),
}

/// The exporter's own counters, shared with the agent's stats and metrics.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Spans accepted into the queue.
    pub queued: AtomicU64,
    /// Spans the destination accepted (a 2xx from the collector, or written to stdout).
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Spans given up on: rejected by the collector (4xx), or still unsent at shutdown.
    pub failed: AtomicU64,
    /// Batch sends that were retried after an error or a 5xx.
    pub retries: AtomicU64,
    /// Batches sent successfully.
    pub batches: AtomicU64,
}

/// A span already written in the output's form (a Zipkin JSON object, or a text line), as it
/// waits in the queue: about half the memory of the span itself, and no second pass.
#[derive(Debug)]
pub struct EncodedSpan(pub(crate) Box<[u8]>);

impl EncodedSpan {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A handle on the running exporter task.
pub struct Exporter {
    tx: mpsc::Sender<EncodedSpan>,
    encode: fn(&Span, &mut Vec<u8>),
    /// Where a span is encoded before it is copied into an allocation of its exact size.
    scratch: Vec<u8>,
    stats: Arc<ExportStats>,
    task: JoinHandle<()>,
    capacity: usize,
}

fn encode_json(span: &Span, out: &mut Vec<u8>) {
    span.write_json(out);
}

fn encode_text(span: &Span, out: &mut Vec<u8>) {
    out.extend_from_slice(text_line(span).as_bytes());
}

impl Exporter {
    /// Starts the exporter task; must be called inside a tokio runtime.
    pub fn start(output: Output) -> Self {
        let stats = Arc::new(ExportStats::default());
        let (capacity, task_stats) = (queue_capacity(&output), stats.clone());
        let (tx, rx) = mpsc::channel(capacity);
        let (encode, task): (fn(&Span, &mut Vec<u8>), _) = match output {
            Output::Text => (
                encode_text,
                tokio::task::spawn_blocking(move || write_stdout(rx, task_stats)),
            ),
            Output::Json => (
                encode_json,
                tokio::task::spawn_blocking(move || write_stdout(rx, task_stats)),
            ),
            Output::Zipkin(config) => (
                encode_json,
                tokio::spawn(zipkin::run(config, rx, task_stats)),
            ),
        };
        Self {
            tx,
            encode,
            scratch: Vec::with_capacity(4096),
            stats,
            task,
            capacity,
        }
    }

    /// Queues a span; never waits. A full queue drops the span and counts it.
    pub fn submit(&mut self, span: &Span) {
        let permit = match self.tx.try_reserve() {
            Ok(permit) => permit,
            Err(_) => {
                let dropped = self.stats.dropped.fetch_add(1, Relaxed) + 1;
                if dropped == 1 || dropped.is_power_of_two() {
                    warn!(
                        "export queue full: {dropped} spans dropped so far (collector slow or down?)"
                    );
                }
                return;
            }
        };
        self.scratch.clear();
        (self.encode)(span, &mut self.scratch);
        permit.send(EncodedSpan(Box::from(self.scratch.as_slice())));
        self.stats.queued.fetch_add(1, Relaxed);
    }

    pub fn stats(&self) -> Arc<ExportStats> {
        self.stats.clone()
    }

    /// Spans waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    /// Closes the queue and lets the task send what is queued, for at most `timeout`; what is
    /// left then is counted as failed.
    pub async fn shutdown(self, timeout: Duration) {
        let Self {
            tx,
            stats,
            mut task,
            ..
        } = self;
        drop(tx);
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
            let unsent = stats
                .queued
                .load(Relaxed)
                .saturating_sub(stats.exported.load(Relaxed) + stats.failed.load(Relaxed));
            stats.failed.fetch_add(unsent, Relaxed);
            warn!("gave up on {unsent} spans still unsent after {timeout:?}");
        }
    }
}

fn queue_capacity(output: &Output) -> usize {
    match output {
        Output::Zipkin(config) => config.queue_capacity.max(1),
        Output::Text | Output::Json => STDOUT_QUEUE,
    }
}

/// Longest a span waits before stdout gets it: the writer sleeps this long after each write, so
/// that under load it wakes a few dozen times a second, not once per span (a wakeup and a
/// context switch each, which cost the agent more than encoding the span).
const STDOUT_LINGER: Duration = Duration::from_millis(20);

/// Writes spans to stdout on a thread of its own, a batch per write: tokio's stdout hands every
/// write to its blocking pool, a thread handoff per line that cost more than the parsing.
fn write_stdout(mut rx: mpsc::Receiver<EncodedSpan>, stats: Arc<ExportStats>) {
    use std::io::Write as _;
    let mut out = Vec::new();
    let mut stdout = std::io::stdout().lock();
    while let Some(first) = rx.blocking_recv() {
        std::thread::sleep(STDOUT_LINGER);
        out.clear();
        let mut n = 0u64;
        let mut next = Some(first);
        while let Some(span) = next {
            out.extend_from_slice(span.as_bytes());
            out.push(b'\n');
            n += 1;
            next = if n < 4096 { rx.try_recv().ok() } else { None };
        }
        // A closed stdout (`tracer run | head`) is the reader's choice: count, keep capturing.
        if stdout.write_all(&out).is_ok() && stdout.flush().is_ok() {
            stats.exported.fetch_add(n, Relaxed);
        } else {
            stats.failed.fetch_add(n, Relaxed);
        }
    }
}

/// Parses `--zipkin`: a base URL (`http://zipkin:9411`) gets Zipkin's span path appended; a
/// URL with a path is used as given.
pub fn parse_zipkin_url(s: &str) -> anyhow::Result<Url> {
    let mut url = match Url::parse(s) {
        Ok(url) => url,
        Err(e) => bail!("bad --zipkin URL {s:?}: {e} (expected e.g. http://127.0.0.1:9411)"),
    };
    if !matches!(url.scheme(), "http" | "https") {
        bail!(
            "bad --zipkin URL {s:?}: the scheme must be http or https, not {}",
            url.scheme()
        );
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("bad --zipkin URL {s:?}: no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Credentials in a URL end up in logs and process listings.
        bail!("bad --zipkin URL {s:?}: put credentials elsewhere, not in the URL");
    }
    if url.path() == "/" || url.path().is_empty() {
        url.set_path("/api/v2/spans");
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipkin_urls() {
        assert_eq!(
            parse_zipkin_url("http://127.0.0.1:9411").unwrap().as_str(),
            "http://127.0.0.1:9411/api/v2/spans"
        );
        assert_eq!(
            parse_zipkin_url("http://zipkin:9411/").unwrap().as_str(),
            "http://zipkin:9411/api/v2/spans"
        );
        assert_eq!(
            parse_zipkin_url("https://c.example/custom/path")
                .unwrap()
                .as_str(),
            "https://c.example/custom/path"
        );
        for bad in [
            "",
            "127.0.0.1:9411",
            "ftp://x/",
            "http://",
            "not a url",
            "http://u:p@host/",
        ] {
            let err = parse_zipkin_url(bad).unwrap_err().to_string();
            assert!(err.contains("--zipkin"), "{bad}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts() {
        let config = ZipkinConfig {
            url: parse_zipkin_url("http://127.0.0.1:9").unwrap(),
            batch_size: 10,
            flush_interval: Duration::from_secs(3600),
            queue_capacity: 3,
            gzip: true,
            request_timeout: Duration::from_millis(100),
        };
        let mut exporter = Exporter::start(Output::Zipkin(config));
        for _ in 0..10 {
            exporter.submit(&crate::spans::tests_support::span());
        }
        let stats = exporter.stats();
        // A current-thread runtime: the task has not run yet, so exactly the capacity fits.
        assert_eq!(stats.queued.load(Relaxed), 3);
        assert_eq!(stats.dropped.load(Relaxed), 7);
        assert_eq!(exporter.queue_depth(), 3);
        exporter.shutdown(Duration::from_millis(200)).await;
        assert_eq!(stats.exported.load(Relaxed), 0);
        assert_eq!(stats.failed.load(Relaxed), stats.queued.load(Relaxed));
    }
}
