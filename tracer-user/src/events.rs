//! Ring-buffer records to typed events: a pure, size-checked decode (no aya, no I/O), so it is
//! unit-tested with records built in memory.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tracer_common::{ConnEvent, DataEvent, EventHeader, EventKind, TAIL_LEN, TraceCtx};

/// One decoded record. Payload slices borrow the ring-buffer item.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Data {
        hdr: EventHeader,
        /// Bytes the syscall moved.
        len: u64,
        ingress: bool,
        syscall: u32,
        head: &'a [u8],
        tail: &'a [u8],
        /// The span identity the kernel named for the request this segment starts, if any.
        ctx: TraceCtx,
        /// TCP sequence number of the first byte, when the kernel could read it.
        seq: Option<u32>,
        /// When the bytes began to move (for sends, no later than a peer could see them).
        start_ns: u64,
    },
    ConnOpen {
        hdr: EventHeader,
        role: u16,
        local: SocketAddr,
        remote: SocketAddr,
        /// The opening thread's command name.
        comm: [u8; 16],
    },
    ConnClose(EventHeader),
    ConnReset(EventHeader),
    /// Calls on the connection went uncaptured before the next data event (per-turn sampling).
    ConnGap(EventHeader),
    ProcessExit(EventHeader),
    ProcessExec(EventHeader),
    /// A socket to take out of the injector's socket map (it is in the kernel's list).
    InjectRelease(EventHeader),
}

impl Event<'_> {
    pub fn header(&self) -> &EventHeader {
        match self {
            Event::Data { hdr, .. } | Event::ConnOpen { hdr, .. } => hdr,
            Event::ConnClose(hdr)
            | Event::ConnReset(hdr)
            | Event::ConnGap(hdr)
            | Event::ProcessExit(hdr)
            | Event::ProcessExec(hdr)
            | Event::InjectRelease(hdr) => hdr,
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {got} bytes is shorter than its {want}-byte header")]
    TooShort { want: usize, got: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u16),
    #[error("data record claims {claimed} payload bytes but carries {carried}")]
    SizeMismatch { claimed: usize, carried: usize },
    #[error("unknown address family {0}")]
    BadFamily(u16),
}

/// Reads a `T` from the start of `bytes`, checking the size first.
fn read_pod<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let want = std::mem::size_of::<T>();
    if bytes.len() < want {
        return Err(DecodeError::TooShort {
            want,
            got: bytes.len(),
        });
    }
    // SAFETY: T is one of the repr(C) integer-only ABI structs (any bit pattern is valid) and
    // `bytes` holds at least size_of::<T>() bytes; read_unaligned needs no alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let hdr: EventHeader = read_pod(bytes)?;
    let kind = EventKind::from_u16(hdr.kind).ok_or(DecodeError::UnknownKind(hdr.kind))?;
    Ok(match kind {
        EventKind::Data => {
            let ev: DataEvent = read_pod(bytes)?;
            let rest = &bytes[std::mem::size_of::<DataEvent>()..];
            let claimed = ev.head_len as usize;
            // The ring buffer pads records to 8 bytes, so the payload may be followed by slack.
            if rest.len() < claimed || claimed as u64 > ev.len {
                return Err(DecodeError::SizeMismatch {
                    claimed,
                    carried: rest.len(),
                });
            }
            let tail_len = (ev.tail_len as usize).min(TAIL_LEN);
            // Copying the fixed-size tail out of `ev` would outlive it; point into the record.
            let tail_offset = std::mem::offset_of!(DataEvent, tail);
            Event::Data {
                hdr,
                len: ev.len,
                ingress: ev.direction == tracer_common::DIR_INGRESS,
                syscall: ev.syscall,
                head: &rest[..claimed],
                tail: &bytes[tail_offset..tail_offset + tail_len],
                ctx: ev.ctx,
                seq: (ev.seq_valid != 0).then_some(ev.seq),
                start_ns: if ev.start_ns == 0 {
                    hdr.ts_ns
                } else {
                    ev.start_ns.min(hdr.ts_ns)
                },
            }
        }
        EventKind::ConnOpen => {
            let ev: ConnEvent = read_pod(bytes)?;
            let (local, remote) = socket_addrs(&ev)?;
            Event::ConnOpen {
                hdr,
                role: ev.role,
                local,
                remote,
                comm: ev.comm,
            }
        }
        EventKind::ConnClose => Event::ConnClose(hdr),
        EventKind::ConnReset => Event::ConnReset(hdr),
        EventKind::ProcessExit => Event::ProcessExit(hdr),
        EventKind::ProcessExec => Event::ProcessExec(hdr),
        EventKind::ConnGap => Event::ConnGap(hdr),
        EventKind::InjectRelease => Event::InjectRelease(hdr),
    })
}

