"""``aura export RUN --out DIR``: one checkpoint of a run as a self-contained weights-only
checkpoint directory (model.safetensors, tokenizer, episodic memories, meta.json) that
``aura generate``, ``aura eval`` and ``load_for_inference`` take as it is.

Consolidated training checkpoints (the default: a data-parallel or FSDP2 run gathers its full
state on rank 0, ``aura.train.distributed``) are copied: exporting verifies the checkpoint and
leaves out what only resuming needs (optimizer state, RNG states), the copy to hand on. A
sharded checkpoint (``train.checkpoint_format=sharded``) is consolidated here: its shards are
read into one CPU model in this process and written as the single ``model.safetensors``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_model

from aura.atomic import atomic_dir
from aura.config import config_from_dict
from aura.data.shards import file_sha256
from aura.errors import DataError
from aura.models import build_model
from aura.train.checkpoint import (
    META_FILE,
    MODEL_FILE,
    STATE_JSON,
    STATE_TENSORS,
    Log,
    load_weights,
    resolve_checkpoint,
    verify_checkpoint,
    warn_stderr,
)
from aura.train.sharded import SHARD_DIR

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
        names = [name for name in meta["files"]
                 if name not in RESUME_ONLY and name.split("/")[0] != SHARD_DIR]
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt / name, tmp / name)
        if meta.get("sharded") is not None:
            model = build_model(config_from_dict(meta["config"]).model)
            model.writers = {}  # the memories are copied as files above
            load_weights(model, ckpt)
            save_model(model, str(tmp / MODEL_FILE))
            names.append(MODEL_FILE)
        meta = {key: value for key, value in meta.items() if key != "sharded"}
        meta = {**meta, "history": None, "exported_from": str(ckpt),
                "files": {name: file_sha256(tmp / name) for name in sorted(names)}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return out
