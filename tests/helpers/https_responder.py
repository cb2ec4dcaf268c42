"""An HTTPS server for test hosts: the HTTP responder's fixed body over TLS, with a certificate made at
start for any name (clients in the tests do not verify it: what they test is where the connection goes).

    python https_responder.py ADDRESS PORT BODY CERT_DIR"""

import socketserver
import ssl
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "src"))

from http_responder import Handler

from corral.proxy.tls import installation_tls

if __name__ == "__main__":
    files = installation_tls(Path(sys.argv[4]), "egress.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), Handler) as server:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.serve_forever()
