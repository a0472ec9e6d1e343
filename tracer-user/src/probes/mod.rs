//! Loading and attaching the eBPF programs: privilege and kernel checks, the kernel struct
//! offsets the probes need (read from BTF), tracefs, and per-program attach with a clear report
//! of what is attached. `openssl` finds OpenSSL in processes for the TLS uprobes.

pub mod openssl;

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use btf_rs::{Btf, Type};
use log::{debug, info, warn};
use tracer_common::{
    Config, DIR_INGRESS, INJECT_OFF, KernelOffsets, MAX_CAPTURE, SavedArgs, SockKey, stat,
};

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("tracer needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE): run it with sudo")]
    NotPrivileged,
    #[error(
        "kernel BTF is missing ({BTF_PATH}): tracer needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    MissingBtf,
    #[error("cannot read kernel BTF: {0}")]
    Btf(String),
    #[error("kernel BTF has no {0}: this kernel is not supported")]
    MissingField(String),
    #[error("cannot mount tracefs at {TRACEFS}: {0}")]
    Tracefs(std::io::Error),
    #[error(
        "this tracer was built without its eBPF programs (AYA_BUILD_SKIP); rebuild it with `cargo xtask build`"
    )]
    NoObject,
    #[error("cannot load the eBPF programs: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("cannot load eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach {name} to syscalls:{tracepoint}: {source}")]
    Attach {
        name: &'static str,
        tracepoint: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {0} is missing or of the wrong type")]
    Map(&'static str),
    #[error("eBPF map update failed: {0}")]
    MapUpdate(#[source] aya::maps::MapError),
}

/// What the agent asks of the probes.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Trace only these processes (and, with `follow_forks`, their children). Empty: all.
    pub pids: Vec<u32>,
    /// Trace only threads with these command names (15 bytes at most), besides `pids`.
    pub comms: Vec<String>,
    /// When true, only the pids in `pids` and the commands in `comms` are traced; when false
    /// every process is.
    pub filter_pids: bool,
    pub follow_forks: bool,
    pub capture_bytes: u32,
    /// Ring buffer size in bytes (rounded up to a power of two by the caller).
    pub ring_bytes: u32,
    pub inject: InjectOptions,
    /// Trace only tasks in the network namespace with this inode number; 0: any.
    pub netns_inum: u32,
    /// Attach the OpenSSL uprobes (TLS plaintext).
    pub tls: bool,
}

/// Trace context injection into outgoing HTTP/1.x requests (sock_ops + sk_msg).
#[derive(Clone, Debug, Default)]
pub struct InjectOptions {
    /// `tracer_common::INJECT_*`.
    pub mode: u32,
    /// Only these destination ports get headers; empty: any.
    pub ports: Vec<u16>,
    /// Only these destination networks get headers; empty: any.
    pub nets: Vec<(IpAddr, u8)>,
}

/// One program and the tracepoints it serves. A required program that loads or attaches nowhere
/// makes start fail; other misses are reported and skipped (a kernel without that syscall).
struct Attachment {
    program: &'static str,
    category: &'static str,
    tracepoints: &'static [&'static str],
    required: bool,
}

const ATTACHMENTS: &[Attachment] = &[
    Attachment {
        program: "tracer_enter_read",
        category: "syscalls",
        tracepoints: &["sys_enter_read", "sys_enter_recvfrom"],
        required: true,
    },
    Attachment {
        program: "tracer_enter_write",
        category: "syscalls",
        tracepoints: &["sys_enter_write", "sys_enter_sendto"],
        required: true,
    },
    Attachment {
        program: "tracer_enter_readv",
        category: "syscalls",
        tracepoints: &["sys_enter_readv"],
        required: false,
    },
    Attachment {
        program: "tracer_enter_writev",
        category: "syscalls",
        tracepoints: &["sys_enter_writev"],
        required: false,
    },
    Attachment {
        program: "tracer_enter_recvmsg",
        category: "syscalls",
        tracepoints: &["sys_enter_recvmsg"],
        required: false,
    },
    Attachment {
        program: "tracer_enter_sendmsg",
        category: "syscalls",
        tracepoints: &["sys_enter_sendmsg"],
        required: false,
    },
    Attachment {
        program: "tracer_enter_sendfile",
        category: "syscalls",
        tracepoints: &["sys_enter_sendfile64"],
        required: false,
    },
    Attachment {
        program: "tracer_exit_data",
        category: "syscalls",
        tracepoints: &[
            "sys_exit_read",
            "sys_exit_recvfrom",
            "sys_exit_write",
            "sys_exit_sendto",
            "sys_exit_readv",
            "sys_exit_writev",
            "sys_exit_recvmsg",
            "sys_exit_sendmsg",
            "sys_exit_sendfile64",
        ],
        required: true,
    },
    Attachment {
        program: "tracer_enter_accept",
        category: "syscalls",
        tracepoints: &["sys_enter_accept", "sys_enter_accept4"],
        required: true,
    },
    Attachment {
        program: "tracer_exit_accept",
        category: "syscalls",
        tracepoints: &["sys_exit_accept", "sys_exit_accept4"],
        required: true,
    },
    Attachment {
        program: "tracer_enter_connect",
        category: "syscalls",
        tracepoints: &["sys_enter_connect"],
        required: true,
    },
    Attachment {
        program: "tracer_exit_connect",
        category: "syscalls",
        tracepoints: &["sys_exit_connect"],
        required: true,
    },
    Attachment {
        program: "tracer_enter_close",
        category: "syscalls",
        tracepoints: &["sys_enter_close"],
        required: true,
    },
    Attachment {
        program: "tracer_sched_fork",
        category: "sched",
        tracepoints: &["sched_process_fork"],
        required: false,
    },
    Attachment {
        program: "tracer_sched_exit",
        category: "sched",
        tracepoints: &["sched_process_exit"],
        required: false,
    },
    Attachment {
        program: "tracer_sched_exec",
        category: "sched",
        tracepoints: &["sched_process_exec"],
        required: false,
    },
];

/// The loaded and attached programs. Dropping it detaches everything (the links are owned by
/// `ebpf`); a SIGKILLed agent leaves nothing behind either, as the links die with its fds.
pub struct Probes {
    ebpf: Ebpf,
    /// Socket I/O is watched at the socket layer, not at syscall entry and exit.
    socket_layer: bool,
    traced_pids: HashMap<MapData, u32, u32>,
    /// The agent's half of the traced set's generation (see GENERATION in tracer-ebpf).
    generation: aya::maps::Array<MapData, u64>,
    /// Processes whose capture is shed (see `crate::governor`), and their count for the
    /// programs' fast path.
    shed_pids: HashMap<MapData, u32, u32>,
    shed_state: aya::maps::Array<MapData, u64>,
    shed: std::collections::HashSet<u32>,
    stats: PerCpuArray<MapData, u64>,
    /// Tracepoints attached, as `category:name`.
    pub attached: Vec<String>,
    /// Tracepoints that could not be attached and were skipped, with the reason.
    pub skipped: Vec<String>,
    /// The socket map the sk_msg program is attached to, held for the program's lifetime.
    inject_sockets: Option<aya::maps::SockHash<MapData, SockKey>>,
    /// Sockets in `inject_sockets` the sk_msg program found in blocking mode, to take out.
    inject_blocking: Option<aya::maps::HashMap<MapData, SockKey, u8>>,
    /// Sockets taken out of `inject_sockets` because they need no injection.
    inject_released: u64,
    /// The TLS probes, when loaded.
    openssl: Option<openssl::OpenSsl>,
}

