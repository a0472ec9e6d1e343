"""A Zipkin-compatible test collector (Python standard library only).

No real Zipkin server can be installed where tracer's tests run, so this stands in for one. It
validates what it receives as strictly as Zipkin does (lowercase hex ids of 16/32 characters,
required fields, kinds, epoch-microsecond timestamps, integer durations, endpoint shapes,
string tags, gzip bodies) and serves the part of Zipkin's v2 query API the tests read:

  POST /api/v2/spans                  JSON list of spans (Content-Encoding: gzip accepted) -> 202
  GET  /api/v2/services               service names seen (lowercased, sorted)
  GET  /api/v2/spans?serviceName=S    span names of a service
  GET  /api/v2/trace/{traceId}        the spans of one trace (404 when none)
  GET  /api/v2/traces?serviceName=&spanName=&limit=   traces, newest first
  GET  /health

and test controls:

  GET  /test/spans      every accepted span, in arrival order
  POST /test/reset      forget everything
  GET  /test/stats      posts, accepted spans, rejected posts, gzip posts, last error
  POST /test/fault      {"mode": "none"|"500"|"503"|"slow"|"drop", "delay_ms": N}

Usage: zipkin_collector.py [--host 127.0.0.1] [--port 0] [--port-file F]
"""
import argparse
import gzip
import http.server
import ipaddress
import json
import os
import re
import sys
import threading
import time
import urllib.parse
import zlib

