"""A client whose reads are interrupted by signals, for the test that the tracer's injector never
makes a blocking read fail. A 5 ms interval timer (as a sampling profiler sets) fires while the
client waits for answers that take 200 ms, on three kept-alive connections: a blocking socket,
one made with a timeout and switched to blocking after it connected, and one with a timeout
(which Python runs non-blocking). Connects once GO_FILE exists; prints one JSON object: per
connection, the reads that failed with EAGAIN and whether its request carried a traceparent.

Usage: signal_client.py PORT GO_FILE
"""
import json
import os
import signal
import socket
import sys
import time


def read_response(sock):
    """One response with Content-Length; reads failed with EAGAIN are counted, and retried."""
    data, failed = b"", 0
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + length_of(data):
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            failed += 1
            continue
        if not chunk:
            raise SystemExit("the server closed the connection")
        data += chunk
    return data, failed


def length_of(data):
    head = data[: data.index(b"\r\n\r\n")].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value.strip())
    return 0


def case(port, timeout, blocking_after):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if blocking_after:
        s.settimeout(None)
    s.sendall(b"GET /headers HTTP/1.1\r\nHost: t\r\n\r\n")
    answer, failed = read_response(s)
    traceparent = b"traceparent" in answer.lower()
    # The agent takes a socket found blocking out of the socket map when the sk_msg program
    # wakes it; leave it the time.
    time.sleep(0.2)
    signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)
    for _ in range(5):
        s.sendall(b"GET /slow-body/200 HTTP/1.1\r\nHost: t\r\n\r\n")
        failed += read_response(s)[1]
    signal.setitimer(signal.ITIMER_REAL, 0)
    s.close()
    return {"eagain": failed, "traceparent": traceparent}


def main():
    port, go = int(sys.argv[1]), sys.argv[2]
    signal.signal(signal.SIGALRM, lambda *_: None)
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("no go file")
        time.sleep(0.02)
    results = {
        "blocking": case(port, None, False),
        "blocking_after_connect": case(port, 10, True),
        "timeout": case(port, 10, False),
    }
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
