//! Golden-fixture support shared by the database protocol tests (test builds only).
//!
//! A fixture `tests/fixtures/PROTO/NAME.seg` is fed to a fresh matcher and the rendered output
//! compared with `NAME.expected`. On a mismatch (or a missing `.expected`) the output is written
//! to `NAME.actual` and the test fails; review it and rename it to accept it.
//!
//! `.seg` format (the one `http1`'s tests use), one item per line; `#` starts a comment line
//! and blank lines are ignored:
//!
//! ```text
//!   < TS [cap=N] PAYLOAD   a syscall in which the process read PAYLOAD (Ingress) at TS ns
//!   > TS [cap=N] PAYLOAD   a syscall in which the process wrote PAYLOAD (Egress)
//!   | PAYLOAD              more bytes of the segment on the line above
//!   close TS               the connection closed;  reset TS: closed by a reset
//! ```
//!
//! PAYLOAD is taken literally except for the escapes \r \n \t \\ \xHH, and \{N} for N filler
//! bytes ('.'). cap=N: only the first N bytes were captured in `head`; `len` is the whole
//! payload and `tail` its last 16 bytes.

use std::{fmt::Write, path::PathBuf};

use super::{DbExchange, Direction, Segment};

pub struct FixtureSegment {
    pub dir: Direction,
    pub ts: u64,
    pub cap: Option<usize>,
    pub bytes: Vec<u8>,
}

impl FixtureSegment {
    /// The segment as the kernel side would report it, with the capture further limited to
    /// `max_cap` bytes when given.
    pub fn segment(&self, max_cap: Option<usize>) -> Segment<'_> {
        let cap = self
            .cap
            .unwrap_or(usize::MAX)
            .min(max_cap.unwrap_or(usize::MAX))
            .min(self.bytes.len());
        Segment {
            dir: self.dir,
            ts_ns: self.ts,
            start_ns: self.ts,
            len: self.bytes.len() as u64,
            head: &self.bytes[..cap],
            tail: tail_of(&self.bytes),
        }
    }
}

pub enum Item {
    Segment(FixtureSegment),
    Close { ts: u64, reset: bool },
}

pub fn tail_of(bytes: &[u8]) -> &[u8] {
    Segment::whole(Direction::Ingress, 0, 0, bytes).tail
}

/// A fully captured segment.
pub fn seg(dir: Direction, ts_ns: u64, bytes: &[u8]) -> Segment<'_> {
    Segment::whole(dir, ts_ns, ts_ns, bytes)
}

/// A segment of which only the first `cap` bytes were captured.
pub fn cut(dir: Direction, ts_ns: u64, bytes: &[u8], cap: usize) -> Segment<'_> {
    Segment {
        dir,
        ts_ns,
        start_ns: ts_ns,
        len: bytes.len() as u64,
        head: &bytes[..cap.min(bytes.len())],
        tail: tail_of(bytes),
    }
}

fn unescape(text: &str, line: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = text.bytes();
    while let Some(c) = chars.next() {
        if c != b'\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = chars.by_ref().take(2).collect();
                let hex = std::str::from_utf8(&hex).expect("hex escape");
                out.push(
                    u8::from_str_radix(hex, 16)
                        .unwrap_or_else(|_| panic!("line {line}: bad \\x{hex}")),
                );
            }
            Some(b'{') => {
                let digits: Vec<u8> = chars.by_ref().take_while(|&c| c != b'}').collect();
                let n: usize = std::str::from_utf8(&digits)
                    .ok()
                    .and_then(|d| d.parse().ok())
                    .unwrap_or_else(|| panic!("line {line}: bad \\{{N}}"));
                out.resize(out.len() + n, b'.');
            }
            other => panic!("line {line}: unknown escape {other:?}"),
        }
    }
    out
}