HEX16 = re.compile(r"^[0-9a-f]{16}$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
KINDS = {"CLIENT", "SERVER", "PRODUCER", "CONSUMER"}
SPAN_KEYS = {
    "traceId", "id", "parentId", "name", "kind", "timestamp", "duration", "localEndpoint",
    "remoteEndpoint", "annotations", "tags", "debug", "shared",
}
ENDPOINT_KEYS = {"serviceName", "ipv4", "ipv6", "port"}
MAX_SPANS = 200_000


class Invalid(Exception):
    pass


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_endpoint(where, ep):
    if not isinstance(ep, dict):
        raise Invalid(f"{where}: must be an object")
    unknown = set(ep) - ENDPOINT_KEYS
    if unknown:
        raise Invalid(f"{where}: unknown field(s) {sorted(unknown)}")
    if "serviceName" in ep and not isinstance(ep["serviceName"], str):
        raise Invalid(f"{where}.serviceName: must be a string")
    if "ipv4" in ep:
        try:
            ipaddress.IPv4Address(ep["ipv4"])
        except (ipaddress.AddressValueError, ValueError, TypeError):
            raise Invalid(f"{where}.ipv4: {ep['ipv4']!r} is not an IPv4 address")
    if "ipv6" in ep:
        try:
            ipaddress.IPv6Address(ep["ipv6"])
        except (ipaddress.AddressValueError, ValueError, TypeError):
            raise Invalid(f"{where}.ipv6: {ep['ipv6']!r} is not an IPv6 address")
    if "port" in ep and not (_int(ep["port"]) and 1 <= ep["port"] <= 65535):
        raise Invalid(f"{where}.port: {ep['port']!r} is not a port")


def check_span(i, span):
    where = f"span {i}"
    if not isinstance(span, dict):
        raise Invalid(f"{where}: must be an object")
    unknown = set(span) - SPAN_KEYS
    if unknown:
        raise Invalid(f"{where}: unknown field(s) {sorted(unknown)}")
    tid = span.get("traceId")
    if not isinstance(tid, str) or not (HEX16.match(tid) or HEX32.match(tid)) or set(tid) == {"0"}:
        raise Invalid(f"{where}.traceId: {tid!r} is not 16 or 32 lowercase hex characters")
    for key, required in (("id", True), ("parentId", False)):
        if key not in span and not required:
            continue
        v = span.get(key)
        if not isinstance(v, str) or not HEX16.match(v) or set(v) == {"0"}:
            raise Invalid(f"{where}.{key}: {v!r} is not 16 lowercase hex characters")
    if "name" in span and not isinstance(span["name"], str):
        raise Invalid(f"{where}.name: must be a string")
    if "kind" in span and span["kind"] not in KINDS:
        raise Invalid(f"{where}.kind: {span['kind']!r} is not one of {sorted(KINDS)}")
    if "timestamp" in span:
        ts = span["timestamp"]
        # Epoch microseconds: 1e15 is 2001, 1e17 is 5138. Milliseconds or nanoseconds fail.
        if not _int(ts) or not (10**15 <= ts < 10**17):
            raise Invalid(f"{where}.timestamp: {ts!r} is not epoch microseconds")
    if "duration" in span:
        d = span["duration"]
        if not _int(d) or d < 1:
            raise Invalid(f"{where}.duration: {d!r} is not a positive integer of microseconds")
    for key in ("localEndpoint", "remoteEndpoint"):
        if key in span:
            check_endpoint(f"{where}.{key}", span[key])
    if "annotations" in span:
        anns = span["annotations"]
        if not isinstance(anns, list):
            raise Invalid(f"{where}.annotations: must be a list")
        for a in anns:
            if not isinstance(a, dict) or not _int(a.get("timestamp")) or not isinstance(a.get("value"), str):
                raise Invalid(f"{where}.annotations: each needs an integer timestamp and a string value")
    if "tags" in span:
        tags = span["tags"]
        if not isinstance(tags, dict):
            raise Invalid(f"{where}.tags: must be an object")
        for k, v in tags.items():
            if not isinstance(v, str):
                raise Invalid(f"{where}.tags[{k!r}]: {v!r} is not a string")
    for key in ("debug", "shared"):
        if key in span and not isinstance(span[key], bool):
            raise Invalid(f"{where}.{key}: must be a boolean")


class Store:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with getattr(self, "lock", threading.Lock()):
            self.spans = []
            self.stats = {"posts": 0, "accepted_spans": 0, "rejected_posts": 0, "gzip_posts": 0, "last_error": None}
            self.fault = {"mode": "none", "delay_ms": 0}


STORE = Store()


def low64(trace_id):
    return trace_id[-16:]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status, body=b"", content_type="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
            content_type = "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def do_POST(self):
        url = urllib.parse.urlparse(self.path)
        if url.path == "/api/v2/spans":
            return self._post_spans()
        if url.path == "/test/reset":
            self._body()
            STORE.reset()
            return self._reply(200, {"ok": True})
        if url.path == "/test/fault":
            try:
                fault = json.loads(self._body() or b"{}")
                mode = fault.get("mode", "none")
                if mode not in ("none", "500", "503", "slow", "drop"):
                    raise ValueError(mode)
                with STORE.lock:
                    STORE.fault = {"mode": mode, "delay_ms": int(fault.get("delay_ms", 0))}
            except (ValueError, TypeError, AttributeError) as e:
                return self._reply(400, f"bad fault: {e}\n")
            return self._reply(200, {"ok": True})
        self._body()
        self._reply(404, "not found\n")

    def _reject(self, why):
        with STORE.lock:
            STORE.stats["rejected_posts"] += 1
            STORE.stats["last_error"] = why
        print(f"zipkin_collector: rejected a POST: {why}", file=sys.stderr, flush=True)
        self._reply(400, why + "\n")

    def _post_spans(self):
        raw = self._body()
        with STORE.lock:
            STORE.stats["posts"] += 1
            fault = dict(STORE.fault)
        if fault["mode"] == "drop":
            self.close_connection = True
            self.connection.close()
            return
        if fault["mode"] == "slow":
            time.sleep(fault["delay_ms"] / 1000)
        if fault["mode"] in ("500", "503"):
            return self._reply(int(fault["mode"]), "injected fault\n")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            with STORE.lock:
                STORE.stats["rejected_posts"] += 1
                STORE.stats["last_error"] = f"unsupported content type {ctype!r}"
            return self._reply(415, f"unsupported content type {ctype!r}\n")
        if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as e:
                return self._reject(f"bad gzip body: {e}")
            with STORE.lock:
                STORE.stats["gzip_posts"] += 1
        try:
            spans = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return self._reject(f"body is not JSON: {e}")
        if not isinstance(spans, list):
            return self._reject("body must be a JSON list of spans")
        try:
            for i, span in enumerate(spans):
                check_span(i, span)
        except Invalid as e:
            return self._reject(str(e))
        with STORE.lock:
            STORE.spans.extend(spans)
            if len(STORE.spans) > MAX_SPANS:
                del STORE.spans[: len(STORE.spans) - MAX_SPANS]
            STORE.stats["accepted_spans"] += len(spans)
        self._reply(202)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        q = urllib.parse.parse_qs(url.query)
        path = url.path
        with STORE.lock:
            spans = list(STORE.spans)
            stats = dict(STORE.stats)
        if path == "/health":
            return self._reply(200, "OK\n")
        if path == "/test/spans":
            return self._reply(200, spans)
        if path == "/test/stats":
            return self._reply(200, stats)
        if path == "/api/v2/services":
            names = {s.get("localEndpoint", {}).get("serviceName", "").lower() for s in spans}
            return self._reply(200, sorted(n for n in names if n))
        if path == "/api/v2/spans":
            service = (q.get("serviceName") or [""])[0].lower()
            if not service:
                return self._reply(400, "serviceName is required\n")
            names = {
                s.get("name", "").lower()
                for s in spans
                if s.get("localEndpoint", {}).get("serviceName", "").lower() == service
            }
            return self._reply(200, sorted(n for n in names if n))
        if path.startswith("/api/v2/trace/"):
            tid = path[len("/api/v2/trace/"):].lower()
            if not (HEX16.match(tid) or HEX32.match(tid)):
                return self._reply(400, f"{tid!r} is not a trace id\n")
            trace = [s for s in spans if s["traceId"] == tid or (len(tid) == 16 and low64(s["traceId"]) == tid)]
            return self._reply(200, trace) if trace else self._reply(404, "trace not found\n")
        if path == "/api/v2/traces":
            service = (q.get("serviceName") or [""])[0].lower()
            span_name = (q.get("spanName") or [""])[0].lower()
            limit = int((q.get("limit") or ["10"])[0])
            traces = {}
            for s in spans:
                traces.setdefault(s["traceId"], []).append(s)

            def wanted(trace):
                return any(
                    (not service or s.get("localEndpoint", {}).get("serviceName", "").lower() == service)
                    and (not span_name or s.get("name", "").lower() == span_name)
                    for s in trace
                )

            chosen = [t for t in traces.values() if wanted(t)]
            chosen.sort(key=lambda t: max(s.get("timestamp", 0) for s in t), reverse=True)
            return self._reply(200, chosen[:limit])
        self._reply(404, "not found\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9411)
    ap.add_argument("--port-file")
    args = ap.parse_args()
    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(server.server_address[1]))
        os.rename(args.port_file + ".tmp", args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
