"""Sharded checkpoints (``train.checkpoint_format=sharded``): every rank writes its own part of
the weights and optimizer state, so no host ever holds the whole training state.

Built on ``torch.distributed.checkpoint`` (DCP) with its safetensors storage,
``HuggingFaceStorageWriter(save_distributed=True)`` / ``HuggingFaceStorageReader``, not its
default ``FileSystemWriter``: that one writes a ``.metadata`` file that is a pickle, which Aura
never reads. The safetensors storage writes one file per rank whose header carries, as JSON,
each chunk's offsets in the full tensor, and its reader rebuilds DCP's metadata from those
headers; so resharding to another world size is DCP's own, and nothing on disk is a pickle.
(DCP's planning exchanges its plan objects between the job's own ranks through torch's object
collectives, in memory; nothing read from a file is unpickled.)

Inside a checkpoint (``aura.train.checkpoint`` writes the rest as for a consolidated one)::

    shards/shard-0000R-model-00001-of-00001.safetensors   rank R-1's chunks: weights as
                                                           ``model.FQN``, optimizer tensors as
                                                           ``opt{i}.FQN.KEY``
    shards/index.json        world size, and each tensor's full shape, dtype and chunks (file,
                             offsets, sizes): what the shards hold, readable without torch
    train_state.json         optimizer param groups (parameters by name) and non-tensor state
    train_state.safetensors  RNG states only

Replicated tensors (DDP's weights, AdamW's step counts) are written once, by the rank DCP's
de-duplication picks. ``aura export`` and every reader of weights (``load_weights``)
consolidate in one process by DCP's reader, no process group needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aura.errors import DataError

SHARD_DIR = "shards"
SHARD_INDEX = f"{SHARD_DIR}/index.json"
MODEL_PREFIX = "model."


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """DCP without a process group warns that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / SHARD_INDEX).is_file()


def stage_dir(run_dir: Path, step: int) -> Path:
    """Where the ranks write a save's shards before rank 0 moves them into the checkpoint: a
    ``.step-*.tmp`` entry of checkpoints/, which listing ignores and pruning removes after a
    crash."""
    return run_dir / "checkpoints" / f".step-{step:08d}.shards.tmp"


def _optimizer_parts(model: nn.Module, optimizers: Any
                     ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Each optimizer's state keyed by parameter name (this rank's shards under FSDP2): the
    tensors, and the JSON rest (param groups, non-tensor state)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors: dict[str, torch.Tensor] = {}
    plain: list[dict[str, Any]] = []
    for i, opt in enumerate(optimizers.optimizers):
        sd = get_optimizer_state_dict(model, opt)  # initialises an empty optimizer's state
        other: dict[str, dict[str, Any]] = {}
        for fqn, state in sd["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"opt{i}.{fqn}.{key}"] = value
                else:
                    other.setdefault(fqn, {})[key] = value
        plain.append({"param_groups": sd["param_groups"], "plain_state": other})
    return tensors, plain


def _unique(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each tensor once under ``model.NAME`` (a tied head is the embedding: safetensors stores
    shared memory once), and the names left out -> the name that holds their tensor."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, value in state.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        key = (local.data_ptr(), tuple(local.shape), local.stride())  # the same view
        if local.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[MODEL_PREFIX + name] = value
    return kept, aliases


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return _unique(get_model_state_dict(model))


def _full(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """The state dict by plain names again, tied names included."""
    state = {k.removeprefix(MODEL_PREFIX): v for k, v in tensors.items()}
    return {**state, **{name: state[kept] for name, kept in aliases.items()}}


@dataclass
class Staged:
    """A save's shards, written by every rank; rank 0 moves them into the checkpoint."""

    path: Path
    world: int
    plain: list[dict[str, Any]]  # the optimizers' JSON part, as train_state.json holds it

    def move_into(self, checkpoint: Path) -> None:
        """Move the shards into ``checkpoint`` (under construction) and write their index."""
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        target = checkpoint / SHARD_DIR
        os.replace(self.path, target)
        metadata = HuggingFaceStorageReader(str(target)).read_metadata()
        files = {}
        for index, info in metadata.storage_data.items():
            files.setdefault(index.fqn, {})[tuple(index.offset)] = Path(info.relative_path).name
        tensors = {
            fqn: {"shape": list(md.size), "dtype": str(md.properties.dtype).removeprefix("torch."),
                  "chunks": [{"file": files[fqn][tuple(c.offsets)], "offsets": list(c.offsets),
                              "sizes": list(c.sizes)} for c in md.chunks]}
            for fqn, md in sorted(metadata.state_dict_metadata.items())}
        (checkpoint / SHARD_INDEX).write_text(json.dumps(
            {"format": "aura-sharded-1", "world": self.world, "tensors": tensors}, indent=1))


def stage(run_dir: Path, step: int, group: Any, model: nn.Module, optimizers: Any) -> Staged:
    """Every rank writes its shards of the weights and optimizer state (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    path = stage_dir(run_dir, step)
    if group.main:
        shutil.rmtree(path, ignore_errors=True)  # a crashed save's
        path.mkdir(parents=True)
    group.barrier()
    # the model's state first: taken after the optimizer's, an FSDP2 model just evaluated
    # failed to name the optimizer's parameters (KeyError in torch's state_dict API)
    weights = _model_tensors(model)[0]
    opt_tensors, plain = _optimizer_parts(model, optimizers)
    tensors = {**weights, **opt_tensors}
    with _one_process():
        dcp.save(tensors, no_dist=group.world == 1,
                 storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True))
    group.barrier()
    return Staged(path, group.world, plain)


def load_state(checkpoint: Path, model: nn.Module, optimizers: Any,
               plain: list[dict[str, Any]]) -> None:
    """Restore weights and optimizer state from a sharded checkpoint into this rank's (possibly
    sharded) model and optimizers, on any world size: DCP reads each rank's chunks of every
    file. Collective under torchrun."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    weights, aliases = _model_tensors(model)
    opt_tensors, _ = _optimizer_parts(model, optimizers)
    if len(plain) != len(optimizers.optimizers):
        raise DataError(f"{checkpoint} holds {len(plain)} optimizers, the run has "
                         f"{len(optimizers.optimizers)} (train.optimizer changed?)")
    with _one_process():
        dcp.load({**weights, **opt_tensors},
                 storage_reader=HuggingFaceStorageReader(str(checkpoint / SHARD_DIR)))
    set_model_state_dict(model, _full(weights, aliases))
    for i, (opt, saved) in enumerate(zip(optimizers.optimizers, plain, strict=True)):
        state: dict[str, dict[str, Any]] = {fqn: dict(s) for fqn, s
                                            in saved["plain_state"].items()}
        prefix = f"opt{i}."
        for name, value in opt_tensors.items():
            if name.startswith(prefix):
                fqn, key = name[len(prefix):].rsplit(".", 1)
                state.setdefault(fqn, {})[key] = value
        set_optimizer_state_dict(model, opt, {"state": state,
                                              "param_groups": saved["param_groups"]})


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """The full weights of a sharded checkpoint into an unsharded ``model``, in this process
    alone (no process group: every chunk is read here)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    targets, aliases = _unique(model.state_dict())
    with _one_process():
        dcp.load(targets, no_dist=True,
                 storage_reader=HuggingFaceStorageReader(str(checkpoint / SHARD_DIR)))
    model.load_state_dict(_full(targets, aliases))
