//! The same probes on the raw `sys_enter`/`sys_exit` tracepoints, x86_64 only, in two builds:
//! BTF-typed (tp_btf, registers read directly) and plain raw tracepoints (registers read with
//! probe reads) for kernels that cannot load the first.
//!
//! Per-syscall tracepoints run through perf's tracepoint machinery, which builds a record of
//! every traced syscall before the program sees it; the raw tracepoints hand the program the
//! registers directly. One program sees every syscall of every process and returns at once
//! for those that are not socket I/O, which is cheaper for traced and untraced processes
//! alike. The agent attaches these where it can and falls back to the per-syscall ones.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use tracer_common::{DIR_EGRESS, DIR_INGRESS, SavedArgs};

use crate::{
    capture_mode, is_traced,
    sockets::{enter_accept, enter_close, enter_connect, exit_accept, exit_connect, take_saved},
    syscalls::{MSG, enter_traced_args, exit_data},
};

// x86_64 syscall numbers.
pub(crate) const NR_READ: i64 = 0;
pub(crate) const NR_WRITE: i64 = 1;
pub(crate) const NR_CLOSE: i64 = 3;
pub(crate) const NR_READV: i64 = 19;
pub(crate) const NR_WRITEV: i64 = 20;
pub(crate) const NR_SENDFILE: i64 = 40;
pub(crate) const NR_CONNECT: i64 = 42;
pub(crate) const NR_ACCEPT: i64 = 43;
pub(crate) const NR_SENDTO: i64 = 44;
pub(crate) const NR_RECVFROM: i64 = 45;
pub(crate) const NR_SENDMSG: i64 = 46;
pub(crate) const NR_RECVMSG: i64 = 47;
pub(crate) const NR_ACCEPT4: i64 = 288;

// Offsets in x86_64 `struct pt_regs` of the syscall arguments and of orig_ax (the number).
pub(crate) const DI: usize = 112;
pub(crate) const SI: usize = 104;
pub(crate) const DX: usize = 96;
pub(crate) const ORIG_AX: usize = 120;

#[inline(always)]
fn reg(regs: *const u8, offset: usize) -> u64 {
    // SAFETY: a probe read of the task's saved user registers.
    unsafe { bpf_probe_read_kernel(regs.add(offset) as *const u64) }.unwrap_or(u64::MAX)
}

/// A register of a BTF-typed `struct pt_regs *`: a plain load, which the verifier checks
/// against the type and the JIT makes fault-safe. A probe read per register costs more than
/// the rest of an untraced syscall's visit.
#[inline(always)]
pub(crate) fn btf_reg(regs: *const u8, offset: usize) -> u64 {
    // SAFETY: `offset` is that of a u64 field of struct pt_regs.
    unsafe { core::ptr::read_volatile(regs.add(offset) as *const u64) }
}

/// raw_syscalls:sys_enter(struct pt_regs *regs, long id)
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn tracer_raw_sys_enter(ctx: RawTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    on_enter(ctx.arg(1), |offset| reg(regs, offset));
    0
}

/// The same, BTF-typed (tp_btf): the registers are read directly.
#[btf_tracepoint(function = "sys_enter")]
pub fn tracer_btf_sys_enter(ctx: BtfTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    on_enter(ctx.arg(1), |offset| btf_reg(regs, offset));
    0
}

/// raw_syscalls:sys_exit(struct pt_regs *regs, long ret)
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn tracer_raw_sys_exit(ctx: RawTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    on_exit(reg(regs, ORIG_AX) as i64, ctx.arg(1));
    0
}

/// The same, BTF-typed (tp_btf).
#[btf_tracepoint(function = "sys_exit")]
pub fn tracer_btf_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    on_exit(btf_reg(regs, ORIG_AX) as i64, ctx.arg(1));
    0
}

/// Syscall `id` entered; `arg` reads a register of its `pt_regs`.
#[inline(always)]
fn on_enter(id: i64, arg: impl Fn(usize) -> u64) {
    let (kind, direction) = match id {
        NR_READ | NR_RECVFROM => (SavedArgs::BUF, DIR_INGRESS),
        NR_WRITE | NR_SENDTO => (SavedArgs::BUF, DIR_EGRESS),
        NR_READV => (SavedArgs::IOV, DIR_INGRESS),
        NR_WRITEV => (SavedArgs::IOV, DIR_EGRESS),
        NR_RECVMSG => (MSG, DIR_INGRESS),
        NR_SENDMSG => (MSG, DIR_EGRESS),
        NR_SENDFILE => (SavedArgs::NO_PAYLOAD, DIR_EGRESS),
        NR_ACCEPT | NR_ACCEPT4 => {
            enter_accept();
            return;
        }
        NR_CONNECT | NR_CLOSE => {
            if !is_traced((bpf_get_current_pid_tgid() >> 32) as u32) {
                return;
            }
            let fd = arg(DI);
            if id == NR_CONNECT {
                enter_connect(fd);
            } else {
                enter_close(fd);
            }
            return;
        }
        _ => return,
    };
    // Untraced processes leave before any register is read.
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(keep) = capture_mode((pid_tgid >> 32) as u32) else {
        return;
    };
    enter_traced_args(
        pid_tgid,
        arg(DI),
        arg(SI),
        arg(DX),
        id as i32,
        kind,
        direction,
        keep,
    );
}

/// Syscall `id` returned `ret`.
#[inline(always)]
fn on_exit(id: i64, ret: i64) {
    if !matches!(
        id,
        NR_READ
            | NR_WRITE
            | NR_READV
            | NR_WRITEV
            | NR_SENDFILE
            | NR_CONNECT
            | NR_ACCEPT
            | NR_SENDTO
            | NR_RECVFROM
            | NR_SENDMSG
            | NR_RECVMSG
            | NR_ACCEPT4
    ) {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    // Cheaper than the saved-arguments lookup that would miss.
    if !is_traced((pid_tgid >> 32) as u32) {
        return;
    }
    let Some(saved) = take_saved(pid_tgid) else {
        return;
    };
    match saved.kind {
        SavedArgs::ACCEPT => exit_accept(ret),
        SavedArgs::CONNECT => exit_connect(saved, ret, pid_tgid),
        _ => exit_data(saved, ret, pid_tgid),
    }
}
