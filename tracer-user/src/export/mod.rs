//! Exporters: where finished spans go. The capture loop only ever calls [`Exporter::submit`]
//! and, once per ring drain, [`Exporter::flush`]; neither blocks: spans wait in a queue bounded
//! in spans, and when it is full they are dropped and counted. A slow terminal, a slow collector
//! or a collector outage therefore costs spans, never capture.
//!
//! Spans cross to the exporter task in chunks, one per drain, not one allocation each: a buffer
//! allocated on the capture thread and freed on the exporter's bypasses glibc's per-thread
//! cache, and under load those frees cost the agent more CPU than the rest of its allocations.
//! Emptied chunks go back to the capture thread to be filled again.

mod zipkin;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        mpsc as std_mpsc,
    },
    time::Duration,
};

use anyhow::bail;
use log::warn;
use reqwest::Url;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::spans::{Span, text_line};

pub(crate) use self::zipkin::error_chain;
pub use self::zipkin::{JsonSpans, USER_AGENT, ZipkinConfig, run as zipkin_forward};

/// Capacity of the queue in front of stdout.
const STDOUT_QUEUE: usize = 10_000;
/// A chunk is handed over when it holds this many spans (or bytes) even if the drain is not
/// over, so that a burst does not leave a buffer of megabytes in circulation.
const CHUNK_SPANS: usize = 512;
const CHUNK_BYTES: usize = 512 * 1024;
/// Emptied chunks waiting to be reused; more are freed. A few drains' worth: the exporters give
/// chunks back within a batch poll (50 ms) while the collector keeps up.
const RECYCLED_CHUNKS: usize = 8;
/// A returned chunk whose buffer grew past this (a burst) is freed, not reused: kept, the pool
/// would hold megabytes for good. A drain's worth at 30k spans/s is about 200 KiB.
const RECYCLED_BYTES: usize = 256 * 1024;

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

/// Spans already written in the output's form (Zipkin JSON objects, or text lines), one after
/// the other in one buffer, as they wait in the queue: about half the memory of the spans
/// themselves, and no second pass.
#[derive(Debug, Default)]
pub struct EncodedChunk {
    bytes: Vec<u8>,
    /// Where each span ends in `bytes`; the next one starts there.
    ends: Vec<u32>,
}

impl EncodedChunk {
    /// Spans in the chunk.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The bytes of span `i`.
    pub fn span(&self, i: usize) -> &[u8] {
        let start = match i {
            0 => 0,
            _ => self.ends[i - 1] as usize,
        };
        &self.bytes[start..self.ends[i] as usize]
    }

    /// Every span's bytes (the writers take a chunk whole, or span by span with `span`).
    #[cfg(test)]
    fn spans(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.len()).map(|i| self.span(i))
    }

    /// Appends a span that `encode` writes.
    fn push(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        encode(&mut self.bytes);
        let end = u32::try_from(self.bytes.len())
            .expect("a chunk is handed over long before 4 GiB (CHUNK_BYTES)");
        self.ends.push(end);
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }
}

/// The exporter task's end of a span queue: items (chunks, or the relay's single spans) and
/// the bookkeeping of the spans they hold.
pub struct SpanQueue<T> {
    rx: mpsc::Receiver<T>,
    /// Spans submitted and not yet taken into a batch or a write, when the sender counts them
    /// (the agent's queue is bounded in spans, not in chunks).
    waiting: Option<Arc<AtomicUsize>>,
    /// Where emptied items go to be reused by the sender.
    recycle: Option<std_mpsc::SyncSender<T>>,
}

impl<T> SpanQueue<T> {
    /// A queue whose channel bounds it by itself: one span per item (the relay's).
    pub fn new(rx: mpsc::Receiver<T>) -> Self {
        Self {
            rx,
            waiting: None,
            recycle: None,
        }
    }

    /// `n` spans have left the queue. Called after [`done`](Self::done) when they were an
    /// item's last, so that a sender that sees the queue empty has every chunk back.
    fn taken(&self, n: usize) {
        if let Some(waiting) = &self.waiting {
            waiting.fetch_sub(n, Relaxed);
        }
    }

    /// Every span of `item` has been taken: it may be reused.
    fn done(&self, item: T) {
        if let Some(recycle) = &self.recycle {
            // A full pool frees the item here: once per chunk, not per span.
            let _ = recycle.try_send(item);
        }
    }
}

/// A handle on the running exporter task.
pub struct Exporter {
    tx: mpsc::Sender<EncodedChunk>,
    encode: fn(&Span, &mut Vec<u8>),
    /// The spans submitted since the last flush.
    chunk: EncodedChunk,
    /// Chunks the task is done with.
    recycled: std_mpsc::Receiver<EncodedChunk>,
    /// Spans submitted and not yet taken by the task: what bounds the queue.
    waiting: Arc<AtomicUsize>,
    stats: Arc<ExportStats>,
    task: JoinHandle<()>,
    capacity: usize,
}

