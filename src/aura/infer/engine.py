"""The model side of `aura serve`: the model, its worker and its conversation memory, behind a
few named operations, in the server's own process (``Engine``) or in a child process of its
own (``EngineProcess``).

Why a process: in one process the model worker and the event loop share one GIL. A decode
round of eight sequences is ~150 small torch calls, each releasing and re-taking the GIL, and
the event loop framing eight SSE chunks takes it in between; on 2 cores the server then used
one core in all, and a round cost ~4 ms served against 2.4 ms alone (docs/BENCHMARKS.md).
vLLM (V1's engine core) and SGLang (its scheduler) run their engines in a process apart from
the API server for the same reason. The child is forked after the model is loaded, so it starts
with the model in memory and nothing is pickled but requests, events and results, over one
pipe between our own two processes.

The HTTP side sees the same API either way: ``submit`` a ``Generation`` with an ``emit``
callback (events as ``worker.Job`` documents them), ``call`` a named operation (``OPS``) for a
``Future``, ``on_flush`` to learn when a round's events are out, ``stats``, ``close``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import torch

from aura.data.sampler import compute_features
from aura.data.tokenizers import Tokenizer
from aura.errors import AuraError
from aura.infer.conversation_memory import ConversationMemory
from aura.infer.sampling import SamplingConfig
from aura.infer.worker import Emit, Job, Worker, WorkerStats
from aura.models.base import AuraModel
from aura.models.memory_mode import memory_kwargs

EngineKind = Literal["auto", "process", "thread"]
OPS = ("embed", "recall", "save", "memory_info")
"""What ``call`` runs on the worker thread: ``embed(texts)``, ``recall(text)`` (the
conversation memory's retrieval for a reply), ``save()`` (persist the memory) and
``memory_info()`` (what the memory holds and last retrieved, None without one)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """One completion to generate (picklable: it crosses to the engine's process)."""

    prompt: str
    max_new_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...] = ()
    stream: bool = True
    remember: str | None = None
    """Written to the conversation memory with the reply appended when it is done (the
    user's turn and the assistant's prefix); None: nothing is written."""


class Engine:
    """The model, its ``Worker`` thread and its conversation memory, in this process."""

    def __init__(self, model: AuraModel, tokenizer: Tokenizer, forward_mode: str,
                 memory_dir: Path | None = None, conversation_memory: bool = False,
                 save_interval: float = 30.0):
        """``forward_mode``: the inference memory mode the model decodes with
        (``memory_flags.forward_mode``); ``conversation_memory``: keep one (always with a
        ``memory_dir``), saved there every ``save_interval`` seconds and at ``close``."""
        self.model, self.tokenizer = model, tokenizer
        self.memory = (ConversationMemory(model, tokenizer, memory_dir)
                       if memory_dir is not None or conversation_memory else None)
        self.worker = Worker(model, tokenizer, memory=memory_kwargs(model, forward_mode))
        self._saver_stop = threading.Event()
        self._saver: threading.Thread | None = None
        if self.memory is not None and self.memory.root is not None:
            self._saver = threading.Thread(target=self._save_loop, args=(save_interval,),
                                           name="aura-memory-saver", daemon=True)
            self._saver.start()

    @property
    def stats(self) -> WorkerStats:
        return self.worker.stats

    @property
    def alive(self) -> bool:
        return self.worker.alive

    def on_flush(self, fn: Callable[[], None]) -> None:
        self.worker.on_flush(fn)

    def submit(self, gen: Generation, emit: Emit) -> Job:
        """Queue ``gen``; its events go to ``emit`` (on the worker thread)."""
        job = Job(gen.prompt, gen.max_new_tokens, gen.sampling, gen.stop, emit,
                  stream=gen.stream)
        if gen.remember is not None and self.memory is not None:
            memory, turn = self.memory, gen.remember
            job.on_done = lambda _, reply: memory.remember(turn + reply.strip())
        return self.worker.submit(job)

    def call(self, op: str, *args: Any) -> Future[Any]:
        """Run the named operation (``OPS``) on the worker thread, between rounds."""
        if op not in OPS:
            raise ValueError(f"unknown engine operation {op!r}")
        return self.worker.call(functools.partial(getattr(self, f"_{op}"), *args))

    def close(self) -> None:
        """Stop the worker (cancelling what runs), then persist the memory."""
        self._saver_stop.set()
        self.worker.stop()
        if self.memory is not None:
            self.memory.save()

    def _save_loop(self, interval: float) -> None:
        while not self._saver_stop.wait(interval):
            try:
                self.call("save").result()
            except AuraError:  # the worker stopped first: close() saves
                return

    # --- the operations (on the worker thread) -----------------------------------------------

    def _save(self) -> bool:
        return self.memory is not None and self.memory.save()

    def _recall(self, text: str) -> list[dict[str, Any]]:
        if self.memory is None or not self.memory.available:
            return []
        return self.memory.recall(text)

    def _memory_info(self) -> dict[str, Any] | None:
        if self.memory is None:
            return None
        return {"available": self.memory.available, "describe": self.memory.describe(),
                "retrieved": self.memory.last_retrieved}

    def _embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean final hidden state of each text (its newest ``max_context`` tokens), unit
        norm."""
        from aura.data.prosody import token_features

        features = token_features(self.model.token_features, self.tokenizer)
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        vectors, total = [], 0
        with torch.inference_mode():
            for text in texts:
                ids = [int(i) for i in self.tokenizer.encode(text)]
                if not ids:
                    raise AuraError("input texts must not be empty")
                total += len(ids)
                if self.model.max_context is not None:
                    ids = ids[-self.model.max_context:]
                x = torch.tensor([ids], device=device)
                out = self.model(x, **compute_features(features, x))
                if out.hidden is None:
                    raise AuraError(f"model {self.model.config.name!r} gives no hidden states")
                vec = torch.nn.functional.normalize(out.hidden[0].float().mean(0), dim=0)
                vectors.append(vec.cpu().tolist())
        return vectors, total


class RemoteJob:
    """A generation running in the engine's process; ``cancel`` stops it there."""

    def __init__(self, engine: EngineProcess, jid: int, emit: Emit):
        self.engine, self.jid, self.emit = engine, jid, emit
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.engine._send(("cancel", self.jid), quiet=True)


