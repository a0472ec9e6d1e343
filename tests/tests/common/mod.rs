//! Harness pieces shared by the end-to-end tests: the tracer as a child process, test servers,
//! and a raw HTTP/1.1 client that keeps its connection and measures its own latency.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracer_e2e::{ChildGuard, http_request, repo_root};

/// A Python client running `script`, its output piped (such scripts usually wait for a go
/// file, so that the tracer is attached before they connect).
pub fn python_client(script: &str) -> ChildGuard {
    let child = Command::new("python3")
        .args(["-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start a Python client");
    ChildGuard(child)
}

/// What a client printed, once it exited; it must have succeeded.
pub fn client_output(client: &mut ChildGuard) -> String {
    let mut out = String::new();
    if let Some(stdout) = client.0.stdout.as_mut() {
        stdout
            .read_to_string(&mut out)
            .expect("read the client's output");
    }
    let status = client.0.wait().expect("wait for the client");
    assert!(status.success(), "the client failed: {out}");
    out
}

/// Privileged tests must run in CI; elsewhere they say clearly that they need root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
    assert!(
        root,
        "the end-to-end tests need root and BPF (CI runs them as root): run `sudo -E cargo xtask test`"
    );
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn tracer_bin() -> PathBuf {
    std::env::var_os("TRACER_BIN")
        .map_or_else(|| repo_root().join("target/release/tracer"), PathBuf::from)
}

/// The tracer, running. Stop it with `stop()` (SIGTERM, as a user's Ctrl-C would).
pub struct Tracer {
    child: Option<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

pub struct Stopped {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

fn pump(stream: impl Read + Send + 'static, sink: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
}

impl Tracer {
    /// Starts `tracer ARGS` and waits until it reports that its probes are attached.
    pub fn start(args: &[&str]) -> Tracer {
        Tracer::start_with_env(args, &[])
    }

    /// `tracer run` limited to the programs `comms` and connections on `port`, exporting to
    /// the collector at `zipkin` with a short flush interval: how most end-to-end tests run it.
    pub fn run_for(comms: &[&str], port: u16, zipkin: &str) -> Tracer {
        let port = port.to_string();
        let mut args = vec!["run"];
        for comm in comms {
            args.extend(["--comm", comm]);
        }
        args.extend([
            "--port",
            &port,
            "--zipkin",
            zipkin,
            "--flush-interval-ms",
            "200",
        ]);
        Tracer::start(&args)
    }

    /// `tracer run` on nginx's connections on `port`, spans as JSON lines on stdout, with
    /// `extra` arguments and `env`: how the tests that load nginx and read every span run it.
    pub fn run_nginx_json(port: u16, extra: &[&str], env: &[(&str, &str)]) -> Tracer {
        let port = port.to_string();
        let mut args = vec![
            "run", "--comm", "nginx", "--port", &port, "--output", "json",
        ];
        args.extend_from_slice(extra);
        Tracer::start_with_env(&args, env)
    }

    /// `tracer attach --pid PID --zipkin ZIPKIN` with `extra` arguments: how the tests that
    /// watch one process and read its spans back run it.
    pub fn attach_exporting(pid: &str, zipkin: &str, extra: &[&str]) -> Tracer {
        let mut args = vec!["attach", "--pid", pid, "--zipkin", zipkin];
        args.extend_from_slice(extra);
        Tracer::start(&args)
    }

    /// `start` with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Tracer {
        let mut tracer = Tracer::spawn(
            Command::new(tracer_bin())
                .args(args)
                .envs(env.iter().copied()),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let err = tracer.stderr();
            // `attach`, `run`, and `collect` (the relay) each say when they are ready.
            if err.contains("attached to pid")
                || err.contains("tracing ")
                || err.contains("relaying spans")
            {
                return tracer;
            }
            if let Some(status) = tracer.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tracer exited early ({status}):\n{err}");
            }
            assert!(
                Instant::now() < deadline,
                "tracer did not attach within 30 s:\n{err}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Spawns `command` (the tracer with its arguments; `RUST_LOG=info` unless it says
    /// otherwise), its output read as it comes, without waiting for anything.
    pub fn spawn(command: &mut Command) -> Tracer {
        if !command.get_envs().any(|(k, _)| k == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tracer_bin().display()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        pump(child.stdout.take().unwrap(), stdout.clone());
        pump(child.stderr.take().unwrap(), stderr.clone());
        Tracer {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    /// Waits (at most `limit`) until the tracer's stderr holds `text`.
    pub fn wait_for_stderr(&self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.stderr().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} from the tracer within {limit:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, then wait (at most 20 s) for the flush and exit.
    pub fn stop(mut self) -> Stopped {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "tracer did not stop within 20 s of SIGTERM:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the pumps read the last lines.
        std::thread::sleep(Duration::from_millis(100));
        Stopped {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Tracer {
    /// Waits (at most `limit`) for the tracer to exit by itself.
    pub fn wait_for_exit(mut self, limit: Duration) -> Stopped {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("tracer did not exit within {limit:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(100));
        Stopped {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }

    /// SIGKILL, as an OOM killer or `kill -9` would: no flush, no cleanup of its own.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the tracer to completion (for error cases) with a time limit.
pub fn run_tracer_to_exit(args: &[&str], limit: Duration) -> Stopped {
    let mut child = Command::new(tracer_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tracer");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tracer {args:?} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Stopped {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// tests/servers/http_server.py on a free port.
pub struct PythonServer {
    pub guard: ChildGuard,
    pub port: u16,
}

impl PythonServer {
    pub fn start() -> PythonServer {
        PythonServer::start_with(&[])
    }

    /// HTTPS, with a certificate and key from [`self_signed_certificate`].
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> PythonServer {
        PythonServer::start_with(&[
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ])
    }

    fn start_with(args: &[&std::ffi::OsStr]) -> PythonServer {
        let dir = tempdir();
        let port_file = dir.join("port");
        let child = Command::new("python3")
            .arg(repo_root().join("tests/servers/http_server.py"))
            .arg("--port-file")
            .arg(&port_file)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("start python3 http server");
        let guard = ChildGuard(child);
        let port = wait_for_file(&port_file, Duration::from_secs(10))
            .trim()
            .parse()
            .unwrap();
        PythonServer { guard, port }
    }

    pub fn pid(&self) -> u32 {
        self.guard.0.id()
    }
}

/// nginx serving `dir/html` (index.html "hi", big.txt of 200 KB, /err answering 503) on a free
/// loopback port with two workers; `listen_options` and `server_extra` go into its server block
/// (`ssl` and the certificate lines for HTTPS). Returns the guard and the port.
pub fn start_nginx(
    dir: &std::path::Path,
    listen_options: &str,
    server_extra: &str,
) -> (ChildGuard, u16) {
    let html = dir.join("html");
    std::fs::create_dir_all(&html).unwrap();
    std::fs::write(html.join("index.html"), "hi\n").unwrap();
    std::fs::write(html.join("big.txt"), "b".repeat(200_000)).unwrap();
    let port = tracer_e2e::free_port();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\ndaemon off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\nevents {{ worker_connections 128; }}\n\
             http {{ access_log off; sendfile on; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port}{listen_options}; {server_extra}\n\
             root {h}; location /err {{ return 503; }} }} }}\n",
            d = dir.display(),
            h = html.display()
        ),
    )
    .unwrap();
    (spawn_nginx(&conf, port), port)
}

/// [`start_nginx`] serving HTTPS with certificate `cert` and key `key` (see
/// [`self_signed_certificate`]).
pub fn start_https_nginx(
    dir: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> (ChildGuard, u16) {
    start_nginx(
        dir,
        " ssl",
        &format!(
            "ssl_certificate {}; ssl_certificate_key {};",
            cert.display(),
            key.display()
        ),
    )
}

/// curl (`-k`, so any certificate) getting `/index.html`, `/big.txt` and `/err` of
/// [`start_nginx`]'s server at `base` on one connection; asserts their statuses (200, 200,
/// 503).
pub fn curl_index_big_err(base: &str) {
    let out = Command::new("curl")
        // -o applies to one URL each: one per URL keeps the bodies out of stdout.
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_code}\\n"])
        .args([
            format!("{base}/index.html"),
            format!("{base}/big.txt"),
            format!("{base}/err"),
        ])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200\n200\n503\n");
}

/// `tracer collect` on a free loopback port, forwarding to `zipkin` what it joined, holding
/// unmatched halves 1.5 s; returns it and the URL agents send to.
pub fn start_relay(zipkin: &str) -> (Tracer, String) {
    let listen = format!("127.0.0.1:{}", tracer_e2e::free_port());
    let relay = Tracer::start(&[
        "collect",
        "--listen",
        &listen,
        "--zipkin",
        zipkin,
        "--hold-ms",
        "1500",
    ]);
    (relay, format!("http://{listen}"))
}

/// nginx with configuration `conf`, once it listens on `port`.
pub fn spawn_nginx(conf: &std::path::Path, port: u16) -> ChildGuard {
    let nginx = ChildGuard(
        Command::new("nginx")
            .arg("-c")
            .arg(conf)
            .spawn()
            .expect("nginx"),
    );
    tracer_e2e::wait_for_port(port, Duration::from_secs(10));
    nginx
}

/// A self-signed certificate for localhost and its key, made with the openssl tool:
/// (cert.pem, key.pem) in `dir`.
pub fn self_signed_certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl req: {out:?}");
    (cert, key)
}

pub fn tempdir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tracer-e2e-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn wait_for_file(path: &std::path::Path, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.is_empty()
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One response as the client saw it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body_len: usize,
    /// From the first byte written to the last byte read.
    pub latency: Duration,
}

/// A keep-alive HTTP/1.1 client on one TCP connection.
pub struct Client {
    stream: BufReader<TcpStream>,
    pub local: SocketAddr,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let local = stream.local_addr().unwrap();
        Client {
            stream: BufReader::new(stream),
            local,
        }
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.request("GET", path, &[])
    }

    pub fn request(&mut self, method: &str, path: &str, body: &[u8]) -> Response {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: tracer-e2e\r\n");
        if !body.is_empty() {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let start = Instant::now();
        let s = self.stream.get_mut();
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let (status, body_len) = self.read_response(method == "HEAD");
        Response {
            status,
            body_len,
            latency: start.elapsed(),
        }
    }

    fn read_response(&mut self, head_only: bool) -> (u16, usize) {
        let mut line = String::new();
        self.stream.read_line(&mut line).unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .expect("status line")
            .parse()
            .unwrap();
        let mut content_length = None;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => content_length = Some(value.trim().parse::<usize>().unwrap()),
                "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                _ => {}
            }
        }
        if head_only || status == 204 || status == 304 {
            return (status, 0);
        }
        if chunked {
            let mut total = 0;
            loop {
                let mut size = String::new();
                self.stream.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut buf = vec![0; n + 2];
                self.stream.read_exact(&mut buf).unwrap();
                if n == 0 {
                    return (status, total);
                }
                total += n;
            }
        }
        let n = content_length.unwrap_or(0);
        let mut buf = vec![0; n];
        self.stream.read_exact(&mut buf).unwrap();
        (status, n)
    }
}

/// (VmRSS, VmHWM) of a process, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The value of the agent's Prometheus metric `name` (its first sample) at `metrics_port`.
pub fn metric(metrics_port: u16, name: &str) -> u64 {
    let (status, body) = http_request(
        &format!("127.0.0.1:{metrics_port}"),
        "GET",
        "/metrics",
        None,
        &[],
    )
    .unwrap();
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&body).into_owned();
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("no {name} in {body}")) as u64
}

/// Polls `cond` every 200 ms until it holds, failing the test after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
