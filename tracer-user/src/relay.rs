//! `tracer collect`: a span relay in front of Zipkin that links hops no header linked.
//!
//! Agents export to the relay instead of Zipkin. Every span of a request carries a link key
//! (`spans::LINK_TAG`): the client and server addresses and the TCP sequence number of the
//! request's first byte, which the agents on both ends compute identically. A SERVER span
//! that has no parent (no trace context arrived with the request) and a CLIENT span with the
//! same key are the two halves of one hop: the server span takes the client span as parent,
//! and the whole server-side trace is renamed into the client's trace (transitively, for
//! chains of hops). Spans wait `hold` before they are forwarded so that both halves of a hop,
//! which different agents flush at different times, meet; then they go to Zipkin with the
//! link tag removed. Every table is bounded; a span whose partner never comes is forwarded
//! unlinked, and counted.

use std::{
    collections::{HashMap, VecDeque},
    io::Read as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use log::{info, warn};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::{
    export::{ExportStats, SpanQueue, ZipkinConfig, zipkin_forward},
    spans::LINK_TAG,
};

/// Spans held at most (older ones are forwarded early when this fills).
const MAX_PENDING: usize = 200_000;
/// Client halves and trace renames remembered.
const MAX_KEYS: usize = 200_000;
/// How long a client half or a rename is remembered.
const KEY_TTL: Duration = Duration::from_secs(300);
/// Largest POST body accepted (compressed or not).
const MAX_BODY: usize = 32 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct JoinStats {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    /// Server spans given their client span as parent.
    pub joined: AtomicU64,
    /// Server spans forwarded without a partner (no traced client, or it came too late).
    pub unmatched: AtomicU64,
    pub rejected_posts: AtomicU64,
}

/// The joining logic, apart from any I/O.
pub struct Joiner {
    hold: Duration,
    /// Spans by slot, and the order they must leave in.
    pending: HashMap<u64, Value>,
    order: VecDeque<(Instant, u64)>,
    next_slot: u64,
    /// Link key -> (trace id, span id) of the client half.
    clients: HashMap<String, (String, String, Instant)>,
    /// Link key -> slot of a parentless server half waiting for its client.
    waiting: HashMap<String, u64>,
    /// Server-side trace id -> the trace it joined.
    renamed: HashMap<String, (String, Instant)>,
    stats: Arc<JoinStats>,
}

impl Joiner {
    pub fn new(hold: Duration, stats: Arc<JoinStats>) -> Self {
        Self {
            hold,
            pending: HashMap::new(),
            order: VecDeque::new(),
            next_slot: 0,
            clients: HashMap::new(),
            waiting: HashMap::new(),
            renamed: HashMap::new(),
            stats,
        }
    }

    pub fn add(&mut self, spans: Vec<Value>, now: Instant) {
        for span in spans {
            self.stats.received.fetch_add(1, Relaxed);
            let key = span["tags"][LINK_TAG].as_str().map(str::to_string);
            let slot = self.next_slot;
            self.next_slot += 1;
            if let Some(key) = key {
                match span["kind"].as_str() {
                    Some("CLIENT") => {
                        let trace = str_field(&span, "traceId");
                        let id = str_field(&span, "id");
                        if let Some(server_slot) = self.waiting.remove(&key) {
                            self.join(server_slot, &trace, &id, now);
                        }
                        self.clients.insert(key, (trace, id, now));
                    }
                    Some("SERVER") if span.get("parentId").is_none() => {
                        if let Some((trace, id, _)) = self.clients.get(&key).cloned() {
                            self.pending.insert(slot, span);
                            self.order.push_back((now, slot));
                            self.join(slot, &trace, &id, now);
                            continue;
                        }
                        self.waiting.insert(key, slot);
                    }
                    _ => {}
                }
            }
            self.pending.insert(slot, span);
            self.order.push_back((now, slot));
        }
        self.bound(now);
    }

    /// The server span in `slot` is the callee of client span `id` in `trace`.
    fn join(&mut self, slot: u64, trace: &str, id: &str, now: Instant) {
        let Some(span) = self.pending.get_mut(&slot) else {
            // Already forwarded: too late to change it.
            return;
        };
        let own_trace = str_field(span, "traceId");
        span["parentId"] = Value::String(id.to_string());
        if own_trace != trace {
            self.renamed.insert(own_trace, (trace.to_string(), now));
        }
        self.stats.joined.fetch_add(1, Relaxed);
    }

    /// Spans whose hold is over (all of them when `flush`), renamed and without the link tag.
    pub fn release(&mut self, now: Instant, flush: bool) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(&(at, slot)) = self.order.front() {
            if !flush && now.duration_since(at) < self.hold {
                break;
            }
            self.order.pop_front();
            if let Some(span) = self.pending.remove(&slot) {
                out.push(self.finish(span));
            }
        }
        self.waiting
            .retain(|_, slot| self.pending.contains_key(slot));
        self.stats.forwarded.fetch_add(out.len() as u64, Relaxed);
        out
    }

    fn finish(&self, mut span: Value) -> Value {
        let mut trace = str_field(&span, "traceId");
        // Follow renames through chains of hops (bounded: a cycle cannot loop forever).
        for _ in 0..16 {
            match self.renamed.get(&trace) {
                Some((to, _)) if *to != trace => trace = to.clone(),
                _ => break,
            }
        }
        span["traceId"] = Value::String(trace);
        if span["kind"] == "SERVER"
            && span.get("parentId").is_none()
            && span["tags"].get(LINK_TAG).is_some()
        {
            self.stats.unmatched.fetch_add(1, Relaxed);
        }
        if let Some(tags) = span.get_mut("tags").and_then(Value::as_object_mut) {
            tags.remove(LINK_TAG);
        }
        span
    }

    fn bound(&mut self, now: Instant) {
        self.clients
            .retain(|_, (_, _, at)| now.duration_since(*at) < KEY_TTL);
        self.renamed
            .retain(|_, (_, at)| now.duration_since(*at) < KEY_TTL);
        if self.clients.len() > MAX_KEYS {
            self.clients.clear();
        }
        if self.renamed.len() > MAX_KEYS {
            self.renamed.clear();
        }
    }

    /// Spans waiting; when too many, the caller releases early.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

fn str_field(span: &Value, key: &str) -> String {
    span[key].as_str().unwrap_or_default().to_string()
}

pub struct RelayOptions {
    pub listen: SocketAddr,
    pub zipkin: ZipkinConfig,
    pub hold: Duration,
}

pub fn run(opts: RelayOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tracer-collect")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(opts))
}

async fn serve(opts: RelayOptions) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    info!(
        "relaying spans from {} to {} (hold {:?})",
        listener.local_addr()?,
        opts.zipkin.url,
        opts.hold
    );
    let stats = Arc::new(JoinStats::default());
    let export_stats = Arc::new(ExportStats::default());
    let (forward_tx, forward_rx) = mpsc::channel::<Value>(opts.zipkin.queue_capacity.max(1));
    let forwarder = tokio::spawn(zipkin_forward(
        opts.zipkin.clone(),
        SpanQueue::new(forward_rx),
        export_stats.clone(),
    ));
    let (in_tx, mut in_rx) = mpsc::channel::<Vec<Value>>(1024);

    let joiner_stats = stats.clone();
    let hold = opts.hold;
    let joiner = tokio::spawn(async move {
        let mut joiner = Joiner::new(hold, joiner_stats);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                batch = in_rx.recv() => match batch {
                    Some(spans) => joiner.add(spans, Instant::now()),
                    None => break,
                },
                _ = tick.tick() => {}
            }
            let flush = joiner.pending() > MAX_PENDING;
            for span in joiner.release(Instant::now(), flush) {
                if forward_tx.try_send(span).is_err() {
                    warn!("forward queue full: span dropped");
                }
            }
        }
        for span in joiner.release(Instant::now(), true) {
            let _ = forward_tx.send(span).await;
        }
    });

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (in_tx, stats) = (in_tx.clone(), stats.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, in_tx.clone(), stats.clone()));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    drop(in_tx);
    let _ = joiner.await;
    let _ = tokio::time::timeout(Duration::from_secs(5), forwarder).await;
    eprintln!(
        "tracer collect: {} spans received, {} forwarded, {} hops joined, {} server spans without a traced caller, {} rejected posts; export: {} sent, {} failed",
        stats.received.load(Relaxed),
        stats.forwarded.load(Relaxed),
        stats.joined.load(Relaxed),
        stats.unmatched.load(Relaxed),
        stats.rejected_posts.load(Relaxed),
        export_stats.exported.load(Relaxed),
        export_stats.failed.load(Relaxed),
    );
    Ok(())
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
    *r.status_mut() = status;
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    in_tx: mpsc::Sender<Vec<Value>>,
    stats: Arc<JoinStats>,
) -> Result<Response<Body>, std::convert::Infallible> {
    if req.method() == hyper::Method::GET && req.uri().path() == "/health" {
        return Ok(reply(StatusCode::OK, "OK\n"));
    }
    if req.method() != hyper::Method::POST || req.uri().path() != "/api/v2/spans" {
        return Ok(reply(StatusCode::NOT_FOUND, "not found\n"));
    }
    let gzipped = req
        .headers()
        .get(hyper::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            stats.rejected_posts.fetch_add(1, Relaxed);
            return Ok(reply(StatusCode::PAYLOAD_TOO_LARGE, &format!("{e}\n")));
        }
    };
    let json = if gzipped {
        let mut out = Vec::new();
        let decoder = flate2::read::GzDecoder::new(&body[..]);
        if let Err(e) = decoder.take(MAX_BODY as u64 * 8).read_to_end(&mut out) {
            stats.rejected_posts.fetch_add(1, Relaxed);
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                &format!("bad gzip body: {e}\n"),
            ));
        }
        out
    } else {
        body.to_vec()
    };
    let spans: Vec<Value> = match serde_json::from_slice(&json) {
        Ok(Value::Array(spans)) => spans,
        _ => {
            stats.rejected_posts.fetch_add(1, Relaxed);
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                "body must be a JSON list of spans\n",
            ));
        }
    };
    if in_tx.send(spans).await.is_err() {
        return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"));
    }
    Ok(reply(StatusCode::ACCEPTED, ""))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn span(kind: &str, trace: &str, id: &str, parent: Option<&str>, key: Option<&str>) -> Value {
        let mut s = json!({"traceId": trace, "id": id, "kind": kind, "name": "x", "tags": {}});
        if let Some(p) = parent {
            s["parentId"] = json!(p);
        }
        if let Some(k) = key {
            s["tags"][LINK_TAG] = json!(k);
        }
        s
    }

    fn joiner() -> Joiner {
        Joiner::new(Duration::from_secs(2), Arc::new(JoinStats::default()))
    }

    fn by_id(spans: &[Value]) -> HashMap<String, Value> {
        spans
            .iter()
            .map(|s| (str_field(s, "id"), s.clone()))
            .collect()
    }

    #[test]
    fn a_chain_of_hops_becomes_one_trace_whatever_the_arrival_order() {
        let t0 = Instant::now();
        let mut j = joiner();
        // Host C (deepest) flushes first, then B, then A: servers before their clients.
        j.add(vec![span("SERVER", "cc", "c1", None, Some("k2"))], t0);
        j.add(
            vec![
                span("CLIENT", "bb", "b2", Some("b1"), Some("k2")),
                span("SERVER", "bb", "b1", None, Some("k1")),
            ],
            t0 + Duration::from_millis(100),
        );
        j.add(
            vec![
                span("CLIENT", "aa", "a2", Some("a1"), Some("k1")),
                span("SERVER", "aa", "a1", None, Some("k0")),
            ],
            t0 + Duration::from_millis(200),
        );
        assert!(
            j.release(t0 + Duration::from_secs(1), false).is_empty(),
            "held"
        );
        let out = by_id(&j.release(t0 + Duration::from_secs(3), false));
        assert_eq!(out.len(), 5);
        assert!(out.values().all(|s| s["traceId"] == "aa"), "{out:#?}");
        assert_eq!(out["b1"]["parentId"], "a2");
        assert_eq!(out["c1"]["parentId"], "b2");
        assert!(out["a1"].get("parentId").is_none());
        assert!(out.values().all(|s| s["tags"].get(LINK_TAG).is_none()));
        assert_eq!(j.stats.joined.load(Relaxed), 2);
        assert_eq!(
            j.stats.unmatched.load(Relaxed),
            1,
            "a1's caller was not traced"
        );
    }

    #[test]
    fn client_first_also_joins() {
        let t0 = Instant::now();
        let mut j = joiner();
        j.add(vec![span("CLIENT", "aa", "a2", None, Some("k1"))], t0);
        j.add(
            vec![
                span("SERVER", "bb", "b1", None, Some("k1")),
                span("CLIENT", "bb", "b2", Some("b1"), None),
            ],
            t0,
        );
        let out = by_id(&j.release(t0, true));
        assert_eq!(out["b1"]["parentId"], "a2");
        assert_eq!(out["b2"]["traceId"], "aa");
    }

    #[test]
    fn a_server_that_already_has_a_parent_is_left_alone() {
        let t0 = Instant::now();
        let mut j = joiner();
        j.add(vec![span("CLIENT", "aa", "a2", None, Some("k1"))], t0);
        j.add(vec![span("SERVER", "aa", "b1", Some("a2"), Some("k1"))], t0);
        let out = by_id(&j.release(t0, true));
        assert_eq!(out["b1"]["parentId"], "a2");
        assert_eq!(j.stats.joined.load(Relaxed), 0);
    }

    #[test]
    fn spans_without_keys_pass_through() {
        let t0 = Instant::now();
        let mut j = joiner();
        j.add(vec![span("SERVER", "aa", "a1", None, None)], t0);
        let out = j.release(t0, true);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["traceId"], "aa");
    }
}
