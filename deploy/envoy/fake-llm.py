#!/usr/bin/env python3
"""A stand-in for an LLM upstream, for trying deploy/envoy/ on one machine: answers
every request on 127.0.0.1:8000 with 200 and `x-tokens-used` (the tokens the call
"used", which Envoy's stream-done rate limit call reports to ration-agent): the
request's `x-use-tokens`, else 300."""

import http.server


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self):
        used = self.headers.get("x-use-tokens", "300")
        body = ('{"usage": {"total_tokens": %s}}\n' % used).encode()
        self.send_response(200)
        self.send_header("x-tokens-used", used)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = answer
    do_POST = answer

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", 8000), Handler).serve_forever()
