"""Statistics that passes request from calibration, and their streaming accumulators.

Every accumulator keeps sums only (count, Σx, Σxxᵀ, Σxyᵀ, ...), never the activations, so memory
is bounded by the statistic, not by the data, and two shards' accumulators add (``merge``). The
one exception, ``RowSample``, keeps a bounded, seeded sample of rows (see its docstring for why).

The request protocol (``Request``): a pass hands ``PassContext.collect`` a list of objects with

- ``key``: a unique string; the result is ``{key: accumulator}``;
- ``tensors() -> {"x": [names], "y": [names]}``: the tensors it reads; "x" tensors come from the
  model being rewritten, "y" tensors from the reference model (the original network's outputs a
  refit must reproduce; both from one model when no reference is given);
- ``new(x_arrays, y_arrays) -> accumulator``: an empty accumulator, shaped by the first batch;
- ``update(acc, x_arrays, y_arrays, rng)``: add one batch ({name: array}); ``rng`` is seeded by
  the run's seed, the batch index and the key, so a run is reproducible.

Requests:
- ``ResponseStats(tensor, reduce)``: per-channel responses of one tensor. ``reduce="spatial_max"``
  (conv outputs N,C,*: max over the spatial positions, the PFA response), ``"spatial_mean"``, or
  ``"rows"`` (every row of the last axis for linear layers: N·T rows of C features).
- ``LayerStats(key, x_tensor, y_tensor)``: the input features of a Conv/Gemm/MatMul (im2col
  patch rows at sampled output positions for a Conv; input rows for a linear layer) and, when
  ``y_tensor`` is given, the layer's target output at the same positions, possibly read from
  another model (the original network, for reconstruction). Accumulates [x 1]ᵀ[x 1], [x 1]ᵀy, yᵀy.
  ``layers.WeightLayer.stats_request`` makes the one that matches a layer's matrix.
- ``ResidualStats``: a LayerStats whose target is what the layer must add to a skip tensor to give
  the reference's residual sum.
- ``PooledStats(key, parts)``: several LayerStats (the readers of one shared weight) into one
  accumulator, each part's means kept (``PooledMoments``).
- ``SplitStats(inner)``: the inner request's batches alternate between two accumulators (fit /
  held out), for choosing a ridge on data the fit did not see.
- ``RowSample``: up to ``max_rows`` raw rows of a layer's input and target output.

Centred cross-moments are computed in one place, ``CrossMoments.moments``. The products of an
update (Σxxᵀ, Σxyᵀ) run on the fitting workers in fixed tiles (``parallel.gram``,
``parallel.cross``: the same sums for any worker count); a ConvTranspose's rows come by stride phase,
each phase at its own taps' columns (``PhaseRows``), the other columns being zero.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from .parallel import cross, gram


# ----------------------------------------------------------------------------- accumulators
class Moments:
    """Running count, Σx and Σxxᵀ of row vectors x (float64).

    Rows come a few at a time (a sequence's steps, a sample's positions), and a rank-r update of a
    wide Σxxᵀ reads and writes the whole d × d matrix for r·d² multiply-adds: memory-bound for small
    r (captcha_crnn's 4096-wide LSTM input, 48 rows a call: 2 GFLOP/s). The rows are therefore kept
    until ``PENDING_ROWS`` (at least a quarter of the width) of them are waiting, then added in one
    product; ``outer`` adds what waits before it is read. What waits is at most a quarter of the
    matrix's bytes (and ``PENDING_BYTES``). The batches depend on the rows' order only, so the sums
    do not depend on the thread count."""

    PENDING_ROWS = 256          # at least this many rows (and a quarter of the width) per product ...
    PENDING_BYTES = 32 << 20    # ... unless they hold more than this

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim)
        self._outer = None          # allocated when rows are first added to it
        self._pending: list = []
        self._pending_rows = 0
        self._lock = threading.Lock()   # readers in several workers (a ridge's held-out errors) flush once

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def outer(self) -> np.ndarray:
        with self._lock:
            self._flush_locked()
            if self._outer is None:
                self._outer = np.zeros((len(self.sum), len(self.sum)))
            return self._outer

    @outer.setter
    def outer(self, value: np.ndarray) -> None:
        self._pending, self._pending_rows = [], 0
        self._outer = value

    def _accumulate(self, rows: np.ndarray) -> None:
        g = gram(rows)
        if self._outer is None:
            self._outer = g
        else:
            self._outer += g

    def _flush_locked(self) -> None:
        if self._pending:
            self._accumulate(self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending))
            self._pending, self._pending_rows = [], 0

    def _add_pending(self, parts: list, count: int) -> None:
        with self._lock:
            self._pending = self._pending + parts
            self._pending_rows += count
            dim = len(self.sum)
            if self._pending_rows >= max(self.PENDING_ROWS, dim // 4) \
                    or self._pending_rows * dim * 8 >= self.PENDING_BYTES:
                self._flush_locked()

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        self.n += rows.shape[0]
        self.sum += rows.sum(axis=0)
        with self._lock:
            if not self._pending and rows.shape[0] >= max(self.PENDING_ROWS, len(self.sum) // 4):
                self._accumulate(rows)   # enough rows for one product: no copy kept
                return
        # a copy: the caller may reuse its buffer
        self._add_pending([np.array(rows, order="C")], rows.shape[0])

    def update_columns(self, cols: np.ndarray, rows: np.ndarray) -> None:
        """Add rows whose entries outside the columns ``cols`` are zero, given at those columns only
        (rows: r × len(cols), float64)."""
        self.n += rows.shape[0]
        if len(cols):
            self.sum[cols] += rows.sum(axis=0)
            self.outer[np.ix_(cols, cols)] += gram(rows)

    def merge(self, other: "Moments") -> "Moments":
        """Add ``other``'s rows: its waiting rows join this one's (the readers of a shared weight,
        a few rows each, pooled into one product), its accumulated Σxxᵀ is added."""
        self.n += other.n
        self.sum += other.sum
        with other._lock:
            done, waiting, count = other._outer, list(other._pending), other._pending_rows
        if done is not None:
            self.outer += done
        if waiting:
            self._add_pending(waiting, count)
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

    def update(self, x_rows, y_rows: np.ndarray | None = None) -> None:
        """Add rows x (n × dx: an array, or ``PhaseRows``) and their targets y (n × dy, or None)."""
        if y_rows is not None:
            y_rows = np.asarray(y_rows, dtype=np.float64)
        if isinstance(x_rows, PhaseRows):
            for cols, xs, rows in x_rows.parts():
                xs = np.asarray(xs, dtype=np.float64)
                self.x.update_columns(cols, xs)
                if y_rows is not None and len(cols):
                    self.xy[cols] += cross(xs, y_rows[rows])
        else:
            x_rows = np.asarray(x_rows, dtype=np.float64)
            self.x.update(x_rows)
            if y_rows is not None:
                self.xy += cross(x_rows, y_rows)
        if y_rows is not None:
            self.sum_y += y_rows.sum(axis=0)
            self.yy += (y_rows * y_rows).sum(axis=0)

    def merge(self, other: "CrossMoments") -> "CrossMoments":
        self.x.merge(other.x)
        for f in ("sum_y", "xy", "yy"):   # the y-side sums add like the x side's
            setattr(self, f, getattr(self, f) + getattr(other, f))
        return self

    @property
    def mean_y(self):
        return self.sum_y / max(self.n, 1)

    def moments(self, centered: bool = True):
        """(cxx, cxy, mx, my): the centred covariances Cov(x), Cov(x, y) and the means, or with
        ``centered=False`` the second moments E[x xᵀ], E[x yᵀ] and zero means (a fit without a
        bias)."""
        n = max(self.n, 1)
        mx, my = self.x.mean, self.mean_y
        if centered:
            return self.x.cov, self.xy / n - np.outer(mx, my), mx, my
        return self.x.second, self.xy / n, np.zeros_like(mx), np.zeros_like(my)

    def minus_bias(self, b) -> "CrossMoments":
        """The moments of (x, y − b): the target of a layer whose bias ``b`` (d_out) stays as it
        is is its product. ``self`` when b is None or zero."""
        if b is None or not np.any(b):
            return self
        out = CrossMoments(len(self.x.mean), len(self.sum_y))
        out.x.merge(self.x)
        n = self.n
        out.sum_y = self.sum_y - n * b
        out.xy = self.xy - np.outer(self.x.sum, b)
        out.yy = self.yy - 2 * b * self.sum_y + n * b * b
        return out

    def outputs(self, mask) -> "CrossMoments":
        """The moments with only the y columns where ``mask`` (bool, d_out) is True (x shared)."""
        out = CrossMoments(self.x.sum.shape[0], int(np.sum(mask)))
        out.x = self.x
        out.sum_y, out.xy, out.yy = self.sum_y[mask], self.xy[:, mask], self.yy[mask]
        return out

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


class PhaseRows:
    """Feature rows of a ConvTranspose grouped by stride phase (``conv_transpose_phases``): the rows
    of one phase are zero outside that phase's taps, so each group is held at its columns only.
    ``groups``: [(cols, x, positions)]: ``x`` (N·p × len(cols), rows ordered (sample, position)) the
    rows at the output positions ``positions`` (p indices into the sampled positions), at the
    feature columns ``cols``; the rows are those of the groups in turn. ``dim``: the feature
    columns in all."""

    def __init__(self, dim: int, samples: int, groups: list):
        self.dim, self.samples, self.groups = dim, samples, groups
        self.n = sum(x.shape[0] for _, x, _ in groups)

    def parts(self):
        """(cols, x, rows): each group with the slice of the rows it holds."""
        start = 0
        for cols, x, _ in self.groups:
            yield cols, x, slice(start, start + x.shape[0])
            start += x.shape[0]

    def rows_at(self, flat: np.ndarray) -> np.ndarray:
        """``flat`` (N·P × m, rows ordered (sample, position), as ``conv_outputs_at`` gives them)
        in the groups' row order."""
        per = flat.reshape(self.samples, -1, flat.shape[-1])
        return np.concatenate([per[:, p].reshape(-1, flat.shape[-1]) for _, _, p in self.groups])

    def sums(self) -> np.ndarray:
        """Σ over the rows of each feature column (dim)."""
        out = np.zeros(self.dim)
        for cols, x, _ in self.groups:
            out[cols] += np.asarray(x, dtype=np.float64).sum(axis=0)
        return out

    def dense(self) -> np.ndarray:
        """The rows as one array (N·P × dim, rows ordered (sample, position))."""
        p = sum(len(q) for _, _, q in self.groups)
        out = np.zeros((self.samples, p, self.dim), dtype=self.groups[0][1].dtype if self.groups else np.float64)
        for cols, x, pos in self.groups:
            out[:, pos[:, None], cols[None, :]] = x.reshape(self.samples, len(pos), len(cols))
        return out.reshape(-1, self.dim)

    @classmethod
    def join(cls, parts: list) -> "PhaseRows":
        """One PhaseRows of the rows of several (same ``dim``)."""
        out = cls(parts[0].dim, 0, [g for p in parts for g in p.groups])
        out.samples = None   # the groups no longer share a sample count: parts() and sums() only
        return out


def conv_transpose_phases(x: np.ndarray, attrs: dict, out_spatial: tuple, flat_pos: np.ndarray) -> PhaseRows:
    """The input features of a ConvTranspose at the given flat output positions, by stride phase.

    x: (N, C, *S). Output position p reads x[c, i] through tap k where i·stride − pad_begin + k·dilation
    = p. The features are (c, k1, k2, ...) columns, matching the weight layout W[c, o, k1, k2, ...]
    (``layers.WeightLayer.matrix``): entry (c, k) is that x[c, i], or 0 where the tap reads no input
    position. Along each axis the taps that can read an input at p are those with
    k·dilation ≡ p + pad_begin (mod stride): the same for every position of one stride phase, so
    the rows of a phase are zero outside its taps' columns and are returned at those columns only
    (a stride-2 4×4 kernel: a quarter of the columns, a sixteenth of the products of a covariance).
    The rows of one stride phase span that phase's taps only, so a least-squares fit on them is the
    transposed convolution's (output_padding only adds positions no tap of the border reaches).
    """
    nd = x.ndim - 2
    k = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    coords = np.unravel_index(flat_pos, out_spatial)
    n, c = x.shape[:2]
    phase = np.ravel_multi_index([(coords[d] + pads[d]) % strides[d] for d in range(nd)], strides) \
        if nd else np.zeros(len(flat_pos), int)
    taps_per_channel = int(np.prod(k))
    groups = []
    for ph in np.unique(phase):
        pos = np.nonzero(phase == ph)[0]
        r = np.unravel_index(ph, strides)
        taps = [np.nonzero((np.arange(k[d]) * dil[d] - r[d]) % strides[d] == 0)[0] for d in range(nd)]
        if any(len(t) == 0 for t in taps):   # no tap reaches these positions: zero rows
            groups.append((np.zeros(0, int), np.zeros((n * len(pos), 0), x.dtype), pos))
            continue
        grids, valid = [], None
        for d in range(nd):
            num = coords[d][pos][:, None] + pads[d] - taps[d][None, :] * dil[d]   # (p, t_d) = i·stride
            ok = (num >= 0) & (num < x.shape[2 + d] * strides[d])
            shape = [len(pos)] + [1] * nd
            shape[1 + d] = len(taps[d])
            grids.append(np.where(ok, num // strides[d], 0).reshape(shape))
            valid = ok.reshape(shape) if valid is None else valid & ok.reshape(shape)
        patches = x[(slice(None), slice(None)) + tuple(grids)]   # (N, C, p, t...)
        if not valid.all():
            patches = patches * valid
        patches = np.moveaxis(patches, 2, 1).reshape(n * len(pos), -1)
        tap_cols = np.ravel_multi_index(np.meshgrid(*taps, indexing="ij"), k).ravel()
        cols = (np.arange(c)[:, None] * taps_per_channel + tap_cols[None, :]).ravel()
        groups.append((cols, patches, pos))
    return PhaseRows(c * taps_per_channel, n, groups)


def conv_transpose_patches(x: np.ndarray, attrs: dict, out_spatial: tuple, flat_pos: np.ndarray) -> np.ndarray:
    """``conv_transpose_phases`` as one array: (N·P, C·prod(k)), rows ordered (sample, position)."""
    return conv_transpose_phases(x, attrs, out_spatial, flat_pos).dense()


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
@runtime_checkable
class Request(Protocol):
    """What ``PassContext.collect`` accepts (see the module docstring)."""

    key: str

    def tensors(self) -> dict: ...

    def new(self, x_arrays: dict, y_arrays: dict): ...

    def update(self, acc, x_arrays: dict, y_arrays: dict, rng: np.random.Generator) -> None: ...


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


SPATIAL_KINDS = ("conv", "convtranspose")   # LayerStats kinds whose rows are sampled output positions


@dataclass
class LayerStats:
    """Inputs of a weight layer (and optionally its target outputs).

    kind: "conv" (needs ``conv_attrs``: kernel_shape, strides, pads, dilations; group must be 1),
    "convtranspose" (the same attributes, plus output_padding where there is no target tensor to
    give the output size; ``conv_transpose_patches``) or "linear" (rows of the last axis; ``transpose_x`` for Gemm transA=1).
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
        if self.kind in SPATIAL_KINDS:
            out_spatial = tuple(y.shape[2:]) if y is not None else self._out_spatial(x.shape)
            pos = spatial_positions(out_spatial, self.positions, rng)
            yr = conv_outputs_at(y, pos) if y is not None else None
            if self.kind == "conv":
                return conv_patches(x, self.conv_attrs, out_spatial, pos), yr
            xr = conv_transpose_phases(x, self.conv_attrs, out_spatial, pos)   # PhaseRows
            return xr, xr.rows_at(yr) if yr is not None else None
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
        if self.kind == "convtranspose":
            op = a.get("output_padding", [0] * nd)
            return tuple((in_shape[2 + i] - 1) * s[i] - p[i] - p[i + nd] + d[i] * (k[i] - 1) + op[i] + 1
                         for i in range(nd))
        return tuple((in_shape[2 + i] + p[i] + p[i + nd] - d[i] * (k[i] - 1) - 1) // s[i] + 1
                     for i in range(nd))

    def new(self, x_arrays, y_arrays):
        xr, yr = self._features(x_arrays, y_arrays, np.random.default_rng(0))
        return CrossMoments(xr.dim if isinstance(xr, PhaseRows) else xr.shape[1], yr.shape[1] if yr is not None else 0)

    def update(self, acc, x_arrays, y_arrays, rng):
        xr, yr = self._features(x_arrays, y_arrays, rng)
        acc.update(xr, yr)


class PooledMoments(CrossMoments):
    """``CrossMoments`` over the rows of several parts, with each part's count and sums kept:
    ``part_means[key]`` = (E[x], E[y]) over that part's rows."""

    def __init__(self, dx: int, dy: int, keys):
        super().__init__(dx, dy)
        self.parts = {k: [0, np.zeros(dx), np.zeros(dy)] for k in keys}

    def add_part(self, key, x_rows, y_rows) -> None:
        part = self.parts[key]
        if isinstance(x_rows, PhaseRows):
            part[0] += x_rows.n
            part[1] += x_rows.sums()
        else:
            part[0] += x_rows.shape[0]
            part[1] += np.asarray(x_rows, dtype=np.float64).sum(axis=0)
        if y_rows is not None:
            part[2] += np.asarray(y_rows, dtype=np.float64).sum(axis=0)

    def part_means(self, key):
        n, sx, sy = self.parts[key]
        return sx / max(n, 1), sy / max(n, 1)


@dataclass
class PooledStats:
    """The ``LayerStats`` of several tensors pairs read by one weight (the readers of a shared
    weight) accumulated into one ``PooledMoments``: a batch's rows of every part go into one
    product, so the moments cost one d × d accumulator, not one per part (and no merging), with
    each part's means kept. ``parts``: LayerStats of equal feature sizes."""

    key: str
    parts: list

    def tensors(self):
        out = {"x": [], "y": []}
        for p in self.parts:
            for side, names in p.tensors().items():
                out[side].extend(n for n in names if n not in out[side])
        return out

    def new(self, x_arrays, y_arrays):
        first = self.parts[0].new(x_arrays, y_arrays)
        return PooledMoments(len(first.x.sum), len(first.sum_y), [p.key for p in self.parts])

    def update(self, acc, x_arrays, y_arrays, rng):
        xs, ys = [], []
        for p in self.parts:
            xr, yr = p._features(x_arrays, y_arrays, rng)
            acc.add_part(p.key, xr, yr)
            xs.append(xr)
            ys.append(yr)
        xs = PhaseRows.join(xs) if isinstance(xs[0], PhaseRows) else np.concatenate(xs)
        acc.update(xs, None if ys[0] is None else np.concatenate(ys))


@dataclass
class ResidualStats(LayerStats):
    """LayerStats whose target is what the layer must add to the pruned network's skip tensor to
    give the reference network's residual sum: y = R_ref[kept] − skip − shift. Fitting to it
    also corrects the error that earlier pruning left in the skip path."""

    skip: str = ""
    mask: np.ndarray | None = None
    shift: np.ndarray | None = None

    def tensors(self):
        return {"x": [self.x_tensor, self.skip], "y": [self.y_tensor]}

    def _features(self, x_arrays, y_arrays, rng):
        axis = 1 if self.kind in SPATIAL_KINDS else -1
        y = y_arrays[self.y_tensor]
        if self.mask is not None and not self.mask.all():
            y = np.compress(self.mask, y, axis=axis)
        t = y - x_arrays[self.skip]
        if self.shift is not None:
            t = t - (self.shift.reshape((-1,) + (1,) * (t.ndim - 2)) if axis == 1 else self.shift)
        return super()._features(x_arrays, {self.y_tensor: t.astype(np.float32)}, rng)


ROWS_PER_COLUMN = 16      # rows a least-squares fit wants per input column (``positions_for``)
MAX_POSITIONS = 1024      # sampled output positions per sample, at most


def positions_for(columns: int, samples: int, positions: int) -> int:
    """Sampled output positions per sample for a Conv's ``LayerStats``: ``positions``, or more where
    ``samples`` are too few for ``ROWS_PER_COLUMN`` rows per input column (C·∏k): with the tens of
    samples users have, 32 positions give a 3×3 Conv over 64 channels (576 columns) under three rows
    per column, and a fit on them overfits the calibration rows. At most ``MAX_POSITIONS`` (a map
    smaller than the count gives all its positions)."""
    need = -(-ROWS_PER_COLUMN * int(columns) // max(int(samples), 1))
    return int(max(positions, min(need, MAX_POSITIONS)))


class SplitStats:
    """A request whose batches alternate between two accumulators [fit, held out] (batch 0, 2, …
    into the first, 1, 3, … into the second). With ``batches=1`` (the data is one batch: a few
    samples) the samples are split instead (even samples fit, odd ones held out, counted across
    updates), so that few samples still have held-out rows; tensors whose axis 0 is not the
    batch's samples (sizes differ, or fewer than 2) leave the batch whole to the first."""

    def __init__(self, inner, batches: int | None = None):
        self.inner, self.key, self._calls = inner, inner.key, 0
        self.within, self._samples = batches == 1, 0

    def tensors(self):
        return self.inner.tensors()

    def new(self, x_arrays, y_arrays):
        return [self.inner.new(x_arrays, y_arrays), self.inner.new(x_arrays, y_arrays)]

    def update(self, acc, x_arrays, y_arrays, rng):
        if self.within:
            names = self.inner.tensors()
            xs = {k: x_arrays[k] for k in names["x"]}
            ys = {k: y_arrays[k] for k in names["y"]}
            sizes = {np.shape(a)[0] if np.ndim(a) else None for d in (xs, ys) for a in d.values()}
            if len(sizes) == 1 and (n := sizes.pop()) is not None and n >= 2:
                parity = (self._samples + np.arange(n)) % 2   # counted across batches
                self._samples += n
                for half in (0, 1):
                    idx = np.nonzero(parity == half)[0]
                    self.inner.update(acc[half], {k: v[idx] for k, v in xs.items()},
                                      {k: v[idx] for k, v in ys.items()}, rng)
                return
        self.inner.update(acc[self._calls % 2], x_arrays, y_arrays, rng)
        self._calls += 1


class RowSample:
    """Up to ``max_rows`` rows of a layer's input (``x_tensor``, from the rewritten model) and its
    target output (``y_tensor``, from the reference), in float32: memory at most
    max_rows·(d_in + d_out)·4 bytes per request. Each batch contributes at most ``per_batch`` rows,
    drawn without replacement by the collector's seeded ``rng`` (the same rows on every run), until
    ``max_rows`` are held; a caller spreads the rows over the data with per_batch ≈ max_rows /
    batches.

    The one request that keeps rows against this module's rule: a fit that is not linear in its
    parameters (the Fastfood diagonals of ``hadamard``, where the features depend on the other
    diagonals being fitted) cannot be done from fixed second moments. The bound above is what keeps
    it within the rule's purpose. Accumulator: {"x": [arrays], "y": [arrays], "n": rows held}."""

    def __init__(self, key, x_tensor, y_tensor, per_batch, max_rows, transpose_x=False):
        self.key, self.x_tensor, self.y_tensor = key, x_tensor, y_tensor
        self.per_batch, self.max_rows, self.transpose_x = per_batch, max_rows, transpose_x

    def tensors(self):
        return {"x": [self.x_tensor], "y": [self.y_tensor]}

    def new(self, xa, ya):
        return {"x": [], "y": [], "n": 0}

    def update(self, acc, xa, ya, rng):
        x = xa[self.x_tensor]
        x = x.T if self.transpose_x else x
        x = x.reshape(-1, x.shape[-1])
        y = ya[self.y_tensor].reshape(-1, ya[self.y_tensor].shape[-1])
        take = min(self.per_batch, self.max_rows - acc["n"], len(x))
        if take <= 0:
            return
        sel = np.arange(len(x)) if take >= len(x) else np.sort(rng.choice(len(x), take, replace=False))
        acc["x"].append(x[sel].astype(np.float32))
        acc["y"].append(y[sel].astype(np.float32))
        acc["n"] += len(sel)

    @staticmethod
    def rows(acc):
        """(x, y) float64 arrays of the rows held."""
        return np.concatenate(acc["x"]).astype(np.float64), np.concatenate(acc["y"]).astype(np.float64)
