"""Continual-learning metrics with Avalanche's definitions (Lomonaco et al. 2021, "Avalanche:
an End-to-End Library for Continual Learning", after Lopez-Paz & Ranzato 2017, GEM), adapted to a
loss, where lower is better.

``L[i][j]`` is the loss on domain j after training stage i (0-based, T stages, T domains), and
``b[j]`` the loss of the untrained model on domain j. Signs are chosen so each number reads like
its accuracy original:

- ``acc``: mean final loss, (1/T) sum_j L[T-1][j] (Avalanche's stream accuracy; lower is better).
- ``forgetting[j]`` = L[T-1][j] - L[j][j] for j < T-1: how much the loss on a domain rose between
  the end of its own stage and the end (Avalanche's experience forgetting, "value when learned
  minus value now", with the sign flipped for a loss, so positive = forgot).
  ``forgetting`` is its mean over the first T-1 domains.
- ``bwt`` = -forgetting (Avalanche's BWT; positive = later stages improved earlier domains).
- ``fwt`` = (1/(T-1)) sum_{j>=1} (b[j] - L[j-1][j]): how much lower a domain's loss is, before
  its stage, than an untrained model's (Avalanche's forward transfer; positive = helped).
- ``relative_forgetting`` = mean over j < T-1 of (L[T-1][j] - L[j][j]) / (b[j] - L[j][j]): the
  share of what was learned on a domain that was lost by the end (0: nothing, 1: back to an
  untrained model). Not an Avalanche metric: the "forgetting under 10%" figure of the design
  notes needs a scale-free number, and this is the one that compares across domains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aura.atomic import atomic_open


def cl_metrics(matrix: Sequence[Sequence[float]], initial: Sequence[float]) -> dict[str, Any]:
    """The metrics above from the T x T loss matrix and the untrained losses (length T)."""
    t = len(matrix)
    if t == 0 or any(len(row) != t for row in matrix) or len(initial) != t:
        raise ValueError("the loss matrix must be T x T and the initial losses of length T")
    final = matrix[-1]
    forgetting = [final[j] - matrix[j][j] for j in range(t - 1)]
    relative = [(final[j] - matrix[j][j]) / (initial[j] - matrix[j][j])
                if initial[j] != matrix[j][j] else 0.0 for j in range(t - 1)]
    fwt = [initial[j] - matrix[j - 1][j] for j in range(1, t)]
    mean_forgetting = sum(forgetting) / len(forgetting) if forgetting else 0.0
    return {
        "acc": sum(final) / t,
        "forgetting": mean_forgetting,
        "forgetting_per_domain": forgetting,
        "bwt": -mean_forgetting,
        "fwt": sum(fwt) / len(fwt) if fwt else 0.0,
        "relative_forgetting": sum(relative) / len(relative) if relative else 0.0,
        "relative_forgetting_per_domain": relative,
    }


def markdown_table(names: Sequence[str], matrix: Sequence[Sequence[float]],
                   initial: Sequence[float], metrics: dict[str, Any], strategy: str) -> str:
    """The loss matrix (rows: after each stage) and the metrics, as markdown."""
    head = "| after \\ on | " + " | ".join(names) + " |"
    rule = "| --- |" + " --- |" * len(names)
    rows = ["| untrained | " + " | ".join(f"{v:.4f}" for v in initial) + " |"]
    rows += [f"| {names[i]} | " + " | ".join(f"{v:.4f}" for v in row) + " |"
             for i, row in enumerate(matrix)]
    summary = (f"strategy **{strategy}**: ACC (mean final loss) {metrics['acc']:.4f}, "
               f"forgetting {metrics['forgetting']:.4f} "
               f"(relative {100 * metrics['relative_forgetting']:.1f}%), "
               f"BWT {metrics['bwt']:.4f}, FWT {metrics['fwt']:.4f}")
    return "\n".join([head, rule, *rows, "", summary, ""])


def heatmap(path: Any, names: Sequence[str], matrix: Sequence[Sequence[float]],
            title: str) -> None:
    """A PNG heatmap of the loss matrix (matplotlib, the ``plot`` extra)."""
    from aura.extras import require

    require("matplotlib", "the continual-learning heatmap", "pip install 'aura[plot]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 1.1 * len(names) + 1.5))
    im = ax.imshow(matrix, cmap="viridis_r")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), [f"after {n}" for n in names])
    ax.set_xlabel("evaluated on")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="loss (nats/token)")
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
