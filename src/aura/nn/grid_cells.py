"""Grid cells: multi-scale hexagonal codes over a learned 2-D map of the hidden state.

Entorhinal grid cells fire at the vertices of a hexagonal lattice. Cells of one module share the
lattice spacing and orientation and differ only in phase; spacings grow by ~1.42 from one module
to the next (Stensola et al. 2012). Here the "space" is a learned plane onto which each token's
hidden state is projected, so the code gives the model a periodic, multi-resolution readout of
where a token sits in that plane: structure a positional code alone does not give. Each token is
encoded on its own, so the encoder is causal by construction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# k_j · a_i = 2π * _STEPS[j][i]: how far (in cycles) wave j advances along lattice basis vector i.
_STEPS = ((1.0, 0.0), (0.0, 1.0), (-1.0, -1.0))
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: phases of a few radians lose ~0.03 rad in bf16, which blurs the fields."""
    return torch.promote_types(dtype, torch.float32)


class GridCellEncoder(nn.Module):
    """``h + W_out(rates(h))``, with ``rates`` the grid code of the token's position in a plane.

    ``plane`` (P, n_embd -> 2) maps a hidden state to ``pos2d``. Module m has lattice spacing
    ``base_scale * scale_ratio**m`` (distance between neighbouring vertices) and an orientation
    (learned when ``learn_orientation``, initially 0 for every module: entorhinal modules are
    roughly co-aligned). Its ``cells_per_module`` cells have their vertices at distinct phases
    spread evenly over the lattice's unit rhombus. A cell's rate is the sum of three plane waves
    whose unit wave vectors are 120 degrees apart (their lines, and the lattice, 60 degrees apart):

        r = (1/3) * sum_j cos(K k_j · (pos2d - vertex)),   K = 4π / (√3 * spacing),

    which lies in [-1/2, 1]; the returned rate is ``(2r + 1) / 3`` in [0, 1]: 1 exactly at the
    lattice vertices, 0 at the centres of the lattice triangles.

    The residual is added here, like a block's sublayer; callers that want the raw code (to gate
    or project it themselves) use ``rates``. ``out`` starts at N(0, 0.02) so the encoder begins
    as a near-identity; ``plane`` starts at N(0, 1/n_embd) so unit-variance hidden states give
    positions of std 1 per axis, about one finest spacing.
    """

    def __init__(self, n_embd: int, n_modules: int = 4, cells_per_module: int = 16,
                 base_scale: float = 1.0, scale_ratio: float = 1.42,
                 learn_orientation: bool = True):
        super().__init__()
        if n_modules < 1 or cells_per_module < 1:
            raise ValueError("need at least one module and one cell per module")
        if base_scale <= 0 or scale_ratio <= 0:
            raise ValueError("base_scale and scale_ratio must be positive")
        self.n_modules, self.cells_per_module = n_modules, cells_per_module
        self.base_scale, self.scale_ratio = base_scale, scale_ratio
        self.plane = nn.Linear(n_embd, 2, bias=False)
        nn.init.normal_(self.plane.weight, 0.0, n_embd**-0.5)
        self.out = nn.Linear(n_modules * cells_per_module, n_embd, bias=False)
        nn.init.normal_(self.out.weight, 0.0, 0.02)
        orientation = torch.zeros(n_modules)
        if learn_orientation:
            self.orientation = nn.Parameter(orientation)
        else:
            self.register_buffer("orientation", orientation)

    # The geometry is recomputed from Python floats on each call (a few dozen numbers) rather than
    # kept in buffers, which `module.to(torch.bfloat16)` would round.

    def scales(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Each module's lattice spacing, shape (n_modules,)."""
        m = torch.arange(self.n_modules, device=self.orientation.device, dtype=dtype)
        return self.base_scale * self.scale_ratio**m

    def wave_vectors(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unit wave vectors at each orientation + 0, 120, 240 degrees: (n_modules, 3, 2)."""
        j = torch.arange(3, device=self.orientation.device, dtype=dtype)
        angles = self.orientation.to(dtype)[:, None] + j * (2 * math.pi / 3)
        return torch.stack((angles.cos(), angles.sin()), -1)

    def lattice_basis(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Each module's two lattice basis vectors (rows), 60 degrees apart: (n_modules, 2, 2)."""
        offsets = torch.tensor((math.pi / 6, math.pi / 2), device=self.orientation.device,
                               dtype=dtype)
        angles = self.orientation.to(dtype)[:, None] + offsets
        basis = torch.stack((angles.cos(), angles.sin()), -1)
        return basis * self.scales(dtype)[:, None, None]

    def phases(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Each cell's vertex in lattice coordinates, (cells_per_module, 2) in [0, 1)^2.

        A Kronecker (golden-ratio) set: evenly spread over the unit rhombus for any cell count.
        """
        i = torch.arange(self.cells_per_module, device=self.orientation.device, dtype=dtype)
        return torch.stack((i / self.cells_per_module, (i * _GOLDEN).frac()), -1)

    def vertices(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Each cell's lattice vertex in the rhombus at the origin: (n_modules, cells, 2)."""
        return (self.phases(dtype)[None, :, :, None] * self.lattice_basis(dtype)[:, None]).sum(-2)

    def position(self, h: torch.Tensor) -> torch.Tensor:
        """``pos2d = h @ P``: (..., n_embd) -> (..., 2), in at least float32 even under autocast."""
        dtype = _work_dtype(h.dtype)
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.to(dtype), self.plane.weight.to(dtype))

    def rates_at(self, pos2d: torch.Tensor) -> torch.Tensor:
        """Grid code at given plane positions: (..., 2) -> (..., n_modules * cells_per_module).

        Module-major order (module 0's cells first). Computed in at least float32.
        """
        dtype = _work_dtype(pos2d.dtype)
        wave_number = 4 * math.pi / (math.sqrt(3) * self.scales(dtype))
        k = self.wave_vectors(dtype) * wave_number[:, None, None]  # (M, 3, 2)
        drive = (pos2d.to(dtype)[..., None, None, :] * k).sum(-1)  # (..., M, 3)
        steps = torch.tensor(_STEPS, device=k.device, dtype=dtype)
        # k_j · vertex per cell, (C, 3); broadcast, not a matmul, so autocast keeps it float32.
        shift = 2 * math.pi * (self.phases(dtype)[:, None, :] * steps).sum(-1)
        r = torch.cos(drive[..., None, :] - shift).mean(-1)  # (..., M, C), in [-1/2, 1]
        # Rounding can step ~1e-7 below the minimum of -1/2; the maximum of 1 is exact.
        return ((2 * r + 1) / 3).clamp_min(0.0).flatten(-2)

    def rates(self, h: torch.Tensor) -> torch.Tensor:
        """Grid code of each token: (..., n_embd) -> (..., n_modules * cells_per_module), in [0, 1].

        Computed in at least float32 (see ``position``).
        """
        return self.rates_at(self.position(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.out(self.rates(h).to(h.dtype))
