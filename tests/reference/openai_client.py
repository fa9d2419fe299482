"""Drives an OpenAI-compatible server (`llmlab serve`) with the official `openai` package, as
an application would (tests/suite/serve.rs).

Reads one JSON object on stdin:
  {"base_url": "http://127.0.0.1:PORT/v1", "api_key": "KEY" | null,
   "calls": [{"op": "chat" | "completion", "kwargs": {...}, "close_after": N?}, ...],
   "concurrent": false}
and prints a JSON list with one result per call, in order:
  - a response: the package's parsed object (`model_dump()`);
  - with "stream": true in kwargs: {"chunks": [chunk, ...]}; with "close_after": N the client
    closes the stream after N chunks (a client that goes away);
  - an HTTP error: {"status": code, "error": the body's error object};
  - any other failure of the package (an error event in a stream, a dropped connection):
    {"exception": type name, "message": text}.
With "concurrent": true every call starts at once, each in its own thread (and connection).
"""

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import openai


def call(client, c):
    try:
        create = (
            client.chat.completions.create
            if c["op"] == "chat"
            else client.completions.create
        )
        out = create(**c["kwargs"])
        if not c["kwargs"].get("stream"):
            return out.model_dump()
        chunks = []
        for chunk in out:
            chunks.append(chunk.model_dump())
            if c.get("close_after") and len(chunks) >= c["close_after"]:
                out.close()
                break
        return {"chunks": chunks}
    except openai.APIStatusError as e:
        try:
            body = e.response.json()
        except ValueError:
            body = {"error": e.response.text}
        return {"status": e.status_code, "error": body.get("error", body)}
    except openai.OpenAIError as e:
        return {"exception": type(e).__name__, "message": str(e)}


def main():
    spec = json.load(sys.stdin)
    # No retries: a 429 or a 5xx is what the test looks at, not something to hide.
    client = openai.OpenAI(
        base_url=spec["base_url"],
        api_key=spec.get("api_key") or "no-key",
        max_retries=0,
        timeout=spec.get("timeout", 300),
    )
    calls = spec["calls"]
    if spec.get("concurrent"):
        start = threading.Barrier(len(calls))

        def at_once(c):
            start.wait()
            return call(client, c)

        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            results = list(pool.map(at_once, calls))
    else:
        results = [call(client, c) for c in calls]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
