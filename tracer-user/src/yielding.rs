//! `--capture-priority idle` (the default): the capture thread yields the CPU to the programs
//! it watches.
//!
//! As a normal thread, the agent's drains can preempt the traced server or its clients: every
//! 10 ms a millisecond of parsing lands on a CPU a server thread wanted, its peers wait on it,
//! and on a virtual machine the CPUs halt meanwhile and pay to wake up. Under `SCHED_IDLE` the
//! drains run only on time nobody else wants. On the 2-vCPU benchmark machine, per-CPU nginx
//! at a paced 20k requests/s (every request a span) had a traced p99 lower with it in 11 of 13
//! rounds over three benchmark runs (medians 1.70 ms against 6.50 in one, untraced 1.67), and
//! at saturation traced/untraced throughput was higher (nginx median 1.03 against 0.92, Python
//! 1.03 against 0.97). The price: the drains come in larger batches, and the agent's peak RSS
//! at saturation was 47 MiB against 44 (spans are handed to the exporter every `DRAIN_CHUNK`
//! records of a drain, so that a drain of a full ring does not hold all of its spans at once).
//!
//! `SCHED_IDLE` alone would let a host whose CPUs are all busy starve the agent until the ring
//! buffer overflows. A watchdog thread (a normal one, asleep almost always) looks at the ring's
//! positions: when unread data piles up or stops moving, the capture thread competes normally
//! until it has caught up. The capture thread starts competing normally, and yields once its
//! event loop runs and has caught up.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use log::{debug, info, warn};

/// Unread bytes past which the capture thread competes normally: an eighth of the default
/// 16 MiB ring, which fills at tens of MiB/s under the heaviest load measured.
const BACKLOG_BYTES: u64 = 2 * 1024 * 1024;
/// Unread data this long not consumed at all: the capture thread is being starved. Longer
/// than the agent's own longest pause between drains when events are rare (320 ms), which
/// leaves a trickle unread that long without anything being wrong.
const STALL: Duration = Duration::from_secs(1);
/// How often the watchdog looks while there is unread data, and while there is none.
const LOOK_BUSY: Duration = Duration::from_millis(20);
const LOOK_IDLE: Duration = Duration::from_millis(200);

/// The ring buffer's consumer and producer positions, mapped read-only.
struct RingPositions {
    consumer: *const AtomicU64,
    producer: *const AtomicU64,
    page: usize,
}

// SAFETY: the pages are the kernel's, shared and only read here (through atomics).
unsafe impl Send for RingPositions {}

impl RingPositions {
    /// Maps the position pages of the ring buffer map `fd`: the consumer's is the first page,
    /// the producer's the second.
    fn map(fd: RawFd) -> std::io::Result<RingPositions> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let map_page = |offset: usize| {
            // SAFETY: a new shared read-only mapping of one page of the map; checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    offset as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(p as *const AtomicU64)
            }
        };
        let consumer = map_page(0)?;
        let producer = match map_page(page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: the page mapped just above.
                unsafe { libc::munmap(consumer as *mut libc::c_void, page) };
                return Err(e);
            }
        };
        Ok(RingPositions {
            consumer,
            producer,
            page,
        })
    }

    /// (consumer position, unread bytes).
    fn read(&self) -> (u64, u64) {
        // SAFETY: both pages stay mapped for `self`'s life; the kernel and the agent write
        // the positions as aligned u64s.
        let consumer = unsafe { (*self.consumer).load(Ordering::Acquire) };
        // SAFETY: as above.
        let producer = unsafe { (*self.producer).load(Ordering::Acquire) };
        (consumer, producer.saturating_sub(consumer))
    }
}

impl Drop for RingPositions {
    fn drop(&mut self) {
        // SAFETY: the two pages `map` made.
        unsafe {
            libc::munmap(self.consumer as *mut libc::c_void, self.page);
            libc::munmap(self.producer as *mut libc::c_void, self.page);
        }
    }
}

