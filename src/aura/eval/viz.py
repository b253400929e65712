"""Pictures of what a model does inside on one probe text, each with its data beside it.

``render`` takes a model's ``brain_state`` (named arrays, see ``aura.models.inspect``) and draws
whatever is there: spike rasters (time on x, neuron on y, as snnTorch's ``spikeplot``) with
firing-rate histograms, attention maps per head, place-cell activity over positions, grid-cell
fields over the learned plane (RatInABox's rate maps), time-cell tuning, theta-gamma phases, BDH's
x/y sparsity (token x neuron), memory reads. Every PNG has a ``.npz`` of exactly what it draws
next to it, and ``index.html`` shows them together. ``aura viz`` and ``aura train
--viz-interval`` both come here; neither knows any model.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), as ``aura.eval.plots``.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aura.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from aura.data.prosody import token_features
from aura.data.sampler import compute_features
from aura.data.shards import PreparedData
from aura.data.tokenizers import Tokenizer
from aura.extras import extra_install, require
from aura.models.base import AuraModel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RASTER_NEURONS = 128  # neurons a raster shows (its histogram counts every neuron)
PLACE_CELLS_SHOWN = 200  # the place cells that fire most over the probe
BDH_NEURONS_SHOWN = 256  # the BDH neurons active at the most tokens, per layer
LABELLED_TOKENS = 48  # longer probes get numbered axes instead of token labels
INDEX = "index.html"
METRICS = "metrics.json"


@dataclass
class Picture:
    """One PNG, the file with its data, and what it shows."""

    png: Path
    data: Path
    caption: str


def _figure(width: float, height: float) -> Figure:
    require("matplotlib", "aura viz", extra_install("plot"))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _token_axis(ax: Any, tokens: list[str], axis: str = "x") -> None:
    if not tokens or len(tokens) > LABELLED_TOKENS:
        return
    ticks = range(len(tokens))
    labels = [repr(t)[1:-1] for t in tokens]
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
    else:
        ax.set_yticks(ticks, labels, fontsize=6)


def _layers(state: Mapping[str, np.ndarray], prefix: str) -> list[str]:
    """The layer suffixes of ``prefix/L`` keys, in layer order."""
    found = [k[len(prefix) + 1:] for k in state if k.startswith(prefix + "/")]
    return sorted(found, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def probe_state(model: AuraModel, tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's ``brain_state`` on token ``ids`` (one sequence, evaluation mode restored
    afterwards, with the token features it declares), and each token's text."""
    device = next(model.parameters()).device
    idx = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)[None]
    features = token_features(model.token_features, tokenizer) if model.token_features else {}
    inputs = compute_features(features, idx)
    was_training = model.training
    model.eval()
    try:
        state = model.brain_state(idx, **inputs)
    finally:
        model.train(was_training)
    return state, [tokenizer.decode([int(i)]) for i in idx[0].tolist()]


# --- what each picture shows (data), then how it is drawn --------------------------------------

def raster_data(spikes: np.ndarray, shown: int = RASTER_NEURONS) -> dict[str, np.ndarray]:
    """A spike raster of ``spikes`` (steps, T, neurons): one point per nonzero (step, token,
    neuron) among the first ``shown`` neurons, at time ``token * steps + step``, with its count
    (graded spikes); every neuron's firing rate (spikes per step) for the histogram."""
    steps, _, _ = spikes.shape
    s, t, n = np.nonzero(spikes[:, :, :shown])
    return {"time": t * steps + s, "neuron": n, "count": spikes[s, t, n],
            "rates": spikes.mean(axis=(0, 1)), "steps": np.array(steps),
            "shown": np.array(min(shown, spikes.shape[2]))}


def place_data(code: np.ndarray, shown: int = PLACE_CELLS_SHOWN) -> dict[str, np.ndarray]:
    """Place code (T, cells): the fraction of cells active at each position and overall (what
    the model measures as ``place_active``), and the ``shown`` cells that fire most."""
    active = code != 0
    cells = np.argsort(-active.sum(0), kind="stable")[:shown]
    cells = np.sort(cells[active[:, cells].any(0)])
    return {"active_per_position": active.mean(1), "active_fraction": np.array(active.mean()),
            "cells": cells, "code": code[:, cells]}