fn socket_addrs(ev: &ConnEvent) -> Result<(SocketAddr, SocketAddr), DecodeError> {
    let ip = |raw: &[u8; 16]| -> Result<IpAddr, DecodeError> {
        match ev.family {
            2 => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
            10 => {
                let v6 = Ipv6Addr::from(*raw);
                // A dual-stack socket talking IPv4 shows v4-mapped addresses; report them as v4.
                Ok(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
            }
            other => Err(DecodeError::BadFamily(other)),
        }
    };
    Ok((
        SocketAddr::new(ip(&ev.local_addr)?, ev.local_port),
        SocketAddr::new(ip(&ev.remote_addr)?, ev.remote_port),
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use tracer_common::{DIR_INGRESS, ROLE_SERVER};

    use super::*;

    fn as_bytes<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: the ABI structs have no padding (size assertions in tracer-common).
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    pub fn data_record(
        tgid: u32,
        fd: u32,
        conn_id: u64,
        ts: u64,
        ingress: bool,
        payload: &[u8],
    ) -> Vec<u8> {
        data_record_with(tgid, fd, conn_id, ts, ingress, payload, |_| {})
    }

    /// A data record whose kernel-filled extras (`start_ns`, `seq`, `ctx`) `edit` sets.
    pub fn data_record_with(
        tgid: u32,
        fd: u32,
        conn_id: u64,
        ts: u64,
        ingress: bool,
        payload: &[u8],
        edit: impl FnOnce(&mut DataEvent),
    ) -> Vec<u8> {
        let mut ev = DataEvent {
            hdr: EventHeader {
                kind: EventKind::Data as u16,
                losses: 0,
                tgid,
                tid: tgid,
                fd,
                ts_ns: ts,
                conn_id,
            },
            len: payload.len() as u64,
            direction: if ingress {
                DIR_INGRESS
            } else {
                tracer_common::DIR_EGRESS
            },
            syscall: 0,
            head_len: payload.len() as u32,
            tail_len: 0,
            tail: [0; TAIL_LEN],
            ctx: TraceCtx::default(),
            seq: 0,
            seq_valid: 0,
            start_ns: 0,
        };
        edit(&mut ev);
        let mut out = as_bytes(&ev);
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(8), 0);
        out
    }

    #[allow(clippy::too_many_arguments)] // a record's fields, in wire order
    pub fn open_record(
        tgid: u32,
        fd: u32,
        conn_id: u64,
        role: u16,
        local: [u8; 4],
        lport: u16,
        remote: [u8; 4],
        rport: u16,
    ) -> Vec<u8> {
        let mut ev = ConnEvent {
            hdr: EventHeader {
                kind: EventKind::ConnOpen as u16,
                losses: 0,
                tgid,
                tid: tgid,
                fd,
                ts_ns: 1,
                conn_id,
            },
            family: 2,
            role,
            local_port: lport,
            remote_port: rport,
            ..Default::default()
        };
        ev.local_addr[..4].copy_from_slice(&local);
        ev.remote_addr[..4].copy_from_slice(&remote);
        as_bytes(&ev)
    }

    pub fn header_record(kind: EventKind, tgid: u32, fd: u32, conn_id: u64, ts: u64) -> Vec<u8> {
        as_bytes(&EventHeader {
            kind: kind as u16,
            losses: 0,
            tgid,
            tid: tgid,
            fd,
            ts_ns: ts,
            conn_id,
        })
    }

    #[test]
    fn data_round_trip_with_ring_padding() {
        let rec = data_record(7, 3, 99, 1000, true, b"GET / HTTP/1.1\r\n\r\n");
        let Event::Data {
            hdr,
            len,
            ingress,
            head,
            tail,
            ..
        } = decode(&rec).unwrap()
        else {
            panic!()
        };
        assert_eq!((hdr.tgid, hdr.fd, hdr.conn_id, hdr.ts_ns), (7, 3, 99, 1000));
        assert_eq!(len, 18);
        assert!(ingress);
        assert_eq!(head, b"GET / HTTP/1.1\r\n\r\n");
        assert!(tail.is_empty());
    }

    #[test]
    fn data_with_tail_and_uncaptured_bytes() {
        let mut rec = data_record(1, 1, 1, 1, false, b"HTTP/1.1 200 OK\r\n");
        // Claim 5000 bytes moved with a 4-byte tail.
        let len_off = std::mem::offset_of!(DataEvent, len);
        rec[len_off..len_off + 8].copy_from_slice(&5000u64.to_ne_bytes());
        let tl = std::mem::offset_of!(DataEvent, tail_len);
        rec[tl..tl + 4].copy_from_slice(&4u32.to_ne_bytes());
        let t = std::mem::offset_of!(DataEvent, tail);
        rec[t..t + 4].copy_from_slice(b"\r\n\r\n");
        let Event::Data {
            len, tail, head, ..
        } = decode(&rec).unwrap()
        else {
            panic!()
        };
        assert_eq!((len, tail, head.len()), (5000, &b"\r\n\r\n"[..], 17));
    }

    #[test]
    fn conn_open_v4() {
        let rec = open_record(
            5,
            4,
            2,
            ROLE_SERVER,
            [127, 0, 0, 1],
            8080,
            [127, 0, 0, 2],
            40000,
        );
        let Event::ConnOpen {
            role,
            local,
            remote,
            ..
        } = decode(&rec).unwrap()
        else {
            panic!()
        };
        assert_eq!(role, ROLE_SERVER);
        assert_eq!(local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(remote, "127.0.0.2:40000".parse().unwrap());
    }

    #[test]
    fn conn_open_v6_and_mapped_v4() {
        let mut ev = ConnEvent {
            hdr: EventHeader {
                kind: EventKind::ConnOpen as u16,
                losses: 0,
                ..Default::default()
            },
            family: 10,
            local_port: 443,
            remote_port: 5555,
            ..Default::default()
        };
        ev.local_addr = Ipv6Addr::LOCALHOST.octets();
        ev.remote_addr = Ipv4Addr::new(10, 0, 0, 9).to_ipv6_mapped().octets();
        let Event::ConnOpen { local, remote, .. } = decode(&as_bytes(&ev)).unwrap() else {
            panic!()
        };
        assert_eq!(local, "[::1]:443".parse().unwrap());
        assert_eq!(remote, "10.0.0.9:5555".parse().unwrap());
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        assert!(matches!(
            decode(&[1, 2, 3]),
            Err(DecodeError::TooShort { .. })
        ));
        let mut bad = header_record(EventKind::ConnClose, 1, 1, 1, 1);
        bad[0] = 77;
        assert_eq!(decode(&bad), Err(DecodeError::UnknownKind(77)));
        let mut rec = data_record(1, 1, 1, 1, true, b"abc");
        let hl = std::mem::offset_of!(DataEvent, head_len);
        rec[hl..hl + 4].copy_from_slice(&4000u32.to_ne_bytes());
        assert!(matches!(
            decode(&rec),
            Err(DecodeError::SizeMismatch { .. })
        ));
        let mut open = open_record(1, 1, 1, 0, [0; 4], 0, [0; 4], 0);
        let fam = std::mem::offset_of!(ConnEvent, family);
        open[fam..fam + 2].copy_from_slice(&1u16.to_ne_bytes());
        assert_eq!(decode(&open), Err(DecodeError::BadFamily(1)));
        // A data header cut short.
        assert!(matches!(
            decode(&rec[..40]),
            Err(DecodeError::TooShort { .. })
        ));
    }
}
