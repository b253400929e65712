"""One run of an ablation (``aura ablate``, ``aura.eval.ablate``): train, resuming whatever an
interrupted attempt saved, then evaluate on the start of the val split.

Here rather than in ``eval/`` because it drives the trainer, and evaluators never import it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from aura.config import AuraConfig
from aura.errors import AuraError
from aura.eval.perplexity import evaluate_prepared
from aura.train.trainer import Trainer


def train_and_evaluate(cfg: AuraConfig, data_dir: Path, run_dir: Path, *, eval_tokens: int,
                       progress: bool = True, log: Callable[[str], None] | None = None
                       ) -> dict[str, float]:
    """Train ``cfg`` in ``run_dir`` (resumed if it holds checkpoints) to its max_steps, then the
    val loss and bits per byte over the split's first ``eval_tokens`` tokens, the same tokens
    for every variant and seed. A run stopped by a signal raises KeyboardInterrupt (the
    ablation stops there; run it again to resume)."""
    kw = {} if log is None else {"log": log}
    trainer = Trainer(cfg, data_dir, run_dir, resume=True, progress=progress, **kw)
    result = trainer.run()
    if result.stopped == "interrupted":
        raise KeyboardInterrupt
    if result.stopped == "sanity":
        raise AuraError(f"{run_dir}: stopped by train.strict_sanity: "
                        f"{result.sanity_warnings[0]}")
    ev = evaluate_prepared(trainer.model, trainer.data, "val", max_tokens=eval_tokens)
    return {"val_loss": ev.loss, "val_bpb": ev.bits_per_byte,
            "tokens_per_s": result.tokens_per_s, "step": float(result.step)}