impl Probes {
    pub fn load(opts: &ProbeOptions) -> Result<Self, ProbeError> {
        check_privileges()?;
        if EBPF_OBJECT.is_empty() {
            return Err(ProbeError::NoObject);
        }
        // The parsed BTF is large: dropped here, before the programs load, it does not add to
        // the agent's peak memory.
        let (offsets, socket_layer_ok) = {
            let btf = read_btf(Path::new(BTF_PATH))?;
            (offsets_of(&btf)?, socket_layer_wanted(&btf))
        };
        ensure_tracefs()?;
        let fork_offset = fork_child_pid_offset().unwrap_or_else(|| {
            warn!("cannot read sched_process_fork's format; children of traced processes will not be followed");
            0
        });
        let config = Config {
            self_tgid: std::process::id(),
            filter_pids: u32::from(opts.filter_pids),
            capture_bytes: opts.capture_bytes.min(MAX_CAPTURE as u32),
            follow_forks: u32::from(opts.follow_forks && fork_offset != 0),
            filter_comms: u32::from(!opts.comms.is_empty()),
            fork_child_pid_offset: fork_offset,
            inject: opts.inject.mode,
            inject_filter_ports: u32::from(!opts.inject.ports.is_empty()),
            inject_filter_nets: u32::from(!opts.inject.nets.is_empty()),
            kernel_ctx: u32::from(opts.inject.mode != INJECT_OFF),
            netns_inum: opts.netns_inum,
            exit_group_dead_offset: sched_format_offset("sched_process_exit", "group_dead")
                .unwrap_or(0),
            sock_hooks: u32::from(socket_layer_ok),
        };
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .override_global("OFFSETS", &offsets, true)
            .map_max_entries("EVENTS", opts.ring_bytes)
            .load(EBPF_OBJECT)
            .map_err(ProbeError::Load)?;

        let mut traced_pids: HashMap<MapData, u32, u32> = HashMap::try_from(
            ebpf.take_map("TRACED_PIDS")
                .ok_or(ProbeError::Map("TRACED_PIDS"))?,
        )
        .map_err(|_| ProbeError::Map("TRACED_PIDS"))?;
        // Fill the traced set before any program runs, so the first request is not missed.
        for pid in &opts.pids {
            traced_pids
                .insert(pid, 1, 0)
                .map_err(ProbeError::MapUpdate)?;
        }
        let mut traced_comms: HashMap<&mut MapData, [u8; 16], u32> = HashMap::try_from(
            ebpf.map_mut("TRACED_COMMS")
                .ok_or(ProbeError::Map("TRACED_COMMS"))?,
        )
        .map_err(|_| ProbeError::Map("TRACED_COMMS"))?;
        for comm in &opts.comms {
            let mut key = [0u8; 16];
            let n = comm.len().min(15);
            key[..n].copy_from_slice(&comm.as_bytes()[..n]);
            traced_comms
                .insert(key, 1, 0)
                .map_err(ProbeError::MapUpdate)?;
        }
        let stats = PerCpuArray::try_from(ebpf.take_map("STATS").ok_or(ProbeError::Map("STATS"))?)
            .map_err(|_| ProbeError::Map("STATS"))?;
        let generation = aya::maps::Array::try_from(
            ebpf.take_map("GENERATION")
                .ok_or(ProbeError::Map("GENERATION"))?,
        )
        .map_err(|_| ProbeError::Map("GENERATION"))?;
        let shed_pids = HashMap::try_from(
            ebpf.take_map("SHED_PIDS")
                .ok_or(ProbeError::Map("SHED_PIDS"))?,
        )
        .map_err(|_| ProbeError::Map("SHED_PIDS"))?;
        let shed_state = aya::maps::Array::try_from(
            ebpf.take_map("SHED_STATE")
                .ok_or(ProbeError::Map("SHED_STATE"))?,
        )
        .map_err(|_| ProbeError::Map("SHED_STATE"))?;

        // Everything is loaded first (the verifier takes about a second over the programs
        // here, and took three) and attached after, the programs that report socket calls
        // first: what they capture waits in the ring buffer until the agent reads it, which
        // begins once this is over. Attached before the other programs were loaded, they
        // filled the 16 MiB ring of a saturated server with nobody reading it, and lost events.
        let injector =
            (opts.inject.mode != INJECT_OFF).then(|| load_injector(&mut ebpf, &opts.inject));
        let openssl = opts.tls.then(|| openssl::OpenSsl::load(&mut ebpf));
        let mut attached = Vec::new();
        let mut skipped = Vec::new();
        let socket_layer = config.sock_hooks != 0
            && match attach_socket_layer(&mut ebpf) {
                Ok(()) => {
                    attached.extend(
                        SOCKET_LAYER
                            .iter()
                            .map(|(_, category, name)| format!("{category}:{name} (tp_btf)")),
                    );
                    true
                }
                Err(e) => {
                    warn!("socket-layer tracepoints unavailable ({e}); using syscall tracepoints");
                    false
                }
            };
        let raw_attempt = if socket_layer {
            Ok(None)
        } else {
            attach_raw_syscalls(&mut ebpf)
        };
        let raw_kind = match raw_attempt {
            Ok(Some(kind)) => {
                attached.push(format!("raw_syscalls:sys_enter ({kind})"));
                attached.push(format!("raw_syscalls:sys_exit ({kind})"));
                Some(kind)
            }
            Ok(None) => None,
            Err(e) => {
                warn!("raw syscall tracepoints unavailable ({e}); using per-syscall tracepoints");
                None
            }
        };
        let raw = raw_kind.is_some();
        fn tracepoint<'a>(
            ebpf: &'a mut Ebpf,
            a: &Attachment,
        ) -> Result<&'a mut TracePoint, ProbeError> {
            ebpf.program_mut(a.program)
                .ok_or(ProbeError::Map(a.program))?
                .try_into()
                .map_err(|source| ProbeError::Program {
                    name: a.program,
                    source,
                })
        }
        // All loaded before any is attached, as above.
        let mut loaded = Vec::new();
        for a in ATTACHMENTS {
            if (raw || socket_layer) && a.category == "syscalls" {
                continue;
            }
            match tracepoint(&mut ebpf, a)?.load() {
                Ok(()) => loaded.push(a),
                Err(source) if a.required => {
                    return Err(ProbeError::Program {
                        name: a.program,
                        source,
                    });
                }
                Err(source) => skipped.push(format!("{} ({source})", a.program)),
            }
        }
        for a in loaded {
            let program = tracepoint(&mut ebpf, a)?;
            let mut attached_here = 0;
            let mut last_error = None;
            for tp in a.tracepoints {
                match program.attach(a.category, tp) {
                    Ok(_) => {
                        attached_here += 1;
                        attached.push(format!("{}:{tp}", a.category));
                    }
                    Err(source) => {
                        debug!("skipping {}:{tp}: {source}", a.category);
                        skipped.push(format!("{}:{tp} ({source})", a.category));
                        last_error = Some((tp, source));
                    }
                }
            }
            if a.required
                && attached_here == 0
                && let Some((tp, source)) = last_error
            {
                return Err(ProbeError::Attach {
                    name: a.program,
                    tracepoint: (*tp).to_string(),
                    source,
                });
            }
        }
        let how = match raw_kind {
            _ if socket_layer => " (socket I/O at the socket layer, no syscall tracepoints)".into(),
            Some(k) => format!(" (sys_enter/sys_exit as {k})"),
            None => String::new(),
        };
        info!("attached {} tracepoints{how}", attached.len());
        if !skipped.is_empty() {
            warn!(
                "not attached (this kernel lacks them): {}",
                skipped.join(", ")
            );
        }
        // The injector after the tracepoints: a send it noted before they were attached would
        // leave its note to the socket's next send.
        let (inject_sockets, inject_blocking) = match injector {
            Some(Ok(())) => match attach_injector(&mut ebpf) {
                Ok((map, blocking)) => {
                    info!("trace context injection on (sock_ops + sk_msg)");
                    (Some(map), Some(blocking))
                }
                Err(e) => {
                    warn!("trace context injection is off: {e}");
                    (None, None)
                }
            },
            // Capture and linking inside the host work without it: a kernel or cgroup setup
            // that refuses it costs cross-host links only.
            Some(Err(e)) => {
                warn!("trace context injection is off: {e}");
                (None, None)
            }
            None => (None, None),
        };
        let openssl = match openssl {
            Some(Ok(mut o)) => {
                let mut n = o.attach_system(&mut ebpf);
                for pid in &opts.pids {
                    n += o.attach_process(&mut ebpf, *pid);
                }
                if n == 0 {
                    info!(
                        "TLS: no OpenSSL library found yet; processes are checked as they appear"
                    );
                }
                Some(o)
            }
            // Plaintext capture goes on without it.
            Some(Err(e)) => {
                warn!("TLS probes unavailable ({e}); TLS traffic will not be parsed");
                None
            }
            None => None,
        };
        Ok(Self {
            ebpf,
            socket_layer,
            traced_pids,
            generation,
            shed_pids,
            shed_state,
            shed: Default::default(),
            stats,
            attached,
            skipped,
            inject_sockets,
            inject_blocking,
            inject_released: 0,
            openssl,
        })
    }

    /// Looks for OpenSSL in a process the agent just saw, and attaches the TLS probes to any
    /// copy not covered yet.
    pub fn tls_scan(&mut self, pid: u32) {
        if let Some(o) = &mut self.openssl {
            o.attach_process(&mut self.ebpf, pid);
        }
    }

    /// Files the TLS probes are attached to.
    pub fn tls_files(&self) -> usize {
        self.openssl.as_ref().map_or(0, |o| o.attached.len())
    }

    /// Whether trace context injection is attached and running.
    pub fn injecting(&self) -> bool {
        self.inject_sockets.is_some()
    }

    /// Puts the client connections `pid` already has into the socket map, so that requests on
    /// kept-alive connections opened before the tracer get a trace context header too. The
    /// sock_ops program only sees connections being established. Each socket is borrowed with
    /// pidfd_getfd just long enough to insert it: the map holds the socket, not our fd, and
    /// drops it when the process closes it. Returns how many were added.
    pub fn inject_existing(&mut self, pid: u32, opts: &InjectOptions) -> usize {
        let Some(map) = self.inject_sockets.as_mut() else {
            return 0;
        };
        let conns = match existing_client_connections(pid) {
            Ok(conns) => conns,
            Err(e) => {
                debug!("cannot list the connections of pid {pid}: {e}");
                return 0;
            }
        };
        // SAFETY: pidfd_open takes a pid and flags; the result is checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as i32;
        if pidfd < 0 {
            debug!("pidfd_open({pid}): {}", std::io::Error::last_os_error());
            return 0;
        }
        // SAFETY: a fresh fd we own.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd) };
        let mut added = 0;
        for (fd, key) in conns {
            if !destination_wanted(opts, &key) {
                continue;
            }
            // SAFETY: pidfd_getfd duplicates the target's fd into ours; the result is checked.
            let dup = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_getfd,
                    pidfd.as_raw_fd(),
                    fd as libc::c_int,
                    0,
                )
            } as i32;
            if dup < 0 {
                continue;
            }
            // SAFETY: a fresh fd we own, closed when `dup` drops.
            let dup = unsafe { std::os::fd::OwnedFd::from_raw_fd(dup) };
            // A blocking socket stays out of the map, as the sock_ops program leaves it (see
            // tracer-ebpf's `inject::blocking`); the dup shares the process's file and flags.
            // SAFETY: F_GETFL on an fd we own.
            let flags = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GETFL) };
            if flags < 0 || flags & libc::O_NONBLOCK == 0 {
                continue;
            }
            if map.insert(key, dup.as_raw_fd(), 0).is_ok() {
                added += 1;
            }
        }
        added
    }

    /// Takes client connections that turned out to need no injection (another protocol than
    /// HTTP/1.x, TLS, or requests with their own context) out of the socket map. A socket in
    /// the map sends through the kernel's sk_msg path, which copies every send into a message
    /// for the program (about 1 µs a send here, several times the program's own cost): nothing
    /// to inject into is no reason to pay it. Connections not in the map (servers' own,
    /// filtered destinations) are simply not found. Sockets switched to blocking mode go too.
    pub fn stop_injecting(&mut self, conns: &[(SocketAddr, SocketAddr)]) {
        let Some(map) = self.inject_sockets.as_mut() else {
            return;
        };
        // And those the sk_msg program found switched to blocking mode (tracer-ebpf's
        // `inject::blocking`, which counts them): their reads must leave the socket map's
        // receive path soon.
        if let Some(blocking) = self.inject_blocking.as_mut() {
            let keys: Vec<SockKey> = blocking.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = map.remove(&key);
                let _ = blocking.remove(&key);
            }
        }
        for (local, remote) in conns {
            let key = SockKey {
                local_addr: mapped_octets(local.ip()),
                remote_addr: mapped_octets(remote.ip()),
                local_port: u32::from(local.port()),
                remote_port: u32::from(remote.port()),
            };
            if map.remove(&key).is_ok() {
                self.inject_released += 1;
            }
        }
    }

    /// Sockets `stop_injecting` took out of the socket map so far.
    pub fn inject_released(&self) -> u64 {
        self.inject_released
    }

    /// The ring buffer carrying every event. Call once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(ProbeError::Map("EVENTS"))?;
        RingBuf::try_from(map).map_err(|_| ProbeError::Map("EVENTS"))
    }

    /// Adds a process to the traced set (used by `run --comm` when a matching process appears).
    pub fn trace_pid(&mut self, pid: u32) -> Result<(), ProbeError> {
        self.traced_pids
            .insert(pid, 1, 0)
            .map_err(ProbeError::MapUpdate)?;
        self.refresh_verdicts();
        Ok(())
    }

    /// Makes the programs decide afresh which processes are traced, from the traced sets: after
    /// a change to them, and periodically, so that a process that renamed itself or moved to
    /// another network namespace keeps its old verdict for at most that period.
    pub fn refresh_verdicts(&mut self) {
        let next = self.generation.get(&1, 0).unwrap_or(0).wrapping_add(1);
        if let Err(e) = self.generation.set(1, next, 0) {
            warn!("cannot refresh the traced set's generation: {e}");
        }
    }

    /// Seeds the saved-arguments map for threads of `pid` that are blocked in a socket read
    /// right now: their read began before the probes existed, so its enter was never seen, and
    /// without this the first request on a kept-alive connection would be lost. Returns how
    /// many threads were seeded. Best effort: a thread that moves on meanwhile is harmless
    /// (its next enter overwrites the entry, or the probe drops it).
    pub fn seed_blocked_reads(&mut self, pid: u32) -> usize {
        // The socket-layer hooks see a read when it returns: nothing to seed.
        if self.socket_layer {
            return 0;
        }
        let Some(map) = self.ebpf.map_mut("ACTIVE") else {
            return 0;
        };
        let Ok(mut active) = HashMap::<&mut MapData, u64, SavedArgs>::try_from(map) else {
            return 0;
        };
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        let mut seeded = 0;
        for task in tasks.flatten() {
            let Ok(tid) = task.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(line) = fs::read_to_string(task.path().join("syscall")) else {
                continue;
            };
            let Some(args) = blocked_read(&line, |addr| read_process_u64(pid, addr)) else {
                continue;
            };
            let key = (u64::from(pid) << 32) | u64::from(tid);
            if active.insert(key, args, 0).is_ok() {
                seeded += 1;
            }
        }
        seeded
    }

    /// Removes a process from the traced set.
    /// Drops the kernel's socket entries of processes that exited or exec'd: their fds were
    /// closed without close syscalls, and a new socket on the same (pid, fd) — the same
    /// process after exec, or another that got the pid — must not inherit the old entry's
    /// connection id and addresses. Returns how many entries went.
    /// `gone` is `(tgid, when)`: entries the kernel made after that moment belong to the
    /// program the process exec'd (or to a new process with the pid) and stay; the agent hears
    /// of an exec only at its next drain, by which time the new program may well have
    /// connected and sent its first request.
    pub fn forget_processes(&mut self, gone: &[(u32, u64)]) -> usize {
        if gone.is_empty() {
            return 0;
        }
        let Some(map) = self.ebpf.map_mut("CONNS") else {
            return 0;
        };
        // The value is the kernel's ConnState: its first field, the connection id, is the
        // time the entry was made.
        let Ok(mut conns) = HashMap::<&mut MapData, u64, [u8; 24]>::try_from(map) else {
            warn!("cannot open the kernel's connection map");
            return 0;
        };
        let stale: Vec<u64> = conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, value)| entry_predates(*key, value, gone))
            .map(|(key, _)| key)
            .collect();
        let dropped = stale.iter().filter(|key| conns.remove(key).is_ok()).count();
        // The socket-layer programs keep a copy of a socket's entry on the socket, good while
        // the generation stands: a new one makes them look again, and find the entry gone.
        self.refresh_verdicts();
        dropped
    }

    /// Has the kernel capture `keep` of process `tgid`'s request/response turns, or all of
    /// them again with `None` (see `crate::governor`): its processes and connections are
    /// followed in full either way.
    pub fn set_shed(&mut self, tgid: u32, keep: Option<f64>) {
        match keep {
            Some(keep) => {
                // Of u32::MAX, as the kernel compares it with a random u32; never 0.
                let keep = ((keep.clamp(0.0, 1.0) * u32::MAX as f64) as u32).max(1);
                if let Err(e) = self.shed_pids.insert(tgid, keep, 0) {
                    warn!("cannot shed process {tgid}: {e}");
                    return;
                }
                if !self.shed.insert(tgid) {
                    // A new share: the programs' cached verdicts carry the old one.
                    self.refresh_verdicts();
                    return;
                }
            }
            None => {
                let _ = self.shed_pids.remove(&tgid);
                if !self.shed.remove(&tgid) {
                    return;
                }
            }
        }
        if let Err(e) = self.shed_state.set(0, self.shed.len() as u64, 0) {
            warn!("cannot update the shed set's count: {e}");
        }
        // The programs' cached verdicts carry the shed bit and share.
        self.refresh_verdicts();
    }

    pub fn untrace_pid(&mut self, pid: u32) {
        let _ = self.traced_pids.remove(&pid);
        self.refresh_verdicts();
    }

    /// What the kernel counts of each loaded program: its runs and their time (counted only
    /// while run-time statistics are on, see [`enable_run_stats`]), and the runs it missed
    /// because the program was already running on that CPU (always counted: events lost).
    pub fn probe_runs(&self) -> Vec<ProbeRuns> {
        let mut out: Vec<ProbeRuns> = self
            .ebpf
            .programs()
            .filter_map(|(name, program)| {
                let fd = program.fd().ok()?;
                let info =
                    fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))
                        .ok()?;
                Some(ProbeRuns::from_fdinfo(name, &info))
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Runs the kernel skipped, all programs together (see [`Probes::probe_runs`]).
    pub fn missed_runs(&self) -> u64 {
        self.probe_runs().iter().map(|p| p.recursion_misses).sum()
    }

    /// Kernel-side counters summed over CPUs, indexed by `tracer_common::stat`.
    pub fn kernel_stats(&self) -> [u64; stat::COUNT as usize] {
        let mut out = [0u64; stat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.stats.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

/// One program's counts, as the kernel shows them in the program's fdinfo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeRuns {
    pub name: String,
    pub runs: u64,
    pub run_ns: u64,
    pub recursion_misses: u64,
}

impl ProbeRuns {
    fn from_fdinfo(name: &str, fdinfo: &str) -> ProbeRuns {
        let mut runs = ProbeRuns {
            name: name.to_string(),
            ..ProbeRuns::default()
        };
        for line in fdinfo.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<u64>() else {
                continue;
            };
            match key {
                "run_cnt" => runs.runs = value,
                "run_time_ns" => runs.run_ns = value,
                "recursion_misses" => runs.recursion_misses = value,
                _ => {}
            }
        }
        runs
    }
}

/// Turns on the kernel's run-time statistics of BPF programs (run counts and time, for every
/// program on the host) for as long as the returned fd is open. Each run of every program then
/// reads the clock twice.
pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd, String> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| e.to_string())
}

