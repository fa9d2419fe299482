"""A stand-in for `llmlab serve` that answers slowly and predictably, for testing the chat page
(src/serve/chat.html) in a browser without a model: the page's own tests (tests/suite/serve_page.rs).

    mock_openai_server.py --page src/serve/chat.html [--port 0] [--api-key K] [--delay 0.05]

Prints `listening on http://127.0.0.1:PORT` once it listens. Serves the page at GET /, a model
at GET /v1/models, GET /health, and POST /v1/chat/completions, whose reply tells what the request
carried: `You said: <last user message>. System: <system message>. Turn <user messages>.` (the
System part only with a system message), one word per token. Streamed (`stream: true`), each
event is written in two halves with a pause between them (a line split across the client's reads)
and a final usage chunk follows with `stream_options.include_usage`. With --api-key, requests
without `Authorization: Bearer K` get OpenAI's 401 error body.
"""

import argparse
import json
import re
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "mock-model"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--page", required=True, help="the chat page served at GET /")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--api-key")
    ap.add_argument("--delay", type=float, default=0.05, help="seconds between two tokens")
    args = ap.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            sys.stderr.write("mock: " + fmt % a + "\n")

        def send(self, status, body, ctype="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def authorized(self):
            if args.api_key is None or self.headers.get("Authorization") == f"Bearer {args.api_key}":
                return True
            self.send(401, {"error": {"message": "invalid or missing API key", "type": "invalid_request_error",
                                      "code": "invalid_api_key"}})
            return False

        def do_GET(self):
            path = self.path.split("?")[0]
            if path == "/":
                with open(args.page, "rb") as f:
                    self.send(200, f.read(), "text/html; charset=utf-8")
            elif path == "/health":
                self.send(200, {"status": "ok"})
            elif path == "/v1/models":
                if self.authorized():
                    self.send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                                "owned_by": "llmlab"}]})
            else:
                self.send(404, {"error": {"message": f"no route {path}"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path != "/v1/chat/completions":
                return self.send(404, {"error": {"message": f"no route {self.path}"}})
            if not self.authorized():
                return
            msgs = body.get("messages", [])
            users = [m["content"] for m in msgs if m.get("role") == "user"]
            system = " ".join(m["content"] for m in msgs if m.get("role") == "system")
            reply = f"You said: {users[-1] if users else ''}."
            if system:
                reply += f" System: {system}."
            reply += f" Turn {len(users)}."
            tokens = re.findall(r"\s*\S+", reply)
            max_tokens = body.get("max_tokens")
            finish = "stop"
            if max_tokens is not None and len(tokens) > max_tokens:
                tokens, finish = tokens[:max_tokens], "length"
            usage = {"prompt_tokens": sum(len(m.get("content", "").split()) for m in msgs),
                     "completion_tokens": len(tokens)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            base = {"id": "chatcmpl-mock", "created": int(time.time()), "model": body.get("model", MODEL)}
            if not body.get("stream"):
                return self.send(200, dict(base, object="chat.completion", usage=usage, choices=[
                    {"index": 0, "message": {"role": "assistant", "content": "".join(tokens)},
                     "finish_reason": finish}]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def write(data):
                raw = data.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
                self.wfile.flush()

            def event(chunk):
                line = "data: " + json.dumps(dict(base, object="chat.completion.chunk", **chunk)) + "\n\n"
                half = len(line) // 2
                write(line[:half])
                time.sleep(args.delay / 2)
                write(line[half:])

            try:
                event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]})
                for t in tokens:
                    time.sleep(args.delay / 2)
                    event({"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]})
                event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    event({"choices": [], "usage": usage})
                write("data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading (the page's Stop button)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
