"""``aura cl EXPERIMENT.yaml``: a sequence of prepared datasets (domains) learned one after
another under one strategy, every domain evaluated after every stage, and the loss matrix with
its metrics (``aura.continual.metrics``) written as JSON, markdown and a PNG heatmap.

It drives the trainer and the evaluator, so it lives in ``train/`` (as ``ablation.py`` does);
``continual/`` sits below, and the trainer calls it through ``hook.ContinualHook``.

Each stage is an ordinary run, ``OUT/stage-I-NAME``, started ``--init-from`` the previous one with
its continual state (Fisher, replay buffer), so its LR warms up and decays again (Ibrahim et al.
2024). Running the same experiment again continues it: finished stages are kept, an interrupted
one resumes from its checkpoint bit-identically.

    domains:                 # prepared datasets, in order; one tokenizer for all
      - {name: shakespeare, data: data/shakespeare-byte}
      - data/python-byte     # a bare path: its directory name is the domain's name
    strategy: replay+ewc     # naive, ewc, replay, replay+ewc, sleep, joint
    steps: 2000              # training steps per domain
    preset: cpu-small        # or config: FILE (as `aura train`)
    set: [train.lr=1e-3]     # --set overrides, applied after the strategy's
    eval_tokens: 32768       # val tokens scored per domain and stage (null: the whole split)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from aura.atomic import atomic_dir, atomic_write_text
from aura.config import AuraConfig, load_config
from aura.continual.metrics import cl_metrics, heatmap, markdown_table
from aura.data.shards import MANIFEST, PreparedData
from aura.errors import ConfigError, DataError
from aura.eval.perplexity import evaluate_prepared
from aura.models import build_model
from aura.train.checkpoint import list_checkpoints, load_for_inference, newest_checkpoint
from aura.train.trainer import Trainer

STRATEGIES = ("naive", "ewc", "replay", "replay+ewc", "sleep", "joint")
DEFAULT_REPLAY_TOKENS = 65536
RESULT_JSON, RESULT_MD, RESULT_PNG, SPEC_JSON = "cl.json", "cl.md", "cl.png", "experiment.json"
Log = Callable[[str], None]


@dataclass
class Domain:
    name: str
    data: str


@dataclass
class Experiment:
    domains: list[Domain]
    strategy: str = "naive"
    steps: int = 1000
    preset: str | None = None
    config: str | None = None
    set: list[str] = field(default_factory=list)
    eval_tokens: int | None = 32768
    eval_batch_size: int = 8


def _stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def load_experiment(path: str | Path) -> Experiment:
    """The experiment of a YAML file; anything wrong in it is one ConfigError line."""
    where = f"experiment file '{path}'"
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"cannot read {where}: {reason}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: must be a mapping with domains, strategy, steps")
    known = {f.name for f in dataclasses.fields(Experiment)}
    unknown = sorted(str(k) for k in tree if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                          f"keys: {', '.join(sorted(known))}")
    raw = tree.get("domains")
    if not isinstance(raw, list) or len(raw) < 2:
        raise ConfigError(f"{where}: domains must be a list of at least two prepared datasets")
    domains = []
    for i, d in enumerate(raw):
        if isinstance(d, str):
            d = {"data": d}
        if not (isinstance(d, dict) and isinstance(d.get("data"), str)
                and set(d) <= {"name", "data"} and isinstance(d.get("name", ""), str)):
            raise ConfigError(f"{where}: domains[{i}] must be a path or {{name, data}}")
        domains.append(Domain(d.get("name") or Path(d["data"]).name, d["data"]))
    if len({d.name for d in domains}) != len(domains):
        raise ConfigError(f"{where}: domain names must be distinct")
    exp = Experiment(domains=domains)
    for key in known - {"domains"}:
        if key in tree:
            setattr(exp, key, tree[key])
    checks = [
        (exp.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}"),
        (type(exp.steps) is int and exp.steps > 0, "steps must be a positive integer"),
        (exp.preset is None or isinstance(exp.preset, str), "preset must be a preset name"),
        (exp.config is None or isinstance(exp.config, str), "config must be a file path"),
        (isinstance(exp.set, list) and all(isinstance(s, str) for s in exp.set),
         "set must be a list of KEY=VALUE strings"),
        (exp.eval_tokens is None or (type(exp.eval_tokens) is int and exp.eval_tokens > 1),
         "eval_tokens must be an integer > 1 or null"),
        (type(exp.eval_batch_size) is int and exp.eval_batch_size > 0,
         "eval_batch_size must be a positive integer"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")
    if exp.preset is None and exp.config is None:
        raise ConfigError(f"{where}: give a preset or a config")
    return exp


def strategy_overrides(exp: Experiment) -> list[str]:
    """The ``--set`` overrides a strategy stands for, before the experiment's own."""
    replay = [f"continual.replay_tokens={DEFAULT_REPLAY_TOKENS}"]
    return {
        "naive": [], "joint": [],
        "ewc": ["continual.ewc=true"],
        "replay": replay,
        "replay+ewc": [*replay, "continual.ewc=true"],
        "sleep": [*replay, f"continual.sleep_interval={max(1, exp.steps // 4)}"],
    }[exp.strategy]


def stage_config(exp: Experiment) -> AuraConfig:
    return load_config(preset=exp.preset, config_file=exp.config,
                       overrides=[*strategy_overrides(exp), *exp.set,
                                  f"train.max_steps={exp.steps}"])


