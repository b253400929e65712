"""Plasticity room: local learning rules that need no backpropagation.

- ``TokenSTDP``: per-token STDP weights scaling salience, batched and exact;
- ``PairSTDP``: pair-based trace STDP for the weights of spiking layers;
- ``OnlineWhitener``: running mean/covariance with PCA or ZCA whitening, in place;
- ``OjaLayer``: batched Oja / GHA with residual-driven growth of components.

Each has ``config()`` (JSON-able), ``state_dict()`` (tensors, safetensors-compatible),
``load_state_dict()``, ``from_state(config, tensors)``, and ``save(dir)`` / ``load(dir)``.
``aura.plasticity.affect`` builds valence / arousal / tone on top of the last two.
"""

from aura.plasticity.oja import OjaLayer
from aura.plasticity.stdp import PairSTDP, TokenSTDP
from aura.plasticity.whitening import OnlineWhitener

__all__ = ["OjaLayer", "OnlineWhitener", "PairSTDP", "TokenSTDP"]
