"""Statistics that passes request from calibration, and their streaming accumulators.

Every accumulator keeps sums only (count, Σx, Σxxᵀ, Σxyᵀ, ...), never the activations, so memory
is bounded by the statistic, not by the data, and two shards' accumulators add (``merge``).

Requests:
- ``ResponseStats(tensor, reduce)``: per-channel responses of one tensor. ``reduce="spatial_max"``
  (conv outputs N,C,*: max over the spatial positions, the PFA response), ``"spatial_mean"``, or
  ``"rows"`` (every row of the last axis for linear layers: N·T rows of C features).
- ``LayerStats(key, node, x_tensor, y_tensor)``: the input features of a Conv/Gemm/MatMul (im2col
  patch rows at sampled output positions for a Conv; input rows for a linear layer) and, when
  ``y_tensor`` is given, the layer's target output at the same positions, possibly read from
  another model (the original network, for reconstruction). Accumulates [x 1]ᵀ[x 1], [x 1]ᵀy, yᵀy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


# ----------------------------------------------------------------------------- accumulators
class Moments:
    """Running count, Σx and Σxxᵀ of row vectors x (float64)."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        self.n += rows.shape[0]
        self.sum += rows.sum(axis=0)
        self.outer += rows.T @ rows

    def merge(self, other: "Moments") -> "Moments":
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer
        return self

    @property
    def mean(self):
        return self.sum / max(self.n, 1)

    @property
    def second(self):
        """E[x xᵀ] (uncentered)."""
        return self.outer / max(self.n, 1)

    @property
    def cov(self):
        m = self.mean
        return self.second - np.outer(m, m)

    @property
    def corr(self):
        c = self.cov
        d = np.sqrt(np.clip(np.diag(c), 1e-12, None))
        return c / np.outer(d, d)


class CrossMoments:
    """Running Σ over rows of x (dx) and y (dy): n, Σx, Σy, ΣxxᵀΣ, Σxyᵀ, Σy² per column."""

    def __init__(self, dx: int, dy: int):
        self.x = Moments(dx)
        self.sum_y = np.zeros(dy)
        self.xy = np.zeros((dx, dy))
        self.yy = np.zeros(dy)

    @property
    def n(self):
        return self.x.n

    def update(self, x_rows: np.ndarray, y_rows: np.ndarray | None = None) -> None:
        x_rows = np.asarray(x_rows, dtype=np.float64)
        self.x.update(x_rows)
        if y_rows is not None:
            y_rows = np.asarray(y_rows, dtype=np.float64)
            self.sum_y += y_rows.sum(axis=0)
            self.xy += x_rows.T @ y_rows
            self.yy += (y_rows * y_rows).sum(axis=0)

    def merge(self, other: "CrossMoments") -> "CrossMoments":
        self.x.merge(other.x)
        self.sum_y += other.sum_y
        self.xy += other.xy
        self.yy += other.yy
        return self

    @property
    def mean_y(self):
        return self.sum_y / max(self.n, 1)

    @classmethod
    def pooled(cls, parts) -> "CrossMoments":
        """One CrossMoments over the rows of several (the readers of a shared weight); ``None``
        parts are left out, and a single part is returned as it is."""
        parts = [c for c in parts if c is not None]
        if len(parts) == 1:
            return parts[0]
        out = cls(len(parts[0].x.mean), len(parts[0].sum_y))
        for c in parts:
            out.merge(c)
        return out


# ----------------------------------------------------------------------------- feature maps
def spatial_positions(out_spatial: tuple, per_sample: int, rng: np.random.Generator) -> np.ndarray:
    """Sampled flat indices into the output grid (same for every sample of a batch)."""
    total = int(np.prod(out_spatial)) if out_spatial else 1
    if per_sample <= 0 or per_sample >= total:
        return np.arange(total)
    return np.sort(rng.choice(total, size=per_sample, replace=False))


def conv_patches(x: np.ndarray, attrs: dict, out_spatial: tuple, flat_pos: np.ndarray) -> np.ndarray:
    """im2col rows of a Conv input at the given flat output positions.

    x: (N, C, *S). Returns (N·P, C·prod(k)) with columns ordered (c, k1, k2, ...), matching the
    weight layout W[o, c, k1, k2, ...] flattened.
    """
    nd = x.ndim - 2
    k = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    coords = np.unravel_index(flat_pos, out_spatial)  # nd arrays of length P
    # index arrays: for each position p and kernel offset j: start_p*stride + j*dil
    idx = []
    for d in range(nd):
        start = coords[d] * strides[d]
        offs = np.arange(k[d]) * dil[d]
        idx.append(start[:, None] + offs[None, :])  # (P, k_d)
    P = len(flat_pos)
    # Build a broadcasted gather: result (N, C, P, k1, ..., knd)
    grids = []
    for d in range(nd):
        shape = [P] + [1] * nd
        shape[1 + d] = k[d]
        grids.append(idx[d].reshape(shape))
    patches = padded[(slice(None), slice(None)) + tuple(grids)]  # (N, C, P, k...)
    n, c = x.shape[:2]
    patches = np.moveaxis(patches, 2, 1)  # (N, P, C, k...)
    return patches.reshape(n * P, c * int(np.prod(k)))


