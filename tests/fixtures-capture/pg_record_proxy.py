#!/usr/bin/env python3
"""Record real TCP conversations as tracer `.seg` fixtures.

A small TCP proxy: it listens on 127.0.0.1:PORT, forwards every accepted connection to the
real server (loopback only) and writes each chunk it receives as one `.seg` line, seen from the
CLIENT (client->server is `>`, the client wrote it; server->client is `<`, the client read it).
With --server-view the directions are flipped: the fixture is then what the server process saw.

Timestamps are synthetic: each chunk is 1000 ns after the previous one; a `close TS` line ends
the file. Payload bytes use the escapes of tracer-user/src/protocols/fixture.rs (\\r \\n \\t
\\\\ \\xHH); long lines go on `| ` continuation lines.

Example (record one psql session):
    python3 pg_record_proxy.py --listen 54400 --target 127.0.0.1:54329 --out /tmp/x.seg &
    psql "host=127.0.0.1 port=54400 user=app dbname=appdb" -c 'SELECT 1'

Every loop is bounded: at most --conns connections, and the whole run ends after --timeout
seconds even if a connection stays open.
"""

import argparse
import select
import socket
import sys
import threading
import time

LINE_WIDTH = 100


def escape(data: bytes) -> list[str]:
    """The escaped payload, cut into pieces of about LINE_WIDTH characters."""
    pieces: list[str] = []
    cur = ""
    for i, b in enumerate(data):
        if b == 0x5C:
            e = "\\\\"
        elif b == 0x0D:
            e = "\\r"
        elif b == 0x0A:
            e = "\\n"
        elif b == 0x09:
            e = "\\t"
        elif 0x20 <= b < 0x7F:
            e = chr(b)
        else:
            e = "\\x%02x" % b
        cur += e
        if len(cur) >= LINE_WIDTH or (b == 0x0A and len(cur) >= LINE_WIDTH // 2):
            pieces.append(cur)
            cur = ""
    if cur or not pieces:
        pieces.append(cur)
    fixed = []
    for p in pieces:
        # Trailing blanks would be lost by editors, and a blank continuation is skipped by the
        # fixture parser: spell them out.
        stripped = p.rstrip(" ")
        p = stripped + "\\x20" * (len(p) - len(stripped))
        fixed.append(p)
    # A payload starting with "cap=" would read as the capture option.
    if fixed[0].startswith("cap="):
        fixed[0] = "\\x63" + fixed[0][1:]
    return fixed


class Recorder:
    def __init__(self, path: str, server_view: bool):
        self.out = open(path, "w", encoding="ascii")
        self.ts = 0
        self.server_view = server_view
        self.lock = threading.Lock()

    def chunk(self, from_client: bool, data: bytes) -> None:
        with self.lock:
            self.ts += 1000
            sym = ">" if from_client != self.server_view else "<"
            pieces = escape(data)
            self.out.write(f"{sym} {self.ts} {pieces[0]}\n")
            for p in pieces[1:]:
                self.out.write(f"| {p}\n")

    def close(self) -> None:
        with self.lock:
            self.ts += 1000
            self.out.write(f"close {self.ts}\n")
            self.out.close()


def relay(client: socket.socket, target: tuple[str, int], rec: Recorder, deadline: float) -> None:
    server = socket.create_connection(target, timeout=10)
    open_ = {client: True, server: True}
    peer = {client: server, server: client}
    try:
        while any(open_.values()) and time.monotonic() < deadline:
            socks = [s for s, o in open_.items() if o]
            ready, _, _ = select.select(socks, [], [], 0.5)
            for s in ready:
                data = s.recv(65536)
                if not data:
                    open_[s] = False
                    try:
                        peer[s].shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    # A closed client ends the recording: the server has nothing more to say.
                    if s is client:
                        open_[server] = False
                    continue
                rec.chunk(s is client, data)
                peer[s].sendall(data)
    finally:
        rec.close()
        client.close()
        server.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    ap.add_argument("--target", required=True, help="HOST:PORT of the real server (loopback)")
    ap.add_argument("--out", required=True, help="output path; {n} is the connection number")
    ap.add_argument("--conns", type=int, default=1, help="connections to record, then exit")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before giving up")
    ap.add_argument("--server-view", action="store_true", help="write the server's view")
    args = ap.parse_args()
    host, port = args.target.rsplit(":", 1)
    if not host.startswith("127.") and host not in ("localhost", "::1"):
        print("only loopback targets are allowed", file=sys.stderr)
        return 2
    target = (host, int(port))
    deadline = time.monotonic() + args.timeout
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", args.listen))
    lsock.listen(8)
    lsock.settimeout(0.5)
    threads = []
    n = 0
    while n < args.conns and time.monotonic() < deadline:
        try:
            client, _ = lsock.accept()
        except socket.timeout:
            continue
        n += 1
        path = args.out.replace("{n}", str(n))
        t = threading.Thread(target=relay, args=(client, target, Recorder(path, args.server_view), deadline))
        t.start()
        threads.append(t)
    lsock.close()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
