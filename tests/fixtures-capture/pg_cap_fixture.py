#!/usr/bin/env python3
"""Shrink the big segments of a `.seg` fixture the way the kernel capture would see them.

Every segment longer than --min bytes becomes `cap=N` with its first N bytes kept, the bytes
that the capture would not see replaced by `\\{K}` filler, and its last 16 bytes kept (the
`tail` the kernel reports). Short segments, comments and `close` lines are copied as they are.

    pg_cap_fixture.py --cap 64 --min 512 big.seg > small.seg
"""

import argparse
import sys

from pg_record_proxy import escape

TAIL = 16


def unescape(text: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("latin-1")
            i += 1
            continue
        e = text[i + 1]
        if e in "rnt\\":
            out += {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}[e]
            i += 2
        elif e == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        elif e == "{":
            end = text.index("}", i)
            out += b"." * int(text[i + 2 : end])
            i = end + 1
        else:
            raise ValueError(f"unknown escape \\{e}")
    return bytes(out)


def parse(lines):
    """Yields ('seg', sym, ts, cap, bytes) or ('raw', line)."""
    cur = None
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith("|"):
            cur[4].extend(unescape(line[2:] if line.startswith("| ") else line[1:]))
            continue
        if cur:
            yield cur
            cur = None
        if line[:2] in ("< ", "> "):
            sym, rest = line[0], line[2:]
            ts, _, payload = rest.partition(" ")
            cap = None
            if payload.startswith("cap="):
                opt, _, payload = payload.partition(" ")
                cap = int(opt[4:])
            cur = ["seg", sym, ts, cap, bytearray(unescape(payload))]
        else:
            yield ["raw", line]
    if cur:
        yield cur


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap", type=int, required=True)
    ap.add_argument("--min", type=int, default=512)
    ap.add_argument("file")
    args = ap.parse_args()
    with open(args.file, encoding="ascii") as f:
        items = list(parse(f))
    w = sys.stdout.write
    for item in items:
        if item[0] == "raw":
            w(item[1] + "\n")
            continue
        _, sym, ts, cap, data = item
        data = bytes(data)
        if cap is None and len(data) > max(args.min, args.cap + TAIL):
            head, tail = data[: args.cap], data[-TAIL:]
            filler = len(data) - len(head) - len(tail)
            pieces = escape(head)
            pieces[-1] += "\\{%d}" % filler
            pieces += escape(tail)
            w(f"{sym} {ts} cap={args.cap} {pieces[0]}\n")
        else:
            pieces = escape(data)
            opt = f"cap={cap} " if cap is not None else ""
            w(f"{sym} {ts} {opt}{pieces[0]}\n")
        for p in pieces[1:]:
            w(f"| {p}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