def conv_outputs_at(y: np.ndarray, flat_pos: np.ndarray) -> np.ndarray:
    """(N, O, *S) -> (N·P, O) at the flat spatial positions."""
    n, o = y.shape[:2]
    flat = y.reshape(n, o, -1)[:, :, flat_pos]
    return np.moveaxis(flat, 2, 1).reshape(-1, o)


def rows_of(x: np.ndarray, transpose: bool = False) -> np.ndarray:
    """All leading axes flattened, last axis as features (Gemm/MatMul inputs and outputs)."""
    if transpose:
        x = x.T
    return x.reshape(-1, x.shape[-1])


def responses(x: np.ndarray, reduce: str) -> np.ndarray:
    if reduce == "rows":
        return rows_of(x)
    if x.ndim <= 2:
        return x.reshape(x.shape[0], -1)
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    if reduce == "spatial_max":
        return flat.max(axis=2)
    if reduce == "spatial_mean":
        return flat.mean(axis=2)
    raise ValueError(f"unknown reduction '{reduce}'")


# ----------------------------------------------------------------------------- requests
@dataclass
class ResponseStats:
    tensor: str
    reduce: str = "spatial_max"
    key: str | None = None

    def __post_init__(self):
        self.key = self.key or f"resp:{self.tensor}:{self.reduce}"

    def tensors(self):
        return {"x": [self.tensor], "y": []}

    def new(self, x_arrays, y_arrays):
        r = responses(x_arrays[self.tensor], self.reduce)
        return Moments(r.shape[1])

    def update(self, acc, x_arrays, y_arrays, rng):
        acc.update(responses(x_arrays[self.tensor], self.reduce))


@dataclass
class LayerStats:
    """Inputs of a weight layer (and optionally its target outputs).

    kind: "conv" (needs ``conv_attrs``: kernel_shape, strides, pads, dilations; group must be 1)
    or "linear" (rows of the last axis; ``transpose_x`` for Gemm transA=1).
    """

    key: str
    x_tensor: str
    y_tensor: str | None = None
    kind: str = "linear"
    conv_attrs: dict = field(default_factory=dict)
    positions: int = 32   # conv: sampled output positions per sample
    rows_per_batch: int = 0  # linear: 0 = all rows
    transpose_x: bool = False

    def tensors(self):
        return {"x": [self.x_tensor], "y": [self.y_tensor] if self.y_tensor else []}

    def _features(self, x_arrays, y_arrays, rng):
        x = x_arrays[self.x_tensor]
        y = y_arrays.get(self.y_tensor) if self.y_tensor else None
        if self.kind == "conv":
            out_spatial = tuple(y.shape[2:]) if y is not None else self._out_spatial(x.shape)
            pos = spatial_positions(out_spatial, self.positions, rng)
            xr = conv_patches(x, self.conv_attrs, out_spatial, pos)
            yr = conv_outputs_at(y, pos) if y is not None else None
            return xr, yr
        xr = rows_of(x, self.transpose_x)
        yr = rows_of(y) if y is not None else None
        if self.rows_per_batch and xr.shape[0] > self.rows_per_batch:
            sel = np.sort(rng.choice(xr.shape[0], size=self.rows_per_batch, replace=False))
            xr = xr[sel]
            yr = yr[sel] if yr is not None else None
        return xr, yr

    def _out_spatial(self, in_shape):
        a = self.conv_attrs
        nd = len(in_shape) - 2
        k = a["kernel_shape"]
        s = a.get("strides", [1] * nd)
        d = a.get("dilations", [1] * nd)
        p = a.get("pads", [0] * (2 * nd))
        return tuple((in_shape[2 + i] + p[i] + p[i + nd] - d[i] * (k[i] - 1) - 1) // s[i] + 1
                     for i in range(nd))

    def new(self, x_arrays, y_arrays):
        xr, yr = self._features(x_arrays, y_arrays, np.random.default_rng(0))
        return CrossMoments(xr.shape[1], yr.shape[1] if yr is not None else 0)

    def update(self, acc, x_arrays, y_arrays, rng):
        xr, yr = self._features(x_arrays, y_arrays, rng)
        acc.update(xr, yr)
