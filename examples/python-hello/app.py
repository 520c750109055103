"""A preview app: answers on $PORT with the standard library alone."""
import os
from http.server import BaseHTTPRequestHandler, HTTPServer


def greeting(path):
    return f"hello from python at {path}\n"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = greeting(self.path).encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8000"))), Handler).serve_forever()
