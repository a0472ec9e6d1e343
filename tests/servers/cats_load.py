"""Bounded load for the cats app: TOTAL requests from CONCURRENCY clients, each over its own
kept-alive connection, stopping after TIMEOUT seconds whatever happened. Every response body
is compared byte for byte with what the app answers untraced. Prints one JSON summary line.

Usage: cats_load.py HOST PORT TOTAL CONCURRENCY TIMEOUT [FIRST_ID]
"""
import http.client
import json
import sys
import threading
import time


def expected_body(cat_id):
    doc = {"image_bytes": 3004, "record": {"id": str(cat_id), "name": "cat-" + str(cat_id)}}
    return json.dumps(doc).encode()


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    total, concurrency, timeout = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    first = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    deadline = time.monotonic() + timeout
    next_id = [first]
    lock = threading.Lock()
    summary = {"sent": 0, "ok": 0, "mismatched": 0, "errors": 0, "statuses": {}}

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=10)
        while time.monotonic() < deadline:
            with lock:
                if next_id[0] >= first + total:
                    break
                cat_id = next_id[0]
                next_id[0] += 1
                summary["sent"] += 1
            try:
                conn.request("GET", "/cats/%d" % cat_id)
                resp = conn.getresponse()
                body = resp.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
                with lock:
                    summary["errors"] += 1
                continue
            with lock:
                key = str(resp.status)
                summary["statuses"][key] = summary["statuses"].get(key, 0) + 1
                if resp.status == 200 and body == expected_body(cat_id):
                    summary["ok"] += 1
                elif resp.status == 200:
                    summary["mismatched"] += 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