def _open_domains(exp: Experiment) -> list[PreparedData]:
    """Every domain's data, checked before any training: present, with a val split, one
    tokenizer."""
    datas = [PreparedData.open(d.data, verify="size") for d in exp.domains]
    for d, data in zip(exp.domains, datas, strict=True):
        if "val" not in data.splits or data.split("val").n_tokens < 2:
            raise DataError(f"domain {d.name} ({d.data}) has no val split to evaluate on; "
                            "prepare it with --val-fraction > 0")
        if data.tokenizer.hash != datas[0].tokenizer.hash:
            raise DataError(f"domain {d.name} ({d.data}) has another tokenizer than "
                            f"{exp.domains[0].name}: prepare every domain with the same one "
                            "(e.g. byte)")
    return datas


def union_data(datas: list[PreparedData], out: Path) -> Path:
    """One prepared dataset holding ``datas`` side by side (shards linked, or copied where
    links are refused), each domain weighted equally: what "joint" trains on."""
    manifests = [d.manifest for d in datas]
    key = hashlib.sha256(json.dumps([m["cache_key"] for m in manifests]).encode()).hexdigest()
    if (out / MANIFEST).is_file():
        with_key = json.loads((out / MANIFEST).read_text())
        if with_key.get("cache_key") == key:
            return out
    merged = json.loads(json.dumps(manifests[0]))
    merged["cache_key"], merged["sources"] = key, []
    merged["splits"] = {}
    with atomic_dir(out) as tmp:
        shutil.copy2(datas[0].root / merged["tokenizer"]["file"], tmp / merged["tokenizer"]["file"])
        for k, (data, m) in enumerate(zip(datas, manifests, strict=True)):
            offset = len(merged["sources"])
            for s in m["sources"]:
                merged["sources"].append({**s, "weight": 1.0 / len(m["sources"])})
            for split, info in m["splits"].items():
                target = merged["splits"].setdefault(split, {"shards": [], "n_docs": 0,
                                                             "n_text_bytes": 0})
                target["n_docs"] += info["n_docs"]
                target["n_text_bytes"] += info["n_text_bytes"]
                for shard in info["shards"]:
                    name = f"d{k}-{shard['file']}"
                    try:
                        os.link(data.root / shard["file"], tmp / name)
                    except OSError:
                        shutil.copy2(data.root / shard["file"], tmp / name)
                    target["shards"].append({**shard, "file": name,
                                             "source": shard["source"] + offset})
        (tmp / MANIFEST).write_text(json.dumps(merged, indent=1))
    return out


def _evaluate_all(model: torch.nn.Module, datas: list[PreparedData], exp: Experiment
                  ) -> list[float]:
    return [evaluate_prepared(model, d, "val", max_tokens=exp.eval_tokens,  # type: ignore[arg-type]
                              batch_size=exp.eval_batch_size).loss for d in datas]


def _spec(exp: Experiment) -> dict[str, Any]:
    return dataclasses.asdict(exp)


def run_experiment(exp: Experiment, out: str | Path, *, progress: bool = True,
                   log: Log = _stderr) -> dict[str, Any]:
    """Train the stages (or continue them), evaluate, write cl.json, cl.md and cl.png. A
    signal that stops a stage returns ``{"stopped": SIGNAL, "stage": I}`` at once."""
    out = Path(out)
    cfg = stage_config(exp)  # config errors before anything is read or written
    datas = _open_domains(exp)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / SPEC_JSON
    if spec_path.is_file() and json.loads(spec_path.read_text()) != _spec(exp):
        raise ConfigError(f"{out} holds another experiment ({SPEC_JSON} differs); choose "
                          "another --out")
    atomic_write_text(spec_path, json.dumps(_spec(exp), indent=1))
    names = [d.name for d in exp.domains]

    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights, before any stage
    cfg.model.vocab_size = datas[0].vocab_size
    initial = _evaluate_all(build_model(cfg.model).eval(), datas, exp)

    matrix: list[list[float]] = []
    stages = []
    previous: Path | None = None
    bar = tqdm(total=len(names), desc=f"cl {exp.strategy}", unit="stage",
               disable=None if progress else True, dynamic_ncols=True)
    for i, name in enumerate(names):
        bar.set_postfix(domain=name)
        run = out / f"stage-{i}-{name}"
        data = (union_data(datas[: i + 1], out / f"joint-data-{i}") if exp.strategy == "joint"
                and i > 0 else Path(exp.domains[i].data))
        stage_cfg = stage_config(exp)
        stage_cfg.data.dir = str(data)
        resume = bool(list_checkpoints(run))
        trained = Trainer(stage_cfg, data, run, resume=resume, progress=False, log=log,
                          init_from=previous, init_continual=True).run()
        if trained.stop_signal is not None:  # saved mid-stage: the next `aura cl` continues
            bar.close()
            return {"stopped": trained.stop_signal, "stage": i}
        previous = newest_checkpoint(run, log)[0]  # the last weights, not the best
        matrix.append(_evaluate_all(load_for_inference(previous, log=log).model, datas, exp))
        stages.append({"stage": i, "domain": name, "run": str(run), "data": str(data)})
        bar.update(1)
    bar.close()

    metrics = cl_metrics(matrix, initial)
    result = {"experiment": _spec(exp), "domains": names, "initial": initial,
              "matrix": matrix, "metrics": metrics, "stages": stages}
    atomic_write_text(out / RESULT_JSON, json.dumps(result, indent=1))
    atomic_write_text(out / RESULT_MD, markdown_table(names, matrix, initial, metrics,
                                                      exp.strategy))
    try:
        heatmap(out / RESULT_PNG, names, matrix, f"loss after each stage ({exp.strategy})")
    except ConfigError as exc:  # matplotlib missing: the numbers are written, the picture not
        log(f"note: no {RESULT_PNG}: {exc}")
    return result
