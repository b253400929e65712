"""The training sanity monitor: the debugging checklist, run on every step, silent when healthy.

Each check watches one failure small runs really hit, and says once what it saw and what to check
(seed 000's list): the loss not falling clearly below ln(vocab) after 100 steps, or not moving at
all; the gradient norm outside [0.1, 10] for many steps in a row; the learning rate the optimizer
holds differing from the schedule's; a spiking layer dead (rate 0) or saturated (rate 1); a memory
gate collapsed to ~0; a router sending (nearly) everything to one expert; the validation loss
rising while the training loss falls. The trainer shows each warning in the progress bar, writes
it to metrics.jsonl (``{"event": "sanity", ...}``) and lists them at the end;
``train.strict_sanity`` stops the run (checkpoint saved) at the first.

The monitor sees only numbers the trainer already has (loss, gradient norm, learning rates, the
model's aux metrics, val losses), so it costs nothing measurable. Its windows live in memory: a
resumed run starts them afresh.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

LOSS_CHECK_STEP = 100  # the loss must have left ln(vocab) by then
LOSS_MARGIN = 0.9  # "clearly below": under 90% of ln(vocab)
GRAD_RANGE = (0.1, 10.0)
PERSIST = 25  # steps in a row an out-of-range value must last to be a warning
FLAT_WINDOW = 50  # steps of a loss that does not move at all
DEAD_RATE, SATURATED_RATE = 1e-4, 0.99
GATE_FLOOR = 1e-3
ROUTER_SHARE = 0.95
DIVERGING_EVALS = 3  # evaluations in a row with val up and train down
LR_TOLERANCE = 1e-6  # relative

_FIRING = re.compile(r"^firing_rate_(\d+)$")
_GATE = re.compile(r"^(mem_gate|memory_gate)$")
# A model with experts reports the share of tokens its busiest expert got, per router, as
# ``router_top_share`` or ``router_top_share_L`` (1 / experts when balanced, 1 when collapsed).
_ROUTER = re.compile(r"^router_top_share(_\w+)?$")


@dataclass(frozen=True)
class SanityWarning:
    step: int
    check: str  # which check, e.g. "grad_norm", "dead_layer_1"
    message: str  # what was seen, then what to check

    def line(self) -> str:
        return f"sanity: step {self.step}: {self.message}"


class _Streak:
    """How many consecutive observations a condition has held."""

    def __init__(self) -> None:
        self.n = 0

    def see(self, holds: bool) -> int:
        self.n = self.n + 1 if holds else 0
        return self.n


class SanityMonitor:
    """Feed it every step (``after_step``) and every evaluation (``after_eval``); each returns
    the warnings that became true just now. A check warns once per run."""

    def __init__(self, vocab_size: int, max_steps: int) -> None:
        self.ln_vocab = math.log(vocab_size)
        self.max_steps = max_steps
        self.warnings: list[SanityWarning] = []
        self._fired: set[str] = set()
        self._losses: deque[float] = deque(maxlen=FLAT_WINDOW)
        self._streaks: dict[str, _Streak] = {}
        self._evals: deque[tuple[float, float]] = deque(maxlen=DIVERGING_EVALS + 1)
        self._train_ema: float | None = None

    # --- bookkeeping ----------------------------------------------------------------------------

    def _warn(self, step: int, check: str, message: str) -> list[SanityWarning]:
        if check in self._fired:
            return []
        self._fired.add(check)
        w = SanityWarning(step, check, message)
        self.warnings.append(w)
        return [w]

    def _persists(self, key: str, holds: bool) -> bool:
        return self._streaks.setdefault(key, _Streak()).see(holds) == PERSIST

    # --- the checks -----------------------------------------------------------------------------

    def after_step(self, step: int, loss: float, grad_norm: float,
                   lr_expected: Iterable[float], lr_seen: Iterable[float],
                   aux: Mapping[str, float]) -> list[SanityWarning]:
        """``step`` is the number of steps done; ``lr_expected`` the schedule's learning rate of
        each optimizer parameter group, ``lr_seen`` what the group holds."""
        out: list[SanityWarning] = []
        self._losses.append(loss)
        self._train_ema = loss if self._train_ema is None else 0.9 * self._train_ema + 0.1 * loss
        if step == LOSS_CHECK_STEP:
            recent = sum(list(self._losses)[-10:]) / min(10, len(self._losses))
            if recent > LOSS_MARGIN * self.ln_vocab:
                out += self._warn(step, "loss_not_falling", (
                    f"loss {recent:.3f} is still near ln(vocab) = {self.ln_vocab:.3f} after "
                    f"{step} steps: the model predicts nearly uniformly; check the learning rate "
                    "(too low, or warmup too long), that targets are the inputs shifted by one, "
                    "and that the gradients reach the weights"))
        if len(self._losses) == FLAT_WINDOW and max(self._losses) - min(self._losses) <= 1e-6 * (
                1 + abs(loss)):
            out += self._warn(step, "loss_constant", (
                f"the loss has been exactly {loss:.4f} for {FLAT_WINDOW} steps: nothing is "
                "learning; check that the LR is not 0, that parameters require grad and are in "
                "the optimizer, and that the batches change from step to step"))
        low, high = GRAD_RANGE
        if math.isfinite(grad_norm):
            if self._persists("grad_high", grad_norm > high):
                out += self._warn(step, "grad_norm_high", (
                    f"gradient norm above {high:g} for {PERSIST} steps (now {grad_norm:.3g}): "
                    "training is unstable; lower train.lr, check train.grad_clip, the init, "
                    "and the loss scale"))
            if self._persists("grad_low", grad_norm < low):
                out += self._warn(step, "grad_norm_low", (
                    f"gradient norm below {low:g} for {PERSIST} steps (now {grad_norm:.3g}): "
                    "gradients vanish; check for detached tensors, dead activations, a loss "
                    "scaled to ~0, or a saturated softmax"))
        for i, (want, got) in enumerate(zip(lr_expected, lr_seen, strict=True)):
            if abs(got - want) > LR_TOLERANCE * max(abs(want), 1e-12):
                out += self._warn(step, "lr_mismatch", (
                    f"the optimizer's learning rate ({got:.3g}, group {i}) is not the "
                    f"schedule's ({want:.3g}): check that the schedule is applied to the "
                    "optimizer every step (set_lr_factor) and that nothing else sets group lr"))
                break
        out += self._check_aux(step, aux)
        return out

    def _check_aux(self, step: int, aux: Mapping[str, float]) -> list[SanityWarning]:
        out: list[SanityWarning] = []
        for key, value in aux.items():
            if not math.isfinite(value):
                continue
            if m := _FIRING.match(key):
                layer = m.group(1)
                if self._persists(f"dead_{layer}", value < DEAD_RATE):
                    out += self._warn(step, f"dead_layer_{layer}", (
                        f"spiking layer {layer} is silent (firing rate {value:.2g}) for "
                        f"{PERSIST} steps: no gradient passes a neuron that never fires; check "
                        "the input scale to its neurons, the threshold, and the surrogate's "
                        "width"))
                if self._persists(f"saturated_{layer}", value > SATURATED_RATE):
                    out += self._warn(step, f"saturated_layer_{layer}", (
                        f"spiking layer {layer} fires at every step (rate {value:.3f}) for "
                        f"{PERSIST} steps: it carries no information; check the input scale "
                        "and the threshold"))
            elif _GATE.match(key):
                if self._persists(f"gate_{key}", value < GATE_FLOOR):
                    out += self._warn(step, f"gate_collapsed_{key}", (
                        f"the memory gate ({key} {value:.2g}) has collapsed to ~0 for "
                        f"{PERSIST} steps: the model ignores its memory; check that the memory "
                        "holds entries (memory_size, hit rate), that reads are on after "
                        "train.memory_warmup_steps, and the retrieval scores"))
            elif _ROUTER.match(key) and self._persists(f"router_{key}", value > ROUTER_SHARE):
                out += self._warn(step, f"router_collapsed_{key}", (
                    f"the router sends {value:.0%} of tokens to one expert ({key}) for "
                    f"{PERSIST} steps: the experts collapsed; check the load-balancing "
                    "loss weight and the router's init and temperature"))
        return out

    def after_eval(self, step: int, val_loss: float) -> list[SanityWarning]:
        """A val loss rising for ``DIVERGING_EVALS`` evaluations in a row while the training
        loss (its moving average) falls is overfitting or a train/val mismatch."""
        if self._train_ema is None:
            return []
        self._evals.append((self._train_ema, val_loss))
        if len(self._evals) <= DIVERGING_EVALS:
            return []
        pairs = list(self._evals)
        val_up = all(b[1] > a[1] for a, b in itertools.pairwise(pairs))
        train_down = pairs[-1][0] < pairs[0][0]
        if val_up and train_down:
            return self._warn(step, "val_diverging", (
                f"val loss rose in {DIVERGING_EVALS} evaluations in a row (to {val_loss:.3f}) "
                f"while the train loss fell (to {pairs[-1][0]:.3f}): overfitting or a train/val "
                "mismatch; check the data size against the model size, dropout and weight "
                "decay, and that val comes from the same distribution"))
        return []

    def summary(self) -> list[str]:
        """One line per warning of the run, for its end."""
        return [w.line() for w in self.warnings]
