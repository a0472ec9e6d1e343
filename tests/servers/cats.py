"""Cats as a service: a small multi-tier app for tracer's distributed tracing tests.

Python standard library only. Every tier is a ThreadingHTTPServer with keep-alive; a handler
thread calls the next tiers over keep-alive connections of its own (one per upstream), as a
thread-per-request service with a connection pool would.

  front  GET /cats/ID         -> api GET /api/cats/ID
  api    GET /api/cats/ID     -> images GET /images/ID, then store GET /store/cats/ID
  images GET /images/ID       a few KB of "image"
  store  GET /store/cats/ID   a JSON record; ID 0 answers 500 (an error path)

Usage: cats.py ROLE --port P [--upstream NAME=HOST:PORT ...] [--port-file F]
"""
import argparse
import http.client
import http.server
import json
import os
import threading

UPSTREAMS = {}
_local = threading.local()


def call(name, path):
    """GET path on upstream `name` over this thread's kept-alive connection."""
    host, port = UPSTREAMS[name]
    conns = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    for attempt in range(2):
        conn = conns.get(name)
        if conn is None:
            conn = conns[name] = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, body
        except (http.client.HTTPException, OSError):
            conn.close()
            conns.pop(name, None)
            if attempt == 1:
                raise
    raise RuntimeError("unreachable")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    role = None

    def log_message(self, *args):
        pass

    def _send(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        try:
            if self.role == "front" and parts[:1] == ["cats"] and len(parts) == 2:
                status, body = call("api", "/api/cats/" + parts[1])
                self._send(status, body)
            elif self.role == "api" and parts[:2] == ["api", "cats"] and len(parts) == 3:
                cat_id = parts[2]
                img_status, img = call("images", "/images/" + cat_id)
                rec_status, rec = call("store", "/store/cats/" + cat_id)
                status = max(img_status, rec_status)
                doc = {"image_bytes": len(img), "record": json.loads(rec) if rec_status == 200 else None}
                self._send(status, json.dumps(doc).encode())
            elif self.role == "images" and parts[:1] == ["images"] and len(parts) == 2:
                self._send(200, b"\x89PNG" + b"c" * 3000, "image/png")
            elif self.role == "store" and parts[:2] == ["store", "cats"] and len(parts) == 3:
                if parts[2] == "0":
                    self._send(500, b'{"error":"no such cat"}')
                else:
                    self._send(200, json.dumps({"id": parts[2], "name": "cat-" + parts[2]}).encode())
            else:
                self._send(404, b'{"error":"not found"}')
        except Exception as e:  # an upstream failure is a 502, as a real gateway answers
            self._send(502, json.dumps({"error": str(e)}).encode())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["front", "api", "images", "store"])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--port-file")
    ap.add_argument("--upstream", action="append", default=[])
    args = ap.parse_args()
    for spec in args.upstream:
        name, addr = spec.split("=", 1)
        host, port = addr.rsplit(":", 1)
        UPSTREAMS[name] = (host, int(port))
    Handler.role = args.role
    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.request_queue_size = 128
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(server.server_address[1]))
        os.rename(args.port_file + ".tmp", args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
