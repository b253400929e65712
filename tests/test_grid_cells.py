"""Grid cells: hexagonal geometry, the [0, 1] rate range, per-module periods, gradients, bf16,
causality."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aura.nn.grid_cells import GridCellEncoder

M, C, E = 4, 16, 32
CELL = (torch.arange(M)[:, None], torch.arange(C)[None, :])  # index every (module, cell) pair

coord = st.floats(-6.0, 6.0, allow_nan=False)
orientations = st.lists(st.floats(-math.pi, math.pi, allow_nan=False), min_size=M, max_size=M)


def encoder(orientation: list[float] | None = None, **kw: object) -> GridCellEncoder:
    torch.manual_seed(0)
    enc = GridCellEncoder(E, M, C, **kw)
    if orientation is not None:
        enc.orientation.data = torch.tensor(orientation)
    return enc


def cell_rates(enc: GridCellEncoder, pos: torch.Tensor) -> torch.Tensor:
    """(..., 2) -> (..., M, C)."""
    return enc.rates_at(pos).unflatten(-1, (M, C)).detach()


def own(rates: torch.Tensor) -> torch.Tensor:
    """From rates at one position per cell, (M, C, M, C), each cell's own rate: (M, C)."""
    return rates[(*CELL, *CELL)]


def rotate(x: torch.Tensor, about: torch.Tensor, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                       dtype=torch.float64)
    return about + (x - about) @ rot.T


@given(orientations)
def test_wave_vectors_are_unit_120_degrees_apart_and_span_the_lattice(orientation: list[float]):
    enc = encoder(orientation)
    k = enc.wave_vectors(torch.float64)
    assert k.shape == (M, 3, 2)
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(M, 3, dtype=torch.float64))
    gram = k @ k.transpose(1, 2)  # unit vectors 120 degrees apart: every pair dots to -1/2
    expected = torch.full((3, 3), -0.5, dtype=torch.float64).fill_diagonal_(1.0).expand(M, 3, 3)
    torch.testing.assert_close(gram, expected)
    basis = enc.lattice_basis(torch.float64)  # two vectors of length `spacing`, 60 degrees apart
    spacing = enc.scales(torch.float64)
    torch.testing.assert_close(basis.norm(dim=-1), spacing[:, None].expand(M, 2))
    torch.testing.assert_close((basis[:, 0] * basis[:, 1]).sum(-1), spacing**2 / 2)
    # Every wave advances a whole number of cycles along each basis vector.
    cycles = (2 / math.sqrt(3)) * (k @ basis.transpose(1, 2)) / spacing[:, None, None]
    torch.testing.assert_close(cycles, cycles.round(), atol=1e-9, rtol=0)


@given(coord, coord, st.integers(-3, 3), st.integers(-3, 3), orientations)
def test_rates_invariant_under_lattice_translations(x: float, y: float, n1: int, n2: int,
                                                     orientation: list[float]):
    enc = encoder(orientation)
    pos = torch.tensor([x, y], dtype=torch.float64)
    basis = enc.lattice_basis(torch.float64)
    shifted = pos + n1 * basis[:, 0] + n2 * basis[:, 1]  # (M, 2): one translation per module
    moved = cell_rates(enc, shifted)[torch.arange(M), torch.arange(M)]  # module m at its shift
    torch.testing.assert_close(moved, cell_rates(enc, pos), atol=1e-9, rtol=0)


@given(coord, coord, orientations)
def test_rates_invariant_under_60_degree_rotation_about_a_vertex(x: float, y: float,
                                                                 orientation: list[float]):
    enc = encoder(orientation)
    pos = torch.tensor([x, y], dtype=torch.float64)
    vertex = enc.vertices(torch.float64)  # (M, C, 2)
    before = cell_rates(enc, pos)
    for degrees in (60, 120, -60):
        after = own(cell_rates(enc, rotate(pos, vertex, degrees)))
        torch.testing.assert_close(after, before, atol=1e-9, rtol=0)


def test_a_90_degree_rotation_is_not_a_symmetry():
    enc = encoder()
    pos = torch.tensor([0.3, 0.1], dtype=torch.float64)
    after = own(cell_rates(enc, rotate(pos, enc.vertices(torch.float64), 90)))
    assert (after - cell_rates(enc, pos)).abs().max() > 0.1


