"""The one interface every Aura model implements, and the registry the trainer builds from.

The trainer, generator, evaluator and learn service know a model only through this:
``forward(idx, targets, ...) -> ModelOutput``, the inputs and abilities it declares, an optional
cache for generation, its memory writers, ``num_params`` and ``config``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from aura.data.shards import PreparedData, SplitData
from aura.data.tokenizers import Tokenizer
from aura.errors import AuraError, ConfigError
from aura.memory.store import EpisodicStore
from aura.memory.writer import MemoryWriter


@dataclass
class ModelConfig:
    """The network's shape, shared by every model; a model with more settings subclasses it and
    registers the subclass with the model (``register_model(name, config=...)``)."""

    name: str = "gpt"
    """The model to build, by its registry name; it also decides which other model keys exist
    and their defaults."""
    vocab_size: int | None = None
    """Token vocabulary size; None: taken from the prepared data's tokenizer."""
    block_size: int = 256
    """Context length in tokens: the longest sequence the model attends over at once."""
    n_layer: int = 6
    """Number of blocks."""
    n_head: int = 6
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 384
    """Width of the residual stream (the embedding size)."""
    dropout: float = 0.0
    """Dropout probability while training, in [0, 1)."""
    bias: bool = False
    """Biases in the Linear and LayerNorm layers."""
    ffn: Literal["mlp", "snn"] = "mlp"
    """The blocks' feed-forward: "mlp" (dense, GELU) or "snn" (spiking neurons' firing rates
    instead of GELU)."""
    snn_steps: int = 4
    """Time steps the "snn" feed-forward integrates each token over: finer rates, more compute."""
    neuron: Literal["lif", "gif"] = "lif"
    """The "snn" feed-forward's neuron: "lif" (leaky integrate-and-fire, soft reset) or "gif"
    (adaptive threshold, graded spikes)."""

    def problems(self) -> list[str]:
        """What a model-specific config finds wrong with its own values (one line each)."""
        return []

    def training_phases(self) -> list[str]:
        """What trains in each of the model's training phases (``train.phases`` sets the
        boundaries), one line each; one phase (everything, always) by default."""
        return ["everything"]


