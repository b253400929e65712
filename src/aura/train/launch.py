"""``aura train --nproc N``: a thin launcher over torchrun (``torch.distributed.run``, whose
elastic agent runs in this process), so one host's data parallelism needs no second command.

``aura train --nproc N ARGS`` is ``torchrun --standalone --nproc-per-node N -m aura train ARGS``
with two differences: each rank gets ``cpu_count // N`` intra-op threads unless
``OMP_NUM_THREADS`` says otherwise (torchrun's default is 1), and the job's exit code is the
ranks' own (2 for a refused start, which rank 0 has already said in one line; 128+signal for a
rank killed by one) instead of torchrun's traceback and failure table.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence

from aura.errors import ConfigError

NPROC_FLAG = "--nproc"


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (what each rank runs)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == NPROC_FLAG:
            skip = True
        elif not arg.startswith(NPROC_FLAG + "="):
            out.append(arg)
    return out


def check_nproc(nproc: int, device_type: str) -> None:
    """One line for an N that cannot run here."""
    if os.environ.get("WORLD_SIZE") is not None:
        raise ConfigError("--nproc launches torchrun itself; under torchrun leave it out")
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if device_type == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise ConfigError(f"--nproc {nproc} needs one GPU per rank; this host has {gpus}")
    elif device_type == "mps":
        raise ConfigError("--nproc runs on CUDA (nccl) or CPU (gloo), not MPS; set "
                          "train.device=cpu")
    else:
        cores = os.cpu_count() or 1
        if nproc > cores:
            raise ConfigError(f"--nproc {nproc} is more ranks than this host's {cores} CPU "
                              "cores; each rank needs one")


@contextlib.contextmanager
def _launch_env(nproc: int) -> Iterator[None]:
    """The threads per rank, and torchrun's own logging (tables, tracebacks) kept quiet."""
    saved = os.environ.get("OMP_NUM_THREADS")
    if saved is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        elastic.setLevel(level)
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def exit_code(failures: dict[int, object]) -> int:
    """The job's exit code from the failed ranks: a refusal (2) wins, then a signal, then the
    first rank's code."""
    codes = [getattr(f, "exitcode", 1) for _, f in sorted(failures.items())]
    if 2 in codes:
        return 2
    for code in codes:
        if code < 0:
            return 128 - code
    return next((code for code in codes if code), 1)


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``aura ARGV`` on ``nproc`` local ranks under torchrun; the job's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--module", "aura", *argv])
    with _launch_env(nproc):
        try:
            run(args)
        except ChildFailedError as exc:
            return exit_code(exc.failures)
    return 0