pub fn parse_fixture(text: &str) -> Vec<Item> {
    let mut items = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() || raw.starts_with('#') {
            continue;
        }
        if let Some(more) = raw.strip_prefix("| ").or(raw.strip_prefix('|')) {
            match items.last_mut() {
                Some(Item::Segment(s)) => s.bytes.extend(unescape(more, line)),
                _ => panic!("line {line}: continuation without a segment"),
            }
            continue;
        }
        let (word, rest) = raw
            .split_once(' ')
            .unwrap_or_else(|| panic!("line {line}: no timestamp"));
        let (ts, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let ts: u64 = ts
            .parse()
            .unwrap_or_else(|_| panic!("line {line}: bad timestamp {ts}"));
        let dir = match word {
            "<" => Direction::Ingress,
            ">" => Direction::Egress,
            "close" | "reset" => {
                items.push(Item::Close {
                    ts,
                    reset: word == "reset",
                });
                continue;
            }
            other => panic!("line {line}: unknown item {other}"),
        };
        let (cap, payload) = match rest.strip_prefix("cap=") {
            Some(opt) => {
                let (n, payload) = opt.split_once(' ').unwrap_or((opt, ""));
                (
                    Some(n.parse().unwrap_or_else(|_| panic!("line {line}: bad cap"))),
                    payload,
                )
            }
            None => (None, rest),
        };
        items.push(Item::Segment(FixtureSegment {
            dir,
            ts,
            cap,
            bytes: unescape(payload, line),
        }));
    }
    items
}

/// The common text form of database exchanges for `.expected` files.
pub fn render_db(exchanges: &[DbExchange], gave_up: bool) -> String {
    let mut s = String::new();
    for (i, e) in exchanges.iter().enumerate() {
        let _ = writeln!(
            s,
            "#{} {:?} {:?} {} {:?}",
            i + 1,
            e.side,
            e.system,
            e.operation,
            e.outcome
        );
        let _ = writeln!(s, "   statement {}", e.statement);
        if let Some(t) = &e.target {
            let _ = writeln!(s, "   target {t}");
        }
        if let Some(err) = &e.error {
            let _ = writeln!(s, "   error {err}");
        }
        let _ = writeln!(
            s,
            "   request  start={} end={} bytes={}",
            e.req_start_ns, e.req_end_ns, e.req_bytes
        );
        let resp_start = e.resp_start_ns.map_or("-".to_string(), |t| t.to_string());
        let _ = writeln!(
            s,
            "   response start={resp_start} end={} bytes={}",
            e.end_ns, e.resp_bytes
        );
    }
    let _ = writeln!(s, "gave_up: {gave_up}");
    s
}

/// Runs every `tests/fixtures/{proto}/*.seg` through `run` (fixture text in, rendered text
/// out) and compares with the `.expected` files; at least `min` fixtures must exist.
pub fn check_golden(proto: &str, min: usize, run: impl Fn(&str) -> String) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(proto);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    names.sort();
    assert!(names.len() >= min, "fixtures missing in {}", dir.display());
    let mut failed = Vec::new();
    for seg_path in &names {
        let text = std::fs::read_to_string(seg_path).expect("fixture readable");
        let actual = run(&text);
        let expected_path = seg_path.with_extension("expected");
        let actual_path = seg_path.with_extension("actual");
        if std::fs::read_to_string(&expected_path).ok().as_deref() == Some(actual.as_str()) {
            let _ = std::fs::remove_file(&actual_path);
        } else {
            std::fs::write(&actual_path, &actual).expect("write .actual");
            failed.push(actual_path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "output differs from .expected; see {failed:?}"
    );
}

/// xorshift64*: deterministic randomness for the adversarial tests, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Random gaps for the parsers' gap tests: before each syscall a gap begins now and then
/// (one in 12); while one is open, each syscall is hidden by it or, half the time, the gap
/// ends just before it.
#[derive(Default)]
pub struct Gaps {
    open: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum GapStep {
    /// No gap: feed the syscall.
    Feed,
    /// The syscall went unseen.
    Hidden,
    /// The gap ends here: tell the parser (`gap()`), then feed the syscall.
    GapEnds,
}

impl Gaps {
    pub fn step(&mut self, rng: &mut Rng) -> GapStep {
        if !self.open && rng.below(12) == 0 {
            self.open = true;
        }
        if !self.open {
            GapStep::Feed
        } else if rng.below(2) == 0 {
            GapStep::Hidden
        } else {
            self.open = false;
            GapStep::GapEnds
        }
    }
}
