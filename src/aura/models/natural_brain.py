"""`natural_brain`: the modular brain of seeds 000 and 003, built so that it learns.

    tokens -> embedding (+ learned positions)          [limbic: hormones set dropout, lr, ...]
           -> Wernicke: n_layer causal attention blocks (comprehension; GIF FFNs with
              use_spiking)
           -> thalamus: per-token relay of the comprehended stream to the regions
              (soft / top-k / bypass)
           -> regions, each proposing a change to the stream:
                PFC          gated recurrent working memory, carried through the cache
                LiquidMoE    top-k routed closed-form liquid-time-constant experts
                hippocampus  the episodic memory (aura.nn.hippocampus) through its MemoryWriter
           -> basal ganglia: Go/NoGo selection over the proposals, with an explicit no-go
           -> LayerNorm -> Broca (projection to broca_dim) -> token head

    loss = CE + moe_balance * the experts' load-balancing loss

The seed's diagram puts the thalamus before the cortex; here it relays the stream after
Wernicke, since every region needs context and attention is what brings it: a region fed raw
token embeddings (the seed's order) can only see one token. Every module is a switch in
``NaturalBrainConfig`` (off = never built: its parameters, buffers and cost are gone); without
Broca the head is tied to the embedding as in gpt. Each module's activity of the last forward
is in ``ModelOutput.aux`` (the trainer logs it). The regions live in ``aura.nn.brain``.

Why it learns where the anchor did not: the backbone is a pre-LN transformer with GPT-2's init,
every region adds a small, initially near-zero change to a residual stream (so a fresh region
cannot drown the signal), routing and selection start uniform, and hormones are neutral
during their warmup.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from aura.data.prosody import N_FEATURES
from aura.memory.store import EpisodicStore
from aura.memory.writer import MemoryAccess, MemoryWriter, token_positions
from aura.models.base import ModelConfig, ModelOutput, lm_loss, register_model
from aura.models.decoder import Block, Decoder, layer_norm_bytes
from aura.models.hippocampal import HippocampalCache, time_since_event
from aura.nn.attention import KVCache
from aura.nn.brain.basal_ganglia import BasalGanglia
from aura.nn.brain.broca import Broca
from aura.nn.brain.limbic import LimbicSystem
from aura.nn.brain.liquid_moe import LiquidMoE
from aura.nn.brain.pfc import PrefrontalCortex
from aura.nn.brain.salience import TokenSalience
from aura.nn.brain.thalamus import Thalamus
from aura.nn.dropout import dropout
from aura.nn.hippocampus import HippocampalMemory, recall_activation_bytes, store_problems
from aura.nn.place_cells import PlaceCellEncoder
from aura.nn.snn_ffn import layer_firing_rates
from aura.nn.time_cells import TimeCellEncoder

SWITCHES = ("limbic", "thalamus", "wernicke", "pfc", "liquid_moe", "hippocampus",
            "basal_ganglia", "broca")
# Seed 000's training phases, as the modules that run and train in each (``train.phases`` sets
# where each starts). Phase 1, the hippocampal transformer alone: attention blocks, the
# hippocampus and the output path (Broca is the head's input, so it cannot wait); phase 2 adds
# the rest of the language zone, the PFC; phase 3 is the full brain. A module not yet in its
# phase is bypassed (not run) and frozen; the embeddings, norms and head always train.
PHASES = (
    ("wernicke", "hippocampus", "broca"),
    ("wernicke", "hippocampus", "broca", "pfc"),
    SWITCHES,
)


@dataclass
class NaturalBrainConfig(ModelConfig):
    name: str = "natural_brain"
    # --- limbic / endocrine system
    limbic: bool = True
    """The limbic/endocrine system: arousal, valence and stress hormones driven by the text's
    prosody and the model's own surprise, modulating the quantities below (needs prosody from
    the data pipeline)."""
    limbic_warmup: int = 1000
    """Training steps during which every hormone stays neutral and every modulation is 1."""
    limbic_rate: float = 0.05
    """How fast the hormones follow their drive: the moving average's weight per training
    forward, in (0, 1]."""
    limbic_lr_range: float = 0.2
    """Arousal scales the learning rate by a factor in [1 - range, 1 + range]; 0: off."""
    limbic_memory_range: float = 0.5
    """Stress (novelty) scales the memories the hippocampus forms per step, in [1 - range,
    1 + range]; 0: off."""
    limbic_dropout_range: float = 0.5
    """Stress scales the brain's dropout (embedding and region outputs), in [1 - range,
    1 + range]; 0: off."""
    limbic_temperature_range: float = 0.2
    """Arousal's sampling-temperature factor at generation, in [1 - range, 1 + range]; 0: off."""
    limbic_top_k_range: float = 0.2
    """Arousal's factor on the sampler's top-k at generation (when one is set), in
    [1 - range, 1 + range], rounded, at least 1; 0: off."""
    limbic_sampling: bool = True
    """The generator applies the limbic temperature and top-k factors (the checkpoint's hormone
    state, read-only while generating); off: sampling exactly as asked."""
    # --- thalamus
    thalamus: bool = True
    """The thalamus relays the stream to the regions per token with learned weights; off: every
    region gets the whole stream (as bypass, with no router built)."""
    thalamus_mode: Literal["soft", "topk", "bypass"] = "soft"
    """"soft": every region, softmax-weighted; "topk": only the thalamus_top_k best regions;
    "bypass": the seed's debug mode, every region gets everything."""
    thalamus_top_k: int = 2
    """Regions each token is relayed to in "topk" mode."""
    # --- cortex: Wernicke (n_layer attention blocks), PFC, Broca
    wernicke: bool = True
    """Wernicke's area: n_layer causal attention blocks (comprehension); off: no attention, the
    PFC is then the only source of context."""
    use_stdp: bool = False
    """Token STDP in Wernicke's attention (seed 001 §10): a per-token weight, moved by the
    STDP rule after each training forward (tokens predicted with above-average surprise are
    potentiated, the others depressed), scales the token's attention keys by
    max(0, 1 + stdp_alpha * weight); saved with the checkpoint."""
    stdp_alpha: float = 0.2
    """How strongly a token's STDP weight (in [-1, 1]) scales its keys."""
    stdp_lr_plus: float = 0.01
    """STDP potentiation per spiking occurrence."""
    stdp_lr_minus: float = 0.005
    """STDP depression per silent occurrence."""
    use_spiking: bool = False
    """GIF spiking neurons (model.snn_steps steps) instead of the GELU MLP in Wernicke's
    feed-forwards."""
    pfc: bool = True
    """The prefrontal cortex: a gated recurrent working memory carried across windows and
    through generation."""
    pfc_dim: int = 256
    """Width of the PFC's recurrent state."""
    pfc_heads: int = 4
    """Retention heads of the PFC (time constants 4 to 64 tokens at init); divides pfc_dim."""
    broca: bool = True
    """Broca's area: a projection to broca_dim units before the token head (untied); off: the
    head reads the stream, tied to the embedding."""
    broca_dim: int = 512
    """Units of Broca's projection (seed 003: 8192)."""
    # --- LiquidMoE
    liquid_moe: bool = True
    """A top-k routed mixture of closed-form continuous-time (liquid) experts."""
    moe_experts: int = 4
    """Experts in the LiquidMoE."""
    moe_top_k: int = 2
    """Experts each token is routed to."""
    moe_hidden: int = 128
    """Hidden units of each liquid expert."""
    moe_balance: float = 0.01
    """Weight of the load-balancing loss in the training loss."""
    # --- hippocampus
    hippocampus: bool = True
    """The episodic memory: novel states are stored, every token recalls its nearest memories
    (aura.nn.hippocampus)."""
    memory_capacity: int = 1024
    """Memories the hippocampus holds; a full store evicts by importance and recency."""
    memory_dim: int = 32
    """Size of the learned keys memories are stored and recalled by."""
    memory_top_k: int = 8
    """Memories each token recalls."""
    memory_decay: float = 0.03
    """Strength each memory loses per training step, in [0, 1)."""
    memory_decay_mode: Literal["fixed", "adaptive"] = "fixed"
    """How memories fade: "fixed" (each loses ``memory_decay`` of its strength per step) or
    "adaptive" (slower for memories novel when formed and for each recall; see
    aura.memory.store)."""
    memory_graph_k: int = 4
    """Cognitive-map neighbours of a token's best match that join its recall; 0: no map."""
    memory_writes: int = 32
    """Memories formed per training step (before the limbic write gate), at most
    memory_capacity."""
    place_cells: bool = False
    """Place cells in the hippocampus: a sparse code (the strongest place_active_fraction of
    n_place_cells) of the region's input, added before it recalls and stores
    (aura.nn.place_cells)."""
    n_place_cells: int = 512
    """Place cells of the hippocampus."""
    place_active_fraction: float = 0.03
    """Fraction of place cells that fire for a token, in (0, 1]."""
    time_cells: bool = False
    """Time cells in the hippocampus: log-spaced tuning to the tokens since the last sentence or
    paragraph end (from prosody), added to the region's input (aura.nn.time_cells)."""
    n_time_cells: int = 32
    """Time cells of the hippocampus, >= 2."""
    # --- basal ganglia
    basal_ganglia: bool = True
    """Go/NoGo selection over the regions' proposals with an explicit no-go; off: the
    proposals are summed."""

    def problems(self) -> list[str]:
        out = []
        for key in ("limbic_lr_range", "limbic_memory_range", "limbic_dropout_range",
                    "limbic_temperature_range", "limbic_top_k_range"):
            if not 0 <= getattr(self, key) < 1:
                out.append(f"model.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.use_stdp and not self.wernicke:
            out.append("model.use_stdp needs model.wernicke (it scales the attention's keys)")
        for key in ("stdp_alpha", "stdp_lr_plus", "stdp_lr_minus"):
            if not 0 <= getattr(self, key) <= 1:
                out.append(f"model.{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0 < self.limbic_rate <= 1:
            out.append(f"model.limbic_rate must be in (0, 1], got {self.limbic_rate}")
        if self.limbic_warmup < 0:
            out.append(f"model.limbic_warmup must be >= 0, got {self.limbic_warmup}")
        n_regions = len(self.regions())
        if self.thalamus_mode == "topk" and not 1 <= self.thalamus_top_k <= max(n_regions, 1):
            out.append(f"model.thalamus_top_k must be in [1, {max(n_regions, 1)}] (the regions "
                       f"built), got {self.thalamus_top_k}")
        if self.pfc_dim < 1 or self.pfc_heads < 1 or self.pfc_dim % self.pfc_heads:
            out.append(f"model.pfc_dim ({self.pfc_dim}) must be a positive multiple of "
                       f"model.pfc_heads ({self.pfc_heads})")
        if not 1 <= self.moe_top_k <= self.moe_experts:
            out.append(f"model.moe_top_k must be in [1, moe_experts={self.moe_experts}], got "
                       f"{self.moe_top_k}")
        if not 1 <= self.memory_writes <= self.memory_capacity:
            out.append(f"model.memory_writes must be in [1, memory_capacity="
                       f"{self.memory_capacity}], got {self.memory_writes}")
        out += store_problems(self.memory_capacity, self.memory_decay, self.memory_graph_k)
        for key in ("place_cells", "time_cells"):
            if getattr(self, key) and not self.hippocampus:
                out.append(f"model.{key} needs model.hippocampus (they code its input)")
        if not 0 < self.place_active_fraction <= 1:
            out.append(f"model.place_active_fraction must be in (0, 1], got "
                       f"{self.place_active_fraction}")
        if self.n_place_cells < 1:
            out.append(f"model.n_place_cells must be >= 1, got {self.n_place_cells}")
        if self.n_time_cells < 2:
            out.append(f"model.n_time_cells must be >= 2, got {self.n_time_cells}")
        if self.moe_balance < 0:
            out.append(f"model.moe_balance must be >= 0, got {self.moe_balance}")
        return out

    def training_phases(self) -> list[str]:
        return ["hippocampal core: " + ", ".join(PHASES[0]), "+ language zone: pfc",
                "full brain: " + ", ".join(SWITCHES)]

    def regions(self) -> tuple[str, ...]:
        """The regions the thalamus relays to and the basal ganglia select among."""
        return tuple(r for r, on in (("pfc", self.pfc), ("liquid_moe", self.liquid_moe),
                                     ("hippocampus", self.hippocampus)) if on)


class BrainCache(HippocampalCache):
    """Wernicke's keys and values, each row's latest event boundary (for the hippocampus's time
    cells), plus the PFC's working memory after the last token."""

    padded_prefill = False  # the PFC's recurrence would run through a row's padding

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        super().__init__(n_layer, batch_size, n_head, max_len, head_dim, device, dtype)
        self.pfc_state: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        if self.pfc_state is not None:
            self.pfc_state.zero_()  # zeros are the PFC's initial state, as None is


@register_model("natural_brain", config=NaturalBrainConfig)
class NaturalBrain(Decoder):
    cache_type = BrainCache
    batched_decoding = True  # the cache through KVCache's methods and its row_state only

    def __init__(self, config: NaturalBrainConfig):
        c = config
        super().__init__(c)
        if not c.wernicke:
            self.blocks = nn.ModuleList()
        elif c.use_spiking:
            spiking = dataclasses.replace(c, ffn="snn", neuron="gif")
            self.blocks = nn.ModuleList(Block(spiking, i) for i in range(c.n_layer))
            self._init_weights()
        self.stdp = (TokenSalience(c.vocab_size, c.n_head, c.stdp_alpha,  # type: ignore[arg-type]
                                   c.stdp_lr_plus, c.stdp_lr_minus)
                     if c.use_stdp and c.wernicke else None)
        if c.broca:
            self.broca: Broca | None = Broca(c.n_embd, c.broca_dim, c.bias)
            self.lm_head = nn.Linear(c.broca_dim, c.vocab_size, bias=False)  # untied
            nn.init.normal_(self.lm_head.weight, 0.0, 0.02)
        else:
            self.broca = None
        self.limbic = (LimbicSystem({"lr": c.limbic_lr_range,
                                     "memory_write": c.limbic_memory_range,
                                     "dropout": c.limbic_dropout_range,
                                     "temperature": c.limbic_temperature_range,
                                     "top_k": c.limbic_top_k_range},
                                    c.limbic_warmup, c.limbic_rate) if c.limbic else None)
        self.token_features = ("prosody",) if c.limbic or c.time_cells else ()
        self.regions = c.regions()
        self.thalamus = (Thalamus(c.n_embd, self.regions, c.thalamus_mode, c.thalamus_top_k)
                         if c.thalamus and self.regions and c.thalamus_mode != "bypass"
                         else None)
        self.norms = nn.ModuleDict({r: nn.LayerNorm(c.n_embd, bias=c.bias)
                                    for r in self.regions})
        self.pfc = PrefrontalCortex(c.n_embd, c.pfc_dim, c.pfc_heads) if c.pfc else None
        self.moe = (LiquidMoE(c.n_embd, c.moe_experts, c.moe_top_k, c.moe_hidden)
                    if c.liquid_moe else None)
        self.hippocampus = None
        self.place = (PlaceCellEncoder(c.n_embd, c.n_place_cells, c.place_active_fraction)
                      if c.hippocampus and c.place_cells else None)
        self.time = (TimeCellEncoder(c.n_embd, c.n_time_cells)
                     if c.hippocampus and c.time_cells else None)
        if c.hippocampus:
            store = EpisodicStore(c.memory_dim, c.n_embd, c.memory_capacity, c.memory_decay,
                                  graph_k=c.memory_graph_k, decay_mode=c.memory_decay_mode)
            self.writers = {"hippocampus": MemoryWriter(store)}
            self.hippocampus = HippocampalMemory(c.n_embd, self.writers["hippocampus"],
                                                 c.memory_top_k, c.memory_writes)
        self.has_memory_switch = c.hippocampus  # train.memory_warmup_steps keeps recall off
        self.wants_corpus_pos = c.hippocampus  # memories then hide text after each token
        self.remembers_by_salience = c.hippocampus  # aura learn chooses what it writes
        self.basal_ganglia = (BasalGanglia(c.n_embd, self.regions)
                              if c.basal_ganglia and self.regions else None)
        # the training phase (train.phases), saved with the weights: a model evaluated after
        # a run that ended in phase 1 runs as phase 1
        self.register_buffer("phase", torch.tensor(len(PHASES) - 1))
        self._active = set(SWITCHES)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._enter_phase())

    def new_cache(self, batch_size: int, max_len: int) -> BrainCache:
        """With a PFC, its state starts as zeros (what None means to it) and is per-row state,
        so a batching server keeps one per sequence."""
        cache = super().new_cache(batch_size, max_len)
        assert isinstance(cache, BrainCache)
        if self.pfc is not None:
            cache.pfc_state = self.pfc.initial_state(batch_size, self.wte.weight.device)
            cache.row_state = (*cache.row_state, "pfc_state")
        return cache

    def module_of(self, switch: str) -> nn.Module | None:
        """The module a switch builds (None when off); "wernicke" is the blocks."""
        if switch == "wernicke":
            return self.blocks if len(self.blocks) else None
        if switch == "hippocampus" and self.hippocampus is not None:
            return nn.ModuleList(m for m in (self.hippocampus, self.place, self.time)
                                 if m is not None)
        return getattr(self, {"liquid_moe": "moe"}.get(switch, switch))

    def inspected_parts(self) -> dict[str, nn.Module]:
        """Wernicke's blocks (as every decoder's), plus each router that is built: thalamus
        (unless bypassed), LiquidMoE and the basal ganglia's selection."""
        routers = {"routing/thalamus": self.thalamus, "routing/moe": self.moe,
                   "routing/basal_ganglia": self.basal_ganglia}
        cells = {"place": self.place, "time": self.time}
        return super().inspected_parts() | {
            name: m for name, m in routers.items()
            if m is not None and getattr(m, "router", True) is not None} | {
            name: m for name, m in cells.items() if m is not None}

    def active(self, switch: str) -> bool:
        """Whether ``switch``'s module is built and runs in the current training phase."""
        return switch in self._active and self.module_of(switch) is not None

    def _enter_phase(self) -> None:
        """Run and train the current phase's modules; bypass and freeze the others."""
        self._active = set(PHASES[int(self.phase)])
        for switch in SWITCHES:
            module = self.module_of(switch)
            if module is not None:
                module.requires_grad_(switch in self._active)
                if switch in self.regions:
                    self.norms[switch].requires_grad_(switch in self._active)

    # --- the trainer's hooks (aura.models.base) ------------------------------------------------

    def on_step(self, step: int, phase: int | None = None) -> None:
        phase = len(PHASES) - 1 if phase is None else phase
        if not 0 <= phase < len(PHASES):
            raise ValueError(f"natural_brain has {len(PHASES)} training phases, got {phase}")
        if self.limbic is not None:
            self.limbic.set_step(step)
        if phase != int(self.phase) or not self._active.issuperset(PHASES[phase]):
            self.phase.fill_(phase)
            self._enter_phase()

    @property
    def _limbic(self) -> LimbicSystem | None:
        return self.limbic if self.active("limbic") else None

    def lr_scale(self) -> float:
        return self._limbic.multiplier("lr") if self._limbic is not None else 1.0

    def sampling_temperature(self) -> float:
        """The limbic system's factor for a sampler's temperature (1 without it)."""
        return self._limbic.multiplier("temperature") if self._limbic is not None else 1.0

    def sampling_modulation(self) -> dict[str, float]:
        """The hormones' temperature and top-k factors, when ``limbic_sampling`` is on (both
        exactly 1 during the warmup)."""
        if self._limbic is None or not self.config.limbic_sampling:
            return {}
        return {name: self._limbic.multiplier(name) for name in ("temperature", "top_k")}

    # --- forward ---------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: BrainCache | None = None, label_smoothing: float = 0.0,
                last_only: bool = False, prosody: torch.Tensor | None = None,
                use_memory: bool = True, corpus_pos: torch.Tensor | None = None,
                remember: bool | None = None, memory_salience: torch.Tensor | None = None
                ) -> ModelOutput:
        """``prosody`` (B, T, N_FEATURES) drives the limbic system (training only);
        ``use_memory``, ``corpus_pos``, ``remember`` (default: training without a cache) and
        ``memory_salience`` are the hippocampus's, as in `hippocampal`; with a cache the PFC
        continues from the state the cache holds."""
        B, T = idx.shape
        self.flush_memory()
        pos = self.positions(idx, cache)
        if self.limbic is not None and (prosody is None or prosody.shape != (B, T, N_FEATURES)):
            raise ValueError(f"the natural_brain model's limbic system needs prosody of shape "
                             f"{(B, T, N_FEATURES)} from the data pipeline, got "
                             f"{None if prosody is None else tuple(prosody.shape)}")
        limbic = self._limbic
        p = self.config.dropout * (limbic.multiplier("dropout") if limbic is not None else 1.0)
        p = min(p, 0.9)
        x = dropout(self.wte(idx) + self.wpe(pos), p, self.training)
        if self.active("wernicke"):
            gains = self.stdp.gains(idx) if self.stdp is not None else None
            for block in self.blocks:
                x = self.run_block(block, x, cache, gains)
        balance = None
        if any(self.active(r) for r in self.regions):
            if remember is None:
                remember = self.training and cache is None
            proposals, balance = self._regions(x, cache, pos, use_memory, corpus_pos, idx,
                                               prosody, remember, memory_salience)
            proposals = {r: dropout(v, p, self.training) for r, v in proposals.items()}
            if self.basal_ganglia is not None and self.active("basal_ganglia"):
                x = self.basal_ganglia(x, proposals)
            else:
                x = x + sum(proposals.values())
        hidden, logits = self.head(x, cache, last_only and targets is None)
        if targets is None:
            return ModelOutput(logits, None, self.metrics(), hidden)
        ce = lm_loss(logits, targets, label_smoothing)
        loss = ce if balance is None else ce + self.config.moe_balance * balance
        if limbic is not None and self.training and cache is None:
            limbic.update(ce, prosody)
        if self.stdp is not None and self.active("wernicke") and self.training and cache is None:
            self.stdp.update(targets, logits)  # read by the next forward, never by this one
        return ModelOutput(logits, loss, {"ce": ce.detach(), **self.metrics()}, hidden)

    def _regions(self, x: torch.Tensor, cache: BrainCache | None, pos: torch.Tensor,
                 use_memory: bool, corpus_pos: torch.Tensor | None,
                 tokens: torch.Tensor | None = None, prosody: torch.Tensor | None = None,
                 remember: bool = False, salience: torch.Tensor | None = None
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Each region's proposal (like x) from what the thalamus relays to it, and the
        experts' load-balancing loss."""
        routes = self.thalamus(x) if self.thalamus is not None and self.active("thalamus") else {}
        inputs = {r: self.norms[r](x) * routes[r] if r in routes else self.norms[r](x)
                  for r in self.regions if self.active(r)}
        out: dict[str, torch.Tensor] = {}
        balance = None
        if self.pfc is not None and self.active("pfc"):
            state = cache.pfc_state if cache is not None else None
            out["pfc"], after = self.pfc(inputs["pfc"], state)
            if cache is not None:
                cache.pfc_state = after
        if self.moe is not None and self.active("liquid_moe"):
            out["liquid_moe"], balance = self.moe(inputs["liquid_moe"])
        if self.hippocampus is not None and self.active("hippocampus"):
            h = inputs["hippocampus"]
            coded = self._cells(h, cache, pos, prosody)
            writes = self.config.memory_writes
            if self._limbic is not None:
                writes = round(writes * self._limbic.multiplier("memory_write"))
            self.hippocampus.writes_per_step = max(1, min(writes, self.config.memory_capacity))
            access = MemoryAccess(read=use_memory, write=remember,
                                  positions=token_positions(corpus_pos, pos), tokens=tokens,
                                  salience=salience)
            out["hippocampus"] = self.hippocampus(coded, access) - h
        return out, balance

    def _cells(self, h: torch.Tensor, cache: BrainCache | None, pos: torch.Tensor,
               prosody: torch.Tensor | None) -> torch.Tensor:
        """The hippocampus's input with its place and time codes added (as in `hippocampal`:
        time since the last sentence or paragraph end, carried by the cache)."""
        if self.place is not None:
            h = self.place(h)
        if self.time is not None:
            if prosody is None or prosody.shape[:2] != h.shape[:2]:
                raise ValueError("the natural_brain model's time cells need prosody of shape "
                                 f"{(*h.shape[:2], N_FEATURES)} from the data pipeline")
            h = self.time(h, time_since_event(prosody, pos, cache))
        return h

    def head(self, x: torch.Tensor, cache: KVCache | None, last_only: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final LayerNorm, then Broca (when built) and the token head."""
        if cache is not None:
            cache.pos += x.size(1)
        hidden = self.ln_f(x)
        y = hidden[:, -1:] if last_only else hidden
        if self.broca is not None:
            y = self.broca(y)
        return hidden, self.lm_head(y)

    def metrics(self) -> dict[str, torch.Tensor]:
        """Every built module's activity in the last forward (hormones and modulations,
        routing, working memory, expert usage, memory recall, selection, Broca), and the
        spiking FFNs' firing rates with use_spiking."""
        out: dict[str, torch.Tensor] = {"phase": self.phase.detach().float() + 1}
        if self.config.use_spiking and self.active("wernicke"):
            out.update(layer_firing_rates([b.mlp for b in self.blocks]))  # type: ignore[misc]
        for switch in SWITCHES:
            module = self.hippocampus if switch == "hippocampus" else self.module_of(switch)
            if switch != "wernicke" and module is not None and self.active(switch):
                out.update(module.metrics())  # type: ignore[operator]
        if self.place is not None and self.active("hippocampus"):
            out.update(self.place.metrics())
        if self.stdp is not None and self.active("wernicke"):
            out.update(self.stdp.metrics())
        return out

    # --- memory estimate -------------------------------------------------------------------

    def block_activation_bytes(self, layer: int, seq: int, dtype: torch.dtype,
                               device_type: str) -> int:
        """The decoder block's, plus, with token STDP in fp32, the queries and keys its gains
        scale (under autocast the scaled copies take the place of casts the block keeps
        anyway: measured +0.1%, test_resources)."""
        base = super().block_activation_bytes(layer, seq, dtype, device_type)
        if self.stdp is not None and dtype == torch.float32:
            base += 2 * self.config.n_embd * dtype.itemsize
        return base

    def activation_bytes(self, batch: int, seq: int, dtype: torch.dtype = torch.float32,
                         device_type: str = "cpu") -> int:
        """Wernicke's blocks as the decoder's, then per token what the regions, the selection
        and Broca keep (the PFC's (T x T) decays per head included)."""
        c, h = self.config, dtype.itemsize
        C = c.n_embd
        # with use_spiking the blocks' GIF feed-forwards keep their (4C) surrogate inputs per
        # step and the spike counts, where the decoder's formula (for model.ffn, here mlp)
        # counts GELU's input and output
        spiking = 4 * (c.snn_steps - 1) * C * h if c.use_spiking else 0
        blocks = [self.block_activation_bytes(i, seq, dtype, device_type) + spiking
                  for i in range(len(self.blocks))]
        kept = (3 * max(blocks, default=0) // 2 + 4 * C * len(blocks) if self.grad_checkpoint
                else sum(blocks))
        extra = 8 + layer_norm_bytes(C) + 4 * c.vocab_size  # type: ignore[operator]
        if c.dropout > 0:
            extra += 4 * C * (1 + len(self.regions))
        extra += len(self.regions) * (layer_norm_bytes(C) + 4 * C)  # region inputs
        if self.pfc is not None:
            extra += 4 * (C + 2 * c.pfc_heads + 5 * c.pfc_dim) + 8 * c.pfc_heads * seq
        if self.moe is not None:  # router; per routed slot the expert's input and activations
            extra += 4 * (2 * c.moe_experts + c.moe_top_k * (C + 9 * c.moe_hidden))
        if self.place is not None:  # the drives' input, the winners' ids and weights
            extra += 4 * C + 12 * self.place.k + 24
        if self.time is not None:
            extra += 4 * c.n_time_cells + 40
        if self.basal_ganglia is not None:
            extra += layer_norm_bytes(C) + 4 * C + 8 * (len(self.regions) + 1)
        extra += C * h
        if self.broca is not None:
            extra += 2 * c.broca_dim * h
        recall = 0 if self.hippocampus is None else recall_activation_bytes(
            batch * seq, C, c.memory_top_k, c.memory_graph_k, c.memory_dim, c.memory_capacity)
        return batch * seq * (kept + extra) + recall
