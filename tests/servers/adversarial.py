"""Malformed and adversarial HTTP over loopback, for the bad-input test: a server that answers
whatever heads it can find and sends broken responses on request, and a client that sends
broken requests and asks for the broken responses, one connection a case. The client shuts
down its sending side after each case's bytes, then reads until the server closes.

Usage: adversarial.py server PORT_FILE LOG_FILE
       adversarial.py client PORT GO_FILE

The server logs one JSON line per connection (the client's port, bytes received, their SHA-256
with anything shaped like the trace context header the tracer adds taken out, and counted;
heads answered); the client prints
one JSON object: per case, its port, what it sent (hashed the same way), what came back and,
for a broken response, what the server sent.
"""
import hashlib
import json
import os
import random
import re
import socket
import sys
import threading
import time

# What the tracer's injector adds to a request: one header line after the request line.
INJECTED = re.compile(rb"(?<=\r\n)traceparent: 00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-9a-f]\r\n")

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# Broken responses, asked for with GET /case/NAME; the connection closes after each.
RNG = random.Random(20261128)
BROKEN = {
    "truncated-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"f" * 40 + b"\r\nhello\r\n0\r\n\r\n",
    "length-overflow": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999999\r\n\r\nab",
    "length-conflict": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\nok",
    "short-body": b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nabc",
    "status-garbage": b"HTTP/1.1 2x0 \xff\xfe\r\nContent-Length: 2\r\n\r\nok",
    "huge-header": b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\nok",
    "no-crlf": b"HTTP/1.1 200 OK" + b"n" * (256 << 10),
    "garbage": RNG.randbytes(1 << 20),
    "nul-bytes": b"HTTP/1.1 200 OK\r\n\x00\x00\x00: \x00\r\nContent-Length: 2\r\n\r\nok",
}


def serve(conn, peer_port, log, lock):
    received = bytearray()
    heads = 0
    pending = b""  # bytes after the last complete head: its request line and last bytes
    closing = False
    with conn:
        while not closing:
            data = conn.recv(1 << 16)
            if not data:
                break
            received += data
            pending += data
            answers = []
            start = 0
            while True:
                end = pending.find(b"\r\n\r\n", start)
                if end < 0:
                    break
                target = pending[start:end].split(b"\r\n", 1)[0].split(b" ")[1:2]
                start = end + 4
                heads += 1
                name = target[0][len(b"/case/") :].decode("latin-1") if target and target[0].startswith(b"/case/") else None
                if name in BROKEN:
                    answers.append(BROKEN[name])
                    closing = True
                    break
                answers.append(OK)
            pending = pending[start:]
            if len(pending) > 1 << 16:
                pending = pending[:256] + pending[-3:]
            if answers:
                conn.sendall(b"".join(answers))
        if closing:
            conn.shutdown(socket.SHUT_WR)
            # What the client still sends is read, so that the close is not a reset.
            while conn.recv(1 << 16):
                pass
    data, headers = INJECTED.subn(b"", bytes(received))
    line = {"port": peer_port, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "heads": heads, "context_headers": headers}
    with lock:
        log.write(json.dumps(line) + "\n")
        log.flush()


def server(port_file, log_file):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    log = open(log_file, "a")
    lock = threading.Lock()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(listener.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    while True:
        conn, peer = listener.accept()
        threading.Thread(target=serve, args=(conn, peer[1], log, lock), daemon=True).start()


def request(path, extra=b""):
    return b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n"


def cases():
    rng = random.Random(7)
    pipelined = request(b"/p") * 100_000
    yield "huge-header", request(b"/huge", b"X-Huge: " + b"a" * (1 << 20) + b"\r\n")
    yield "many-headers", request(b"/many", b"".join(b"X-%d: v\r\n" % i for i in range(10_000)))
    yield "no-crlf", b"GET /" + b"a" * (256 << 10)
    yield "bare-lf", b"GET /lf HTTP/1.1\nHost: t\n\n" * 1000
    yield "garbage", rng.randbytes(1 << 20)
    yield "garbage-then-http", rng.randbytes(64 << 10) + request(b"/after-garbage") * 10
    yield "nul-and-high-bytes", request(b"/\x00\xff\x80", b"X-\x00: \xff\r\n") + request(b"/ok-after-nul")
    yield "request-length-overflow", b"POST /big HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\nab"
    yield "request-truncated-chunks", b"POST /chunks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"
    yield "pipelined-100k", pipelined
    for value in [
        b"zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
        b"00-XBF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" + b"x" * 4000,
    ]:
        yield "bad-traceparent", request(b"/tp", b"traceparent: " + value + b"\r\n")
    for name in BROKEN:
        yield "response-" + name, request(b"/case/" + name.encode())


def run_case(port, payload, duplex):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    local_port = s.getsockname()[1]

    def send():
        try:
            view = memoryview(payload)
            while view:
                n = s.send(view[: 64 << 10])
                view = view[n:]
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server closed first (a broken response ends the connection)

    # Only the pipelined case needs to read while it writes (the server answers as it reads);
    # the others write first, as one thread, so that the tracer sees each request sent before
    # its answer is read (two threads of a client are not ordered on one connection).
    writer = threading.Thread(target=send)
    if duplex:
        writer.start()
    else:
        writer.run()
    got = hashlib.sha256()
    count = 0
    while True:
        data = s.recv(1 << 16)
        if not data:
            break
        got.update(data)
        count += len(data)
    if duplex:
        writer.join()
    s.close()
    sent, headers = INJECTED.subn(b"", payload)
    return {
        "port": local_port,
        "sent_bytes": len(sent),
        "sent_sha256": hashlib.sha256(sent).hexdigest(),
        "context_headers": headers,
        "received_bytes": count,
        "received_sha256": got.hexdigest(),
    }


def client(port, go):
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("no go file")
        time.sleep(0.05)
    results = []
    for name, payload in cases():
        result = run_case(port, payload, duplex=name == "pipelined-100k")
        result["case"] = name
        broken = BROKEN.get(name.removeprefix("response-"))
        if name.startswith("response-"):
            result["expected_sha256"] = hashlib.sha256(broken).hexdigest()
        results.append(result)
    # A plain request at the end: the tracer still works after all the above.
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(request(b"/after"))
    answer = s.recv(1 << 16)
    s.close()
    print(json.dumps({"cases": results, "after": answer.decode("latin-1")}))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2], sys.argv[3])
    else:
        client(int(sys.argv[2]), sys.argv[3])
