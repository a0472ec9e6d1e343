//! Keeps the traced set in step with the processes: forked children of traced processes are
//! traced too (pre-fork servers, worker pools), and exits are reported so userspace can drop
//! the state of a process whose pid may be reused.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use tracer_common::EventKind;

use crate::{
    ACTIVE, TRACED_PIDS, bump_generation, forget_verdict, is_traced, sockets::header_only,
};

/// sched:sched_process_fork. Runs in the parent; `child_pid` is at an offset the agent read
/// from the tracepoint's format file (it moved in 6.x).
#[tracepoint]
pub fn tracer_sched_fork(ctx: TracePointContext) -> u32 {
    let offset = (config!(fork_child_pid_offset) & 0xff) as usize;
    if offset == 0 {
        return 0;
    }
    // SAFETY: reads the tracepoint record at an offset taken from its format description.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(offset) }) else {
        return 0;
    };
    // The pid may have named another process before, whose verdict must not stick to this one.
    forget_verdict(child as u32);
    if config!(filter_pids) == 0 || config!(follow_forks) == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_traced(tgid) {
        return 0;
    }
    // A new thread of a traced process shows up here too; its tid in the set is harmless and
    // leaves again at its exit.
    let _ = TRACED_PIDS.insert(&(child as u32), &1, 0);
    bump_generation();
    0
}

/// sched:sched_process_exit, in the exiting thread's context. A thread group is dead when its
/// last thread exits (`group_dead`), which is not always the main thread: a thread that execs
/// kills the others, the main one included, and takes over the group's pid.
#[tracepoint]
pub fn tracer_sched_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // A thread killed inside a syscall never reaches its exit probe. Whatever the verdict:
    // the process may have left the traced set since the entry was made.
    let _ = ACTIVE.remove(&pid_tgid);
    let _ = crate::inject::THREAD_CTX.remove(&tid);
    if !is_traced(tgid) {
        return 0;
    }
    let group_dead = match config!(exit_group_dead_offset) {
        0 => tid == tgid,
        // SAFETY: reads the tracepoint record at an offset taken from its format description.
        offset => unsafe { ctx.read_at::<u8>((offset & 0xff) as usize) }.is_ok_and(|b| b != 0),
    };
    if config!(filter_pids) != 0 {
        // The thread leaves the set; the process too when it is dead, as its pid may be given
        // to an unrelated program next.
        if tid != tgid {
            let _ = TRACED_PIDS.remove(&tid);
        }
        if group_dead {
            let _ = TRACED_PIDS.remove(&tgid);
            bump_generation();
        }
    }
    if group_dead {
        header_only(EventKind::ProcessExit, tgid, tid, 0, 0);
    }
    0
}

/// sched:sched_process_exec, in the new program's context (its comm is already the new one).
#[tracepoint]
pub fn tracer_sched_exec(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // The verdict may rest on the old name.
    forget_verdict(tgid);
    if !is_traced(tgid) {
        return 0;
    }
    header_only(EventKind::ProcessExec, tgid, pid_tgid as u32, 0, 0);
    0
}