/// Whether the `CONNS` entry `key` -> `value` was made before its process left, per `gone`.
fn entry_predates(key: u64, value: &[u8; 24], gone: &[(u32, u64)]) -> bool {
    let made = u64::from_ne_bytes(value[..8].try_into().expect("8 bytes"));
    gone.iter()
        .any(|&(tgid, when)| tgid == (key >> 32) as u32 && made < when)
}

fn check_privileges() -> Result<(), ProbeError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    // Not root: accept the capabilities that loading, attaching and the memlock need.
    let cap_eff = effective_capabilities();
    const CAP_SYS_ADMIN: u64 = 21;
    const CAP_SYS_RESOURCE: u64 = 24;
    const CAP_PERFMON: u64 = 38;
    const CAP_BPF: u64 = 39;
    let has = |cap: u64| cap_eff & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && has(CAP_SYS_RESOURCE)) {
        Ok(())
    } else {
        Err(ProbeError::NotPrivileged)
    }
}

/// This process's effective capabilities, a bit per `CAP_*` number (0 when unreadable).
pub(crate) fn effective_capabilities() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

/// aya attaches tracepoints through tracefs, which a fresh machine may not have mounted.
fn ensure_tracefs() -> Result<(), ProbeError> {
    if Path::new(TRACEFS).join("events").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        return Ok(());
    }
    let source = c"tracefs";
    let target = c"/sys/kernel/tracing";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(ProbeError::Tracefs(std::io::Error::last_os_error()));
    }
    info!("mounted tracefs at {TRACEFS}");
    Ok(())
}

