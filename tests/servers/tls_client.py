"""HTTPS client for the TLS tests: one keep-alive connection (Python's ssl module, i.e.
OpenSSL's SSL_write_ex/SSL_read_ex), a fixed number of requests, each response read whole.

Usage: tls_client.py PORT COUNT [--wait S] [--traceparent TP]
--wait: seconds to wait after connecting (and completing the handshake) before the first
request, so the tracer can find this process's libssl first.
Prints one status per line; exits non-zero on any error.
"""

import argparse
import http.client
import ssl
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--wait", type=float, default=0.0)
    ap.add_argument("--traceparent")
    args = ap.parse_args()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", args.port, context=ctx, timeout=10)
    conn.connect()
    time.sleep(args.wait)
    for i in range(args.count):
        headers = {}
        if args.traceparent and i == 0:
            headers["traceparent"] = args.traceparent
        path = "/status/500" if i == args.count - 1 else f"/bytes/{100 + i}"
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        print(resp.status, flush=True)
    conn.close()


if __name__ == "__main__":
    sys.exit(main())