@dataclass
class ModelOutput:
    """``loss`` is what to backpropagate (cross-entropy plus any weighted extra losses);
    ``aux`` names its parts and any metrics worth logging (sparsity, firing rates, ...);
    ``hidden`` are the final hidden states (B, T, ``hidden_size``) the head reads, for callers
    that learn from them (the continuous-learning service)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None


class AuraModel(nn.Module):
    """Base class: subclasses set ``config`` and implement ``forward`` (and ``new_cache``).

    ``forward(idx, targets=None, *, cache=None, label_smoothing=0.0, last_only=False, ...)``:
    with ``cache`` the model reads and extends it (generation); ``last_only`` asks for the last
    position's logits only. Any further keyword a model takes is one of the inputs it declares
    below, and callers pass exactly those: an unknown keyword is a TypeError, never ignored.
    """

    config: ModelConfig
    grad_checkpoint: bool = False  # recompute each block in backward (set by the trainer)
    # False: forward may skip the aux metrics that only describe the model for a log (bdh's
    # sparsity counts, 4-5% of a `bdh-cpu` step); the trainer clears it for steps whose metrics
    # no log row reads. Evaluation and inspection leave it on.
    report_metrics: bool = True

    # --- what the model declares; callers trust these and probe nothing ----------------------
    # Per-token features (aura.data.prosody.token_features) the data pipeline computes for this
    # model and passes to forward by name, e.g. ("prosody",).
    token_features: tuple[str, ...] = ()
    # True: training batches also pass ``corpus_pos`` (B,), each window's offset in the train
    # split (aura.data.sampler), so a memory of the corpus can hide text after each token.
    wants_corpus_pos: bool = False
    # True: the model takes ``memory_floor`` (B, T), each token's document start in the corpus,
    # and reads no memory formed before it (``train.memory_stream``'s batches pass it).
    wants_memory_floor: bool = False
    # True: forward takes ``use_memory``; the trainer keeps memory reads off for
    # ``train.memory_warmup_steps``.
    has_memory_switch: bool = False
    # True: forward takes ``remember`` (and ``corpus_pos``): asked to, it queues memories of its
    # input, which is how ``aura learn`` has the model remember new text at service positions.
    writes_own_memory: bool = False
    # True: the model reads its KV cache only through ``KVCache``'s methods (``positions``,
    # ``attn_mask``, ``append``, ``pos``), or its cache makes its own batched form (``ragged``,
    # e.g. bdh's recurrent state), so a server may decode many sequences in one forward with a
    # cache whose rows sit at different positions (``aura.infer.batching``).
    batched_decoding: bool = False
    # True: forward takes ``remember``, and asked to, an *inference* forward (eval, generation)
    # queues memories of its input too, written as the next forward starts, so later windows or
    # tokens read them and none reads its own (``aura eval --memory write``, aura.eval.stream).
    remembers_at_inference: bool = False
    # True: forward also takes ``memory_salience`` (B, T); with ``remember`` it writes the tokens
    # of positive salience (importance the salience), keyed by the model's own key projection,
    # instead of choosing by its own novelty: what ``aura learn`` found salient is retrievable.
    remembers_by_salience: bool = False

    def __init__(self) -> None:
        super().__init__()
        # The episodic memories this model keeps, by name (checkpoints save each as
        # memory/NAME); filled by models that have memories.
        self.writers: dict[str, MemoryWriter] = {}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: Any = None, label_smoothing: float = 0.0, last_only: bool = False
                ) -> ModelOutput:
        raise NotImplementedError

    def new_cache(self, batch_size: int, max_len: int) -> Any:
        """A generation cache, or None for models that only decode by re-running the prefix."""
        return None

    @property
    def max_context(self) -> int | None:
        """Longest input the model accepts at once; None when unbounded (recurrent models)."""
        return self.config.block_size

    @property
    def hidden_size(self) -> int:
        """The width of ``ModelOutput.hidden``."""
        return self.config.n_embd

    def on_train_start(self, data: PreparedData) -> None:
        """Called by the trainer once before the first step of a fresh (not resumed) run, with
        the prepared corpus: e.g. to fill a memory bank from text. Nothing by default."""

    def on_step(self, step: int, phase: int | None = None) -> None:
        """Called by the trainer before each training step with its number and its training
        phase (an index into ``training_phases()``; None without ``train.phases``: the whole
        model), resumed runs included: for state that follows the schedule, e.g. a warmup, or
        which modules train. Nothing by default."""

    def lr_scale(self) -> float:
        """A factor the trainer applies to this step's learning rate (after ``on_step``), e.g.
        a neuromodulator's; 1 by default."""
        return 1.0

    def sampling_modulation(self) -> dict[str, float]:
        """Factors the generator applies to the user's sampling settings, by name
        ("temperature", "top_k"), e.g. a hormone state's (``aura.infer.generate.modulated``
        bounds and applies them); none by default. Read-only: generating must not change
        them, since a server shares one model between requests."""
        return {}

    def build_memory(self, split: SplitData, tokenizer: Tokenizer | None = None,
                     max_chunks: int | None = None, batch_size: int = 8) -> int:
        """Refill the memories from a prepared split (``aura memory build``); returns the
        entries written per store. Only models whose memories are made from text can."""
        raise AuraError(f"model {self.config.name!r} has no memory to build from a corpus")

    def flush_memory(self) -> None:
        """Apply every queued memory write; a model with memories calls this as its forward
        starts, so each forward reads what the previous ones formed."""
        for writer in self.writers.values():
            writer.flush()

    def memory_stores(self) -> dict[str, EpisodicStore]:
        """The episodic stores by name, with every queued write applied."""
        self.flush_memory()
        return {name: writer.store for name, writer in self.writers.items()}

    def _apply(self, fn: Any, recurse: bool = True) -> AuraModel:
        """``.to(device)`` also moves the memories (stores are not modules)."""
        super()._apply(fn, recurse)
        param = next(self.parameters(), None)
        if param is not None:
            for writer in self.writers.values():
                writer.to(param.device)
        return self

    def activation_bytes(self, batch: int, seq: int, dtype: torch.dtype = torch.float32,
                         device_type: str = "cpu") -> int:
        """Bytes one training forward of ``batch`` sequences of ``seq`` tokens keeps for backward
        (the loss's log-softmax included; weights and autocast's copies of them not), under
        autocast to ``dtype`` (fp32: none) on ``device_type``, with ``grad_checkpoint`` as set:
        what the memory estimate (``aura.train.resources``) counts as activations. A model
        computes it from its shapes, since only it knows what its layers save; a test holds
        each model's figure to what torch's saved-tensor hooks measure."""
        raise NotImplementedError(f"model {self.config.name!r} does not declare its "
                                  "activation_bytes")

    def inspected_parts(self) -> dict[str, nn.Module]:
        """The parts ``brain_state`` looks inside, by the name their arrays take (see
        ``aura.models.inspect``): none by default."""
        return {}

    def brain_state(self, idx: torch.Tensor, **inputs: Any) -> dict[str, torch.Tensor]:
        """What one forward of ``idx`` (1, T) does inside, as named CPU arrays (spike trains,
        attention weights, place codes, memory reads, ... named as ``aura.models.inspect``
        lists), for ``aura viz`` and ``aura train --viz-interval``; ``inputs`` are the ones the
        model declares. The declared capability: a model shows what it has by naming its parts
        (``inspected_parts``), and callers draw whatever comes back."""
        from aura.models.inspect import brain_state_of  # models/ imports it, not vice versa

        return brain_state_of(self, self.inspected_parts(), idx, inputs)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
            ) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; targets < 0 are ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-1, label_smoothing=label_smoothing)


# name -> (model class, its config class): litgpt's one config dataclass per model, resolved
# here so that aura.config needs no knowledge of any model.
_REGISTRY: dict[str, tuple[type[AuraModel], type[ModelConfig]]] = {}


def register_model(name: str, config: type[ModelConfig] = ModelConfig
                   ) -> Callable[[type[AuraModel]], type[AuraModel]]:
    """Class decorator: ``model.name = name`` builds this class from a ``config`` instance."""
    def add(cls: type[AuraModel]) -> type[AuraModel]:
        _REGISTRY[name] = (cls, config)
        return cls
    return add


def model_config_class(name: str) -> type[ModelConfig]:
    """The config dataclass of model ``name``; an unknown name is an error listing the models."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; models: {', '.join(model_names())}")
    return _REGISTRY[name][1]


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def build_model(config: ModelConfig) -> AuraModel:
    model_config_class(config.name)  # an unknown name is a ConfigError
    if config.vocab_size is None:
        raise ConfigError("model.vocab_size is not set (it normally comes from the prepared data)")
    return _REGISTRY[config.name][0](config)
