"""Warmup sweeps: N sweeps of M random text samples, validated between sweeps.

Local rules started on the first files they see drift with whatever those files say; a few sweeps
over random samples of the whole directory (3 x 2000 settle them here) let STDP and Oja start from
the collection's statistics before continuous learning. Here a sample is ``SAMPLE_BYTES`` of a
random usable file's first 90%; validation reads fixed windows of every file's last 10%, which no
sweep trains on, so the metric between sweeps is held out. Samples and validation windows are read
by seeking, so a directory larger than memory warms up in constant memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from aura.learn.learner import Learner

SAMPLE_BYTES = 1024
VAL_FRACTION = 0.1
MAX_VAL_SAMPLES = 200


@dataclass(frozen=True)
class _File:
    path: Path
    size: int

    @property
    def split(self) -> int:
        """Bytes before the held-out tail."""
        return max(1, int(self.size * (1 - VAL_FRACTION)))


def _read(path: Path, start: int, n: int) -> str:
    """``n`` bytes from ``start`` as text; characters cut by the window's edges are dropped."""
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(n).decode("utf-8", errors="ignore")


class WarmupPool:
    """The usable files of the watched directory, sampled by size."""

    def __init__(self, files: list[tuple[Path, int]], seed: int):
        self.files = [_File(p, s) for p, s in files if s >= 2]
        self.seed = seed

    def __bool__(self) -> bool:
        return bool(self.files)

    def _pick(self, rng: random.Random) -> _File:
        return rng.choices(self.files, weights=[f.split for f in self.files])[0]

    def samples(self, sweep: int, n: int) -> list[str]:
        """Sweep ``sweep``'s ``n`` training samples (the same ones whenever it is re-run)."""
        rng = random.Random(f"{self.seed}:warmup:{sweep}")
        out = []
        for _ in range(n):
            f = self._pick(rng)
            length = min(SAMPLE_BYTES, f.split)
            out.append(_read(f.path, rng.randrange(f.split - length + 1), length))
        return out

    def validation(self, n: int) -> list[str]:
        """``n`` (at most ``MAX_VAL_SAMPLES``) fixed windows of the files' held-out tails."""
        rng = random.Random(f"{self.seed}:warmup:val")
        out = []
        for _ in range(min(max(n, 1), MAX_VAL_SAMPLES)):
            f = rng.choices(self.files, weights=[f.size - f.split for f in self.files])[0]
            tail = f.size - f.split
            length = min(SAMPLE_BYTES, tail)
            out.append(_read(f.path, f.split + rng.randrange(tail - length + 1), length))
        return out


def drift(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Relative change ``|after - before| / |after|`` over the plastic weights (0 when none):
    how far a sweep still moved them."""
    num = den = 0.0
    for name, a in after.items():
        b = before.get(name)
        if b is None or b.shape != a.shape:
            num += float(a.double().square().sum())
        else:
            num += float((a.double() - b.double()).square().sum())
        den += float(a.double().square().sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def sweep(learner: Learner, pool: WarmupPool, index: int, samples: int) -> int:
    """One sweep of local learning; returns the tokens it learned."""
    tokens = 0
    for i, text in enumerate(pool.samples(index, samples)):
        tokens += int(learner.apply(text, f"warmup:{index}:{i}", warmup=True)["tokens"])
    return tokens