/// The `child_pid` offset in the sched_process_fork record, from its format file.
fn fork_child_pid_offset() -> Option<u32> {
    sched_format_offset("sched_process_fork", "child_pid")
}

/// The offset of `field` in the record of the sched tracepoint `event`, from its format file.
fn sched_format_offset(event: &str, field: &str) -> Option<u32> {
    let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|root| fs::read_to_string(format!("{root}/events/sched/{event}/format")).ok())?;
    parse_format_offset(&format, field)
}

/// Finds `field:<type> <name>;\toffset:N;` in a tracepoint format description.
fn parse_format_offset(format: &str, name: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        if decl.split_whitespace().last()? != name {
            return None;
        }
        let offset = line
            .split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))?;
        offset.trim().parse().ok()
    })
}

/// Computes the struct field offsets the probes use, from the running kernel's BTF.
pub fn kernel_offsets(btf_path: &Path) -> Result<KernelOffsets, ProbeError> {
    offsets_of(&read_btf(btf_path)?)
}

/// The kernel's BTF, parsed.
fn read_btf(btf_path: &Path) -> Result<Btf, ProbeError> {
    if !btf_path.exists() {
        return Err(ProbeError::MissingBtf);
    }
    Btf::from_file(btf_path).map_err(|e| ProbeError::Btf(e.to_string()))
}

