"""Python calls per streamed token in `aura serve`, by thread: a count, not a timing. Prints JSON.

    python benchmarks/serve_calls.py [--requests 4] [--max-tokens 64] [--clients 1]
                                     [--http auto|h11|httptools] [--loop auto|asyncio|uvloop]

Runs the server in this process (uvicorn on a thread, the model's engine as a thread, as
`aura serve --engine thread` runs it; a random demo-shaped `gpt`, byte vocabulary) with a
profile hook counting every Python and C function call, per thread, while a client (raw
``http.client`` on the main thread, not counted) streams ``--requests`` chat completions one
after another (``--clients`` such clients at once, each on its own thread). Reported per thread
(the event loop that frames and sends the SSE chunks, the model worker that samples and
detokenises): calls per completion token and the
functions called most per token. Counts do not depend on the machine's load, only on how many
tokens shared a chunk (also reported), so they compare two commits where timings on a shared
machine cannot. ``--http`` and ``--loop`` are uvicorn's (``auto``, what `aura serve` runs, takes
httptools and uvloop when installed).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import socket
import sys
import threading
import time
from typing import Any

import torch

from machine import machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=1, help="clients streaming at once")
    ap.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    ap.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    ap.add_argument("--top", type=int, default=25, help="functions listed per thread")
    args = ap.parse_args()

    import uvicorn

    from aura.config import load_config
    from aura.data.tokenizers import ByteTokenizer
    from aura.infer.server import ServeOptions, create_app
    from aura.models.base import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(load_config(preset="demo", overrides=["model.vocab_size=256"]).model)
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    counting = threading.Event()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if not counting.is_set():
            return
        if event == "call":
            code = frame.f_code
            name = f"{code.co_filename.rsplit('/', 2)[-2:][-1]}:{code.co_name}"
        elif event == "c_call":
            name = f"C:{getattr(arg, '__qualname__', getattr(arg, '__name__', '?'))}"
        else:
            return
        counts[threading.current_thread().name][name] += 1

    threading.setprofile(profile)  # the threads started from here on: uvicorn's, the worker's
    port = _free_port()
    # the engine as a thread: its worker's calls are counted in this process
    app = create_app(model, ByteTokenizer(), ServeOptions(port=port, engine="thread"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=args.http,
                                           loop=args.loop, log_level="warning"))
    thread = threading.Thread(target=server.run, name="event-loop", daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stream(seed: int) -> tuple[int, int]:
        """(completion tokens, SSE chunks) of one streamed chat completion."""
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = {"messages": [{"role": "user", "content": "Tell me about the sea."}],
                "max_tokens": args.max_tokens, "seed": seed, "stream": True,
                "stream_options": {"include_usage": True}}
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        tokens = chunks = 0
        for line in conn.getresponse().read().decode().splitlines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                chunks += bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        conn.close()
        return tokens, chunks

    stream(0)  # warm-up, not counted
    totals = [0, 0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(args.requests):
            t, n = stream(1 + c * args.requests + r)
            with lock:
                totals[0] += t
                totals[1] += n

    clients = [threading.Thread(target=client, args=(c,), name=f"client-{c}")
               for c in range(args.clients)]
    counting.set()
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    counting.clear()
    tokens, chunks = totals
    server.should_exit = True
    thread.join(30)
    threads = {}
    for name, counter in counts.items():
        if name.startswith("client-") or not counter:  # the clients', or idle, threads
            continue
        total = sum(counter.values())
        threads[name] = {"calls_per_token": round(total / tokens, 1),
                         "top_per_token": {k: round(v / tokens, 2)
                                           for k, v in counter.most_common(args.top)}}
    json.dump({"machine": machine(), "http": args.http, "loop": args.loop,
               "clients": args.clients, "requests": args.requests,
               "completion_tokens": tokens,
               "text_chunks": chunks, "threads": threads}, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
