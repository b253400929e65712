"""One rank of a torchrun job in tests/test_distributed.py: ``aura train`` as the CLI runs it,
plus what the tests check from inside each rank.

    torchrun ... tests/dist_worker.py SPEC_JSON

SPEC: ``argv`` (of ``aura train``), ``run`` (the run directory), ``report`` (a directory outside
the run: each rank writes ``rank-N.json`` there), ``kill_rank`` / ``kill_after_step``
(that rank SIGKILLs itself once that step is done). The report holds every write into the run
directory this rank attempted (an audit hook on open-for-write, mkdir, rename, remove), the
parameter elements this rank holds (FSDP2: its shards), a digest of each episodic store and
(DDP) whether the wrapper was freed by the time ``aura train`` returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import weakref
from pathlib import Path
from typing import Any

WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.symlink"}


def main() -> int:
    spec = json.loads(sys.argv[1])
    rank = int(os.environ["RANK"])
    run = os.path.realpath(spec["run"])
    writes: list[str] = []

    def inside(path: Any) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(run)
        except (TypeError, ValueError):
            return False

    def audit(event: str, args: tuple) -> None:
        if event == "open" and args and inside(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (
                    not mode and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                writes.append(f"open {args[0]} {mode or flags}")
        elif event in WRITE_EVENTS and args and inside(args[0]):
            writes.append(f"{event} {args[0]}")

    sys.addaudithook(audit)

    from aura.cli import main as aura_main
    from aura.train import trainer as trainer_mod

    kept: dict[str, Any] = {}
    run_fn, advance = trainer_mod.Trainer.run, trainer_mod.Trainer._advance

    def run_and_keep(self: Any) -> Any:
        kept["trainer"] = self
        if self.wrapped is not self.model:  # DDP: is it freed when the run ends?
            kept["wrapper"] = weakref.ref(self.wrapped)
        return run_fn(self)

    def advance_and_maybe_die(self: Any, step: int) -> int:
        if rank == spec.get("kill_rank") and step + 1 == spec.get("kill_after_step"):
            os.kill(os.getpid(), signal.SIGKILL)
        return advance(self, step)

    trainer_mod.Trainer.run = run_and_keep  # type: ignore[method-assign]
    trainer_mod.Trainer._advance = advance_and_maybe_die  # type: ignore[method-assign]
    code = aura_main(["train", *spec["argv"]])
    report: dict[str, Any] = {"rank": rank, "code": code, "writes": writes}
    if "wrapper" in kept:
        report["wrapper_freed"] = kept["wrapper"]() is None
    trainer = kept.get("trainer")
    if trainer is not None:
        report["param_numel"] = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel()
            for p in trainer.model.parameters())
        report["stores"] = {
            name: hashlib.sha256(w.store.keys.cpu().numpy().tobytes()).hexdigest()
            for name, w in trainer.model.writers.items()}
    Path(spec["report"], f"rank-{rank}.json").write_text(json.dumps(report))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