fn offsets_of(btf: &Btf) -> Result<KernelOffsets, ProbeError> {
    let field = |s: &str, path: &str| -> Result<u32, ProbeError> {
        field_offset(btf, s, path)?.ok_or_else(|| ProbeError::MissingField(format!("{s}.{path}")))
    };
    Ok(KernelOffsets {
        task_files: field("task_struct", "files")?,
        files_fdt: field("files_struct", "fdt")?,
        fdt_max_fds: field("fdtable", "max_fds")?,
        fdt_fd: field("fdtable", "fd")?,
        file_inode: field("file", "f_inode")?,
        file_private_data: field("file", "private_data")?,
        inode_mode: field("inode", "i_mode")?,
        socket_type: field("socket", "type")?,
        socket_sk: field("socket", "sk")?,
        sk_family: field("sock", "__sk_common.skc_family")?,
        // A bitfield on kernels before 5.6; the probes then skip the protocol check.
        sk_protocol: field_offset(btf, "sock", "sk_protocol")?.unwrap_or(u32::MAX),
        sk_daddr: field("sock", "__sk_common.skc_daddr")?,
        sk_rcv_saddr: field("sock", "__sk_common.skc_rcv_saddr")?,
        sk_dport: field("sock", "__sk_common.skc_dport")?,
        sk_num: field("sock", "__sk_common.skc_num")?,
        sk_v6_daddr: field("sock", "__sk_common.skc_v6_daddr")?,
        sk_v6_rcv_saddr: field("sock", "__sk_common.skc_v6_rcv_saddr")?,
        task_nsproxy: field("task_struct", "nsproxy")?,
        nsproxy_net_ns: field("nsproxy", "net_ns")?,
        net_ns_inum: field("net", "ns.inum")?,
        // Absent fields only cost passive cross-host linking.
        tcp_write_seq: field_offset(btf, "tcp_sock", "write_seq")?.unwrap_or(u32::MAX),
        tcp_copied_seq: field_offset(btf, "tcp_sock", "copied_seq")?.unwrap_or(u32::MAX),
        task_group_leader: field("task_struct", "group_leader")?,
        task_comm: field("task_struct", "comm")?,
        // Absent (before 4.20), a send that had no sk_msg note is dated at its return.
        tcp_snd_nxt: field_offset(btf, "tcp_sock", "snd_nxt")?.unwrap_or(u32::MAX),
        tcp_wstamp_ns: field_offset(btf, "tcp_sock", "tcp_wstamp_ns")?.unwrap_or(u32::MAX),
        sk_socket: field("sock", "sk_socket")?,
        socket_file: field("socket", "file")?,
        file_flags: field("file", "f_flags")?,
        _pad: [0; 2],
        valid: 1,
    })
}

/// Byte offset of `path` (dot-separated members) inside `struct name`, looking through
/// anonymous unions and structs as C does. `None` when a member is absent or is a bitfield
/// that does not start on a byte.
fn field_offset(btf: &Btf, name: &str, path: &str) -> Result<Option<u32>, ProbeError> {
    let types = btf
        .resolve_types_by_name(name)
        .map_err(|e| ProbeError::Btf(format!("{name}: {e}")))?;
    let Some(mut current) = types.into_iter().find(|t| matches!(t, Type::Struct(_))) else {
        return Ok(None);
    };
    let mut bits = 0u32;
    for member_name in path.split('.') {
        let Some((offset, ty)) = find_member(btf, &current, member_name) else {
            return Ok(None);
        };
        bits += offset;
        current = ty;
    }
    Ok(bits.is_multiple_of(8).then_some(bits / 8))
}

/// Finds a member by name in a struct or union, descending into anonymous members. Returns its
/// bit offset and its type with typedefs and qualifiers peeled off.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Option<(u32, Type)> {
    let (Type::Struct(s) | Type::Union(s)) = ty else {
        return None;
    };
    for member in &s.members {
        let member_name = btf.resolve_name(member).unwrap_or_default();
        if member_name == name {
            if member
                .bitfield_size()
                .is_some_and(|size| size != 0 && size % 8 != 0)
            {
                return None;
            }
            return Some((
                member.bit_offset(),
                peel(btf, btf.resolve_chained_type(member).ok()?),
            ));
        }
        if member_name.is_empty() {
            let inner = peel(btf, btf.resolve_chained_type(member).ok()?);
            if let Some((offset, found)) = find_member(btf, &inner, name) {
                return Some((member.bit_offset() + offset, found));
            }
        }
    }
    None
}

fn peel(btf: &Btf, mut ty: Type) -> Type {
    for _ in 0..16 {
        let next = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t),
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => btf.resolve_chained_type(t),
            Type::TypeTag(t) => btf.resolve_chained_type(t),
            _ => return ty,
        };
        match next {
            Ok(next) => ty = next,
            Err(_) => return ty,
        }
    }
    ty
}

/// x86_64 syscall numbers of the reads a thread can be found blocked in.
const NR_READ: u64 = 0;
const NR_READV: u64 = 19;
const NR_RECVFROM: u64 = 45;
const NR_RECVMSG: u64 = 47;