def test_rates_span_zero_to_one_with_one_at_vertices_and_zero_at_triangle_centres():
    enc = encoder()
    torch.manual_seed(1)
    rates = enc.rates_at(torch.empty(20000, 2).uniform_(-20, 20)).detach()
    assert rates.shape == (20000, M * C)
    assert rates.min() >= 0 and rates.max() <= 1
    assert rates.min() < 0.01 and rates.max() > 0.99  # the whole range is used
    vertex = enc.vertices(torch.float64)
    basis = enc.lattice_basis(torch.float64)
    far_vertex = vertex + (3 * basis[:, 0] - 2 * basis[:, 1])[:, None]
    centre = vertex + ((basis[:, 0] + basis[:, 1]) / 3)[:, None]
    ones, zeros = torch.ones(M, C, dtype=torch.float64), torch.zeros(M, C, dtype=torch.float64)
    torch.testing.assert_close(own(cell_rates(enc, vertex)), ones, atol=1e-12, rtol=0)
    torch.testing.assert_close(own(cell_rates(enc, far_vertex)), ones, atol=1e-12, rtol=0)
    torch.testing.assert_close(own(cell_rates(enc, centre)), zeros, atol=1e-12, rtol=0)


def test_cells_of_a_module_have_distinct_vertices_in_the_unit_rhombus():
    phases = encoder().phases(torch.float64)
    assert phases.shape == (C, 2)
    assert phases.min() >= 0 and phases.max() < 1
    gaps = (phases[:, None] - phases[None]).abs().sum(-1) + torch.eye(C, dtype=torch.float64)
    assert gaps.min() > 0.05


def test_modules_have_their_own_geometric_periods():
    enc = encoder(base_scale=0.7)
    spacing = enc.scales(torch.float64)
    torch.testing.assert_close(spacing, 0.7 * 1.42 ** torch.arange(M, dtype=torch.float64))
    direction = enc.lattice_basis(torch.float64)[0, 0] / spacing[0]  # all modules co-aligned at 0
    first_cells = cell_rates(enc, spacing[:, None] * direction)[:, :, 0]  # (shift m, module m')
    # Cell 0 of every module sits at the origin: a shift by module m's spacing returns it to a
    # vertex, and takes the neighbouring modules' cell 0 well off theirs. (Not modules m +- 2:
    # 1.42**2 ~ 2, so their lattices nearly nest, as the ~sqrt(2) ratios of real grid modules do.)
    torch.testing.assert_close(first_cells.diagonal(), torch.ones(M, dtype=torch.float64))
    neighbours = torch.cat((first_cells.diagonal(1), first_cells.diagonal(-1)))
    assert neighbours.max() < 0.9
    # No shorter period: between 0.1 and 0.9 spacings every module's cell 0 stays below its value
    # at the ends, (1 + 2 * (1 + 2 cos(0.2π)) / 3) / 3 = 0.915.
    t = torch.linspace(0.1, 0.9, 801, dtype=torch.float64)
    along = cell_rates(enc, (t[:, None, None] * spacing[:, None]) * direction)[..., 0]
    assert along[:, torch.arange(M), torch.arange(M)].max() < 0.916


def test_gradients_reach_the_plane_the_readout_and_the_orientations():
    enc = encoder()
    torch.manual_seed(2)
    h = torch.randn(2, 5, E, requires_grad=True)
    (enc(h) * torch.randn(2, 5, E)).sum().backward()
    for grad in (enc.plane.weight.grad, enc.out.weight.grad, enc.orientation.grad, h.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    fixed = encoder(learn_orientation=False)
    assert "orientation" not in dict(fixed.named_parameters())
    assert "orientation" in dict(fixed.named_buffers())


def test_forward_adds_the_projected_code_to_the_residual():
    enc = encoder()
    h = torch.randn(3, 4, E)
    with torch.no_grad():
        torch.testing.assert_close(enc(h) - h, enc.rates(h) @ enc.out.weight.T)


def test_bf16_autocast_keeps_the_residual_dtype_and_the_code_in_float32():
    enc = encoder()
    torch.manual_seed(3)
    h = torch.randn(2, 6, E)
    with torch.no_grad():
        ref, ref_rates = enc(h), enc.rates(h)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, rates = enc(h), enc.rates(h)
    assert out.dtype == torch.float32 and rates.dtype == torch.float32
    torch.testing.assert_close(rates, ref_rates)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)
    half = encoder().to(torch.bfloat16)
    with torch.no_grad():
        out_bf16 = half(h.to(torch.bfloat16))
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), ref, atol=5e-2, rtol=0)


@given(st.integers(0, 6))
def test_changing_later_tokens_never_changes_earlier_outputs(t: int):
    enc = encoder()
    torch.manual_seed(t)
    h = torch.randn(2, 8, E)
    changed = h.clone()
    changed[:, t + 1:] = torch.randn(2, 7 - t, E)
    with torch.no_grad():
        assert torch.equal(enc(h)[:, :t + 1], enc(changed)[:, :t + 1])
        assert not torch.equal(enc(h)[:, t + 1:], enc(changed)[:, t + 1:])


@pytest.mark.parametrize("kw", [{"n_modules": 0}, {"cells_per_module": 0},
                                {"base_scale": 0.0}, {"scale_ratio": -1.0}])
def test_rejects_degenerate_settings(kw: dict[str, float]):
    with pytest.raises(ValueError):
        GridCellEncoder(E, **kw)
