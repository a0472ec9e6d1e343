#!/usr/bin/env python3
"""Record one TCP connection as a `.seg` golden fixture (format: tracer-user/src/protocols/fixture.rs).

Listens on 127.0.0.1:PORT, accepts ONE client, forwards it to 127.0.0.1:TARGET and writes every
chunk it receives as one segment line, from the client's point of view:

    > TS PAYLOAD    bytes the client sent (Egress)
    < TS PAYLOAD    bytes the server sent (Ingress)
    close TS        when either side closed

With --server-view the directions are flipped (the traced process is the server). Timestamps
are synthetic and monotonic: the chunk's step number times --step (default 1000 ns), or real
elapsed nanoseconds with --real-time. A payload is cut into `|` continuation lines after each
LF and every --width raw bytes. Escapes: \\r \\n \\t \\\\ \\xHH (non-printables, a leading "cap="
and trailing spaces). Optional rewriting for big payloads: --cap N marks segments longer than
N bytes `cap=N` (only the first N bytes "captured"; the bytes between the cap and the last 16,
which the parser never sees, are written as \\{N} filler unless --keep-uncaptured), --filler MIN
writes runs of at least MIN '.' bytes as \\{N}.

Loopback only; every loop is bounded (--timeout seconds overall, --max-chunks).
Example:
    record_proxy.py --listen 7001 --target 6390 --out get.seg &
    redis-cli -p 7001 GET k
"""

import argparse
import select
import socket
import sys
import time

LOOPBACK = "127.0.0.1"


def token(b: int) -> str:
    """One byte in the fixture's escaped form."""
    if b == 0x5C:
        return "\\\\"
    if b == 0x0D:
        return "\\r"
    if b == 0x0A:
        return "\\n"
    if b == 0x09:
        return "\\t"
    if 0x20 <= b < 0x7F:
        return chr(b)
    return "\\x%02x" % b


def segment_lines(marker: str, ts: int, data: bytes, args) -> list:
    """The lines of one segment: escaped, '.' runs as \\{N} (--filler), cut after each LF and
    every --width bytes."""
    cap = args.cap if args.cap is not None and len(data) > args.cap else None
    if cap is not None and not args.keep_uncaptured and len(data) - cap > 16:
        # The parser sees only the first `cap` bytes and the last 16 (the tail): the bytes in
        # between are written as filler to keep the fixture small.
        tokens = [token(b) for b in data[:cap]]
        tokens.append("\\{%d}" % (len(data) - cap - 16))
        tokens += [token(b) for b in data[-16:]]
    else:
        tokens = [token(b) for b in data]
    if args.filler:
        merged, i = [], 0
        while i < len(tokens):
            j = i
            while j < len(tokens) and tokens[j] == ".":
                j += 1
            if j - i >= args.filler:
                merged.append("\\{%d}" % (j - i))
                i = j
            else:
                merged.append(tokens[i])
                i += 1
        tokens = merged
    lines, cur = [], []
    for t in tokens:
        cur.append(t)
        if t == "\\n" or len(cur) >= args.width:
            lines.append(cur)
            cur = []
    if cur or not lines:
        lines.append(cur)
    for line in lines:
        if line and line[-1] == " ":
            line[-1] = "\\x20"  # a trailing space is invisible (and editors strip it)
    first = "".join(lines[0])
    if first.startswith("cap="):
        first = "\\x63" + first[1:]  # would be read as the cap= option
    opt = "cap=%d " % cap if cap is not None else ""
    out = ["%s %d %s%s" % (marker, ts, opt, first)]
    out += ["| " + "".join(line) for line in lines[1:]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=int, required=True, help="port to listen on (127.0.0.1)")
    ap.add_argument("--target", type=int, required=True, help="port to forward to (127.0.0.1)")
    ap.add_argument("--out", required=True, help=".seg file to write")
    ap.add_argument("--comment", action="append", default=[], help="'# ' line at the top")
    ap.add_argument("--server-view", action="store_true", help="the traced process is the server")
    ap.add_argument("--real-time", action="store_true", help="elapsed ns instead of step counter")
    ap.add_argument("--step", type=int, default=1000, help="ns per chunk (synthetic clock)")
    ap.add_argument("--width", type=int, default=96, help="raw bytes per line at most")
    ap.add_argument("--cap", type=int, help="mark segments longer than this cap=N")
    ap.add_argument("--keep-uncaptured", action="store_true",
                    help="with --cap, write the bytes past the cap as they were, not as filler")
    ap.add_argument("--filler", type=int, default=0, help="write '.' runs this long as \\{N}")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up")
    ap.add_argument("--max-chunks", type=int, default=100_000)
    args = ap.parse_args()

    deadline = time.monotonic() + args.timeout
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((LOOPBACK, args.listen))
    lsock.listen(1)
    lsock.settimeout(args.timeout)
    print("listening on %s:%d" % (LOOPBACK, args.listen), file=sys.stderr, flush=True)
    client, _ = lsock.accept()
    lsock.close()
    server = socket.create_connection((LOOPBACK, args.target), timeout=args.timeout)

    egress, ingress = (">", "<") if not args.server_view else ("<", ">")
    t0 = time.monotonic_ns()
    step = 0
    lines = ["# " + c for c in args.comment]

    def stamp() -> int:
        nonlocal step
        step += 1
        if args.real_time:
            return max(time.monotonic_ns() - t0, step)
        return step * args.step

    peers = {client: (server, egress), server: (client, ingress)}
    open_socks = [client, server]
    chunks = 0
    while open_socks and chunks < args.max_chunks and time.monotonic() < deadline:
        ready, _, _ = select.select(open_socks, [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        closed = False
        for s in ready:
            data = s.recv(1 << 20)
            if not data:
                closed = True
                break
            chunks += 1
            other, marker = peers[s]
            lines += segment_lines(marker, stamp(), data, args)
            other.sendall(data)
        if closed:
            break
    lines.append("close %d" % stamp())
    for s in (client, server):
        s.close()
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote %s (%d chunks)" % (args.out, chunks), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