/// Parses `/proc/PID/task/TID/syscall` ("nr arg1 arg2 ... sp pc", numbers in hex after the
/// first) into the arguments the exit probe needs, for the socket reads it knows.
/// `read_u64` reads the traced process's memory (for recvmsg's msghdr).
fn blocked_read(line: &str, read_u64: impl Fn(u64) -> Option<u64>) -> Option<SavedArgs> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let mut fields = line.split_whitespace();
    let nr: u64 = fields.next()?.parse().ok()?;
    let mut arg = || {
        fields
            .next()
            .and_then(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok())
    };
    let (fd, a2, a3) = (arg()?, arg()?, arg()?);
    let fd = u32::try_from(fd).ok()?;
    let (kind, buf, count) = match nr {
        NR_READ | NR_RECVFROM => (SavedArgs::BUF, a2, 0),
        NR_READV => (SavedArgs::IOV, a2, a3),
        // struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
        NR_RECVMSG => (SavedArgs::IOV, read_u64(a2 + 16)?, read_u64(a2 + 24)?),
        _ => return None,
    };
    Some(SavedArgs {
        kind,
        fd,
        buf,
        count,
        conn_id: 0,
        syscall: nr as u32,
        direction: DIR_INGRESS,
        seq: 0,
        seq_valid: 0,
        enter_ns: 0,
        injected: Default::default(),
    })
}

fn read_process_u64(pid: u32, addr: u64) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mem = fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = [0u8; 8];
    mem.read_exact_at(&mut buf, addr).ok()?;
    Some(u64::from_ne_bytes(buf))
}

/// The socket-layer programs and their tracepoints, `(program, category, tracepoint)` (see
/// tracer-ebpf/src/sockio.rs).
const SOCKET_LAYER: [(&str, &str, &str); 4] = [
    ("tracer_sock_send", "sock", "sock_send_length"),
    ("tracer_sock_recv", "sock", "sock_recv_length"),
    ("tracer_sock_state", "sock", "inet_sock_set_state"),
    ("tracer_sock_destroy", "tcp", "tcp_destroy_sock"),
];

/// Whether to watch socket I/O at the socket layer: x86_64 (the programs read syscall
/// registers), a kernel whose BTF has all of `SOCKET_LAYER`'s tracepoints (6.3+ for the
/// first two), and no `TRACER_SYSCALL_TRACEPOINTS` asking for a syscall path.
fn socket_layer_wanted(btf: &Btf) -> bool {
    if !cfg!(target_arch = "x86_64") || std::env::var_os("TRACER_SYSCALL_TRACEPOINTS").is_some() {
        return false;
    }
    let missing: Vec<&str> = SOCKET_LAYER
        .iter()
        .map(|(_, _, name)| *name)
        .filter(|name| {
            btf.resolve_types_by_name(&format!("btf_trace_{name}"))
                .is_err()
        })
        .collect();
    if !missing.is_empty() {
        info!(
            "this kernel lacks {}: socket I/O is watched at syscalls",
            missing.join(", ")
        );
    }
    missing.is_empty()
}

/// Attaches `SOCKET_LAYER`, all or none.
fn attach_socket_layer(ebpf: &mut Ebpf) -> Result<(), aya::programs::ProgramError> {
    attach_btf_tracepoints(
        ebpf,
        &SOCKET_LAYER.map(|(program, _, name)| (program, name)),
    )
}

/// Attaches the raw `sys_enter`/`sys_exit` programs (x86_64): cheaper per syscall than the
/// per-syscall tracepoints, which stay as the fallback. `TRACER_SYSCALL_TRACEPOINTS=1` forces
/// the fallback (to compare the two). Ok(false): not used here.
fn attach_raw_syscalls(ebpf: &mut Ebpf) -> Result<Option<&'static str>, String> {
    if !cfg!(target_arch = "x86_64")
        || std::env::var_os("TRACER_SYSCALL_TRACEPOINTS").is_some_and(|v| v == "1")
    {
        return Ok(None);
    }
    // TRACER_SYSCALL_TRACEPOINTS=raw skips the BTF-typed programs (to test the fallback).
    let btf_error = if std::env::var_os("TRACER_SYSCALL_TRACEPOINTS").is_some_and(|v| v == "raw") {
        "skipped (TRACER_SYSCALL_TRACEPOINTS=raw)".to_string()
    } else {
        match attach_btf_syscalls(ebpf) {
            Ok(()) => return Ok(Some("tp_btf")),
            Err(e) => e.to_string(),
        }
    };
    debug!("BTF-typed syscall tracepoints unavailable ({btf_error}); trying raw tracepoints");
    attach_raw_syscall_pair(ebpf)
        .map(|()| Some("raw_tracepoint"))
        .map_err(|e| format!("tp_btf: {btf_error}; raw_tracepoint: {e}"))
}

/// sys_enter/sys_exit as BTF-typed tracepoints.
fn attach_btf_syscalls(ebpf: &mut Ebpf) -> Result<(), aya::programs::ProgramError> {
    attach_btf_tracepoints(
        ebpf,
        &[
            ("tracer_btf_sys_enter", "sys_enter"),
            ("tracer_btf_sys_exit", "sys_exit"),
        ],
    )
}

/// Loads and attaches BTF-typed programs, `(program, tracepoint)`, all or none: a half
/// attached set (a send seen without its connection's close, an enter without its exit) is
/// worse than none, so the ones done are taken down again on a failure. All are loaded before
/// any is attached: the verifier may take a second over them, in which what the first
/// attached captured would wait unread.
fn attach_btf_tracepoints(
    ebpf: &mut Ebpf,
    list: &[(&str, &str)],
) -> Result<(), aya::programs::ProgramError> {
    use aya::programs::{BtfTracePoint, ProgramError};
    let btf = aya::Btf::from_sys_fs()
        .map_err(|e| ProgramError::IOError(std::io::Error::other(e.to_string())))?;
    fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut BtfTracePoint, ProgramError> {
        ebpf.program_mut(name)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()
    }
    let result = list
        .iter()
        .try_for_each(|&(name, tracepoint)| program(ebpf, name)?.load(tracepoint, &btf))
        .and_then(|()| {
            list.iter()
                .try_for_each(|&(name, _)| program(ebpf, name)?.attach().map(drop))
        });
    if result.is_err() {
        // Unloading detaches too; a program never loaded is left as it is.
        for &(name, _) in list {
            if let Ok(p) = program(ebpf, name) {
                let _ = p.unload();
            }
        }
    }
    result
}

