"""``aura learn-export STATE --out RUN``: the model of a learn state's newest generation (its
gradient steps and episodic memories) as an ordinary weights-only run, which ``aura generate``,
``aura eval`` and ``aura train --init-from`` load like any other."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_model

from aura.errors import DataError
from aura.learn.learner import MEMORY_DIR, MODEL_FILE
from aura.learn.state import CURRENT, StateDir
from aura.train.checkpoint import MODEL_FILE as CKPT_MODEL
from aura.train.checkpoint import (
    TrainState,
    list_checkpoints,
    load_for_inference,
    lock_run,
    new_history,
    save_checkpoint,
    write_history,
)


def export_state(state: Path, out: Path, model: Path | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Write the state's model into a new run ``out``; returns its checkpoint. ``model`` is the
    run the state learned from (default: the one it recorded), checked by its weights' sha256."""
    if not (state / CURRENT).is_file():  # checked first: locking would create files in it
        raise DataError(f"no saved learn state at {state}")
    states = StateDir(state)
    try:
        found = states.current()
        if found is None:
            raise DataError(f"state {state} has no saved generation yet")
        gen, _meta = found
        info = json.loads((gen / "learner.json").read_text(encoding="utf-8"))
        model_id = info.get("identity", {}).get("model")
        if not model_id:
            raise DataError(f"state {state} was learned without --model: no model to export")
        source = model or (Path(info["model_path"]) if info.get("model_path") else None)
        if source is None:
            raise DataError(f"state {state} does not record its run: pass --model RUN")
        loaded = load_for_inference(source, log=log)
        if loaded.meta["files"][CKPT_MODEL] != model_id["weights_sha256"]:
            raise DataError(f"{loaded.path} is not the checkpoint state {state} learned from "
                            "(its weights differ)")
        if (gen / MODEL_FILE).is_file():
            load_model(loaded.model, str(gen / MODEL_FILE))
        for name, writer in loaded.model.writers.items():
            if (gen / MEMORY_DIR / name).is_dir():
                writer.restore(gen / MEMORY_DIR / name)
    finally:
        states.close()
    if out.exists() and list_checkpoints(out):
        raise DataError(f"--out {out} already holds checkpoints; choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_run(out, "aura learn-export")
    try:
        history = new_history()
        write_history(out, history)
        path = save_checkpoint(out, loaded.model, loaded.tokenizer, loaded.config,
                               TrainState(step=int(loaded.meta["step"])), None,
                               history=history)
    finally:
        lock.release()
    return path
