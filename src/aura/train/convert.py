"""`aura convert RUN --set model.KEY=VALUE ... --out RUN2`: a checkpoint migrated to a larger shape.

Seed 003 §5's migration for every registered model: the source run's best (else newest good)
checkpoint is loaded and verified, its config takes the ``model.*`` overrides, and the new model
is built fresh (the run's seed) and then filled tensor by tensor, by name:

- copied: same shape, the source's values;
- padded: every dimension at least as large, the source's values in the leading block and the
  fresh initialisation around them (a wider embedding keeps each token's old coordinates,
  more layers keep the old ones first, more place cells or experts keep the old ones). Fused
  tensors are padded per part (``attn.qkv``: q, k and v; a liquid expert's ``heads``: f, g, h),
  so a part never lands in another's rows;
- reset: a dimension shrank, or the layout the values mean changed (attention whose head size
  changed: the same row is another head's now), so the fresh initialisation stays;
- new / dropped: only in the new model / only in the source.

Episodic memories are copied when their store keeps its shape, else reset (empty). Models only
grow: an override that makes a size smaller is refused, as is any key outside ``model.``. The
result is a weights-only checkpoint (step 0, a new history) that ``aura eval`` and ``aura
generate`` read and ``aura train --init-from RUN2`` continues from with fresh optimizer state.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from aura.config import apply_overrides, parse_override
from aura.errors import AuraError, ConfigError
from aura.models import build_model
from aura.train.checkpoint import (
    MEMORY_DIR,
    TrainState,
    load_for_inference,
    new_history,
    save_checkpoint,
    write_history,
)

# parameter-name suffix -> parts fused along dim 0
_FUSED = {"attn.qkv.weight": 3, "attn.qkv.bias": 3, "heads.weight": 3, "heads.bias": 3}
_HEAD_LAYOUT = ("attn.qkv.", "attn.proj.")  # rows/columns are (head, head_dim) pairs


@dataclasses.dataclass(frozen=True)
class Moved:
    name: str
    action: str  # copied, padded, reset, new, dropped
    old: tuple[int, ...] | None
    new: tuple[int, ...] | None


def _pad(dst: torch.Tensor, src: torch.Tensor, parts: int) -> None:
    """``src`` into the leading block of ``dst`` (per part along dim 0 when fused)."""
    if parts > 1:
        for d, s in zip(dst.chunk(parts, 0), src.chunk(parts, 0), strict=True):
            _pad(d, s, 1)
        return
    dst[tuple(slice(0, n) for n in src.shape)].copy_(src)


def _transfer(name: str, dst: torch.Tensor, src: torch.Tensor, head_dim_changed: bool) -> str:
    if src.shape == dst.shape:
        dst.copy_(src)
        return "copied"
    if head_dim_changed and any(p in name for p in _HEAD_LAYOUT):
        return "reset"
    parts = next((n for suffix, n in _FUSED.items() if name.endswith(suffix)), 1)
    if (src.dim() != dst.dim() or any(a > b for a, b in zip(src.shape, dst.shape, strict=True))
            or src.shape[0] % parts or dst.shape[0] % parts):
        return "reset"
    _pad(dst, src, parts)
    return "padded"


def convert(run: str | Path, overrides: list[str], out: str | Path
            ) -> tuple[list[Moved], Path]:
    """Write the migrated checkpoint into run directory ``out``; returns what happened to each
    tensor (and memory store) and the checkpoint's path."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AuraError(f"--out {out} exists and is not empty")
    pairs = [parse_override(o) for o in overrides]
    for key, _ in pairs:
        if not key.startswith("model.") or key == "model.name":
            raise ConfigError(f"convert changes the model's shape only (model.* keys, not "
                              f"model.name), got {key!r}")
    loaded = load_for_inference(run)
    old_cfg = loaded.config
    new_cfg = apply_overrides(old_cfg, dict(pairs))  # an unknown key is a ConfigError
    old_m, new_m = dataclasses.asdict(old_cfg.model), dataclasses.asdict(new_cfg.model)
    shrunk = [f"model.{k} {old_m[k]} -> {new_m[k]}" for k in old_m
              if isinstance(old_m[k], int) and not isinstance(old_m[k], bool)
              and new_m[k] is not None and old_m[k] is not None and new_m[k] < old_m[k]]
    if shrunk:
        raise ConfigError(f"convert only grows a model: {', '.join(shrunk)}")
    torch.manual_seed(new_cfg.train.seed)
    model = build_model(new_cfg.model)
    old_heads = old_cfg.model.n_embd // old_cfg.model.n_head
    head_dim_changed = new_cfg.model.n_embd // new_cfg.model.n_head != old_heads
    src, dst = loaded.model.state_dict(), model.state_dict()
    moved = []
    with torch.no_grad():
        for name, tensor in dst.items():
            if name not in src:
                moved.append(Moved(name, "new", None, tuple(tensor.shape)))
                continue
            action = _transfer(name, tensor, src[name].to(tensor.dtype), head_dim_changed)
            moved.append(Moved(name, action, tuple(src[name].shape), tuple(tensor.shape)))
    moved += [Moved(name, "dropped", tuple(t.shape), None) for name, t in src.items()
              if name not in dst]
    for name, writer in model.writers.items():
        old_writer = loaded.model.writers.get(name)
        old_store = None if old_writer is None else old_writer.store
        same = old_store is not None and (old_store.dim_key, old_store.dim_value,
                                          old_store.capacity) == (
            writer.store.dim_key, writer.store.dim_value, writer.store.capacity)
        if same:
            writer.restore(loaded.path / MEMORY_DIR / name)
        moved.append(Moved(f"memory/{name}", "copied" if same else "reset", None, None))
    out.mkdir(parents=True, exist_ok=True)
    history = new_history()
    write_history(out, history)
    path = save_checkpoint(out, model, loaded.tokenizer, new_cfg, TrainState(), None,
                           history=history)
    return moved, path