fn encode_json(span: &Span, out: &mut Vec<u8>) {
    span.write_json(out);
}

/// Stdout's forms are lines: a chunk of them is written as it is.
fn encode_json_line(span: &Span, out: &mut Vec<u8>) {
    span.write_json(out);
    out.push(b'\n');
}

fn encode_text_line(span: &Span, out: &mut Vec<u8>) {
    out.extend_from_slice(text_line(span).as_bytes());
    out.push(b'\n');
}

impl Exporter {
    /// Starts the exporter task; must be called inside a tokio runtime.
    pub fn start(output: Output) -> Self {
        let stats = Arc::new(ExportStats::default());
        let (capacity, task_stats) = (queue_capacity(&output), stats.clone());
        // Every chunk in the channel holds at least one waiting span, so a channel as long as
        // the span bound never turns a chunk away.
        let (tx, rx) = mpsc::channel(capacity);
        let (recycle, recycled) = std_mpsc::sync_channel(RECYCLED_CHUNKS);
        let waiting = Arc::new(AtomicUsize::new(0));
        let queue = SpanQueue {
            rx,
            waiting: Some(waiting.clone()),
            recycle: Some(recycle),
        };
        let (encode, task): (fn(&Span, &mut Vec<u8>), _) = match output {
            Output::Text => (
                encode_text_line,
                tokio::task::spawn_blocking(move || write_stdout(queue, task_stats)),
            ),
            Output::Json => (
                encode_json_line,
                tokio::task::spawn_blocking(move || write_stdout(queue, task_stats)),
            ),
            Output::Zipkin(config) => (
                encode_json,
                tokio::spawn(zipkin::run(config, queue, task_stats)),
            ),
        };
        Self {
            tx,
            encode,
            chunk: EncodedChunk::default(),
            recycled,
            waiting,
            stats,
            task,
            capacity,
        }
    }

    /// Queues a span; never waits. A full queue drops the span and counts it. The span reaches
    /// the exporter task at the next [`flush`](Self::flush).
    pub fn submit(&mut self, span: &Span) {
        // Only this side adds to `waiting`: what it reads here can only shrink meanwhile.
        if self.waiting.load(Relaxed) >= self.capacity {
            self.count_dropped(1);
            return;
        }
        self.waiting.fetch_add(1, Relaxed);
        let encode = self.encode;
        self.chunk.push(|out| encode(span, out));
        self.stats.queued.fetch_add(1, Relaxed);
        if self.chunk.len() >= CHUNK_SPANS || self.chunk.bytes.len() >= CHUNK_BYTES {
            self.flush();
        }
    }

    /// Hands the spans submitted since the last flush to the exporter task; never waits. The
    /// capture loop calls it after each ring drain.
    pub fn flush(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let next = reusable_chunk(&self.recycled);
        let chunk = std::mem::replace(&mut self.chunk, next);
        if let Err(e) = self.tx.try_send(chunk) {
            // Only a task that is gone refuses a chunk (see `start`).
            let n = e.into_inner().len();
            self.waiting.fetch_sub(n, Relaxed);
            self.stats.queued.fetch_sub(n as u64, Relaxed);
            self.count_dropped(n as u64);
        }
    }

    fn count_dropped(&self, n: u64) {
        let before = self.stats.dropped.fetch_add(n, Relaxed);
        let dropped = before + n;
        // One warning at the first drop, then at every power of two.
        if before == 0 || dropped.ilog2() > before.ilog2() {
            warn!("export queue full: {dropped} spans dropped so far (collector slow or down?)");
        }
    }

    pub fn stats(&self) -> Arc<ExportStats> {
        self.stats.clone()
    }