def bdh_data(x: np.ndarray, y: np.ndarray, shown: int = BDH_NEURONS_SHOWN
             ) -> dict[str, np.ndarray]:
    """BDH activity (T, heads, N) of x and y: the active fraction per token and overall (the
    model's ``x_active`` / ``y_active``), and the ``shown`` neurons of x active at most tokens,
    numbered head * N + n."""
    T = x.shape[0]
    xf, yf = x.reshape(T, -1), y.reshape(T, -1)
    neurons = np.sort(np.argsort(-xf.sum(0), kind="stable")[:shown])
    return {"x_per_token": xf.mean(1), "y_per_token": yf.mean(1),
            "x_active": np.array(xf.mean()), "y_active": np.array(yf.mean()),
            "neurons": neurons, "x_shown": xf[:, neurons], "y_shown": yf[:, neurons]}


def _draw_attention(w: np.ndarray, tokens: list[str], title: str) -> Figure:
    from matplotlib.colors import PowerNorm

    heads = w.shape[0]
    cols = min(heads, 4)
    rows = -(-heads // cols)
    fig = _figure(3.2 * cols, 3.2 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        # a square-root scale: late rows spread their weight over many keys
        ax.imshow(w[h], cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1),
                  interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        _token_axis(ax, tokens, "x")
        _token_axis(ax, tokens, "y")
    fig.suptitle(title)
    return fig


def _draw_raster(d: dict[str, np.ndarray], T: int, title: str) -> Figure:
    fig = _figure(10, 5)
    ax, hist = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    ax.scatter(d["time"], d["neuron"], s=2, c="black", marker="|")
    ax.set_xlim(-0.5, T * int(d["steps"]) - 0.5)
    ax.set_ylim(-0.5, int(d["shown"]) - 0.5)
    ax.set_xlabel(f"time (token x {int(d['steps'])} steps)")
    ax.set_ylabel("neuron")
    hist.hist(d["rates"], bins=20, range=(0, max(1.0, float(d["rates"].max(initial=0)))),
              color="tab:blue")
    hist.set_xlabel("firing rate (spikes / step)")
    hist.set_ylabel("neurons")
    hist.set_yscale("log")
    fig.suptitle(f"{title}: mean rate {float(d['rates'].mean()):.3f}")
    return fig


def _draw_place(d: dict[str, np.ndarray], tokens: list[str]) -> Figure:
    fig = _figure(10, 6)
    ax, line = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.imshow(d["code"].T, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_ylabel(f"place cell ({len(d['cells'])} most active)")
    line.plot(d["active_per_position"], color="tab:red")
    line.set_ylabel("active fraction")
    line.set_xlabel("token position")
    _token_axis(line, tokens)
    fig.suptitle(f"place cells: {float(d['active_fraction']):.2%} active")
    return fig


def _draw_grid(state: Mapping[str, np.ndarray]) -> Figure:
    field, pos, ext = state["grid/field"], state["grid/position"], state["grid/extent"]
    modules = field.shape[0]
    fig = _figure(3 * modules, 3.4)
    axes = fig.subplots(1, modules, squeeze=False)[0]
    for m, ax in enumerate(axes):
        ax.imshow(field[m], origin="lower", extent=tuple(ext), cmap="jet", vmin=0, vmax=1)
        ax.plot(pos[:, 0], pos[:, 1], "w.-", lw=0.6, ms=3)
        ax.set_title(f"module {m}, cell 0", fontsize=9)
    fig.suptitle("grid cells: rate over the learned plane, the probe's path in white")
    return fig


def _draw_time(state: Mapping[str, np.ndarray], tokens: list[str]) -> Figure:
    fig = _figure(10, 6)
    curves, code = fig.subplots(2, 1)
    tuning = state["time/tuning"]
    curves.plot(tuning, lw=0.8)
    curves.set_xscale("symlog")
    curves.set_xlabel("tokens since the last boundary")
    curves.set_ylabel("rate")
    code.imshow(state["time/rates"].T, aspect="auto", cmap="viridis", interpolation="nearest")
    code.set_ylabel("time cell")
    code.set_xlabel("token position")
    _token_axis(code, tokens)
    fig.suptitle("time cells: tuning curves, and the code over the probe")
    return fig


def _draw_theta_gamma(state: Mapping[str, np.ndarray]) -> Figure:
    fig = _figure(10, 4)
    ax = fig.subplots()
    t = np.arange(len(state["theta_gamma/theta_phase"]))
    ax.plot(t, state["theta_gamma/theta_phase"], label="theta phase")
    ax.plot(t, state["theta_gamma/gamma_phase"], label="gamma phase", lw=0.8)
    ax.plot(t, 2 * np.pi * state["theta_gamma/gamma_amplitude"], "--",
            label="gamma amplitude x 2π")
    ax.set_xlabel("token position")
    ax.set_ylabel("radians")
    ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("theta-gamma phase per position")
    return fig


def _draw_memory(d: dict[str, np.ndarray], name: str, tokens: list[str]) -> Figure:
    fig = _figure(10, 6)
    ax, line = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    shown = ax.imshow(d["scores"].T, aspect="auto", cmap="viridis", vmin=-1, vmax=1,
                      interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="cosine")
    ax.set_ylabel("k-th memory read")
    line.plot(d["gate"], color="tab:green")
    line.set_ylabel("gate")
    line.set_xlabel("token position")
    _token_axis(line, tokens)
    found = int((d["ids"] >= 0).sum())
    fig.suptitle(f"memory {name}: {found} reads of {len(np.unique(d['ids'][d['ids'] >= 0]))} "
                 "distinct memories")
    return fig


def _draw_routing(probs: np.ndarray, name: str, tokens: list[str]) -> Figure:
    fig = _figure(10, 4)
    ax = fig.subplots()
    im = ax.imshow(probs.T, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                   interpolation="nearest")
    ax.set_xlabel("token position")
    ax.set_ylabel("option")
    fig.colorbar(im, ax=ax, label="probability")
    fig.suptitle(f"{name} routing per token ({probs.shape[1]} options; {len(tokens)} tokens)")
    return fig


def _draw_bdh(d: dict[str, np.ndarray], layer: str) -> Figure:
    fig = _figure(10, 7)
    ax_x, ax_y, line = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2, 2, 1]})
    for ax, key, label in ((ax_x, "x_shown", "x"), (ax_y, "y_shown", "y")):
        ax.imshow(d[key].T, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(f"{label} neuron")
    line.plot(d["x_per_token"], label="x active")
    line.plot(d["y_per_token"], label="y active")
    line.set_ylabel("fraction")
    line.set_xlabel("token position")
    line.legend(fontsize=8)
    fig.suptitle(f"BDH layer {layer}: x {float(d['x_active']):.2%}, y {float(d['y_active']):.2%}"
                 f" active ({len(d['neurons'])} neurons of x most active shown)")
    return fig


# --- writing ----------------------------------------------------------------------------------

def _save(out: Path, stem: str, fig: Figure, data: Mapping[str, np.ndarray], caption: str
          ) -> Picture:
    png, npz = out / f"{stem}.png", out / f"{stem}.npz"
    with atomic_open(png) as f:
        fig.savefig(f, format="png")
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in data.items()})
    atomic_write_bytes(npz, buf.getvalue())
    return Picture(png, npz, caption)


