//! Distributed tracing across hosts: "cats as a service" (Python tiers, and a Ruby/Sinatra
//! store behind them) on four test hosts (network
//! namespaces joined by a bridge), one tracer per host limited to it with `--netns`, and the
//! trace context carried between hosts by the kernel-injected `traceparent` (or, with injection
//! off, joined by `tracer collect` from TCP sequence numbers).
//!
//! The store looks each cat up in Redis, which runs on the client's host: untraced when the
//! kernel injects context (a Redis command has no header to carry it), traced by a fifth
//! tracer in the relay scenario, whose sequence-number keys link database calls as well.
//!
//! One request must give exactly one trace of eight spans (nine with the traced Redis), each
//! with the right parent; then 1,000 requests from concurrent keep-alive clients must give
//! 1,000 such traces, with parent accuracy printed and required to be at least 99.9%. The
//! client runs on a fifth host; every response it gets is checked byte for byte.

mod common;

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Tracer, require_root, tempdir, wait_for_file};
use serde_json::Value;
use tracer_e2e::{ChildGuard, Collector, repo_root};

const SUBNET: &str = "10.213.0";
const PORT: u16 = 8080;
/// The hosts with a traced service: (role, host number in the subnet).
const TIERS: [(&str, u8); 4] = [("front", 11), ("api", 12), ("images", 13), ("store", 14)];
const CLIENT_HOST: u8 = 10;
const REDIS_PORT: u16 = 6379;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 (`ip`) is needed for the multi-host tests");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Test hosts: network namespaces on one bridge, removed on drop.
struct Hosts {
    prefix: String,
    names: Vec<String>,
}

