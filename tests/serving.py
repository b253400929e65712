"""Helpers for the serving tests: a tiny checkpoint, a live `aura serve` process, raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from aura.data.tokenizers import ByteTokenizer
from aura.models.base import build_model
from aura.train.checkpoint import TrainState, save_checkpoint
from conftest import tiny_config

SRC = Path(__file__).resolve().parents[1] / "src"
KEY = "test-key"


def tiny_run(root: Path, *overrides: str) -> Path:
    """An untrained byte-level model's checkpoint: what it says is noise, but deterministic."""
    cfg = tiny_config("model.vocab_size=256", *overrides)
    torch.manual_seed(0)
    run = root / "run"
    save_checkpoint(run, build_model(cfg.model), ByteTokenizer(), cfg, TrainState(step=1), None)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    """One torch thread: a tiny model on a shared CPU runs many times faster without them."""
    path = f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


class Server:
    """`aura serve RUN ARGS...` on a free port, ready once /health answers."""

    def __init__(self, run: Path, *args: str, log: Path | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log or os.devnull, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aura", "serve", str(run), "--port", str(self.port), *args],
            env=env(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(self.port, "GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (exit {self.proc.poll()})")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            self.log.close()


def request(port: int, method: str, path: str, body: Any = None, *, key: str | None = KEY,
            raw: bytes | None = None, headers: dict[str, str] | None = None
            ) -> tuple[int, Any]:
    """(status, parsed JSON body or text) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers=h)
    resp = conn.getresponse()
    text = resp.read().decode("utf-8", "replace")
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text
