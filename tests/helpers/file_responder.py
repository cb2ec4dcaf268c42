"""A static file server for test hosts: serves one directory over HTTP. Like http_responder.py, it does no
reverse DNS lookup of its address at start (http.server's HTTPServer does, which would hang in a
namespace without DNS)."""

import functools
import socketserver
import sys
from http.server import SimpleHTTPRequestHandler


class Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


if __name__ == "__main__":
    address, port, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer((address, port), functools.partial(Handler, directory=directory)) as server:
        server.serve_forever()