_EXITED = "the model process has exited"


class EngineProcess:
    """An ``Engine`` in a forked child process: requests go down one pipe, each round's
    events (and the worker's counters) come back as one message, read by a thread here that
    hands them to their ``emit`` and then calls the ``on_flush`` functions, as the worker
    thread does in-process. The child ignores SIGINT (a terminal's Ctrl-C reaches the whole
    process group; the server decides) and closes its engine, saving the memory, when told to
    or when this process is gone (its end of the pipe closes, even on kill -9)."""

    def __init__(self, make: Callable[[], Engine], threads: int | None = None):
        """``make`` builds the engine in the child (it runs after the fork); ``threads``: the
        child's torch threads (default: this process's). GNU OpenMP is not fork-safe: a child
        can run more than one thread only if this process never ran a parallel region with
        more than one, so it gets ``threads`` only while this process is at one thread (the
        CLI keeps it there until the fork), else one."""
        if torch.get_num_threads() > 1:
            threads = 1
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._send_lock = threading.Lock()
        self._proc = ctx.Process(target=_child, args=(make, child, self._conn, threads),
                                 name="aura-engine", daemon=True)
        self._proc.start()
        child.close()
        self.stats = WorkerStats()
        self._ids = itertools.count()
        self._jobs: dict[int, RemoteJob] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._flushers: tuple[Callable[[], None], ...] = ()
        self._closed = False
        ready = self._calls[-1] = Future[Any]()
        self._reader = threading.Thread(target=self._read, name="aura-engine-reader",
                                        daemon=True)
        self._reader.start()
        try:
            ready.result()  # the child built its engine, or its error is raised here
        except BaseException:
            self._proc.join(10)
            raise

    @property
    def alive(self) -> bool:
        """Whether the engine's process still serves (False once it exited or was killed)."""
        return not self._closed and self._proc.is_alive()

    def on_flush(self, fn: Callable[[], None]) -> None:
        self._flushers = (*self._flushers, fn)

    def submit(self, gen: Generation, emit: Emit) -> RemoteJob:
        job = RemoteJob(self, next(self._ids), emit)
        self._jobs[job.jid] = job
        try:
            self._send(("submit", job.jid, gen))
        except AuraError:
            self._jobs.pop(job.jid, None)
            raise
        self.stats.queued += 1  # until the child's next counters say otherwise
        return job

    def call(self, op: str, *args: Any) -> Future[Any]:
        if op not in OPS:
            raise ValueError(f"unknown engine operation {op!r}")
        cid, fut = next(self._ids), Future[Any]()
        self._calls[cid] = fut
        try:
            self._send(("call", cid, op, args))
        except AuraError as exc:
            self._calls.pop(cid, None)
            fut.set_exception(exc)
        return fut

    def close(self) -> None:
        """Stop the child's engine (what runs is cancelled, the memory saved) and wait for it."""
        self._send(("close",), quiet=True)
        self._proc.join(60)
        if self._proc.is_alive():
            self._proc.kill()
        self._reader.join(10)
        self._conn.close()

    def _send(self, message: tuple[Any, ...], quiet: bool = False) -> None:
        with self._send_lock:
            try:
                if self._closed:
                    raise OSError
                self._conn.send(message)
            except (OSError, ValueError):
                if not quiet:
                    raise AuraError(_EXITED) from None

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                for jid, event in message[1]:
                    job = self._jobs.get(jid)
                    if job is None:
                        continue
                    if "done" in event or "error" in event:
                        del self._jobs[jid]
                    job.emit(event)
                self.stats = message[2]
                for fn in self._flushers:
                    fn()
            elif kind == "result":
                fut = self._calls.pop(message[1], None)
                if fut is not None:
                    if message[2] is not None:
                        fut.set_exception(message[2])
                    else:
                        fut.set_result(message[3])
        with self._send_lock:
            self._closed = True
        for job in list(self._jobs.values()):
            job.emit({"error": _EXITED})
        self._jobs.clear()
        for fn in self._flushers:
            fn()
        for fut in list(self._calls.values()):
            if not fut.done():
                fut.set_exception(AuraError(_EXITED))
        self._calls.clear()


