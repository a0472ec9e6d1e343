"""A client that sends awkward requests, for the injection safety test. It connects only once
--go-file exists (so that the tracer, attached meanwhile, sees its connections being made),
then prints one JSON line per case: what the server says it received.

Usage: inject_client.py PORT GO_FILE
"""
import hashlib
import json
import os
import select
import socket
import sys
import time


def read_response(f):
    """One HTTP/1.1 response with Content-Length from a socket file: (status, body)."""
    status = int(f.readline().split()[1])
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, f.read(length)


def connect(port, nodelay=True):
    # With a timeout, which Python implements on a non-blocking socket: the tracer adds no
    # header on blocking sockets (see the test `injection_never_fails_a_blocking_read`).
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if nodelay:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s, s.makefile("rb")


def main():
    port, go = int(sys.argv[1]), sys.argv[2]
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("no go file")
        time.sleep(0.02)
    results = {}
    s, f = connect(port)

    # A plain request in one write.
    s.sendall(b"GET /inspect HTTP/1.1\r\nHost: t\r\nX-Case: plain\r\n\r\n")
    results["plain"] = json.loads(read_response(f)[1])

    # The head split over three writes: the end of the head is not in the first send.
    for part in (b"GET /inspect HTTP/1.1\r\nHo", b"st: t\r\nX-Case: split\r\n", b"\r\n"):
        s.sendall(part)
        time.sleep(0.05)
    results["split"] = json.loads(read_response(f)[1])

    # Two pipelined requests in one write.
    s.sendall(b"GET /inspect HTTP/1.1\r\nHost: t\r\nX-Case: pipe1\r\n\r\nGET /inspect HTTP/1.1\r\nHost: t\r\nX-Case: pipe2\r\n\r\n")
    results["pipe1"] = json.loads(read_response(f)[1])
    results["pipe2"] = json.loads(read_response(f)[1])

    # A request that already carries a traceparent.
    own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    s.sendall(b"GET /inspect HTTP/1.1\r\nHost: t\r\ntraceparent: " + own.encode() + b"\r\nX-Case: own\r\n\r\n")
    results["own"] = json.loads(read_response(f)[1])

    # A large POST in one write (many sk_msg pieces): the body must arrive intact.
    body = bytes(range(256)) * 4096  # 1 MiB
    head = b"POST /inspect HTTP/1.1\r\nHost: t\r\nX-Case: large\r\nContent-Length: %d\r\n\r\n" % len(body)
    s.sendall(head + body)
    results["large"] = json.loads(read_response(f)[1])
    results["large"]["sent_sha256"] = hashlib.sha256(body).hexdigest()

    # The same from a non-blocking socket, as an event loop sends: partial sends, waits for
    # room, the rest of the message next time.
    body = os.urandom(2 << 20)
    data = b"POST /inspect HTTP/1.1\r\nHost: t\r\nX-Case: nonblocking\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    s.setblocking(False)
    view = memoryview(data)
    deadline = time.monotonic() + 30
    while view:
        if time.monotonic() > deadline:
            sys.exit("the non-blocking send made no progress for 30 s")
        try:
            view = view[s.send(view):]
        except BlockingIOError:
            select.select([], [s], [], 1.0)
    s.settimeout(30)
    results["nonblocking"] = json.loads(read_response(f)[1])
    results["nonblocking"]["sent_sha256"] = hashlib.sha256(body).hexdigest()
    s.close()

    # Nagle's algorithm left on (the socket default, which Java's and many other clients keep):
    # a request the header split into two segments would have its second one held until the
    # first is acknowledged, which a server acknowledges with its response, up to 40 ms later
    # (delayed ACK). Every request of a kept-alive connection would wait that long.
    s, f = connect(port, nodelay=False)
    latencies, contexts = [], []
    for i in range(20):
        t = time.monotonic()
        s.sendall(b"GET /inspect HTTP/1.1\r\nHost: t\r\nX-Case: nagle\r\n\r\n")
        seen = json.loads(read_response(f)[1])
        latencies.append((time.monotonic() - t) * 1000)
        contexts.append(sum(h[0].lower() == "traceparent" for h in seen["headers"]))
    # A body that is not small, in the same write as its head: 40 KB is less than a loopback
    # segment (64 KiB), so a request split in two would wait for a delayed ACK too.
    body = os.urandom(40000)
    head = b"POST /inspect HTTP/1.1\r\nHost: t\r\nX-Case: medium\r\nContent-Length: %d\r\n\r\n" % len(body)
    medium_latencies = []
    for i in range(5):
        t = time.monotonic()
        s.sendall(head + body)
        results["medium"] = json.loads(read_response(f)[1])
        medium_latencies.append((time.monotonic() - t) * 1000)
    results["medium"]["latencies_ms"] = medium_latencies
    results["medium"]["sent_sha256"] = hashlib.sha256(body).hexdigest()
    s.close()
    results["nagle"] = {"latencies_ms": latencies, "traceparents": contexts}
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