    /// Spans waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    /// Hands over what was submitted, closes the queue and lets the task send what is queued,
    /// for at most `timeout`; what is left then is counted as failed.
    pub async fn shutdown(mut self, timeout: Duration) {
        self.flush();
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

/// An empty chunk to fill: a returned one unless it grew too large to keep.
fn reusable_chunk(recycled: &std_mpsc::Receiver<EncodedChunk>) -> EncodedChunk {
    let mut chunk = recycled
        .try_recv()
        .ok()
        .filter(|c| c.bytes.capacity() <= RECYCLED_BYTES)
        .unwrap_or_default();
    chunk.clear();
    chunk
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
/// Spans written between two flushes of stdout at most.
const STDOUT_BATCH: usize = 4096;

/// Writes spans to stdout on a thread of its own, a chunk per write: tokio's stdout hands every
/// write to its blocking pool, a thread handoff per line that cost more than the parsing.
fn write_stdout(queue: SpanQueue<EncodedChunk>, stats: Arc<ExportStats>) {
    write_lines(queue, &stats, std::io::stdout().lock());
}

/// One span per line: the chunks' bytes as they are (their spans are lines already), each
/// written straight from the chunk rather than copied into one buffer first.
fn write_lines(
    mut queue: SpanQueue<EncodedChunk>,
    stats: &ExportStats,
    mut writer: impl std::io::Write,
) {
    // A burst (a drain of a full ring makes spans far faster than one write a linger takes
    // away) is written without lingering until it is through: a 10k-span queue overflowed
    // behind 4096 spans a linger.
    let mut behind = false;
    while let Some(first) = queue.rx.blocking_recv() {
        if !behind {
            std::thread::sleep(STDOUT_LINGER);
        }
        let (mut written, mut failed) = (0, 0);
        let mut next = Some(first);
        while let Some(chunk) = next {
            let spans = chunk.len();
            // A closed stdout (`tracer run | head`) is the reader's choice: count, keep
            // capturing.
            if failed == 0 && writer.write_all(&chunk.bytes).is_ok() {
                written += spans;
            } else {
                failed += spans;
            }
            queue.done(chunk);
            queue.taken(spans);
            next = if written + failed < STDOUT_BATCH {
                queue.rx.try_recv().ok()
            } else {
                None
            };
        }
        behind = written + failed >= STDOUT_BATCH;
        if written > 0 && writer.flush().is_err() {
            (failed, written) = (failed + written, 0);
        }
        stats.exported.fetch_add(written as u64, Relaxed);
        stats.failed.fetch_add(failed as u64, Relaxed);
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

    /// A Zipkin collector on loopback that keeps the body of every POST and answers 202, once
    /// `open` is true.
    struct Collector {
        config: ZipkinConfig,
        bodies: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
        open: tokio::sync::watch::Sender<bool>,
    }

    impl Collector {
        async fn start(open: bool, batch_size: usize, queue_capacity: usize) -> Self {
            use http_body_util::{BodyExt as _, Full};
            use hyper::{Response, body::Bytes, service::service_fn};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (open_tx, open_rx) = tokio::sync::watch::channel(open);
            let kept = bodies.clone();
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let (kept, open_rx) = (kept.clone(), open_rx.clone());
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (kept, mut open_rx) = (kept.clone(), open_rx.clone());
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            kept.lock().unwrap().push(body.to_vec());
                            let _ = open_rx.wait_for(|open| *open).await;
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = hyper::StatusCode::ACCEPTED;
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                    );
                }
            });
            Self {
                config: ZipkinConfig {
                    url: parse_zipkin_url(&url).unwrap(),
                    batch_size,
                    flush_interval: Duration::from_millis(50),
                    queue_capacity,
                    gzip: false,
                    request_timeout: Duration::from_secs(10),
                },
                bodies,
                open: open_tx,
            }
        }

        /// The names of the spans of each batch received.
        fn batches(&self) -> Vec<Vec<String>> {
            self.bodies
                .lock()
                .unwrap()
                .iter()
                .map(|body| {
                    serde_json::from_slice::<Vec<serde_json::Value>>(body)
                        .unwrap()
                        .iter()
                        .map(|span| span["name"].as_str().unwrap().to_string())
                        .collect()
                })
                .collect()
        }

        async fn wait_for_batches(&self, n: usize) {
            for _ in 0..1000 {
                if self.bodies.lock().unwrap().len() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("the collector did not get {n} batches");
        }
    }

    fn named(i: usize) -> Span {
        let mut span = crate::spans::tests_support::span();
        span.name = format!("span {i}");
        span
    }

    fn names(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("span {i}")).collect()
    }