impl Hosts {
    fn new() -> Hosts {
        let prefix = format!("trc{}", std::process::id() % 100_000);
        let switch = format!("{prefix}-sw");
        let mut hosts = Hosts {
            prefix: prefix.clone(),
            names: vec![switch.clone()],
        };
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        let mut all: Vec<(String, u8)> = vec![("client".to_string(), CLIENT_HOST)];
        all.extend(TIERS.iter().map(|(role, n)| (role.to_string(), *n)));
        for (role, n) in all {
            let ns = hosts.ns(&role);
            ip(&["netns", "add", &ns]);
            hosts.names.push(ns.clone());
            let (inner, outer) = (format!("{prefix}h{n}"), format!("{prefix}s{n}"));
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "netns", &switch]);
            ip(&["-n", &switch, "link", "set", &outer, "master", "br0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{SUBNET}.{n}/24"),
                "dev",
                &inner,
            ]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
        }
        hosts
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// Runs `program args` on the host of `role`.
    fn command(&self, role: &str, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(role), program])
            .args(args);
        cmd
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// The app: one service per tier host. Returns the children (killed on drop).
fn start_app(hosts: &Hosts) -> Vec<ChildGuard> {
    let script = repo_root().join("tests/servers/cats.py");
    let dir = tempdir();
    let redis_addr = format!("{SUBNET}.{CLIENT_HOST}");
    let mut children = vec![ChildGuard(
        hosts
            .command(
                "client",
                "redis-server",
                &[
                    "--port",
                    &REDIS_PORT.to_string(),
                    "--bind",
                    &redis_addr,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                    "--dir",
                    dir.to_str().unwrap(),
                ],
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server (package redis-server)"),
    )];
    let upstream = |role: &str| {
        let n = TIERS.iter().find(|(r, _)| *r == role).unwrap().1;
        format!("{role}={SUBNET}.{n}:{PORT}")
    };
    for (role, _) in TIERS {
        let port_file = dir.join(format!("{role}.port"));
        let mut args = vec![
            script.to_str().unwrap().to_string(),
            role.to_string(),
            "--port".into(),
            PORT.to_string(),
            "--port-file".into(),
            port_file.to_str().unwrap().to_string(),
        ];
        let ups: Vec<String> = match role {
            "front" => vec![upstream("api")],
            "api" => vec![upstream("images"), upstream("store")],
            _ => vec![],
        };
        for u in ups {
            args.push("--upstream".into());
            args.push(u);
        }
        // The store tier is Ruby (Sinatra on Puma): one hop crosses another runtime.
        let (program, args) = if role == "store" {
            let ruby = vec![
                repo_root()
                    .join("tests/servers/cats_store.rb")
                    .to_str()
                    .unwrap()
                    .to_string(),
                "--port".into(),
                PORT.to_string(),
                "--port-file".into(),
                port_file.to_str().unwrap().to_string(),
                "--redis".into(),
                format!("{redis_addr}:{REDIS_PORT}"),
            ];
            ("ruby", ruby)
        } else {
            ("python3", args)
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = hosts
            .command(role, program, &args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start a cats tier");
        children.push(ChildGuard(child));
        wait_for_file(&port_file, Duration::from_secs(10));
    }
    children
}

fn start_tracers(hosts: &Hosts, zipkin: &str, extra: &[&str]) -> Vec<Tracer> {
    TIERS
        .iter()
        .map(|(role, _)| {
            let ns = hosts.ns(role);
            let url = zipkin.to_string();
            let mut args = vec![
                "run",
                "--netns",
                &ns,
                "--service-name",
                role,
                "--zipkin",
                &url,
                "--flush-interval-ms",
                "200",
            ];
            args.extend_from_slice(extra);
            Tracer::start(&args)
        })
        .collect()
}

fn run_load(hosts: &Hosts, total: usize, concurrency: usize, first_id: usize) -> Value {
    let script = repo_root().join("tests/servers/cats_load.py");
    let front = format!("{SUBNET}.{}", TIERS[0].1);
    let out = hosts
        .command(
            "client",
            "python3",
            &[
                script.to_str().unwrap(),
                &front,
                &PORT.to_string(),
                &total.to_string(),
                &concurrency.to_string(),
                "120",
                &first_id.to_string(),
            ],
        )
        .output()
        .expect("run the load client");
    assert!(
        out.status.success(),
        "load client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(String::from_utf8_lossy(&out.stdout).trim().as_bytes())
        .expect("load summary")
}

/// Which span of a cats trace this is: (service, kind, name).
fn role_of(span: &Value) -> (String, String, String) {
    (
        span["localEndpoint"]["serviceName"]
            .as_str()
            .unwrap_or("?")
            .to_string(),
        span["kind"].as_str().unwrap_or("?").to_string(),
        span["name"].as_str().unwrap_or("?").to_string(),
    )
}

/// The parent each span of a cats trace must have, by role.
fn expected_parent(
    role: &(String, String, String),
) -> Option<(&'static str, &'static str, &'static str)> {
    match (role.0.as_str(), role.1.as_str(), role.2.as_str()) {
        ("front", "SERVER", "GET /cats/{id}") => None,
        ("front", "CLIENT", "GET /api/cats/{id}") => Some(("front", "SERVER", "GET /cats/{id}")),
        ("api", "SERVER", "GET /api/cats/{id}") => Some(("front", "CLIENT", "GET /api/cats/{id}")),
        ("api", "CLIENT", "GET /images/{id}") => Some(("api", "SERVER", "GET /api/cats/{id}")),
        ("api", "CLIENT", "GET /store/cats/{id}") => Some(("api", "SERVER", "GET /api/cats/{id}")),
        ("images", "SERVER", "GET /images/{id}") => Some(("api", "CLIENT", "GET /images/{id}")),
        ("store", "SERVER", "GET /store/cats/{id}") => {
            Some(("api", "CLIENT", "GET /store/cats/{id}"))
        }
        ("store", "CLIENT", "GET") => Some(("store", "SERVER", "GET /store/cats/{id}")),
        ("cache", "SERVER", "GET") => Some(("store", "CLIENT", "GET")),
        _ => None,
    }
}

struct Verdict {
    spans: usize,
    correct: usize,
    complete_traces: usize,
    traces: usize,
    /// A few incomplete traces, described, for the failure message.
    incomplete: Vec<String>,
}

/// Groups spans by trace and checks every parent. A span is correct when its parent is the
/// span of the expected role in the same trace (or it is the root and has none).
fn judge(spans: &[Value], per_trace: usize) -> Verdict {
    let mut traces: HashMap<&str, Vec<&Value>> = HashMap::new();
    for s in spans {
        traces
            .entry(s["traceId"].as_str().unwrap())
            .or_default()
            .push(s);
    }
    let mut v = Verdict {
        spans: spans.len(),
        correct: 0,
        complete_traces: 0,
        traces: traces.len(),
        incomplete: Vec::new(),
    };
    for members in traces.values() {
        let by_id: HashMap<&str, &Value> = members
            .iter()
            .map(|s| (s["id"].as_str().unwrap(), *s))
            .collect();
        let mut correct_here = 0;
        for s in members {
            let role = role_of(s);
            let parent = s
                .get("parentId")
                .and_then(Value::as_str)
                .and_then(|p| by_id.get(p));
            let ok = match (expected_parent(&role), parent) {
                (None, None) => {
                    role.1 == "SERVER" && role.0 == "front" && s.get("parentId").is_none()
                }
                (Some(want), Some(p)) => {
                    let got = role_of(p);
                    (got.0.as_str(), got.1.as_str(), got.2.as_str()) == want
                }
                _ => false,
            };
            if ok {
                correct_here += 1;
            }
        }
        v.correct += correct_here;
        if members.len() == per_trace && correct_here == per_trace {
            v.complete_traces += 1;
        } else if v.incomplete.len() < 3 {
            let described: Vec<String> = members
                .iter()
                .map(|s| {
                    format!(
                        "  {:?} id={} parent={} start={}",
                        role_of(s),
                        s["id"],
                        s["parentId"],
                        s["timestamp"]
                    )
                })
                .collect();
            v.incomplete.push(described.join("\n"));
        }
    }
    v
}

fn wait_for_traces(collector: &Collector, spans: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = collector.wait_for_spans(spans, Duration::from_secs(5));
        if got.len() >= spans || Instant::now() > deadline {
            return got;
        }
    }
}

/// How the hops are linked.
#[derive(Clone, Copy, PartialEq)]
enum Linking {
    /// The kernel writes `traceparent` into each request.
    Injected,
    /// Nothing is written; `tracer collect` joins the hops by TCP sequence numbers.
    Passive,
}

fn scenario(linking: Linking) {
    require_root();
    let hosts = Hosts::new();
    let _app = start_app(&hosts);
    let collector = Collector::start();
    let relay_url;
    let (relay, zipkin) = match linking {
        Linking::Injected => (None, collector.url()),
        Linking::Passive => {
            let relay;
            (relay, relay_url) = common::start_relay(&collector.url());
            (Some(relay), relay_url.clone())
        }
    };
    let inject = if linking == Linking::Injected {
        "traceparent"
    } else {
        "off"
    };
    let mut tracers = start_tracers(&hosts, &zipkin, &["--inject", inject]);
    // Spans per request: four servers, three HTTP calls, the store's Redis call; and Redis's
    // own server span when its host is traced.
    let per_trace = if linking == Linking::Passive {
        let ns = hosts.ns("client");
        tracers.push(Tracer::start(&[
            "run",
            "--netns",
            &ns,
            "--comm",
            "redis-server",
            "--service-name",
            "cache",
            "--zipkin",
            &zipkin,
            "--flush-interval-ms",
            "200",
            "--inject",
            "off",
        ]));
        9
    } else {
        8
    };

    // One request: exactly one trace.
    let summary = run_load(&hosts, 1, 1, 1);
    assert_eq!(
        summary["ok"], 1,
        "the app answered wrongly under the tracer: {summary}"
    );
    let spans = wait_for_traces(&collector, per_trace);
    let verdict = judge(&spans, per_trace);
    let dump = || {
        spans
            .iter()
            .map(|s| {
                format!(
                    "{:?} trace={} id={} parent={}",
                    role_of(s),
                    s["traceId"],
                    s["id"],
                    s["parentId"]
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(spans.len(), per_trace, "spans of one request:\n{}", dump());
    assert_eq!(verdict.traces, 1, "one request, one trace:\n{}", dump());
    assert_eq!(
        verdict.correct,
        per_trace,
        "every span parented right:\n{}",
        dump()
    );
    if linking == Linking::Injected {
        assert!(
            spans.iter().all(|s| s["tags"].get("tracer.link").is_some()),
            "agents tag spans with link keys"
        );
    } else {
        assert!(
            spans.iter().all(|s| s["tags"].get("tracer.link").is_none()),
            "the relay strips link keys"
        );
    }
    collector.reset();

    // 1,000 requests from 8 concurrent keep-alive clients.
    let total = 1000;
    let summary = run_load(&hosts, total, 8, 1000);
    assert_eq!(
        summary["ok"], total,
        "every response byte for byte as without the tracer: {summary}"
    );
    let spans = wait_for_traces(&collector, per_trace * total);
    for tracer in tracers {
        let stopped = tracer.stop();
        println!("{}", stopped.stderr.lines().last().unwrap_or(""));
    }
    if let Some(relay) = relay {
        let stopped = relay.stop();
        println!("{}", stopped.stderr.lines().last().unwrap_or(""));
    }
    let verdict = judge(&spans, per_trace);
    let accuracy = verdict.correct as f64 / (per_trace * total) as f64;
    println!(
        "multi-host linking ({}): {} requests, {} spans, {} traces, {} complete, parent accuracy {:.4} ({} / {})",
        if linking == Linking::Injected {
            "traceparent injected in the kernel"
        } else {
            "passive, joined by tracer collect"
        },
        total,
        verdict.spans,
        verdict.traces,
        verdict.complete_traces,
        accuracy,
        verdict.correct,
        per_trace * total
    );
    assert!(
        accuracy >= 0.999,
        "parent accuracy {accuracy:.4} is below 99.9%"
    );
    assert_eq!(
        verdict.complete_traces,
        total,
        "every request one complete trace; some that are not:\n{}",
        verdict.incomplete.join("\n--\n")
    );
}

#[test]
fn one_trace_per_request_across_four_hosts() {
    scenario(Linking::Injected);
}

/// With injection off the hops are still linked: the agents tag both halves of each hop with
/// the same key (addresses and TCP sequence number) and `tracer collect` joins them.
#[test]
fn hops_link_without_injection_through_the_relay() {
    scenario(Linking::Passive);
}
