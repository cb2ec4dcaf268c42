"""An HTTP server for test hosts: answers every GET with a fixed body. Unlike `python -m http.server` it
does no reverse DNS lookup of its address at start (which would hang in a namespace without DNS)."""

import hashlib
import json
import socketserver
import sys
from http.server import BaseHTTPRequestHandler


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = sys.argv[3].encode() + b"\n"
        if (auth := self.headers.get("Authorization")) is not None:
            # What the egress tests check, without echoing the value back into the sandbox: its hash.
            body = json.dumps({"authorization_sha256": hashlib.sha256(auth.encode()).hexdigest(),
                               "has_placeholder": "${" in auth, "host": self.headers.get("Host")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), Handler) as server:
        server.serve_forever()