/// Sets thread `tid`'s policy to `SCHED_IDLE` (`idle`) or `SCHED_OTHER`.
fn set_policy(tid: libc::pid_t, idle: bool) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: a valid sched_param for either policy.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process may move a thread back from `SCHED_IDLE` to a normal policy: root, or
/// CAP_SYS_NICE. Without it a starved capture thread could not be rescued, so it never yields.
fn may_raise_priority() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    const CAP_SYS_NICE: u32 = 23;
    crate::probes::effective_capabilities() & (1 << CAP_SYS_NICE) != 0
}

/// The watchdog of a yielding capture thread; stops when dropped.
pub struct Yielding {
    stop: Arc<AtomicBool>,
    /// The capture thread's event loop runs.
    draining: Arc<AtomicBool>,
    /// Times the capture thread had to compete normally to catch up.
    pub raises: Arc<AtomicU64>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl Yielding {
    /// Starts the watchdog of the calling thread (the capture thread, which drains `ring`): it
    /// lets the thread yield to every other thread once its event loop runs (see
    /// [`draining`](Self::draining)) and the ring has been caught up with, and raises it again
    /// while the ring backs up. None, with the thread left as it was, when that cannot be done
    /// safely.
    pub fn start(ring: &impl AsRawFd) -> Option<Yielding> {
        if !may_raise_priority() {
            // Not a fault: the thread runs as every thread does, as with `normal`.
            info!(
                "the capture thread competes for CPU normally: no CAP_SYS_NICE to raise it when it falls behind"
            );
            return None;
        }
        let positions = match RingPositions::map(ring.as_raw_fd()) {
            Ok(p) => p,
            Err(e) => {
                warn!(
                    "the capture thread competes for CPU normally: cannot map the ring's positions ({e})"
                );
                return None;
            }
        };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let stop = Arc::new(AtomicBool::new(false));
        let draining = Arc::new(AtomicBool::new(false));
        let raises = Arc::new(AtomicU64::new(0));
        // The watchdog, a normal thread (spawned from this one while it is still normal, it
        // does not inherit SCHED_IDLE), makes every change of the capture thread's policy, the
        // first lowering too: a thread that lowers itself can lose the CPU before its next
        // instruction, the one that would set a watchdog watching. With busy CPUs that
        // happened at a start under load in one CI run (36,000 events lost) and in two of
        // thirteen runs here (the watchdog's first look 1.4 s after the start, the 16 MiB ring
        // full). And it lowers the thread only once its event loop runs and has caught up, so
        // that such a start (a ring filling at 20 MiB/s while the agent sets up) never
        // depends on a rescue.
        let watchdog = {
            let (stop, draining, raises) = (stop.clone(), draining.clone(), raises.clone());
            std::thread::Builder::new()
                .name("tracer-watchdog".into())
                .spawn(move || watch(tid, &positions, &stop, &draining, &raises))
        };
        match watchdog {
            Ok(handle) => Some(Yielding {
                stop,
                draining,
                raises,
                watchdog: Some(handle),
            }),
            Err(e) => {
                warn!("the capture thread competes for CPU normally: no watchdog thread ({e})");
                None
            }
        }
    }

    /// Tells the watchdog that the capture thread's event loop runs: the thread may yield once
    /// it has caught up.
    pub fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

impl Drop for Yielding {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.watchdog.take() {
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

/// What the watchdog decides from one look at the ring.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Raise,
    Lower,
    Keep,
}

/// The watchdog's memory between looks.
struct Watch {
    /// The capture thread competes normally (as it starts).
    raised: bool,
    /// The capture thread's event loop runs.
    draining: bool,
    last_consumer: u64,
    /// Since when unread data has been waiting with the consumer not moving.
    stalled_since: Option<Instant>,
}

impl Watch {
    /// As the capture thread starts: competing normally, its event loop not yet running.
    fn new(consumer: u64) -> Watch {
        Watch {
            raised: true,
            draining: false,
            last_consumer: consumer,
            stalled_since: None,
        }
    }

    fn look(&mut self, consumer: u64, unread: u64, now: Instant) -> Verdict {
        if unread == 0 || consumer != self.last_consumer {
            self.stalled_since = None;
        } else if self.stalled_since.is_none() {
            self.stalled_since = Some(now);
        }
        self.last_consumer = consumer;
        let stalled = self
            .stalled_since
            .is_some_and(|since| now.duration_since(since) >= STALL);
        match (self.raised, unread >= BACKLOG_BYTES || stalled) {
            (false, true) => {
                self.raised = true;
                Verdict::Raise
            }
            // Caught up: what is left is less than one look's worth at a busy rate.
            (true, false) if self.draining && unread < BACKLOG_BYTES / 8 => {
                self.raised = false;
                Verdict::Lower
            }
            _ => Verdict::Keep,
        }
    }
}

fn watch(
    tid: libc::pid_t,
    ring: &RingPositions,
    stop: &AtomicBool,
    draining: &AtomicBool,
    raises: &AtomicU64,
) {
    let mut state = Watch::new(ring.read().0);
    let mut yielded_before = false;
    while !stop.load(Ordering::Relaxed) {
        state.draining = draining.load(Ordering::Relaxed);
        let (consumer, unread) = ring.read();
        match state.look(consumer, unread, Instant::now()) {
            Verdict::Raise => {
                raises.fetch_add(1, Ordering::Relaxed);
                debug!("capture thread behind ({unread} bytes unread): competing normally");
                if let Err(e) = set_policy(tid, false) {
                    warn!("cannot raise the capture thread's priority: {e}");
                }
            }
            Verdict::Lower if !yielded_before => {
                if let Err(e) = set_policy(tid, true) {
                    warn!(
                        "the capture thread competes for CPU normally: cannot set SCHED_IDLE ({e})"
                    );
                    return;
                }
                yielded_before = true;
                info!("the capture thread yields the CPU to other programs (SCHED_IDLE)");
            }
            Verdict::Lower => {
                debug!("capture thread caught up: yielding again");
                let _ = set_policy(tid, true);
            }
            Verdict::Keep => {}
        }
        std::thread::park_timeout(if unread > 0 { LOOK_BUSY } else { LOOK_IDLE });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watchdog past the start: the capture thread's loop runs, and it yields.
    fn watch() -> Watch {
        Watch {
            raised: false,
            draining: true,
            last_consumer: 0,
            stalled_since: None,
        }
    }

    #[test]
    fn the_capture_thread_yields_only_once_its_loop_runs_and_has_caught_up() {
        let t = Instant::now();
        let mut w = Watch::new(0);
        // Setting up, however much or little is waiting.
        assert_eq!(w.look(0, 0, t), Verdict::Keep);
        assert_eq!(w.look(0, BACKLOG_BYTES * 4, t + STALL * 2), Verdict::Keep);
        // Draining a backlog: still behind.
        w.draining = true;
        assert_eq!(w.look(100, BACKLOG_BYTES, t), Verdict::Keep);
        assert_eq!(w.look(200, BACKLOG_BYTES / 16, t), Verdict::Lower);
        assert_eq!(w.look(300, BACKLOG_BYTES, t), Verdict::Raise);
    }

    #[test]
    fn a_backlog_raises_the_capture_thread_until_it_has_caught_up() {
        let mut w = watch();
        let t = Instant::now();
        assert_eq!(w.look(0, 4096, t), Verdict::Keep);
        assert_eq!(w.look(100, BACKLOG_BYTES, t), Verdict::Raise);
        assert_eq!(w.look(200, BACKLOG_BYTES / 2, t), Verdict::Keep);
        assert_eq!(w.look(300, BACKLOG_BYTES / 16, t), Verdict::Lower);
        assert_eq!(w.look(400, 0, t), Verdict::Keep);
    }

    #[test]
    fn unread_data_that_does_not_move_raises_it_however_little() {
        let mut w = watch();
        let t = Instant::now();
        assert_eq!(w.look(0, 100, t), Verdict::Keep);
        assert_eq!(w.look(0, 100, t + STALL / 2), Verdict::Keep);
        assert_eq!(w.look(0, 100, t + STALL), Verdict::Raise);
        // Consumed meanwhile: caught up.
        assert_eq!(w.look(100, 0, t + STALL * 2), Verdict::Lower);
    }

    #[test]
    fn a_consumer_that_keeps_moving_is_not_stalled() {
        let mut w = watch();
        let t = Instant::now();
        for i in 0..10u64 {
            assert_eq!(w.look(i * 10, 100, t + STALL * i as u32), Verdict::Keep);
        }
    }
}