def render(state: Mapping[str, Any], tokens: list[str], out: str | Path, title: str = ""
           ) -> list[Picture]:
    """Draw every picture ``state`` (a ``brain_state``, tensors or arrays) has into ``out``
    (created), with the data beside each, ``metrics.json`` and ``index.html``; returns them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in state.items()}
    pics: list[Picture] = []
    T = len(tokens)
    for layer in _layers(s, "spikes"):
        d = raster_data(s[f"spikes/{layer}"])
        fig = _draw_raster(d, T, f"spiking FFN, layer {layer}")
        pics.append(_save(out, f"spikes-{layer}", fig, d,
                          f"layer {layer}: spike raster (first {int(d['shown'])} neurons) and "
                          "firing rates of every neuron"))
    for layer in _layers(s, "attention"):
        w = s[f"attention/{layer}"]
        fig = _draw_attention(w, tokens, f"attention, layer {layer} (query rows, key columns)")
        pics.append(_save(out, f"attention-{layer}", fig, {"weights": w},
                          f"layer {layer}: attention weights per head"))
    if "place/code" in s:
        d = place_data(s["place/code"])
        pics.append(_save(out, "place", _draw_place(d, tokens), d,
                          "place cells: activity over token positions"))
    if "grid/field" in s:
        keys = ("grid/field", "grid/position", "grid/rates", "grid/extent")
        pics.append(_save(out, "grid", _draw_grid(s), {k[5:]: s[k] for k in keys},
                          "grid cells: each module's field over the learned plane"))
    if "time/rates" in s:
        keys = ("time/elapsed", "time/rates", "time/tuning", "time/preferred")
        pics.append(_save(out, "time", _draw_time(s, tokens), {k[5:]: s[k] for k in keys},
                          "time cells: log-spaced tuning and the probe's code"))
    if "theta_gamma/theta_phase" in s:
        d = {k[12:]: v for k, v in s.items() if k.startswith("theta_gamma/")}
        pics.append(_save(out, "theta-gamma", _draw_theta_gamma(s), d,
                          "theta and gamma phase per position"))
    names = sorted({k.split("/")[1] for k in s if k.startswith("memory/") and k.endswith("/ids")})
    for name in names:
        d = {f: s[f"memory/{name}/{f}"] for f in ("ids", "scores", "gate")}
        pics.append(_save(out, f"memory-{name}", _draw_memory(d, name, tokens), d,
                          f"memory {name}: which memories each token read, and its gate"))
    for name in _layers(s, "routing"):
        probs = s[f"routing/{name}"]
        pics.append(_save(out, f"routing-{name}", _draw_routing(probs, name, tokens),
                          {"probs": probs}, f"{name}: each token's routing probabilities"))
    for layer in _layers(s, "bdh_x"):
        d = bdh_data(s[f"bdh_x/{layer}"], s[f"bdh_y/{layer}"])
        pics.append(_save(out, f"bdh-{layer}", _draw_bdh(d, layer), d,
                          f"BDH layer {layer}: x and y neurons active per token"))
    metrics = {k[7:]: float(v) for k, v in s.items() if k.startswith("metric/")}
    atomic_write_text(out / METRICS, json.dumps({"tokens": tokens, "metrics": metrics},
                                                indent=1))
    write_index(out, pics, title, metrics)
    return pics


def write_index(out: Path, pics: list[Picture], title: str, metrics: Mapping[str, float]
                ) -> Path:
    """``out/index.html``: every picture with its caption and a link to its data."""
    e = html.escape
    rows = "".join(f"<tr><td>{e(k)}</td><td>{v:.4g}</td></tr>" for k, v in metrics.items())
    figures = "".join(
        f'<figure><img src="{e(p.png.name)}" alt="{e(p.caption)}"><figcaption>{e(p.caption)} '
        f'(<a href="{e(p.data.name)}">data</a>)</figcaption></figure>' for p in pics)
    empty = "" if pics else "<p>This model declares no internal state to draw.</p>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            "<style>body{font-family:sans-serif;margin:1em}img{max-width:100%}"
            "figure{margin:1em 0}td{padding:0 1em}</style></head><body>"
            f"<h1>{e(title)}</h1>{empty}<table>{rows}</table>{figures}</body></html>\n")
    path = out / INDEX
    atomic_write_text(path, page)
    return path


PROBE_TOKENS = 64  # the training probe: the first 64 tokens of the val split (else train)


class Snapshots:
    """``aura train --viz-interval N``: every N steps, the pictures of one fixed probe under
    ``RUN/viz/step-XXXXXXX/``. The probe is the start of the held-out split (the train split
    when there is none), cut to the context, so every snapshot shows the same text."""

    def __init__(self, run_dir: Path, interval: int, tokenizer: Tokenizer,
                 probe: np.ndarray) -> None:
        self.dir, self.interval, self.tokenizer = Path(run_dir) / "viz", interval, tokenizer
        self.probe = np.asarray(probe, dtype=np.int64)

    @classmethod
    def for_run(cls, run_dir: Path, interval: int, data: PreparedData, context: int
                ) -> Snapshots:
        split = data.splits.get("val")
        split = split if split is not None and split.n_tokens else data.split("train")
        n = min(PROBE_TOKENS, context)
        tokens: list[np.ndarray] = []
        for shard in split.maps:
            tokens.append(np.asarray(shard[:n - sum(len(t) for t in tokens)]))
            if sum(len(t) for t in tokens) >= n:
                break
        return cls(run_dir, interval, data.tokenizer, np.concatenate(tokens))

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    def take(self, model: AuraModel, step: int) -> Path:
        """Draw the probe at ``step``; returns the snapshot's directory."""
        out = self.dir / f"step-{step:07d}"
        state, tokens = probe_state(model, self.tokenizer, self.probe)
        render(state, tokens, out, f"step {step}")
        return out