    #[tokio::test]
    async fn spans_reach_the_collector_in_order_in_batches_of_at_most_batch_size() {
        let collector = Collector::start(true, 3, 100).await;
        let mut exporter = Exporter::start(Output::Zipkin(collector.config.clone()));
        // A drain of 7 spans (split across batches), then drains of 1 and 2 (joined).
        for i in 0..7 {
            exporter.submit(&named(i));
        }
        exporter.flush();
        assert_eq!(exporter.queue_depth(), 7);
        collector.wait_for_batches(2).await;
        exporter.submit(&named(7));
        exporter.flush();
        exporter.submit(&named(8));
        exporter.submit(&named(9));
        // Not flushed: shutdown hands these over too.
        let stats = exporter.stats();
        exporter.shutdown(Duration::from_secs(5)).await;
        let batches = collector.batches();
        assert!(
            batches.iter().all(|b| !b.is_empty() && b.len() <= 3),
            "{batches:?}"
        );
        assert_eq!(batches[..2], [names(0..3), names(3..6)]);
        assert_eq!(batches.concat(), names(0..10));
        assert_eq!(stats.queued.load(Relaxed), 10);
        assert_eq!(stats.exported.load(Relaxed), 10);
        assert_eq!(stats.batches.load(Relaxed), batches.len() as u64);
        assert_eq!(stats.failed.load(Relaxed), 0);
        assert_eq!(stats.dropped.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_spans_not_chunks_while_the_collector_is_slow() {
        let collector = Collector::start(false, 2, 5).await;
        let mut exporter = Exporter::start(Output::Zipkin(collector.config.clone()));
        for i in 0..3 {
            exporter.submit(&named(i));
        }
        exporter.flush();
        // The task took two spans into a batch, which the collector holds: one span waits.
        collector.wait_for_batches(1).await;
        assert_eq!(exporter.queue_depth(), 1);
        // Room for four more, in two chunks; two dropped.
        for i in 3..5 {
            exporter.submit(&named(i));
        }
        exporter.flush();
        for i in 5..9 {
            exporter.submit(&named(i));
        }
        exporter.flush();
        let stats = exporter.stats();
        assert_eq!(exporter.queue_depth(), 5);
        assert_eq!(stats.queued.load(Relaxed), 7);
        assert_eq!(stats.dropped.load(Relaxed), 2);
        collector.open.send(true).unwrap();
        exporter.shutdown(Duration::from_secs(5)).await;
        assert_eq!(
            collector.batches(),
            [names(0..2), names(2..4), names(4..6), names(6..7)]
        );
        assert_eq!(stats.exported.load(Relaxed), 7);
        assert_eq!(stats.batches.load(Relaxed), 4);
        assert_eq!(stats.failed.load(Relaxed), 0);
        assert_eq!(stats.dropped.load(Relaxed), 2);
    }

    #[test]
    fn a_chunk_keeps_its_spans_apart() {
        let mut chunk = EncodedChunk::default();
        assert!(chunk.is_empty());
        for span in [&b"first"[..], b"", b"third"] {
            chunk.push(|out| out.extend_from_slice(span));
        }
        assert_eq!(chunk.len(), 3);
        assert_eq!(
            chunk.spans().collect::<Vec<_>>(),
            [&b"first"[..], b"", b"third"]
        );
        chunk.clear();
        assert!(chunk.is_empty());
        assert_eq!(chunk.spans().count(), 0);
    }

    #[test]
    fn returned_chunks_are_reused_unless_a_burst_grew_them() {
        let (recycle, recycled) = std_mpsc::sync_channel(RECYCLED_CHUNKS);
        let mut typical = EncodedChunk::default();
        typical.push(|out| out.extend_from_slice(&[b'x'; 1000]));
        let typical_capacity = typical.bytes.capacity();
        let mut burst = EncodedChunk::default();
        burst.push(|out| out.extend_from_slice(&vec![b'x'; 2 * RECYCLED_BYTES]));
        recycle.try_send(typical).unwrap();
        recycle.try_send(burst).unwrap();

        let reused = reusable_chunk(&recycled);
        assert!(reused.is_empty() && reused.bytes.is_empty());
        assert_eq!(reused.bytes.capacity(), typical_capacity, "its buffer kept");
        let fresh = reusable_chunk(&recycled);
        assert!(fresh.is_empty());
        assert_eq!(
            fresh.bytes.capacity(),
            0,
            "the grown buffer freed, not kept"
        );
        assert_eq!(
            reusable_chunk(&recycled).bytes.capacity(),
            0,
            "none left: a new one"
        );
    }

    #[test]
    fn stdout_gets_a_line_per_span_and_chunks_go_back_to_be_reused() {
        let (tx, rx) = mpsc::channel(4);
        let (recycle, recycled) = std_mpsc::sync_channel(RECYCLED_CHUNKS);
        let waiting = Arc::new(AtomicUsize::new(3));
        let queue = SpanQueue {
            rx,
            waiting: Some(waiting.clone()),
            recycle: Some(recycle),
        };
        let mut chunks = [EncodedChunk::default(), EncodedChunk::default()];
        for (chunk, lines) in chunks
            .iter_mut()
            .zip([&["{\"a\":1}", "{\"b\":2}"][..], &["x y"]])
        {
            for line in lines {
                chunk.push(|out| {
                    out.extend_from_slice(line.as_bytes());
                    out.push(b'\n');
                });
            }
        }
        for chunk in chunks {
            tx.try_send(chunk).unwrap();
        }
        drop(tx);
        let (stats, mut out) = (ExportStats::default(), Vec::new());
        write_lines(queue, &stats, &mut out);
        assert_eq!(out, b"{\"a\":1}\n{\"b\":2}\nx y\n");
        assert_eq!(stats.exported.load(Relaxed), 3);
        assert_eq!(waiting.load(Relaxed), 0);
        assert_eq!(
            recycled.try_iter().map(|c| c.len()).collect::<Vec<_>>(),
            [2, 1]
        );
    }
}