/// sys_enter/sys_exit as raw tracepoints.
fn attach_raw_syscall_pair(ebpf: &mut Ebpf) -> Result<(), aya::programs::ProgramError> {
    use aya::programs::RawTracePoint;
    let enter: &mut RawTracePoint = ebpf
        .program_mut("tracer_raw_sys_enter")
        .ok_or(aya::programs::ProgramError::NotLoaded)?
        .try_into()?;
    enter.load()?;
    enter.attach("sys_enter")?;
    let exit: &mut RawTracePoint = ebpf
        .program_mut("tracer_raw_sys_exit")
        .ok_or(aya::programs::ProgramError::NotLoaded)?
        .try_into()?;
    let attached = exit.load().and_then(|()| exit.attach("sys_exit").map(drop));
    if let Err(e) = attached {
        if let Some(p) = ebpf.program_mut("tracer_raw_sys_enter")
            && let Ok(p) = <&mut RawTracePoint>::try_from(p)
        {
            let _ = p.unload();
        }
        return Err(e);
    }
    Ok(())
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Where the tracer mounts the cgroup v2 hierarchy when the host has none mounted (cgroup v1
/// hosts): sock_ops programs attach to a cgroup v2 directory only.
const CGROUP2_PRIVATE: &str = "/run/tracer/cgroup2";

/// The root of the cgroup v2 hierarchy: the unified mount of a v2 or hybrid host, or one the
/// tracer mounts itself.
fn cgroup2_root() -> Result<std::path::PathBuf, String> {
    let mounts = fs::read_to_string("/proc/self/mounts")
        .map_err(|e| format!("cannot read /proc/self/mounts: {e}"))?;
    if let Some(dir) = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| dir.replace("\\040", " "))
    }) {
        return Ok(dir.into());
    }
    fs::create_dir_all(CGROUP2_PRIVATE)
        .map_err(|e| format!("cannot create {CGROUP2_PRIVATE}: {e}"))?;
    let target = std::ffi::CString::new(CGROUP2_PRIVATE).expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot mount cgroup2 at {CGROUP2_PRIVATE}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(CGROUP2_PRIVATE.into())
}

/// Program `name` of `ebpf`, as its kind `T`.
fn program_as<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("no {name} program"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())
}

/// Loads the injector: the sock_ops program, for the root cgroup (it sees every connection the
/// host makes and keeps only those of traced processes), and the sk_msg program, for the
/// socket map; fills in the destinations it is limited to.
fn load_injector(ebpf: &mut Ebpf, opts: &InjectOptions) -> Result<(), String> {
    use aya::{
        maps::{LpmTrie, lpm_trie::Key},
        programs::{SkMsg, SockOps},
    };
    let mut ports: HashMap<&mut MapData, u16, u8> =
        HashMap::try_from(ebpf.map_mut("INJECT_PORTS").ok_or("no INJECT_PORTS map")?)
            .map_err(|e| e.to_string())?;
    for port in &opts.ports {
        ports.insert(port, 1, 0).map_err(|e| e.to_string())?;
    }
    let mut nets: LpmTrie<&mut MapData, [u8; 16], u8> =
        LpmTrie::try_from(ebpf.map_mut("INJECT_NETS").ok_or("no INJECT_NETS map")?)
            .map_err(|e| e.to_string())?;
    for (ip, prefix) in &opts.nets {
        let (addr, bits) = match ip {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), u32::from(*prefix) + 96),
            IpAddr::V6(v6) => (v6.octets(), u32::from(*prefix)),
        };
        nets.insert(&Key::new(bits, addr), 1, 0)
            .map_err(|e| e.to_string())?;
    }
    let sockops: &mut SockOps = program_as(ebpf, "tracer_sockops")?;
    sockops
        .load()
        .map_err(|e| format!("sock_ops program: {e}"))?;
    let sk_msg: &mut SkMsg = program_as(ebpf, "tracer_inject")?;
    sk_msg.load().map_err(|e| format!("sk_msg program: {e}"))
}

/// Attaches the injector `load_injector` loaded: sock_ops to the root cgroup, sk_msg to the
/// socket map, which it returns with the map of sockets found blocking.
fn attach_injector(ebpf: &mut Ebpf) -> Result<InjectorMaps, String> {
    use aya::{
        maps::{HashMap, SockHash},
        programs::{CgroupAttachMode, SkMsg, SockOps},
    };
    let root = cgroup2_root()?;
    let cgroup =
        fs::File::open(&root).map_err(|e| format!("cannot open {}: {e}", root.display()))?;
    // SAFETY: statfs on a valid fd with a zeroed out-struct.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(&cgroup), &mut sfs) };
    if rc != 0 || sfs.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(format!("{} is not a cgroup v2 hierarchy", root.display()));
    }
    let sockops: &mut SockOps = program_as(ebpf, "tracer_sockops")?;
    sockops
        // With BPF links (which aya uses where the kernel has them) several programs share a
        // cgroup whatever the mode, and link_create refuses the multi flag: use the default.
        .attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|e| {
            format!(
                "attaching sock_ops to {}: {}",
                root.display(),
                crate::export::error_chain(&e)
            )
        })?;

    let sockets: SockHash<MapData, SockKey> =
        SockHash::try_from(ebpf.take_map("SOCKETS").ok_or("no SOCKETS map")?)
            .map_err(|e| e.to_string())?;
    let sk_msg: &mut SkMsg = program_as(ebpf, "tracer_inject")?;
    sk_msg
        .attach(sockets.fd())
        .map_err(|e| format!("attaching sk_msg: {e}"))?;
    let blocking = HashMap::try_from(ebpf.take_map("BLOCKING").ok_or("no BLOCKING map")?)
        .map_err(|e| e.to_string())?;
    Ok((sockets, blocking))
}

type InjectorMaps = (
    aya::maps::SockHash<MapData, SockKey>,
    aya::maps::HashMap<MapData, SockKey, u8>,
);

/// Whether `key`'s remote end passes `--inject-port` / `--inject-net` (as the kernel checks).
fn destination_wanted(opts: &InjectOptions, key: &SockKey) -> bool {
    let remote = std::net::Ipv6Addr::from(key.remote_addr);
    let port_ok = opts.ports.is_empty() || opts.ports.contains(&(key.remote_port as u16));
    let net_ok = opts.nets.is_empty()
        || opts.nets.iter().any(|(net, bits)| {
            let (net, bits) = match net {
                IpAddr::V4(v4) => (v4.to_ipv6_mapped(), u32::from(*bits) + 96),
                IpAddr::V6(v6) => (*v6, u32::from(*bits)),
            };
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits.min(128))
            };
            u128::from(remote) & mask == u128::from(net) & mask
        });
    port_ok && net_ok
}

/// The established TCP connections of `pid` that it opened (not accepted from one of its
/// listening sockets), as (fd, socket-map key).
fn existing_client_connections(pid: u32) -> std::io::Result<Vec<(u32, SockKey)>> {
    use std::collections::{HashMap, HashSet};
    let mut inode_fd = HashMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            && let (Ok(inode), Ok(fd)) = (
                inode.parse::<u64>(),
                entry.file_name().to_string_lossy().parse::<u32>(),
            )
        {
            inode_fd.insert(inode, fd);
        }
    }
    let mut listening = HashSet::new();
    let mut established = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let Ok(inode) = f[9].parse::<u64>() else {
                continue;
            };
            let Some(&fd) = inode_fd.get(&inode) else {
                continue;
            };
            let (Some(local), Some(remote)) = (proc_net_addr(f[1], v6), proc_net_addr(f[2], v6))
            else {
                continue;
            };
            match f[3] {
                "0A" => {
                    listening.insert(local.1);
                }
                "01" => established.push((fd, local, remote)),
                _ => {}
            }
        }
    }
    Ok(established
        .into_iter()
        .filter(|(_, local, _)| !listening.contains(&local.1))
        .map(|(fd, local, remote)| {
            (
                fd,
                SockKey {
                    local_addr: local.0,
                    remote_addr: remote.0,
                    local_port: u32::from(local.1),
                    remote_port: u32::from(remote.1),
                },
            )
        })
        .collect())
}

