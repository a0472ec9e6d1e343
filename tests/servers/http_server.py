"""HTTP/1.1 test server for tracer's end-to-end tests (Python standard library only).

ThreadingHTTPServer with keep-alive. Routes:
  /hello                 200, small Content-Length body
  /status/N              status N (a short body unless N is 204 or 304)
  /bytes/N               200 with an N-byte body (larger than the tracer's capture)
  /slow-body/MS          200, Content-Length body sent in two halves MS milliseconds apart
  /chunked/MS            200, chunked body: two chunks MS milliseconds apart, then the last-chunk
  /users/ID?token=...    200 (a high-cardinality path with a credential in the query)
  POST /echo-size        200, reads a Content-Length request body, answers its size
  GET|POST /inspect      200, JSON of the request as received: line, headers, body length/sha256
  /headers               200, the request headers as received (to check injected context)
  /proxy/PORT/PATH       calls http://127.0.0.1:PORT/PATH (a kept-alive connection per thread)
                         and answers with its status: a front tier calling a back tier
  /count                 200, the number of requests this server answered before (the
                         benchmark counts on the server side)
  /exec                  200, then (with --exec PROGRAM) the process execs PROGRAM running
                         this server again on the same port: same pid, another program
  /exec-keep             the same, but the connection it came on survives the exec: the new
                         program goes on serving it (same pid, fd and socket)
Writes its port to --port-file once listening. Binds 127.0.0.1 only.
"""
import argparse
import hashlib
import os
import json
import socket
import http.client
import http.server
import threading
import time

_upstream = threading.local()
EXEC_PROGRAM = None
_served = 0
_served_lock = threading.Lock()


def call_upstream(port, path):
    conns = getattr(_upstream, "conns", None)
    if conns is None:
        conns = _upstream.conns = {}
    for attempt in range(2):
        conn = conns.get(port)
        if conn is None:
            conn = conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except (http.client.HTTPException, OSError):
            conn.close()
            del conns[port]
            if attempt:
                raise


class Server(http.server.ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a load generator opening 50 connections at once
    # overflowed it, and the dropped SYNs' one-second retransmit became the p99 latency.
    request_queue_size = 128


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle's algorithm and the
        # client's delayed ACK add 40 ms to every kept-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status not in (204, 304) and self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        global _served
        path = self.path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        if path == "/count":
            with _served_lock:
                n = _served
            self._send(200, str(n).encode())
            return
        with _served_lock:
            _served += 1
        if path == "/hello":
            self._send(200, b"hello\n")
        elif path in ("/exec", "/exec-keep") and EXEC_PROGRAM:
            self._send(200, b"exec\n")
            self.wfile.flush()
            # The listening and accepted sockets are close-on-exec (Python's default): the new
            # program binds the port again, and takes over this connection if asked to.
            port = self.server.server_address[1]
            argv = [EXEC_PROGRAM, __file__, "--port", str(port)]
            if path == "/exec-keep":
                fd = self.connection.fileno()
                os.set_inheritable(fd, True)
                argv += ["--serve-fd", str(fd)]
            os.execv(EXEC_PROGRAM, argv)
        elif parts[0] == "status" and len(parts) == 2:
            self._send(int(parts[1]), b"status\n")
        elif parts[0] == "bytes" and len(parts) == 2:
            self._send(200, b"x" * int(parts[1]))
        elif parts[0] == "slow-body" and len(parts) == 2:
            body = b"y" * 20000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:10000])
            self.wfile.flush()
            time.sleep(int(parts[1]) / 1000)
            self.wfile.write(body[10000:])
        elif parts[0] == "chunked" and len(parts) == 2:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"6\r\nchunk1\r\n")
            self.wfile.flush()
            time.sleep(int(parts[1]) / 1000)
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (3000, b"z" * 3000))
        elif parts[0] == "proxy" and len(parts) >= 3:
            status = call_upstream(int(parts[1]), "/" + "/".join(parts[2:]))
            self._send(status, b"proxied\n")
        elif path == "/headers":
            self._send(200, str(self.headers).encode())
        elif path == "/inspect":
            doc = {"request_line": self.requestline, "headers": [[k, v] for k, v in self.headers.items()]}
            self._send(200, json.dumps(doc).encode())
        elif parts[0] == "users":
            self._send(200, b"user\n")
        else:
            self._send(404, b"not found\n")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        if self.path == "/inspect":
            # What arrived, exactly: the request line, the headers in order, and the body's
            # length and digest (to prove that what the tracer adds leaves the rest intact).
            doc = {
                "request_line": self.requestline,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body_len": len(data),
                "body_sha256": hashlib.sha256(data).hexdigest(),
            }
            self._send(200, json.dumps(doc).encode())
            return
        self._send(200, str(len(data)).encode())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    ap.add_argument("--tls-key", help="and this private key (PEM)")
    ap.add_argument("--exec", help="program to exec on GET /exec (a copy of the Python binary)")
    ap.add_argument("--serve-fd", type=int, help="a connection inherited across /exec-keep, to serve")
    args = ap.parse_args()
    global EXEC_PROGRAM
    EXEC_PROGRAM = args.exec
    server = Server(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.tls_cert:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    if args.serve_fd is not None:
        conn = socket.socket(fileno=args.serve_fd)
        threading.Thread(
            target=Handler, args=(conn, conn.getpeername(), server), daemon=True
        ).start()
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(server.server_address[1]))
        os.rename(args.port_file + ".tmp", args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
