"""Self-test of the test collector: it must accept what Zipkin accepts and reject what Zipkin
rejects, or the end-to-end tests prove nothing. Run: python3 -m unittest -v tests/collector/test_zipkin_collector.py
"""
import gzip
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


def span(**over):
    s = {
        "traceId": "0af7651916cd43dd8448eb211c80319c",
        "id": "b7ad6b7169203331",
        "kind": "SERVER",
        "name": "get /cats/{id}",
        "timestamp": 1_700_000_000_000_000,
        "duration": 1234,
        "localEndpoint": {"serviceName": "Cats", "ipv4": "127.0.0.1", "port": 8080},
        "remoteEndpoint": {"ipv6": "::1", "port": 50000},
        "tags": {"http.method": "GET"},
    }
    s.update(over)
    return {k: v for k, v in s.items() if v is not None}


class CollectorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp()
        port_file = os.path.join(cls.tmp, "port")
        cls.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "zipkin_collector.py"), "--port", "0", "--port-file", port_file],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(port_file):
            if time.monotonic() > deadline:
                raise RuntimeError("collector did not start")
            time.sleep(0.02)
        cls.port = int(open(port_file).read())

    @classmethod
    def tearDownClass(cls):
        cls.proc.kill()
        cls.proc.wait()

    def setUp(self):
        self.request("POST", "/test/reset")

    def request(self, method, path, body=None, headers=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def post(self, spans, gz=False, ctype="application/json"):
        body = json.dumps(spans).encode()
        headers = {"Content-Type": ctype}
        if gz:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return self.request("POST", "/api/v2/spans", body, headers)

    def get_json(self, path):
        status, data = self.request("GET", path)
        return status, (json.loads(data) if status == 200 else None)

    def test_valid_span_is_readable_through_the_query_api(self):
        self.assertEqual(self.post([span(), span(id="00000000000000a1", parentId="b7ad6b7169203331", kind="CLIENT", name="get /api")])[0], 202)
        status, trace = self.get_json("/api/v2/trace/0af7651916cd43dd8448eb211c80319c")
        self.assertEqual(status, 200)
        self.assertEqual(len(trace), 2)
        self.assertEqual(self.get_json("/api/v2/trace/8448eb211c80319c")[0], 200, "low 64 bits, as Zipkin")
        self.assertEqual(self.get_json("/api/v2/trace/00000000000000000000000000000001")[0], 404)
        self.assertEqual(self.get_json("/api/v2/services")[1], ["cats"])
        self.assertEqual(self.get_json("/api/v2/spans?serviceName=cats")[1], ["get /api", "get /cats/{id}"])
        self.assertEqual(len(self.get_json("/api/v2/traces?serviceName=cats&limit=10")[1]), 1)
        self.assertEqual(self.get_json("/api/v2/traces?serviceName=dogs")[1], [])
        self.assertEqual(len(self.get_json("/test/spans")[1]), 2)

    def test_gzip_body(self):
        self.assertEqual(self.post([span()], gz=True)[0], 202)
        self.assertEqual(self.get_json("/test/stats")[1]["gzip_posts"], 1)
        status, _ = self.request("POST", "/api/v2/spans", b"not gzip", {"Content-Type": "application/json", "Content-Encoding": "gzip"})
        self.assertEqual(status, 400)

    def test_rejects_what_zipkin_rejects(self):
        bad = {
            "uppercase hex": [span(traceId="0AF7651916CD43DD8448EB211C80319C")],
            "short trace id": [span(traceId="abc")],
            "long span id": [span(id="b7ad6b71692033310")],
            "zero span id": [span(id="0000000000000000")],
            "bad parent": [span(parentId="xyz")],
            "millisecond timestamp": [span(timestamp=1_700_000_000_000)],
            "nanosecond timestamp": [span(timestamp=1_700_000_000_000_000_000)],
            "float duration": [span(duration=12.5)],
            "zero duration": [span(duration=0)],
            "bad kind": [span(kind="server")],
            "non-string tag": [span(tags={"http.status_code": 200})],
            "bad ipv4": [span(localEndpoint={"serviceName": "x", "ipv4": "300.1.1.1"})],
            "bad port": [span(localEndpoint={"port": 70000})],
            "unknown endpoint key": [span(localEndpoint={"host": "x"})],
            "unknown key": [span(foo=1)],
            "missing id": [{k: v for k, v in span().items() if k != "id"}],
            "not a list": span(),
        }
        for why, body in bad.items():
            with self.subTest(why):
                self.assertEqual(self.post(body)[0], 400)
        self.assertEqual(self.post([span()], ctype="application/x-protobuf")[0], 415)
        self.assertEqual(self.get_json("/test/spans")[1], [])
        self.assertEqual(self.get_json("/test/stats")[1]["rejected_posts"], len(bad) + 1)

    def test_faults(self):
        self.request("POST", "/test/fault", json.dumps({"mode": "503"}).encode(), {"Content-Type": "application/json"})
        self.assertEqual(self.post([span()])[0], 503)
        self.request("POST", "/test/fault", json.dumps({"mode": "slow", "delay_ms": 300}).encode(), {"Content-Type": "application/json"})
        t = time.monotonic()
        self.assertEqual(self.post([span()])[0], 202)
        self.assertGreaterEqual(time.monotonic() - t, 0.3)
        self.request("POST", "/test/fault", json.dumps({"mode": "drop"}).encode(), {"Content-Type": "application/json"})
        with self.assertRaises((http.client.HTTPException, OSError)):
            self.post([span()])
        self.request("POST", "/test/fault", json.dumps({"mode": "none"}).encode(), {"Content-Type": "application/json"})
        self.assertEqual(self.post([span()])[0], 202)
        self.assertEqual(len(self.get_json("/test/spans")[1]), 2)

    def test_reset(self):
        self.post([span()])
        self.request("POST", "/test/reset")
        self.assertEqual(self.get_json("/test/spans")[1], [])


if __name__ == "__main__":
    unittest.main()