/// An address as the socket map's keys hold it: IPv6, or IPv4-mapped IPv6.
fn mapped_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Parses `/proc/net/tcp{,6}`'s `ADDR:PORT` (hex, the address in host-order 32-bit words)
/// into an IPv6 (or IPv4-mapped) address in network order and a port.
fn proc_net_addr(field: &str, v6: bool) -> Option<([u8; 16], u16)> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut out = [0u8; 16];
    if v6 {
        if addr.len() != 32 {
            return None;
        }
        for w in 0..4 {
            let word = u32::from_str_radix(&addr[w * 8..w * 8 + 8], 16).ok()?;
            out[w * 4..w * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    } else {
        let word = u32::from_str_radix(addr, 16).ok()?;
        out[10] = 0xff;
        out[11] = 0xff;
        out[12..].copy_from_slice(&word.to_ne_bytes());
    }
    Some((out, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_runs_are_read_from_the_programs_fdinfo() {
        // As Linux 6.18 shows a program's fdinfo.
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1039\nprog_type:\t13\n\
                      prog_jited:\t1\nprog_tag:\te0105c44d76b3f07\nmemlock:\t8192\n\
                      prog_id:\t11117\nrun_time_ns:\t123456\nrun_cnt:\t789\n\
                      recursion_misses:\t3\nverified_insns:\t857\n";
        assert_eq!(
            ProbeRuns::from_fdinfo("tracer_sock_send", fdinfo),
            ProbeRuns {
                name: "tracer_sock_send".into(),
                runs: 789,
                run_ns: 123456,
                recursion_misses: 3,
            }
        );
        // An older kernel without the counters: zeros.
        assert_eq!(
            ProbeRuns::from_fdinfo("p", "pos:\t0\nprog_tag:\tab\n"),
            ProbeRuns {
                name: "p".into(),
                ..ProbeRuns::default()
            }
        );
    }

    /// An exec seen late must not take the new program's first connection with it.
    #[test]
    fn only_entries_made_before_the_process_left_are_forgotten() {
        let value = |made: u64| {
            let mut v = [0u8; 24];
            v[..8].copy_from_slice(&made.to_ne_bytes());
            v
        };
        let key = |tgid: u64, fd: u64| (tgid << 32) | fd;
        let gone = [(7, 1_000)];
        assert!(entry_predates(key(7, 3), &value(999), &gone));
        assert!(
            !entry_predates(key(7, 3), &value(1_001), &gone),
            "made after the exec"
        );
        assert!(
            !entry_predates(key(8, 3), &value(5), &gone),
            "another process"
        );
        assert!(
            entry_predates(key(7, 4), &value(0), &gone),
            "a not-TCP marker"
        );
    }

    #[test]
    fn proc_net_tcp_addresses() {
        // 127.0.0.1:8080 as /proc/net/tcp prints it on little-endian machines.
        let (addr, port) = proc_net_addr("0100007F:1F90", false).unwrap();
        assert_eq!(
            std::net::Ipv6Addr::from(addr),
            "::ffff:127.0.0.1".parse::<std::net::Ipv6Addr>().unwrap()
        );
        assert_eq!(port, 8080);
        let (addr, _) = proc_net_addr("00000000000000000000000001000000:0050", true).unwrap();
        assert_eq!(
            std::net::Ipv6Addr::from(addr),
            std::net::Ipv6Addr::LOCALHOST
        );
        assert!(proc_net_addr("zz:1", false).is_none());
        let opts = InjectOptions {
            mode: 1,
            ports: vec![80],
            nets: vec![("10.0.0.0".parse().unwrap(), 8)],
        };
        let key = |ip: &str, port: u32| SockKey {
            remote_addr: ip.parse::<std::net::Ipv6Addr>().unwrap().octets(),
            remote_port: port,
            ..SockKey::default()
        };
        assert!(destination_wanted(&opts, &key("::ffff:10.1.2.3", 80)));
        assert!(!destination_wanted(&opts, &key("::ffff:11.1.2.3", 80)));
        assert!(!destination_wanted(&opts, &key("::ffff:10.1.2.3", 81)));
    }

    const FORK_FORMAT: &str = "name: sched_process_fork\nID: 320\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";

    #[test]
    fn format_offsets_are_parsed() {
        assert_eq!(parse_format_offset(FORK_FORMAT, "child_pid"), Some(20));
        assert_eq!(parse_format_offset(FORK_FORMAT, "parent_pid"), Some(12));
        assert_eq!(parse_format_offset(FORK_FORMAT, "missing"), None);
    }

    /// Reads this machine's BTF (world-readable, no root needed) when it has one.
    #[test]
    fn offsets_from_running_kernel_btf() {
        let path = Path::new(BTF_PATH);
        if !path.exists() {
            assert!(matches!(kernel_offsets(path), Err(ProbeError::MissingBtf)));
            return;
        }
        let off = kernel_offsets(path).expect("offsets");
        assert_eq!(off.valid, 1);
        // struct sock starts with struct sock_common, whose first 8 bytes are daddr, rcv_saddr.
        assert_eq!(off.sk_daddr, 0);
        assert_eq!(off.sk_rcv_saddr, 4);
        assert!(off.sk_dport > off.sk_rcv_saddr && off.sk_num > off.sk_dport);
        assert!(off.sk_family > 0 && off.sk_protocol != u32::MAX);
        assert!(off.socket_sk > off.socket_type);
        assert!(off.sk_socket > off.sk_family && off.socket_file > off.socket_type);
    }

    #[test]
    fn blocked_reads_are_recognised() {
        let no_mem = |_| None;
        let read = blocked_read(
            "0 0x5 0x7f00001000 0x2000 0x0 0x0 0x0 0x7ffd 0x7f01",
            no_mem,
        )
        .unwrap();
        assert_eq!(
            (read.kind, read.fd, read.buf, read.conn_id),
            (SavedArgs::BUF, 5, 0x7f00001000, 0)
        );
        let recv = blocked_read("45 0x4 0x1000 0x10000 0x0 0x0 0x0 0x1 0x2", no_mem).unwrap();
        assert_eq!((recv.kind, recv.fd, recv.syscall), (SavedArgs::BUF, 4, 45));
        let readv = blocked_read("19 0x3 0x2000 0x2 0x0 0x0 0x0 0x1 0x2", no_mem).unwrap();
        assert_eq!(
            (readv.kind, readv.buf, readv.count),
            (SavedArgs::IOV, 0x2000, 2)
        );
        let msg = blocked_read("47 0x3 0x5000 0x0 0x0 0x0 0x0 0x1 0x2", Some).unwrap();
        assert_eq!(
            (msg.kind, msg.buf, msg.count),
            (SavedArgs::IOV, 0x5010, 0x5018)
        );
        // Not blocked in a syscall, or in one that is not a read.
        assert!(blocked_read("running", no_mem).is_none());
        assert!(blocked_read("232 0x3 0x0 0x0 0x0 0x0 0x0 0x1 0x2", no_mem).is_none());
    }

    #[test]
    fn missing_btf_is_reported() {
        assert!(matches!(
            kernel_offsets(Path::new("/nonexistent/btf")),
            Err(ProbeError::MissingBtf)
        ));
    }
}
