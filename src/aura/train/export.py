"""``aura export RUN --out DIR``: one checkpoint of a run as a self-contained weights-only
checkpoint directory (model.safetensors, tokenizer, episodic memories, meta.json) that
``aura generate``, ``aura eval`` and ``load_for_inference`` take as it is.

Training checkpoints are already consolidated when saved (a data-parallel or FSDP2 run gathers
its full state on rank 0, ``aura.train.distributed``), so exporting verifies the checkpoint and
leaves out what only resuming needs (optimizer state, RNG states): the copy to hand on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from aura.atomic import atomic_dir
from aura.data.shards import file_sha256
from aura.errors import DataError
from aura.train.checkpoint import (
    META_FILE,
    STATE_JSON,
    STATE_TENSORS,
    Log,
    resolve_checkpoint,
    verify_checkpoint,
    warn_stderr,
)

RESUME_ONLY = {STATE_TENSORS, STATE_JSON}


def export_checkpoint(source: str | Path, out: str | Path, log: Log = warn_stderr) -> Path:
    """Write the best (else newest good) checkpoint of run ``source`` (or the checkpoint
    ``source`` itself) to ``out`` without its resume-only files; ``out`` must not exist."""
    out = Path(out)
    if out.exists():
        raise DataError(f"--out {out} already exists; choose a new directory")
    ckpt = resolve_checkpoint(source, log)
    meta = verify_checkpoint(ckpt)
    with atomic_dir(out) as tmp:
        for name in meta["files"]:
            if name in RESUME_ONLY:
                continue
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt / name, tmp / name)
        meta = {**meta, "history": None, "exported_from": str(ckpt),
                "files": {name: file_sha256(tmp / name) for name in meta["files"]
                          if name not in RESUME_ONLY}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return out
