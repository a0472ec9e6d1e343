//! Shared pieces of tracer's end-to-end tests: the Zipkin-compatible test collector (or a real
//! Zipkin named by `ZIPKIN_URL`), child processes that die with the test, ports, and a minimal
//! HTTP/1.1 client for talking to the collector without pulling an HTTP stack into the tests.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The Python interpreter for the test servers (`PYTHON` overrides).
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A child process stopped (and reaped) when the test lets go of it, pass or fail: SIGTERM
/// first, so that servers with workers (nginx) take them down too, then SIGKILL after 3 s.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: signals our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral loopback port")
        .port()
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on 127.0.0.1:{port} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and the (de-chunked)
/// body. `addr` is `host:port`.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body)?;
    }
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            out.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = length {
        out.resize(n, 0);
        reader.read_exact(&mut out)?;
    } else {
        reader.read_to_end(&mut out)?;
    }
    Ok((status, out))
}

/// A Zipkin collector for a test: the test collector in `tests/collector/`, started on a free
/// loopback port, or the real Zipkin named by `ZIPKIN_URL` (e.g. `http://127.0.0.1:9411`).
pub struct Collector {
    base: String,
    addr: String,
    real: bool,
    _child: Option<ChildGuard>,
}

impl Collector {
    pub fn start() -> Collector {
        if let Ok(url) = std::env::var("ZIPKIN_URL") {
            let base = url.trim_end_matches('/').to_string();
            let addr = base
                .split("://")
                .nth(1)
                .unwrap_or(&base)
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            return Collector {
                base,
                addr,
                real: true,
                _child: None,
            };
        }
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let port_file = std::env::temp_dir().join(format!(
            "tracer-collector-{}-{}.port",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&port_file);
        let child = Command::new(python())
            .arg(repo_root().join("tests/collector/zipkin_collector.py"))
            .args(["--host", "127.0.0.1", "--port", "0", "--port-file"])
            .arg(&port_file)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the test collector (python3)");
        let guard = ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let port: u16 = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "the test collector did not start within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = std::fs::remove_file(&port_file);
        let addr = format!("127.0.0.1:{port}");
        Collector {
            base: format!("http://{addr}"),
            addr,
            real: false,
            _child: Some(guard),
        }
    }

    /// The collector's base URL, as a user would pass it to `--zipkin`.
    pub fn url(&self) -> String {
        self.base.clone()
    }

    fn get(&self, path: &str) -> (u16, Vec<u8>) {
        http_request(&self.addr, "GET", path, None, &[])
            .unwrap_or_else(|e| panic!("GET {path} from the collector: {e}"))
    }

    fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"))
    }

    /// Every span the collector holds.
    pub fn spans(&self) -> Vec<Value> {
        if self.real {
            let traces = self.get_json("/api/v2/traces?limit=100000&lookback=3600000");
            return traces
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|t| t.as_array().cloned().unwrap_or_default())
                .collect();
        }
        self.get_json("/test/spans")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The spans of one trace through the query API, or `None` when Zipkin has no such trace.
    pub fn trace(&self, id: &str) -> Option<Vec<Value>> {
        let (status, body) = self.get(&format!("/api/v2/trace/{id}"));
        if status == 404 {
            return None;
        }
        assert_eq!(
            status,
            200,
            "GET trace {id}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice::<Value>(&body)
            .ok()?
            .as_array()
            .cloned()
    }

    pub fn services(&self) -> Vec<String> {
        self.get_json("/api/v2/services")
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    }

    /// Forgets every span (the test collector only; a real Zipkin keeps them).
    pub fn reset(&self) {
        if !self.real {
            let (status, _) = http_request(&self.addr, "POST", "/test/reset", Some(b""), &[])
                .expect("reset the collector");
            assert_eq!(status, 200);
        }
    }

    /// Waits until at least `n` spans arrived (polling), then a little longer so that extra
    /// spans, which a test must see to fail on them, arrive too. Returns what is there.
    pub fn wait_for_spans(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if spans.len() >= n {
                std::thread::sleep(Duration::from_millis(300));
                return self.spans();
            }
            if Instant::now() >= deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes span POSTs fail: `mode` is "none", "500", "503", "slow" (delay_ms per POST) or
    /// "drop" (connection closed without an answer).
    pub fn set_fault(&self, mode: &str, delay_ms: u64) {
        assert!(!self.real, "faults need the test collector");
        let body = format!(r#"{{"mode":"{mode}","delay_ms":{delay_ms}}}"#);
        let (status, _) = http_request(
            &self.addr,
            "POST",
            "/test/fault",
            Some(body.as_bytes()),
            &[("Content-Type", "application/json")],
        )
        .expect("set a collector fault");
        assert_eq!(status, 200);
    }

    /// The test collector's counters (posts, accepted spans, rejected posts, gzip posts).
    pub fn stats(&self) -> Value {
        self.get_json("/test/stats")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span_json(id: &str) -> String {
        format!(
            r#"[{{"traceId":"0af7651916cd43dd8448eb211c80319c","id":"{id}","kind":"SERVER","name":"get /x","timestamp":1700000000000000,"duration":5,"localEndpoint":{{"serviceName":"t"}}}}]"#
        )
    }

    #[test]
    fn collector_round_trip() {
        let c = Collector::start();
        let addr = c.url().trim_start_matches("http://").to_string();
        let headers = [("Content-Type", "application/json")];
        let (status, _) = http_request(
            &addr,
            "POST",
            "/api/v2/spans",
            Some(span_json("b7ad6b7169203331").as_bytes()),
            &headers,
        )
        .unwrap();
        assert_eq!(status, 202);
        let (status, _) = http_request(
            &addr,
            "POST",
            "/api/v2/spans",
            Some(span_json("B7AD6B7169203331").as_bytes()),
            &headers,
        )
        .unwrap();
        assert_eq!(status, 400, "uppercase ids are rejected");
        let trace = c
            .trace("0af7651916cd43dd8448eb211c80319c")
            .expect("the trace");
        assert_eq!(trace.len(), 1);
        assert_eq!(c.services(), vec!["t".to_string()]);
        assert_eq!(c.wait_for_spans(1, Duration::from_secs(1)).len(), 1);
        c.reset();
        assert!(c.spans().is_empty());
        assert!(c.trace("0af7651916cd43dd8448eb211c80319c").is_none());
    }
}