def _portable(exc: BaseException) -> BaseException:
    """``exc`` as the parent can unpickle it: an AuraError stays one (the server maps it to
    4xx/503), anything else becomes a RuntimeError with its repr."""
    return AuraError(str(exc)) if isinstance(exc, AuraError) else RuntimeError(repr(exc))


def _child(make: Callable[[], Engine], conn: Connection, parent_end: Connection,
           threads: int | None) -> None:
    """The engine process: build the engine, then serve the pipe until told to close or the
    parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_end.close()  # so the parent's death closes the pipe for us
    if threads is not None:
        torch.set_num_threads(threads)
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        # the parent gone: recv() below sees it too
        with lock, contextlib.suppress(OSError, ValueError):
            conn.send(message)

    try:
        engine = make()
    except BaseException as exc:
        send(("result", -1, _portable(exc), None))
        return
    send(("result", -1, None, None))
    host = _Host(engine, send)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message[0] == "close":
            break
        host.handle(message)
    engine.close()
    host.flush()
    conn.close()


class _Host:
    """The engine process's side of the pipe: ``handle`` one message from the parent; the
    worker thread's ``flush`` sends each round's events and new counters back."""

    def __init__(self, engine: Engine, send: Callable[[tuple[Any, ...]], None]):
        self.engine, self.send = engine, send
        self.jobs: dict[int, Job] = {}  # running, by the parent's id
        self._ended: set[int] = set()  # ended before ``handle`` had recorded them
        self._lock = threading.Lock()  # ``jobs`` and ``_ended``: this thread and the worker's
        self._outbox: list[tuple[int, dict[str, Any]]] = []
        self._sent = dataclasses.replace(engine.stats)
        engine.on_flush(self.flush)

    def flush(self) -> None:
        """On the worker thread, once a round: its events and the counters, if either is new."""
        if self._outbox or self.engine.stats != self._sent:
            batch = self._outbox[:]
            del self._outbox[:len(batch)]
            self._sent = dataclasses.replace(self.engine.stats)
            self.send(("events", batch, self._sent))

    def _post(self, jid: int, event: dict[str, Any]) -> None:
        self._outbox.append((jid, event))
        if "done" in event or "error" in event:
            with self._lock:
                if self.jobs.pop(jid, None) is None:
                    self._ended.add(jid)

    def _answer(self, cid: int, fut: Future[Any]) -> None:
        exc = fut.exception()
        self.send(("result", cid, None if exc is None else _portable(exc),
                   None if exc is not None else fut.result()))

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "submit":
            jid = message[1]
            try:
                job = self.engine.submit(message[2], functools.partial(self._post, jid))
            except AuraError as exc:
                self.send(("events", [(jid, {"error": str(exc)})], self.engine.stats))
                return
            with self._lock:  # a job can end on the worker before submit() returns here
                if jid in self._ended:
                    self._ended.discard(jid)
                else:
                    self.jobs[jid] = job
        elif kind == "cancel":
            with self._lock:
                job = self.jobs.get(message[1])
            if job is not None:
                job.cancel()
        elif kind == "call":
            _, cid, op, args = message
            self.engine.call(op, *args).add_done_callback(functools.partial(self._answer, cid))


def resolve(kind: EngineKind, device: torch.device | str = "cpu"
            ) -> Literal["process", "thread"]:
    """What "auto" means for a model on ``device``: a process where forking a loaded model
    is safe (Linux, a CPU model: CUDA cannot be used in a forked child), else a thread."""
    on_cpu = torch.device(device).type == "cpu"
    if kind == "auto":
        return "process" if sys.platform.startswith("linux") and on_cpu else "thread"
    if kind == "process" and not on_cpu:
        raise AuraError(f"--engine process needs a model on the CPU (a forked process cannot "
                        f"use {torch.device(device).type}); use --engine thread")
    return kind


def start_engine(kind: EngineKind, make: Callable[[], Engine], threads: int | None = None,
                 device: torch.device | str = "cpu") -> Engine | EngineProcess:
    """The engine ``kind`` asks for (``resolve``), its model on ``device`` at ``threads``
    torch threads (None: as this process is)."""
    if resolve(kind, device) == "process":
        return EngineProcess(make, threads)
    if threads is not None:
        torch.set_num_threads(threads)
    return make()
