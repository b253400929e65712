"""The model worker behind `aura serve`: one thread owns the model and runs every request.

Requests queue to the worker; each active generation keeps its own random generator and text
stream (``generate.Decoder``, ``generate.TextStream``) and is prefilled alone through its own KV
cache. Then every round samples one token for each sequence and computes all their next logits
in one forward, each sequence a row of a cache whose rows sit at their own positions
(``batching.DecodeBatch``), for models that declare ``batched_decoding`` (per-token features
such as prosody computed a token at a time for each row); other models get one
forward per sequence per round. New requests are admitted between rounds (continuous batching:
a request starts at the next round, not after the others finish). Each sequence goes through
the same steps as ``generate`` alone, so a concurrent request returns what the same request
returns sequentially (same seed, same text; tested).

Work other than generation (embeddings, memory writes, memory reads) is queued as a call and
runs between rounds on the same thread, so nothing else touches the model concurrently.
A cancelled request (its client disconnected) is dropped at the next round.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aura.data.prosody import token_features
from aura.data.tokenizers import Tokenizer
from aura.errors import AuraError
from aura.infer.batching import DecodeBatch, Row, streamable
from aura.infer.generate import Decoder, TextStream, _check_max_new_tokens
from aura.infer.sampling import SamplingConfig
from aura.models.base import AuraModel

Emit = Callable[[dict[str, Any]], None]


@dataclass
class Job:
    """One generation. ``emit`` is called from the worker thread with ``{"text": piece}`` as
    text settles (unless ``stream`` is False), then once with ``{"done": finish_reason,
    "text": whole, "prompt_tokens", "completion_tokens"}`` or ``{"error": message}``;
    ``on_done(job, text)`` (optional) runs on the worker thread after the reply is complete,
    before ``done`` is emitted (memory writes)."""

    prompt: str
    max_new_tokens: int
    sampling: SamplingConfig
    stop: Sequence[str]
    emit: Emit
    on_done: Callable[[Job, str], None] | None = None
    stream: bool = True  # False: no text events, only the final one (a whole response)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Active:
    job: Job
    text: TextStream
    t0: int
    decoder: Decoder | None = None  # one forward per sequence (models without batches)
    seq: Row | None = None  # a row of the worker's DecodeBatch
    ids: list[int] = field(default_factory=list)  # the prompt, until it has a row


@dataclass
class WorkerStats:
    """Counters ``/health`` reports."""

    active: int = 0
    queued: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0


class Worker:
    """Owns ``model`` on its own thread; ``submit`` generations, ``call`` anything else."""

    def __init__(self, model: AuraModel, tokenizer: Tokenizer, batched: bool = True,
                 memory: dict[str, bool] | None = None):
        """``memory``: the forward keywords of the inference memory mode
        (``memory_mode.memory_kwargs``)."""
        self.model, self.tokenizer, self.memory = model.eval(), tokenizer, memory or {}
        self.features = token_features(model.token_features, tokenizer)
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._inbox: queue.Queue[Job | tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.Queue())
        self._active: list[_Active] = []
        self._pending: list[_Active] = []  # started, waiting for a row (``_admit``)
        # One forward for every sequence's next token, where the model can (else one each);
        # per-token features (prosody) come a token at a time from each row's own state.
        self.batch = (DecodeBatch(model, self.memory, self.features)
                      if batched and model.batched_decoding
                      and streamable(self.features) else None)
        self.stats = WorkerStats()
        self._flushers: tuple[Callable[[], None], ...] = ()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aura-model-worker", daemon=True)
        self._thread.start()

    # --- the API other threads use ------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        if self._stopping.is_set():
            raise AuraError("the server is shutting down")
        self.stats.queued += 1
        self._inbox.put(job)
        return job

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn()`` on the worker thread between rounds; its result or error in a Future."""
        fut: Future[Any] = Future()
        if self._stopping.is_set():
            fut.set_exception(AuraError("the server is shutting down"))
            return fut
        self._inbox.put((fn, fut))
        return fut

    def on_flush(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on the worker thread once a round, after the round's events are
        emitted and before its forward (and after any other events, e.g. a failed start): a
        consumer that batches what ``emit`` hands it sends it then."""
        self._flushers = (*self._flushers, fn)

    def _flush(self) -> None:
        for fn in self._flushers:
            fn()

    @property
    def alive(self) -> bool:
        """Whether the worker thread still runs (it ends only when stopped)."""
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what is queued or running (each gets an error event) and end the thread."""
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    # --- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._take(block=not self._active):
                    break
                self._admit()
                self._round()
                self._flush()
        for item in ([a.job for a in self._active] + [p.job for p in self._pending]
                     + self._drain()):
            if isinstance(item, Job):
                item.emit({"error": "the server is shutting down"})
            elif item is not None:
                item[1].set_exception(AuraError("the server is shutting down"))
        self._flush()
        self._active.clear()
        self.stats.active = 0

    def _drain(self) -> list[Any]:
        items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _take(self, block: bool) -> bool:
        """Start what is waiting (blocking for one item when idle); False once told to stop."""
        while True:
            try:
                item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                if self._stopping.is_set():
                    return False
                if block:
                    continue
                return True
            block = False
            if item is None:
                return False
            if isinstance(item, Job):
                self.stats.queued -= 1
                self._start(item)
            else:
                fn, fut = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # handed to the caller, who reports it
                        fut.set_exception(exc)

    def _start(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.stats.cancelled += 1
            return
        try:
            _check_max_new_tokens(job.max_new_tokens)
            ids = self.tokenizer.encode(job.prompt)
            if len(ids) == 0:
                if self.tokenizer.eot_id is None:
                    raise AuraError("empty prompt: the tokenizer has no end-of-text token to "
                                    "start from")
                ids = np.array([self.tokenizer.eot_id])
            t0 = len(ids)
            text = TextStream(self.tokenizer, job.stop,
                              (lambda s: job.emit({"text": s})) if job.stream else None)
            if job.max_new_tokens == 0:
                self._finish(job, text, "length", t0, 0)
                return
            if self.batch is not None:  # prefilled with whatever else arrived (``_admit``)
                self._pending.append(_Active(job, text, t0, ids=[int(i) for i in ids]))
                return
            out = torch.empty(1, t0 + job.max_new_tokens, dtype=torch.long, device=self.device)
            out[0, :t0] = torch.as_tensor(ids.astype(np.int64), device=self.device)
            active = _Active(job, text, t0, decoder=Decoder(
                self.model, out, t0, job.sampling, True, self.tokenizer.eot_id, self.features,
                self.memory))
        except Exception as exc:  # one request fails, not the server
            self.stats.failed += 1
            job.emit({"error": str(exc) if isinstance(exc, AuraError) else repr(exc)})
            return
        self._active.append(active)
        self.stats.active = len(self._active)

    def _admit(self) -> None:
        """Give the requests started since the last round their rows, prefilled together."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        assert self.batch is not None
        try:
            rows = self.batch.add_many([(p.ids, p.job.max_new_tokens, p.job.sampling)
                                        for p in pending])
        except Exception as exc:  # their prefill failed: those requests, not the server
            self._fail(pending, exc)
            return
        for p, row in zip(pending, rows, strict=True):
            p.seq = row
        self._active.extend(pending)
        self.stats.active = len(self._active)

    def _round(self) -> None:
        """One token for every active sequence, then the forward that prepares the next: one
        sampling call and one forward for all of them when the model decodes in batches, else
        one of each per sequence."""
        live = []
        for a in self._active:
            if a.job.cancelled.is_set():
                self.stats.cancelled += 1
                self._drop(a)
            else:
                live.append(a)
        if self.batch is not None:
            try:
                self.batch.step()
            except Exception as exc:  # the batch's sampling failed: every request in it
                self._fail(live, exc)
                live = []
        still = []
        for a in live:
            try:
                if a.seq is not None:
                    over, stopped = a.seq.over, a.text.push_id(a.seq.last)
                    n_new = a.seq.t - a.t0
                else:
                    assert a.decoder is not None
                    nxt, over = a.decoder.step()
                    stopped = a.text.push(nxt)
                    n_new = a.decoder.t - a.t0
                if over or stopped:
                    self._drop(a)
                    self._finish(a.job, a.text, "stop" if stopped else "length", a.t0, n_new)
                    continue
                if a.decoder is not None:
                    a.decoder.advance()
            except Exception as exc:  # one request fails, not the server
                self._fail([a], exc)
                continue
            still.append(a)
        self._flush()  # the round's text goes out while its forward runs
        if self.batch is not None and still:
            try:
                self.batch.advance()
            except Exception as exc:  # the batch's forward failed: every request in it
                self._fail(still, exc)
                still = []
        self._active = still
        self.stats.active = len(still)

    def _fail(self, actives: list[_Active], exc: Exception) -> None:
        for a in actives:
            self.stats.failed += 1
            self._drop(a)
            a.job.emit({"error": repr(exc)})

    def _drop(self, a: _Active) -> None:
        if self.batch is not None and a.seq is not None and a.seq.row >= 0:
            self.batch.remove(a.seq)
            a.seq.row = -1

    def _finish(self, job: Job, text: TextStream, reason: str, t0: int, n_new: int) -> None:
        whole = text.finish()
        if job.on_done is not None:
            job.on_done(job, whole)
        self.stats.completed += 1
        job.emit({"done": reason, "text": whole, "prompt_tokens": t0,
                  "completion_tokens": n_new})
