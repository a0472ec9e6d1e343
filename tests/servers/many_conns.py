"""Connection load for the scale test: many concurrent kept-alive connections, then churn.

Usage: many_conns.py PORT OPEN CHURN
Opens OPEN connections (source addresses 127.0.0.2-127.0.0.9, so the client's ephemeral ports
do not run out), sends one GET / on each and reads its response, and keeps them all open; prints
"open N" and waits for a line on stdin. Then closes them all, prints "closed", and makes CHURN
more connections one after another, each with one request and then closed; prints "churned N".
Every loop is bounded by its count; any error exits non-zero.
"""
import resource
import socket
import sys

REQUEST = b"GET / HTTP/1.1\r\nHost: scale\r\n\r\n"


def one_request(sock):
    sock.sendall(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed before the response")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed in the body")
        body += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head[:40])


def connect(port, i):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((f"127.0.0.{2 + i % 8}", 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def main():
    port, n_open, n_churn = (int(a) for a in sys.argv[1:4])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n_open + 1000
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    socks = []
    for i in range(n_open):
        sock = connect(port, i)
        one_request(sock)
        socks.append(sock)
    print(f"open {len(socks)}", flush=True)
    sys.stdin.readline()
    for sock in socks:
        sock.close()
    print("closed", flush=True)
    for i in range(n_churn):
        sock = connect(port, i)
        one_request(sock)
        sock.close()
    print(f"churned {n_churn}", flush=True)


if __name__ == "__main__":
    main()
