#!/usr/bin/env python3
"""A webhook receiver that checks the sidecar's signatures (standard library only).

    WEBHOOK_SECRET=... python3 webhook_receiver.py 8099

Point a ``[[webhooks]]`` entry at http://HOST:8099/ with the same secret.
Each delivery is printed as one line; a bad signature gets 401, and a
repeated event id (a retry after a lost answer) is acknowledged again but
handled only once.
"""

import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

SECRET = os.environ["WEBHOOK_SECRET"].encode()
TOLERANCE_S = 300  # refuse signatures older than five minutes (replays)
seen: set[str] = set()  # use a database in production


def verify(header: str, body: bytes) -> bool:
    """Captions-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>"""
    fields = [item.split("=", 1) for item in header.split(",") if "=" in item]
    timestamps = [v for k, v in fields if k.strip() == "t"]
    macs = [v for k, v in fields if k.strip() == "v1"]
    if not timestamps or not timestamps[0].isdigit():
        return False
    if abs(time.time() - int(timestamps[0])) > TOLERANCE_S:
        return False
    expected = hmac.new(SECRET, timestamps[0].encode() + b"." + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, mac) for mac in macs)


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if not verify(self.headers.get("Captions-Signature", ""), body):
            self.send_response(401)
            self.end_headers()
            print("refused: bad signature", flush=True)
            return
        event = json.loads(body)
        self.send_response(204)  # answer quickly; do slow work elsewhere
        self.end_headers()
        if event["id"] in seen:
            return
        seen.add(event["id"])
        print(f"verified {event['type']} {event['id']} room={event['room']}", flush=True)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8099
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
