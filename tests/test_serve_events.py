"""The per-token path from the model worker to the SSE bytes: every event delivered once, in
order, with few wake-ups; chunks framed exactly as sse-starlette frames them."""

from __future__ import annotations

import asyncio
import json
import threading

import torch
from sse_starlette.event import ensure_bytes

from aura.infer.server import Events, Mailbox, _json_string, sse_event


def test_events_posted_from_another_thread_arrive_once_in_order_with_few_wake_ups() -> None:
    async def main() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        mailbox = Mailbox(loop)
        wakeups = 0
        deliver = mailbox._deliver

        def counted() -> None:
            nonlocal wakeups
            wakeups += 1
            deliver()

        mailbox._deliver = counted  # type: ignore[method-assign]
        queues = [Events() for _ in range(3)]

        def worker() -> None:  # rounds of 3 events, flushed after each, as Worker does
            for i in range(3000):
                mailbox.post(queues[i % 3], {"n": i})
                if i % 3 == 2:
                    mailbox.flush()
            for q in queues:
                mailbox.post(q, {"done": True})
            mailbox.flush()

        thread = threading.Thread(target=worker)
        thread.start()
        got: list[list[int]] = [[] for _ in queues]

        async def read(k: int) -> None:
            while True:
                for event in await queues[k].take():
                    if "done" in event:
                        return
                    got[k].append(event["n"])

        await asyncio.gather(*(read(k) for k in range(3)))
        thread.join()
        return got, wakeups

    got, wakeups = asyncio.run(main())
    assert got == [list(range(k, 3000, 3)) for k in range(3)]
    assert wakeups <= 1001  # at most one wake-up of the loop per flushed round


def test_the_worker_flushes_each_rounds_events_before_the_rounds_forward() -> None:
    """So the event loop sends a round's chunks while the next forward runs."""
    from aura.data.tokenizers import ByteTokenizer
    from aura.infer.sampling import SamplingConfig
    from aura.infer.worker import Job, Worker
    from aura.models.base import build_model
    from conftest import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config("model.vocab_size=256").model).eval()
    marks: list[str] = []
    model.register_forward_pre_hook(lambda *_: marks.append("forward"))
    worker = Worker(model, ByteTokenizer())
    worker.on_flush(lambda: marks.append("flush"))
    finished: list[dict] = []
    all_done = threading.Event()

    def emit(event: dict) -> None:
        marks.append("emit")
        if "done" in event:
            finished.append(event)
            if len(finished) == 3:
                all_done.set()

    for i in range(3):
        worker.submit(Job("Hi", 12, SamplingConfig(seed=i), (), emit))
    assert all_done.wait(60)
    worker.stop()
    assert marks.count("emit") > 3 + 12  # text pieces (bytes may wait for a whole character)
    assert marks.count("forward") > 12
    for i, mark in enumerate(marks):
        if mark == "emit":  # a flush follows before any forward does
            rest = [m for m in marks[i + 1:] if m != "emit"]
            assert rest and rest[0] == "flush", marks[i:i + 6]


def test_sse_bytes_are_what_sse_starlette_makes_of_the_same_data() -> None:
    for text in ["Hello", "", "two\nlines\r\n", "caf\u00e9 \U0001f600", 'quote " and \\']:
        body = json.dumps({"choices": [{"delta": {"content": text}}]})
        assert sse_event(body) == ensure_bytes({"data": body}, "\r\n")
        assert _json_string(text) == json.dumps(text)
    assert sse_event("[DONE]") == ensure_bytes({"data": "[DONE]"}, "\r\n")
