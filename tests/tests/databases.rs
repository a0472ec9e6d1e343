//! End-to-end: database calls as spans. A real PostgreSQL (initdb'd for the test, password
//! authentication) and a real redis-server, driven by psql, redis-cli and Ruby clients (ruby-pg
//! and the redis gem, Debian packages); the tracer traces clients and servers alike, and the
//! spans are read back from the collector.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{Tracer, require_root, tempdir};
use serde_json::Value;
use tracer_e2e::{ChildGuard, Collector, free_port, repo_root, wait_for_port};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PG_PASSWORD: &str = "s3cret-pw";

fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["tags"][key].as_str()
}

/// A PostgreSQL server of its own: a fresh cluster owned by the `postgres` user, listening on
/// 127.0.0.1 only, with SCRAM password authentication over TCP.
struct Postgres {
    _server: ChildGuard,
    port: u16,
    /// libpq's sslmode for the clients: `disable`, or `require` when the server has TLS on.
    sslmode: &'static str,
}

impl Postgres {
    fn start(dir: &Path) -> Postgres {
        Postgres::start_with(dir, false)
    }

    /// With `tls`, the server gets a self-signed certificate and clients must use TLS.
    fn start_with(dir: &Path, tls: bool) -> Postgres {
        let data = dir.join("pgdata");
        std::fs::create_dir_all(&data).unwrap();
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, PG_PASSWORD).unwrap();
        for p in [dir, data.as_path(), pwfile.as_path()] {
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .arg(p)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("initdb (package postgresql)");
        assert!(out.status.success(), "initdb: {out:?}");
        let port = free_port();
        let mut tls_args: Vec<String> = Vec::new();
        if tls {
            let (cert, key) = common::self_signed_certificate(dir);
            for f in [&cert, &key] {
                assert!(
                    Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(f)
                        .status()
                        .unwrap()
                        .success()
                );
            }
            assert!(
                Command::new("chmod")
                    .arg("600")
                    .arg(&key)
                    .status()
                    .unwrap()
                    .success()
            );
            tls_args = vec![
                "-c".into(),
                "ssl=on".into(),
                "-c".into(),
                format!("ssl_cert_file={}", cert.display()),
                "-c".into(),
                format!("ssl_key_file={}", key.display()),
            ];
        }
        let server = ChildGuard(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(format!("{PG_BIN}/postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
                .args(&tls_args)
                .arg("-k")
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("postgres"),
        );
        wait_for_port(port, Duration::from_secs(20));
        let pg = Postgres {
            _server: server,
            port,
            sslmode: if tls { "require" } else { "disable" },
        };
        // The port opens before the server takes connections: until then psql is turned away
        // ("the database system is starting up"), and the table was missing from the tests.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let out = pg.psql(
                "CREATE TABLE cats (id int PRIMARY KEY, name text); \
                 INSERT INTO cats VALUES (1, 'Tom'), (2, 'Felix'), (3, 'Garfield');",
            );
            if out.trim().is_empty() {
                break;
            }
            assert!(
                out.contains("starting up") && std::time::Instant::now() < deadline,
                "creating the test table: {out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    /// Runs psql over TCP with the password; returns its output.
    fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql])
            .env("PGPASSWORD", PG_PASSWORD)
            .env("PGSSLMODE", self.sslmode)
            .output()
            .expect("psql");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

struct Redis {
    _server: ChildGuard,
    port: u16,
}

impl Redis {
    fn start(dir: &Path) -> Redis {
        let port = free_port();
        let server = ChildGuard(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server (package redis-server)"),
        );
        wait_for_port(port, Duration::from_secs(10));
        Redis {
            _server: server,
            port,
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (package redis-tools)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn ruby(script: &str, args: &[&str]) -> String {
    let out = Command::new("ruby")
        .arg(repo_root().join("tests/servers").join(script))
        .args(args)
        .output()
        .expect("ruby");
    assert!(out.status.success(), "{script}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Span names per (kind, local service), sorted, for exact comparison.
fn names(spans: &[Value]) -> BTreeMap<(String, String), Vec<String>> {
    let mut map: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for s in spans {
        map.entry((
            s["kind"].as_str().unwrap().to_string(),
            s["localEndpoint"]["serviceName"]
                .as_str()
                .unwrap()
                .to_string(),
        ))
        .or_default()
        .push(s["name"].as_str().unwrap().to_string());
    }
    for v in map.values_mut() {
        v.sort();
    }
    map
}

fn find<'a>(spans: &'a [Value], kind: &str, statement: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["kind"] == kind && tag(s, "db.statement") == Some(statement))
        .unwrap_or_else(|| panic!("no {kind} span with statement {statement:?}: {spans:#?}"))
}

fn scratch_dir() -> PathBuf {
    let dir = tempdir();
    // postgres must be able to enter it.
    let _ = Command::new("chmod").arg("755").arg(&dir).status();
    dir
}

/// psql (simple query protocol) and ruby-pg (extended protocol, prepared statements, a
/// pipeline) against PostgreSQL: one CLIENT span per query, and one SERVER span per query in
/// the postgres backend, linked to its client's, with literals hidden, errors carried, and no
/// password anywhere.
#[test]
fn postgres_calls_are_spans() {
    require_root();
    let collector = Collector::start();
    let dir = scratch_dir();
    let pg = Postgres::start(&dir);
    let port_s = pg.port.to_string();
    let tracer = Tracer::run_for(&["psql", "ruby", "postgres"], pg.port, &collector.url());
    assert_eq!(pg.psql("SELECT name FROM cats WHERE id = 2"), "Felix\n");
    let err = pg.psql("SELECT * FROM nope");
    assert!(err.contains("does not exist"), "{err}");
    let out = ruby("pg_client.rb", &[&port_s, PG_PASSWORD]);
    assert_eq!(
        out,
        "Tom\nFelix\nGarfield\nerror: ERROR:  division by zero\npipeline: 3\n"
    );

    // Client spans: psql 2; ruby 8: exec_params, prepare (a round trip of its own), two
    // exec_prepared, the division, the pipeline's three. The same 10 as server spans.
    let spans = collector.wait_for_spans(20, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(500));
    let spans_now = collector.spans();
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_eq!(
        spans.len(),
        spans_now.len(),
        "more spans than queries: {spans_now:#?}"
    );
    let got = names(&spans);
    let client_psql = &got[&("CLIENT".to_string(), "psql".to_string())];
    assert_eq!(client_psql, &["SELECT cats", "SELECT nope"], "{spans:#?}");
    let client_ruby = &got[&("CLIENT".to_string(), "ruby".to_string())];
    assert_eq!(
        client_ruby,
        &[
            "INSERT cats",
            "PREPARE cats",
            "SELECT",
            "SELECT cats",
            "SELECT cats",
            "SELECT cats",
            "SELECT cats",
            "UPDATE cats"
        ],
        "{spans:#?}"
    );
    let server = &got[&("SERVER".to_string(), "postgres".to_string())];
    let mut all_clients: Vec<String> = client_psql.iter().chain(client_ruby).cloned().collect();
    all_clients.sort();
    assert_eq!(server, &all_clients, "one SERVER span per query");
    // Linked as the Redis commands below, the pipeline's three queries too (one write, one
    // read: each numbered from where it began in them).
    assert_eq!(linked_and_nested(&spans), all_clients.len());

    for s in &spans {
        assert_eq!(tag(s, "db.system"), Some("postgresql"));
        if s["kind"] == "CLIENT" {
            assert_eq!(s["remoteEndpoint"]["serviceName"], "postgresql");
            assert_eq!(
                s["remoteEndpoint"]["port"].as_u64(),
                Some(u64::from(pg.port))
            );
        }
    }
    let psql_select = find(&spans, "CLIENT", "SELECT name FROM cats WHERE id = ?");
    assert_eq!(tag(psql_select, "db.operation"), Some("SELECT"));
    assert!(tag(psql_select, "error").is_none());
    let missing = find(&spans, "CLIENT", "SELECT * FROM nope");
    assert!(
        tag(missing, "error").is_some_and(|e| e.contains("relation \"nope\" does not exist")),
        "{missing}"
    );
    let division = find(&spans, "CLIENT", "SELECT ? / $1::int");
    assert!(
        tag(division, "error").is_some_and(|e| e.contains("division by zero")),
        "{division}"
    );
    find(&spans, "CLIENT", "UPDATE cats SET name = $1 WHERE id = $2");
    find(
        &spans,
        "SERVER",
        "INSERT INTO cats (id, name) VALUES ($1, $2)",
    );
    let all = serde_json::to_string(&spans).unwrap();
    for secret in [PG_PASSWORD, "Felix", "Garfield", "Kit"] {
        assert!(
            !all.contains(secret),
            "{secret:?} leaked into a span: {all}"
        );
    }
}

/// The same queries over TLS (libpq with sslmode=require, the server with ssl=on): psql and
/// the postgres backend both use OpenSSL, and the spans are the plaintext ones.
#[test]
fn postgres_over_tls() {
    require_root();
    let collector = Collector::start();
    let dir = scratch_dir();
    let pg = Postgres::start_with(&dir, true);
    let tracer = Tracer::run_for(&["psql", "postgres"], pg.port, &collector.url());
    assert_eq!(pg.psql("SELECT name FROM cats WHERE id = 3"), "Garfield\n");
    assert!(pg.psql("SELECT * FROM nope").contains("does not exist"));
    let spans = collector.wait_for_spans(4, Duration::from_secs(15));
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let got = names(&spans);
    assert_eq!(
        got[&("CLIENT".to_string(), "psql".to_string())],
        ["SELECT cats", "SELECT nope"],
        "{spans:#?}"
    );
    assert_eq!(
        got[&("SERVER".to_string(), "postgres".to_string())],
        ["SELECT cats", "SELECT nope"],
        "{spans:#?}"
    );
    find(&spans, "SERVER", "SELECT name FROM cats WHERE id = ?");
    let missing = find(&spans, "CLIENT", "SELECT * FROM nope");
    assert!(tag(missing, "error").is_some_and(|e| e.contains("does not exist")));
    let all = serde_json::to_string(&spans).unwrap();
    assert!(
        !all.contains(PG_PASSWORD) && !all.contains("Garfield"),
        "{all}"
    );
}

/// redis-cli and the redis gem (single commands, a pipeline, MULTI/EXEC, an error reply)
/// against redis-server: a CLIENT span per command and a SERVER span per command in
/// redis-server.
#[test]
fn redis_calls_are_spans() {
    require_root();
    let collector = Collector::start();
    let dir = scratch_dir();
    let redis = Redis::start(&dir);
    let port_s = redis.port.to_string();
    let tracer = Tracer::run_for(
        &["redis-cli", "ruby", "redis-server"],
        redis.port,
        &collector.url(),
    );
    assert_eq!(redis.cli(&["SET", "greeting", "hello"]), "OK");
    assert_eq!(redis.cli(&["GET", "greeting"]), "hello");
    let out = ruby("redis_client.rb", &[&port_s]);
    assert_eq!(
        out,
        "Tom\nerror: ERR value is not an integer or out of range\n"
    );
    // redis-cli: SET, GET. ruby: SET, GET, 10 x INCR, MULTI, SET, INCR, EXEC, INCR (error).
    let expected_ruby = 17;
    let n = 2 + expected_ruby;
    let spans = collector.wait_for_spans(2 * n, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(500));
    let spans_now = collector.spans();
    let stopped = tracer.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_eq!(
        spans.len(),
        spans_now.len(),
        "more spans than commands: {spans_now:#?}"
    );
    let got = names(&spans);
    assert_eq!(
        got[&("CLIENT".to_string(), "redis-cli".to_string())],
        ["GET", "SET"],
        "{spans:#?}"
    );
    let mut ruby_names: Vec<String> = ["SET", "GET", "MULTI", "SET", "INCR", "EXEC", "INCR"]
        .into_iter()
        .map(String::from)
        .chain(std::iter::repeat_n("INCR".to_string(), 10))
        .collect();
    ruby_names.sort();
    assert_eq!(
        got[&("CLIENT".to_string(), "ruby".to_string())],
        ruby_names,
        "{spans:#?}"
    );
    let server = &got[&("SERVER".to_string(), "redis-server".to_string())];
    assert_eq!(server.len(), n, "one SERVER span per command: {spans:#?}");
    for s in &spans {
        assert_eq!(tag(s, "db.system"), Some("redis"));
        if s["kind"] == "CLIENT" {
            assert_eq!(s["remoteEndpoint"]["serviceName"], "redis");
        }
    }
    let errors: Vec<_> = spans
        .iter()
        .filter(|s| s["kind"] == "CLIENT" && tag(s, "error").is_some())
        .collect();
    assert_eq!(errors.len(), 1, "{spans:#?}");
    assert!(tag(errors[0], "error").unwrap().contains("not an integer"));
    let set = find(&spans, "CLIENT", "SET ? ?");
    assert_eq!(tag(set, "db.operation"), Some("SET"));
    let all = serde_json::to_string(&spans).unwrap();
    for value in ["hello", "Felix", "Tom"] {
        assert!(!all.contains(value), "{value:?} leaked into a span: {all}");
    }
    // Each command's server span has the link tag its client span has (the TCP sequence
    // number of its first byte, wherever the server's reads cut the pipelined ones).
    assert_eq!(linked_and_nested(&spans), n);
}

/// Checks that each SERVER span in `spans` has a link tag, that a CLIENT span has the same,
/// and, both ends on one host and one clock, that the server span lies within it (a send is
/// reported when it returns, and the reader may have run before that). Returns how many.
fn linked_and_nested(spans: &[Value]) -> usize {
    let mut nested = 0;
    for server in spans.iter().filter(|s| s["kind"] == "SERVER") {
        let link = tag(server, "tracer.link")
            .unwrap_or_else(|| panic!("a SERVER span without a link tag: {server:#}"));
        let client = spans
            .iter()
            .find(|s| s["kind"] == "CLIENT" && tag(s, "tracer.link") == Some(link))
            .unwrap_or_else(|| panic!("no CLIENT span for {link}: {spans:#?}"));
        let (cs, ce) = span_times(client);
        let (ss, se) = span_times(server);
        // Microseconds, each rounded down on its own.
        assert!(
            cs <= ss && se <= ce + 1,
            "server span {ss}..{se} outside its client's {cs}..{ce}: {client:#} {server:#}"
        );
        nested += 1;
    }
    nested
}

/// A span's start and end, in microseconds.
fn span_times(span: &Value) -> (u64, u64) {
    let start = span["timestamp"].as_u64().expect("timestamp");
    (start, start + span["duration"].as_u64().unwrap_or(0))
}
