"""Calibration data and the ONNX Runtime run that gathers statistics.

Data is a sequence of *feeds*: dicts of input name -> array, each with its own shapes (photos of
different sizes, sequences of different lengths). Sources:
- a dict of arrays keyed by input name, an ``.npz`` file (keyed by input name; a single-input model
  may use one unnamed array), a ``.npy`` file (single-input models): one stacked feed, split and
  held out by sample;
- a folder of ``.npz`` files, one feed each (sorted by name);
- a folder of images, decoded lazily, one feed per image: at ``--image-size H,W``, or, when the
  model's spatial dims are dynamic, at each image's own size (aspect kept, longest side at most
  ``max_side``, sides rounded to ``size_multiple``);
- any iterable of feed dicts, or an onnxruntime ``CalibrationDataReader``: a list is kept as it
  is; a generator or reader is read once into a temporary folder of ``.npz`` feeds (passes read
  the data several times), removed by ``close()``.

An input's axis 0 is the batch axis when the model's dim 0 is dynamic (or every input fixes the
same batch); other inputs (scalars, a recurrent state ``[2, B, 128]``) pass through as given:
never split, stacked or merged. Batches are consecutive feeds of equal shapes merged up to
``batch_size`` samples; statistics accumulate batch by batch.

``collect`` runs a model once over the data with the requested tensors exposed as outputs (only
the nodes they are computed from: ``upstream_of``) and updates each request's accumulator batch
by batch; with a second model (``model_y``) the same batches also run through it, so a request
can pair inputs from the rewritten network with targets from the original one.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import shutil
import tempfile
import warnings
import weakref
import zlib

import numpy as np
import onnx
import onnxruntime as ort

from .errors import CalibrationError, InputError, first_line
from .model_io import EXTERNAL_THRESHOLD, copy_fields, has_lazy, is_lazy, save_model, session_folder, weight_bytes

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
HUGE = 1e18   # |x| above this overflows float32 products and float64 sums of squares downstream


# ----------------------------------------------------------------------------- model inputs
def model_inputs(model: onnx.ModelProto):
    """[(name, shape with None for dynamic dims, numpy dtype)] of the real (non-initializer) inputs."""
    init = {t.name for t in model.graph.initializer}
    result = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        result.append((vi.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return result


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs fix (a model exported with batch 1): every input of rank
    ≥ 1 fixes the same dim 0. None when any dim 0 is dynamic."""
    dims = [shape[0] for _, shape, _ in model_inputs(model) if shape]
    if not dims or any(d is None for d in dims) or len(set(dims)) != 1:
        return None
    return dims[0]


def input_roles(model: onnx.ModelProto) -> dict:
    """{input name: "batch" | "pass"}: axis 0 is the batch axis when the model's dim 0 is dynamic
    or every input fixes the same batch; scalars and inputs with another static dim 0 (a state
    ``[2, B, 128]``) pass through as given."""
    fixed = fixed_batch(model)
    roles = {}
    for name, shape, _ in model_inputs(model):
        roles[name] = "batch" if shape and (shape[0] is None or fixed is not None) else "pass"
    return roles


def _batches(data: "DataSource", batch_size: int, model: onnx.ModelProto):
    """(batches, count): feed dicts of up to ``batch_size`` samples, or of exactly the model's
    fixed batch size (a last, shorter batch is left out)."""
    fixed = fixed_batch(model)
    if fixed is None:
        return data.batches(batch_size), data.count_batches(batch_size)
    return ((f for f in data.batches(fixed) if data.batch_count(f) == fixed), data.n // fixed)


def _fmt_shape(shape):
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _layout_hint(shape, model_shape):
    """A hint when NCHW-shaped data meets an NHWC model (or the reverse)."""
    if len(shape) == 4 and len(model_shape) == 4:
        nhwc = (shape[0], shape[2], shape[3], shape[1])
        nchw = (shape[0], shape[3], shape[1], shape[2])
        fits = lambda s: all(w is None or g == w for g, w in zip(s[1:], model_shape[1:]))  # noqa: E731
        if fits(nhwc):
            return " (the data looks NCHW and the model takes NHWC: give --layout NHWC for an image folder, " \
                   "or transpose the arrays)"
        if fits(nchw):
            return " (the data looks NHWC and the model takes NCHW: give --layout NCHW, or transpose the arrays)"
    return ""


# ----------------------------------------------------------------------------- checks
class _Survey:
    """Per-input facts gathered while the data is checked, feed by feed: value range, whether
    every sample equals the first, distinct samples (hashes), for the degenerate-data checks."""

    def __init__(self):
        self.lo, self.hi, self.big = {}, {}, {}
        self.first, self.same, self.hashes = {}, {}, {}

    def add(self, name, a, batch_major):
        if np.dtype(a.dtype).kind != "f" or a.size == 0:
            return
        a64 = np.asarray(a)
        self.lo[name] = min(self.lo.get(name, np.inf), float(a64.min()))
        self.hi[name] = max(self.hi.get(name, -np.inf), float(a64.max()))
        self.big[name] = max(self.big.get(name, 0.0), float(np.abs(a64).max()))
        if not batch_major:
            return
        hashes = self.hashes.setdefault(name, set())
        for s in a64:
            s = np.ascontiguousarray(s)
            if name not in self.first:
                self.first[name], self.same[name] = s.copy(), True
            elif self.same[name] and (s.shape != self.first[name].shape or not np.array_equal(s, self.first[name])):
                self.same[name] = False
            if len(hashes) < 4096:
                hashes.add((s.shape, zlib.crc32(s.tobytes())))

    def check(self, origin, n):
        for name in self.lo:
            if self.big[name] > HUGE:
                raise CalibrationError(
                    f"{origin}: input '{name}' has values up to {self.big[name]:.3g}: statistics of such "
                    "values overflow (not finite); rescale the data to the range the model was trained on")
            if self.lo[name] == self.hi[name]:
                raise CalibrationError(
                    f"{origin}: input '{name}' has zero variance: every value is {self.lo[name]:g} "
                    "(blank images or a stuck sensor?); statistics of constant data mean nothing")
            if self.same.get(name) and n > 1:
                raise CalibrationError(
                    f"{origin}: input '{name}' has zero variance across samples: all {n} samples are identical")
        for name, hashes in self.hashes.items():
            k = len(hashes)
            if n > 1 and k < 4096 and (k < 4 or k < n / 2):
                warnings.warn(f"{origin}: input '{name}' has only {k} distinct sample(s) among {n}: "
                              "statistics from so few samples may not represent real data")


def _check_feed(origin, feed, inputs, roles, where=""):
    """Names, ranks, fixed dims and dtypes of one feed against the model; returns its arrays."""
    names = [i[0] for i in inputs]
    missing = [n for n in names if n not in feed]
    extra = [k for k in feed if k not in names]
    if missing or extra:
        raise CalibrationError(
            f"{origin}{where}: input names {sorted(feed)} do not match the model's inputs {names}"
            + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else ""))
    for name, shape, dtype in inputs:
        a = feed[name]
        if a.ndim != len(shape):
            raise CalibrationError(f"{origin}{where}: input '{name}' has rank {a.ndim} (shape {tuple(a.shape)}) "
                                   f"but the model expects rank {len(shape)} {_fmt_shape(shape)}")
        first = 1 if roles.get(name) == "batch" else 0
        for i, (got, want) in enumerate(zip(a.shape, shape)):
            if i >= first and want is not None and got != want:
                raise CalibrationError(f"{origin}{where}: input '{name}' has shape {tuple(a.shape)} but the "
                                       f"model expects {_fmt_shape(shape)}" + _layout_hint(a.shape, shape))
        a_kind, m_kind = np.dtype(a.dtype).kind, np.dtype(dtype).kind
        if (m_kind == "f") != (a_kind == "f") or a_kind not in "fiub":
            raise CalibrationError(f"{origin}{where}: input '{name}' has dtype {a.dtype} but the model "
                                   f"expects {np.dtype(dtype).name}")
        if a_kind == "f":
            flat = a.reshape(-1) if a.ndim else a.reshape(1)
            if not all(np.isfinite(flat[s:s + 1 << 20]).all() for s in range(0, flat.size, 1 << 20)):
                raise CalibrationError(f"{origin}{where}: input '{name}' contains NaN or Inf values")
# ----------------------------------------------------------------------------- data sources
class DataSource:
    """One stacked feed: arrays keyed by input name, batch-major ones with the same number of
    samples on axis 0; inputs whose role is "pass" (see ``input_roles``) are given whole to every
    batch. Split, batched and held out by sample; when a pass-through input has rank ≥ 1 (a state
    whose B must match), the whole feed runs at once."""

    unit = "sample"
    max_batch = None   # 1 for a model that runs at batch 1 only although its batch dim is dynamic
    batch_note = None  # why, for the report
    index = None       # the samples of ``arrays`` this source holds, in order (``pick``); None: all of them

    def __init__(self, arrays: dict, origin: str = "calibration data", cast: dict | None = None,
                 roles: dict | None = None):
        self.arrays = arrays
        self.origin = origin
        self.cast = cast or {}   # input name -> dtype, applied per batch (memory-mapped arrays stay on disk)
        self.roles = dict(roles or {})
        ns = {k: len(v) for k, v in arrays.items() if self._batch_major(k)}
        if len(set(ns.values())) > 1 and roles is not None:
            raise CalibrationError(f"{origin}: inputs have different sample counts {ns}")
        self.n = next(iter(ns.values())) if ns else (1 if arrays else 0)
        self.splittable = not any(self.roles.get(k) == "pass" and np.ndim(v) > 0 for k, v in arrays.items())

    def _batch_major(self, name):
        return self.roles.get(name, "batch") == "batch" and np.ndim(self.arrays[name]) > 0

    # -- reading
    def take(self, idx) -> dict:
        if self.index is not None:
            idx = self.index[idx]
        return {k: _contiguous(v[idx] if self._batch_major(k) else v, self.cast.get(k)) for k, v in self.arrays.items()}

    def batches(self, batch_size: int = 64):
        if not self.splittable:
            yield self.take(slice(None))
            return
        batch_size = min(batch_size, self.max_batch or batch_size)
        for s in range(0, self.n, batch_size):
            yield self.take(slice(s, min(s + batch_size, self.n)))

    def count_batches(self, batch_size: int) -> int:
        batch_size = min(batch_size, self.max_batch or batch_size)
        return -(-self.n // batch_size) if self.splittable else 1

    def batch_count(self, feed) -> int:
        """Samples in one feed or batch of this source."""
        for k, v in feed.items():
            if self.roles.get(k, "batch") == "batch" and np.ndim(v) > 0:
                return len(v)
        return 1

    def units(self) -> int:
        """How many units (samples here, feeds for a FeedSource) a held-out split divides."""
        return self.n if self.splittable else 1

    def validation_batches(self, batch_size: int = 256):
        """(feed, feed index or None, index of its first sample — or, for a picked source, the
        indices of its samples) for a feed-by-feed comparison; indices count from the whole data a
        held-out part was split from."""
        start = getattr(self, "first_sample", 0)
        if self.index is not None and self.splittable:
            batch_size = min(batch_size, self.max_batch or batch_size)
            for s in range(0, self.n, batch_size):
                stop = min(s + batch_size, self.n)
                yield self.take(slice(s, stop)), None, start + self.index[s:stop]
            return
        for feed in self.batches(batch_size):
            yield feed, None, start
            start += self.batch_count(feed)

    def subset(self, start: int, stop: int) -> "DataSource":
        if self.index is not None:
            return self.pick(np.arange(start, stop))
        arrays = {k: v[start:stop] if self._batch_major(k) else v for k, v in self.arrays.items()}
        new = DataSource(arrays, self.origin, self.cast, self.roles)
        new.max_batch, new.batch_note = self.max_batch, self.batch_note
        new.first_sample = getattr(self, "first_sample", 0) + start
        return new

    def pick(self, units) -> "DataSource":
        """The units (samples) at these positions, in this order, as a source of their own; no
        array is copied (its batches read them by index), reports count from the whole data."""
        units = np.asarray(units, dtype=np.int64)
        new = DataSource(self.arrays, self.origin, self.cast, self.roles)
        new.index = units if self.index is None else self.index[units]
        new.n = len(units)
        new.max_batch, new.batch_note = self.max_batch, self.batch_note
        new.first_sample = getattr(self, "first_sample", 0)
        return new

    # -- shapes
    def sample_shapes(self):
        """Per-sample shapes of batch-major inputs (axis 0 left out), full shapes of the others."""
        return {k: tuple(np.shape(v)[1:]) if self._batch_major(k) else tuple(np.shape(v))
                for k, v in self.arrays.items()}

    def signatures(self) -> list:
        """[{"inputs": {name: shape}, "batch": b, "samples": n}]: the distinct input shapes the data
        runs at (batch-major inputs at batch 1 when they can be split), with their sample counts."""
        if self.splittable:
            shapes = {k: ((1,) + tuple(np.shape(v)[1:])) if self._batch_major(k) else tuple(np.shape(v))
                      for k, v in self.arrays.items()}
            return [{"inputs": shapes, "batch": 1, "samples": self.n}]
        return [{"inputs": {k: tuple(np.shape(v)) for k, v in self.arrays.items()}, "batch": self.n,
                 "samples": self.n}]

    def representatives(self) -> list:
        """One feed per signature (at the signature's shapes), for observing intermediate shapes."""
        return [self.take(slice(0, 1)) if self.splittable else self.take(slice(None))]

    # -- checks
    def check(self, model: onnx.ModelProto) -> "DataSource":
        """Validate names, ranks, fixed dims, dtypes and values against the model inputs; returns
        a source whose batches are cast to the model's dtypes."""
        inputs = model_inputs(model)
        roles = input_roles(model)
        names = {i[0] for i in inputs}
        if set(self.arrays) != names:
            _check_feed(self.origin, self.arrays, inputs, roles)   # raises: names differ
        src = DataSource(self.arrays, self.origin, {n: np.dtype(d) for n, _, d in inputs}, roles)
        if src.n == 0 or any(np.ndim(v) > 0 and len(v) == 0 for v in self.arrays.values()):
            raise CalibrationError(f"{self.origin}: zero samples")
        batch = fixed_batch(model)
        if batch is not None and src.n < batch:
            raise CalibrationError(f"{self.origin}: {src.n} sample(s), but the model's inputs take a fixed "
                                   f"batch of {batch}")
        survey = _Survey()
        step = 1024 if src.splittable else max(src.n, 1)
        for s in range(0, src.n, step):
            part = {k: np.asarray(v[s:s + step] if src._batch_major(k) else v) for k, v in self.arrays.items()}
            _check_feed(self.origin, part, inputs, roles)
            for k, v in part.items():
                survey.add(k, v, src._batch_major(k))
        survey.check(self.origin, src.n)
        return src

    def close(self) -> None:
        """Remove temporary files this source owns (a materialised generator)."""


class FeedSource(DataSource):
    """A sequence of feeds, each a dict of arrays with its own shapes, read one at a time
    (``load(item)``: an in-memory dict, an .npz path, an image path). Held out by feed; batches
    merge consecutive feeds of equal shapes up to ``batch_size`` samples."""

    unit = "feed"

    def __init__(self, items, origin="calibration data", load=None, cast=None, roles=None, meta=None,
                 owner=None):
        self.items = list(items)
        self.origin = origin
        self.load = load or (lambda item: item)
        self.cast = cast or {}
        self.roles = dict(roles or {})
        self.arrays = None
        self._meta = meta          # per item: (samples, signature key, {name: shape})
        self.owner = owner         # a temporary folder this source removes on close()
        self._finalizer = weakref.finalize(self, shutil.rmtree, owner, True) if owner else None
        self.splittable = True

    def close(self):
        if self._finalizer is not None:
            self._finalizer()

    def _get(self, i) -> dict:
        feed = self.load(self.items[i])
        if not isinstance(feed, dict):
            raise CalibrationError(f"{self.origin}: expected dicts of input name -> array, got {type(feed).__name__}")
        return {k: _contiguous(v, self.cast.get(k)) for k, v in feed.items()}

    def _describe(self, feed):
        """(samples, key, shapes): key is None when the feed cannot be merged or split (a
        pass-through input of rank ≥ 1)."""
        n, key, mergeable = 1, [], True
        for k in sorted(feed):
            v = feed[k]
            if self.roles.get(k, "batch") == "batch" and v.ndim > 0:
                n = len(v)
                key.append((k, v.shape[1:], str(v.dtype)))
            elif v.ndim == 0:
                key.append((k, v.tobytes(), str(v.dtype)))
            else:
                mergeable = False
        return n, (tuple(key) if mergeable else None), {k: tuple(v.shape) for k, v in feed.items()}

    @property
    def meta(self):
        if self._meta is None:
            self._meta = [self._describe(self._get(i)) for i in range(len(self.items))]
        return self._meta

    @property
    def n(self):
        return sum(m[0] for m in self.meta)

    def units(self):
        return len(self.items)

    def batches(self, batch_size: int = 64):
        batch_size = min(batch_size, self.max_batch or batch_size)
        buf, key, count = [], None, 0
        for i in range(len(self.items)):
            feed = self._get(i)
            n, k, _ = self.meta[i]
            if buf and (k is None or k != key or count + n > batch_size):
                yield _stack(buf, self.roles)
                buf, count = [], 0
            if k is None:
                yield feed
                continue
            if n > batch_size:
                whole = DataSource(feed, self.origin, roles=self.roles)
                yield from whole.batches(batch_size)
                continue
            buf.append(feed)
            key, count = k, count + n
        if buf:
            yield _stack(buf, self.roles)

    def count_batches(self, batch_size: int) -> int:
        batch_size = min(batch_size, self.max_batch or batch_size)
        total, key, count = 0, None, 0
        for n, k, _ in self.meta:
            if count and (k is None or k != key or count + n > batch_size):
                total, count = total + 1, 0
            if k is None or n > batch_size:
                total += 1 if k is None else -(-n // batch_size)
                continue
            key, count = k, count + n
        return total + (1 if count else 0)

    def _origins(self) -> tuple[list, list]:
        """(feed index, index of its first sample) of every feed, counted from the whole data."""
        if getattr(self, "feed_ids", None) is not None:
            return self.feed_ids, self.sample_starts
        first, start = getattr(self, "first_feed", 0), getattr(self, "first_sample", 0)
        starts = []
        for m in self.meta:
            starts.append(start)
            start += m[0]
        return [first + i for i in range(len(self.items))], starts

    def validation_batches(self, batch_size: int = 256):
        ids, starts = self._origins()
        for i in range(len(self.items)):
            feed = self._get(i)
            n, key, _ = self.meta[i]
            if self.max_batch and key is not None and n > self.max_batch:   # a stacked feed, split
                for s, part in enumerate(DataSource(feed, self.origin, roles=self.roles).batches(self.max_batch)):
                    yield part, ids[i], starts[i] + s * self.max_batch
            else:
                yield feed, ids[i], starts[i]

    def subset(self, start, stop):
        return self.pick(range(start, stop))

    def pick(self, units) -> "FeedSource":
        """The feeds at these positions, in this order; reports count from the whole data."""
        units = [int(u) for u in units]
        ids, starts = self._origins()
        new = FeedSource([self.items[u] for u in units], self.origin, self.load, self.cast, self.roles,
                         [self.meta[u] for u in units])
        new.max_batch, new.batch_note = self.max_batch, self.batch_note
        new.parent = self   # keeps the owner of temporary files alive
        new.close = self.close   # closing a part removes the temporary feeds of the whole
        new.feed_ids, new.sample_starts = [ids[u] for u in units], [starts[u] for u in units]
        return new

    def sample_shapes(self):
        n, _, shapes = self.meta[0]
        return {k: s[1:] if self.roles.get(k, "batch") == "batch" and len(s) > 0 else s for k, s in shapes.items()}

    def signatures(self):
        sigs = {}
        for n, key, shapes in self.meta:
            if key is not None:
                full = {k: ((1,) + s[1:]) if self.roles.get(k, "batch") == "batch" and len(s) > 0 else s
                        for k, s in shapes.items()}
                b = 1
            else:
                full, b = shapes, n
            sk = (tuple(sorted(full.items())), b)
            entry = sigs.setdefault(sk, {"inputs": full, "batch": b, "samples": 0})
            entry["samples"] += n
        return list(sigs.values())

    def representatives(self):
        seen, reps = set(), []
        for i, (n, key, shapes) in enumerate(self.meta):
            sk = (key, None if key is not None else tuple(sorted(shapes.items())))
            if sk in seen:
                continue
            seen.add(sk)
            feed = self._get(i)
            if key is not None:
                feed = {k: v[:1] if self.roles.get(k, "batch") == "batch" and v.ndim > 0 else v for k, v in feed.items()}
            reps.append(feed)
        return reps

    def check(self, model):
        inputs = model_inputs(model)
        roles = input_roles(model)
        src = FeedSource(self.items, self.origin, self.load, {n: np.dtype(d) for n, _, d in inputs}, roles,
                         owner=None)
        src.parent = self
        if not self.items:
            raise CalibrationError(f"{self.origin}: zero samples")
        survey, meta = _Survey(), []
        for i in range(len(self.items)):
            raw = self.load(self.items[i])
            if not isinstance(raw, dict):
                raise CalibrationError(f"{self.origin}: expected dicts of input name -> array, got "
                                       f"{type(raw).__name__}")
            raw = {k: np.asarray(v) for k, v in raw.items()}
            _check_feed(self.origin, raw, inputs, roles, f" (feed {i})")
            for k, v in raw.items():
                survey.add(k, v, roles.get(k) == "batch")
            meta.append(src._describe({k: v.astype(src.cast[k], copy=False) for k, v in raw.items()}))
        src._meta = meta
        if src.n == 0:
            raise CalibrationError(f"{self.origin}: zero samples")
        batch = fixed_batch(model)
        if batch is not None and src.n < batch:
            raise CalibrationError(f"{self.origin}: {src.n} sample(s), but the model's inputs take a fixed "
                                   f"batch of {batch}")
        survey.check(self.origin, src.n)
        return src


def _contiguous(v, dtype=None):
    """A C-contiguous array of ``dtype`` (0-d arrays stay 0-d, unlike np.ascontiguousarray)."""
    return np.require(np.asarray(v, dtype=dtype), requirements="C")


def _stack(feeds, roles):
    if len(feeds) == 1:
        return feeds[0]
    return {k: np.concatenate([f[k] for f in feeds]) if roles.get(k, "batch") == "batch" and feeds[0][k].ndim > 0
            else feeds[0][k] for k in feeds[0]}


class _ImageLoader:
    """One image file -> {input: (1, C, H, W) or (1, H, W, C)}: RGB or BGR channel order, pixel
    values scaled to 0-1 (``scale=1``) or kept 0-255 (``scale=255``), then (x − mean) / std."""

    def __init__(self, input_name, size, mean, std, layout, channels, dtype, channel_order="RGB", scale=1,
                 max_side=960, multiple=32, dynamic=(False, False)):
        self.input_name, self.size, self.layout, self.channels = input_name, size, layout, channels
        self.mean, self.std, self.dtype = mean, std, dtype
        self.bgr, self.divisor = channel_order == "BGR", 255.0 if scale == 1 else 1.0
        self.max_side, self.multiple, self.dynamic = max_side, multiple, dynamic

    def target_size(self, h, w):
        """(H, W): the fixed size, or this image's own size (aspect kept) for dynamic dims."""
        if self.size is not None and not any(self.dynamic):
            return self.size
        s = min(1.0, self.max_side / max(h, w))
        m = self.multiple
        own = [max(m, int(round(d * s / m)) * m) for d in (h, w)]
        return tuple(own[i] if self.dynamic[i] else self.size[i] for i in range(2))

    def __call__(self, path):
        from PIL import Image
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                h, w = self.target_size(im.height, im.width)
                a = np.asarray(im.resize((w, h)), dtype=np.float32) / self.divisor
        except CalibrationError:
            raise
        except Exception as e:
            raise CalibrationError(f"cannot read image '{path}': {e}") from None
        if a.ndim == 2:
            a = a[..., None]
        if self.bgr:
            a = a[..., ::-1]
        a = (a - self.mean) / self.std
        a = a.transpose(2, 0, 1) if self.layout == "NCHW" else a
        return {self.input_name: a[None].astype(self.dtype)}


class ImageFolderSource(FeedSource):
    """Images decoded lazily, one feed each: resized (to ``image_size``, or each at its own size
    when the model's spatial dims are dynamic), normalised, NCHW or NHWC."""

    def __init__(self, folder, input_name, image_size=None, mean=(0.0,), std=(1.0,), layout="NCHW",
                 channels=None, dtype=np.float32, channel_order="RGB", scale=1, max_side=960, size_multiple=32,
                 dynamic=(False, False)):
        try:
            from PIL import Image  # noqa: F401
        except ImportError:
            raise InputError("reading an image folder needs Pillow: pip install 'onnxshrink[images]'") from None
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise CalibrationError(f"image folder '{folder}' holds no images ({', '.join(IMAGE_EXTS)})")
        mean = np.asarray(mean, np.float32)
        std = np.asarray(std, np.float32)
        channels = channels or max(len(mean), len(std), 1)
        if image_size is not None and not any(dynamic) and (len(image_size) != 2 or not all(
                isinstance(d, (int, np.integer)) and d > 0 for d in image_size)):
            raise CalibrationError(f"--image-size expects H,W (two positive integers), got {image_size}")
        for flag, v in (("--mean", mean), ("--std", std)):
            if v.ndim != 1 or len(v) not in (1, channels):
                want = "1 value" if channels == 1 else f"1 or {channels} values"
                raise CalibrationError(f"{flag} has {v.size} values; the model's input '{input_name}' has "
                                       f"{channels} channel{'s' if channels != 1 else ''}: give {want}")
        if not (std > 0).all():
            raise CalibrationError(f"--std must be > 0, got {tuple(std.tolist())}")
        if channel_order not in ("RGB", "BGR"):
            raise CalibrationError(f"--channel-order must be RGB or BGR, got '{channel_order}'")
        if float(scale) not in (1.0, 255.0):
            raise CalibrationError(f"--scale must be 1 (mean/std apply to 0-1 pixels) or 255 (to 0-255), got {scale}")
        if int(max_side) < 1 or int(size_multiple) < 1:
            raise CalibrationError(f"--max-side and --size-multiple must be positive, got {max_side}, {size_multiple}")
        loader = _ImageLoader(input_name, tuple(image_size) if image_size is not None else None, mean, std, layout,
                              channels, dtype, channel_order, float(scale), int(max_side), int(size_multiple),
                              tuple(dynamic))
        super().__init__([os.path.join(folder, f) for f in files], f"image folder '{folder}'", loader)
        self.files = self.items


class _NpzLoader:
    """One .npz file -> a feed; a single unnamed array (``arr_0``) goes to a single-input model."""

    def __init__(self, single_input=None):
        self.single = single_input

    def __call__(self, path):
        try:
            with np.load(path, allow_pickle=False) as z:
                feed = {k: z[k] for k in z.files}
        except Exception as e:
            raise CalibrationError(f"cannot read feed '{path}': {e}") from None
        if self.single and len(feed) == 1 and next(iter(feed)).startswith("arr_") and self.single not in feed:
            feed = {self.single: next(iter(feed.values()))}
        return feed


def from_feeds(feeds, origin="calibration data") -> DataSource:
    """An iterable of feed dicts (or a CalibrationDataReader) as a source, without stacking: a list
    or tuple is used as it is; anything that can be read only once (a generator, an iterator, a
    reader) is read once into a temporary folder of .npz feeds that the source removes on
    ``close()`` (or when it is garbage-collected). A single feed is one stacked array."""
    if hasattr(feeds, "get_next"):
        reader = feeds
        feeds = iter(lambda: reader.get_next(), None)
    if isinstance(feeds, (list, tuple)):
        items = list(feeds)
        for f in items:
            if not isinstance(f, dict):
                raise CalibrationError(f"{origin}: expected dicts of input name -> array, got {type(f).__name__}")
        if not items:
            raise CalibrationError(f"{origin}: zero samples")
        if len(items) == 1:
            return DataSource({k: np.asarray(v) for k, v in items[0].items()}, origin)
        return FeedSource(items, origin)
    folder = tempfile.mkdtemp(prefix="onnxshrink-feeds-")
    paths = []
    try:
        for i, feed in enumerate(feeds):
            if not isinstance(feed, dict):
                raise CalibrationError(f"{origin}: expected dicts of input name -> array, got {type(feed).__name__}")
            path = os.path.join(folder, f"{i:08d}.npz")
            np.savez(path, **{k: np.asarray(v) for k, v in feed.items()})
            paths.append(path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if not paths:
        shutil.rmtree(folder, ignore_errors=True)
        raise CalibrationError(f"{origin}: zero samples")
    return FeedSource(paths, origin, _NpzLoader(), owner=folder)


def load_data(spec, model: onnx.ModelProto, image_options: dict | None = None,
              origin: str = "calibration data") -> DataSource:
    """Any supported calibration spec -> a checked DataSource (a FeedSource for sequences of
    feeds). The returned source may own temporary files: ``close()`` it when done."""
    inputs = model_inputs(model)
    if isinstance(spec, DataSource):
        src = spec
    elif isinstance(spec, (str, os.PathLike)):
        src = _load_path(os.fspath(spec), inputs, image_options or {}, origin)
    elif isinstance(spec, np.ndarray):
        if len(inputs) != 1:
            raise CalibrationError(f"{origin}: a single array needs a single-input model; the model has "
                                   f"inputs {[i[0] for i in inputs]}")
        src = DataSource({inputs[0][0]: spec}, origin, roles=input_roles(model))
    elif isinstance(spec, dict):
        src = DataSource({k: np.asarray(v) for k, v in spec.items()}, origin, roles=input_roles(model))
    else:
        src = from_feeds(spec, origin)
    try:
        checked = src.check(model)
    except BaseException:
        src.close()
        raise
    if checked is not src and src.unit == "feed":
        checked.close = src.close   # the checked source removes the temporary feeds it reads
    return checked


def _image_options(path, name, shape, dtype, image_options):
    opts = dict(image_options)
    layout = opts.get("layout", "NCHW")
    if len(shape) != 4:
        raise CalibrationError(f"an image folder needs a 4-D image input; the model's input '{name}' is "
                               f"{_fmt_shape(shape)}")
    c_axis = 1 if layout == "NCHW" else 3
    other = 3 if layout == "NCHW" else 1
    if shape[c_axis] not in (None, 1, 2, 3, 4) and shape[other] in (1, 3, 4):
        better = "NHWC" if layout == "NCHW" else "NCHW"
        raise CalibrationError(f"image folder: the model's input '{name}' {_fmt_shape(shape)} looks {better}, "
                               f"not {layout}: give --layout {better}")
    hw = shape[2:4] if layout == "NCHW" else shape[1:3]
    dynamic = tuple(d is None for d in hw)
    if opts.get("image_size"):
        dynamic = (False, False)
    elif not any(dynamic):
        opts["image_size"] = tuple(hw)
    else:
        opts["image_size"] = tuple(d if d is not None else 0 for d in hw)
    opts.setdefault("channels", shape[c_axis] or None)
    return ImageFolderSource(path, name, dtype=dtype, dynamic=dynamic, **opts)


def _load_path(path, inputs, image_options, origin):
    if not os.path.exists(path):
        raise CalibrationError(f"{origin} '{path}' does not exist")
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        npz = [f for f in names if f.lower().endswith(".npz")]
        if npz:
            single = inputs[0][0] if len(inputs) == 1 else None
            src = FeedSource([os.path.join(path, f) for f in npz], f"{origin} folder '{path}'", _NpzLoader(single))
            return src
        if len(inputs) != 1:
            raise CalibrationError(f"{origin} folder '{path}': holds no .npz feeds, and an image folder needs a "
                                   "single-input model")
        name, shape, dtype = inputs[0]
        return _image_options(path, name, shape, dtype, image_options)
    label = f"{origin} '{path}'"
    try:
        # .npy files are memory-mapped: batches are read from disk as they are needed
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if path.endswith(".npy") else None)
    except Exception as e:
        raise CalibrationError(f"cannot read {label}: not a .npy/.npz file or a folder of .npz feeds or "
                               f"images ({e})") from None
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise CalibrationError(f"{label}: a .npy holds one array; the model has inputs "
                                   f"{[i[0] for i in inputs]} (use a .npz keyed by input name)")
        return DataSource({inputs[0][0]: loaded}, label)
    with loaded:
        keys = list(loaded.files)
        if len(keys) == 1 and len(inputs) == 1 and keys[0] not in (inputs[0][0],) and keys[0].startswith("arr_"):
            return DataSource({inputs[0][0]: loaded[keys[0]]}, label)
        return DataSource({k: loaded[k] for k in keys}, label)


def random_data(model: onnx.ModelProto, n: int, seed: int = 0, sample_shapes=None) -> DataSource:
    """``n`` random samples (standard normal floats, zero integers); dynamic dims from
    ``sample_shapes`` (per-sample shapes of batch-major inputs, full shapes of the others) or 1."""
    rng = np.random.default_rng(seed)
    roles = input_roles(model)
    arrays = {}
    for name, shape, dtype in model_inputs(model):
        given = (sample_shapes or {}).get(name)
        if roles[name] == "batch":
            if given is not None and len(given) == len(shape):   # a full shape: its batch dim is replaced
                given = tuple(given)[1:]
            rest = [d if d is not None else (given[i - 1] if given is not None and len(given) == len(shape) - 1
                                             else 1) for i, d in enumerate(shape) if i > 0]
            dims = [n] + rest
        else:
            dims = [d if d is not None else (given[i] if given is not None and len(given) == len(shape) else 1)
                    for i, d in enumerate(shape)]
        arrays[name] = rng.standard_normal(dims).astype(dtype) if np.dtype(dtype).kind == "f" else \
            np.zeros(dims, dtype)
    return DataSource(arrays, "random calibration data", roles=roles)


def probe_batching(model: onnx.ModelProto, src: DataSource) -> str | None:
    """Some models declare a dynamic batch dim but only run at batch 1 (a Reshape whose target
    bakes the exporter's batch of 1 into a constant). Run the model once on two samples of ``src``
    stacked into one batch; when that fails while one sample alone runs, the source is limited to
    batches of one sample (``max_batch = 1``) and the reason is returned (also kept as
    ``batch_note``). None when stacking works or cannot apply (a fixed batch, nothing to stack)."""
    roles = input_roles(model)
    if fixed_batch(model) is not None or not src.splittable or "batch" not in roles.values() or src.max_batch:
        return None
    one = next(iter(src.batches(1)), None)
    if one is None:
        return None
    pair = next(iter(src.batches(2)))
    if src.batch_count(pair) < 2:   # one sample, or no two of the same shape: the first one twice
        pair = _stack([one, one], roles)
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    try:
        sess.run(names, pair)
        return None
    except Exception as e:
        stacked_error = first_line(e)
    try:
        sess.run(names, one)
    except Exception:
        return None   # it does not run at all: the run itself reports that
    src.max_batch = 1
    src.batch_note = (f"{src.origin}: the model runs one sample at a time only (its batch dim is dynamic, but two "
                      f"samples stacked fail: {stacked_error}); every run uses batches of 1")
    return src.batch_note


HOLDOUT_RUNS = 8   # a held-out part is this many runs of consecutive units, spread over the data


def held_out_units(units: int, held: int, runs: int = HOLDOUT_RUNS) -> np.ndarray:
    """Positions of ``held`` of ``units`` units, as up to ``runs`` runs of consecutive units spread
    evenly over the data: data sorted by class (a folder per label, faces then background) gives a
    held-out part of every stretch, not of the last class only, while units next to each other (the
    crops of one image, frames of one clip) mostly stay on one side."""
    held = max(0, min(held, units))
    runs = max(1, min(runs, held))
    sizes = [held // runs + (1 if r < held % runs else 0) for r in range(runs)]
    out = []
    for r, size in enumerate(sizes):   # run r in the r-th of ``runs`` equal stretches, at its end
        end = (r + 1) * units // runs
        out.extend(range(end - size, end))
    return np.asarray(out, dtype=np.int64)


def split_holdout(src: DataSource, fraction: float = 0.2):
    """(fit, held-out): ``fraction`` of the feeds (of the samples of one stacked array) held out,
    as ``held_out_units`` spreads them."""
    units = src.units()
    n_val = max(1, int(round(units * fraction)))
    if units - n_val < 1:
        raise CalibrationError(f"{src.origin}: {units} {src.unit}(s) is too few to hold out validation "
                               "data; give more or --validation-data")
    return split_units(src, held_out_units(units, n_val))


def split_units(src: DataSource, held) -> tuple:
    """(the units not in ``held``, the units in ``held``) of ``src``, each in the data's order."""
    mask = np.zeros(src.units(), dtype=bool)
    mask[np.asarray(held, dtype=np.int64)] = True
    return src.pick(np.flatnonzero(~mask)), src.pick(np.flatnonzero(mask))


# ----------------------------------------------------------------------------- running
KEEP_SESSION_BYTES = 256 << 20   # weights up to which a session is kept for reuse (``keeping_sessions``)
_KEPT: contextvars.ContextVar = contextvars.ContextVar("onnxshrink_kept_sessions", default=None)


@contextlib.contextmanager
def keeping_sessions():
    """Within the block, the sessions of the models given to ``keep_session`` are made once and
    served again by ``session`` (the default threads only): a shrink call runs its input in the
    batching probe, the validation and the passes' output probes, and its output in the load
    check and the validation; each of these built its own session of the same model before."""
    token = _KEPT.set({})
    try:
        yield
    finally:
        _KEPT.reset(token)


def keep_session(model: onnx.ModelProto, slot: str) -> None:
    """Keep ``model``'s session (made at its first ``session(model)``) in ``slot`` of the active
    ``keeping_sessions`` block, replacing what the slot held; the model is that object (not
    changed in place afterwards). A large model's (weights from ``KEEP_SESSION_BYTES``, or kept
    in files) is not kept: the slot is emptied, its memory given back."""
    kept = _KEPT.get()
    if kept is None:
        return
    if has_lazy(model) or weight_bytes(model) >= KEEP_SESSION_BYTES:
        kept.pop(slot, None)
    elif slot not in kept or kept[slot][0] is not model:
        kept[slot] = [model, None]


def session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    kept = _KEPT.get() if not threads else None
    if kept:
        for entry in kept.values():
            if entry[0] is model:
                if entry[1] is None:
                    entry[1] = _session(model, threads)
                return entry[1]
    return _session(model, threads)


def _session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors come back as exceptions; no second copy on stderr
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    lazy = [t for t in model.graph.initializer if is_lazy(t)] if has_lazy(model) else []
    if lazy:
        # a large model whose weights stay on disk; prepacking would copy them
        so.add_session_config_entry("session.disable_prepacking", "1")
        folder = session_folder(model)  # ONNX Runtime maps the data files: no copy in this process
        try:
            path = os.path.join(folder, "model.onnx")
            with open(path, "wb") as f:
                f.write(model.SerializeToString())
            return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if weight_bytes(model) < EXTERNAL_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # near or over the 2 GB protobuf limit: ONNX Runtime reads a copy saved with external data
    with tempfile.TemporaryDirectory(prefix="onnxshrink-") as d:
        path = os.path.join(d, "model.onnx")
        save_model(model, path, external=True)
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _elem_types(model: onnx.ModelProto, names) -> dict:
    """{tensor: element type} from the model's value_info and inputs, and from shape inference
    when one of ``names`` (not a graph output) is not among them."""
    g = model.graph
    existing = {o.name for o in g.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input)}
    if any(n not in types and n not in existing for n in names):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            types.update({vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info})
        except Exception:
            pass
    return types


def _add_outputs(graph, names, types) -> None:
    existing = {o.name for o in graph.output}
    for name in names:
        if name not in existing:
            if types.get(name):
                graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
            else:   # type unknown (an op without type inference): ONNX Runtime infers it
                vi = graph.output.add()
                vi.name = name
            existing.add(name)


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of the model exposing the named intermediate tensors as extra graph outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _add_outputs(m.graph, names, _elem_types(m, names))
    return m


def _subgraph_names(node) -> set:
    """Every tensor name a node's subgraphs (If/Loop/Scan bodies) read, their own included: a
    superset of the outer-scope names they capture."""
    out = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for n in g.node:
                out.update(i for i in n.input if i)
                out |= _subgraph_names(n)
    return out


def data_memo(store: "weakref.WeakKeyDictionary", ctx, model) -> dict | None:
    """A dict in ``store`` kept for as long as ``ctx``'s calibration data lives, for results that
    depend only on ``model``, that data, the seed and the batch size (a pass's statistics or
    measurements on the model it starts from, asked again by the steps of an accuracy search):
    a fresh one when any of them changed; None without data or for data that cannot be referenced
    weakly (no memo)."""
    if ctx.data is None:
        return None
    try:
        entry = store.get(ctx.data)
    except TypeError:
        return None
    if entry is None or entry[0] is not model or entry[1:3] != (ctx.seed, ctx.batch_size):
        entry = (model, ctx.seed, ctx.batch_size, {})
        store[ctx.data] = entry
    return entry[3]


def _upstream(graph, names, stop) -> tuple:
    """(the indices of the nodes ``names`` depend on, every tensor name reached): a walk up from
    ``names`` through node inputs and what If/Loop bodies capture, not past a tensor in ``stop``."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    nodes, seen, stack = set(), set(), list(names)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in stop:
            continue
        i = producer.get(t)
        if i is None or i in nodes:
            continue
        nodes.add(i)
        node = graph.node[i]
        stack.extend(x for x in node.input if x)
        stack.extend(_subgraph_names(node))
    return nodes, seen


def upstream_of(model: onnx.ModelProto, names, given: dict | None = None) -> onnx.ModelProto:
    """A model whose outputs are exactly ``names`` (tensors of ``model``), holding only the nodes
    and initializers they depend on; every real input is kept. ONNX Runtime runs every node of a
    model whatever outputs are fetched, so a calibration run that reads tensors early in the
    network runs only that part of it. The nodes kept are unchanged, so the values are those the
    whole model computes. ``given`` ({tensor: ONNX element type}, none of ``names``): tensors
    fed as inputs instead of computed (``RunCache``): the nodes upstream of them are left out
    where nothing else needs them."""
    graph = model.graph
    wanted = set(names)
    given = dict(given or {})
    keep, seen = _upstream(graph, names, given)
    m = onnx.ModelProto()
    copy_fields(model, m, skip=("graph",))   # everything but the graph, as it is
    g = m.graph
    g.name = graph.name
    g.node.extend(graph.node[i] for i in sorted(keep))
    g.initializer.extend(t for t in graph.initializer if t.name in seen)
    g.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in seen)
    init = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    g.input.extend(vi for vi in graph.input if vi.name not in init or vi.name in seen)
    g.input.extend(onnx.helper.make_tensor_value_info(t, given[t], None) for t in sorted(given) if t in seen)
    g.value_info.extend(vi for vi in graph.value_info if vi.name in seen and vi.name not in given)
    g.output.extend(vi for vi in graph.output if vi.name in wanted)
    _add_outputs(g, names, _elem_types(model, names))
    return m


class _Runner:
    def __init__(self, model, names):
        inputs = {i[0] for i in model_inputs(model)}
        self.from_feed = [n for n in names if n in inputs]
        wanted = [n for n in names if n not in inputs]
        self.sess = session(upstream_of(model, wanted)) if wanted else None
        self.wanted = wanted

    def __call__(self, feed, b=None):
        out = {n: feed[n] for n in self.from_feed}
        if self.sess is not None and self.wanted:
            vals = self.sess.run(self.wanted, feed)
            out.update(zip(self.wanted, vals))
        return out


REFERENCE_CACHE_MB = 1024   # the reference tensors ``TensorCache`` keeps, at most (MiB)
CACHE_ENV = "ONNXSHRINK_REFERENCE_CACHE_MB"   # overrides it; 0 turns the cache off


def reference_cache_bytes() -> int:
    """The byte cap of a ``TensorCache``: ``REFERENCE_CACHE_MB`` MiB, or the environment's
    ``ONNXSHRINK_REFERENCE_CACHE_MB`` (0: no cache)."""
    raw = os.environ.get(CACHE_ENV)
    if raw is None or not raw.strip():
        return int(REFERENCE_CACHE_MB) << 20
    try:
        mb = float(raw)
    except ValueError:
        raise InputError(f"{CACHE_ENV}={raw!r} is not a number of MiB") from None
    return max(int(mb * (1 << 20)), 0)


# ONNX Runtime's basic graph optimisations that change values (weights folded into a producer):
# a fetched tensor blocks them where it is the producer's output, so the values of tensors
# downstream depend on which tensors a run fetches; {producer: consumers}
VALUE_FUSIONS = {"Conv": ("BatchNormalization", "Add", "Mul"), "MatMul": ("BatchNormalization",),
                 "Gemm": ("Sum",), "Div": ("Mul",)}


def fetch_independent(model: onnx.ModelProto) -> bool:
    """True when no node pair of ``model`` is one that ONNX Runtime's basic optimisations fuse
    with a change of values (``VALUE_FUSIONS``; a Div only with a constant numerator): then a
    tensor has the same value whatever else a run fetches, bit for bit."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    readers: dict = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    for n in model.graph.node:
        fused = VALUE_FUSIONS.get(n.op_type)
        if fused is None or (n.op_type == "Div" and (not n.input or n.input[0] not in consts)):
            continue
        if any(readers.get(o, set()) & set(fused) for o in n.output):
            return False
    return True


class TensorCache:
    """Tensors that ``collect`` fetched from one model (``model``, the reference a refit
    reproduces), kept batch by batch for later runs over the same data and batch size, so that
    the reference runs once, not once per refit level or statistics round.

    Served values are bit for bit those a run of their own would fetch, with one exception that
    ``fetch_independent`` does not see: ONNX Runtime (1.32, basic optimisations) fuses a MatMul
    with the Add that reads it unless the MatMul's output is fetched, so a tensor downstream of
    such a pair (a residual sum) fetched beside the MatMul's output (pfa's statistics run, which
    keeps its refit's targets: ``PassContext.prefetch_reference``) can differ in the last bits
    from a run fetching it alone. Where ``fetch_independent`` holds, a run fetches, beside the tensors its requests read,
    those ``want``ed ahead (a later level's targets), and any tensor held is served; otherwise a
    tensor is served only to a run that fetches exactly the tensors it was fetched with (a
    repeated round), and nothing is fetched ahead. Every tensor a run fetched is kept while the
    cache holds at most ``cap`` bytes; over the cap, tensors are given up last-wanted first (a
    tensor given up is fetched again when a run asks for it: the cap bounds memory, never the
    result). A tensor is held only for every batch of the data; its arrays are read-only. Nothing
    goes to disk."""

    def __init__(self, model: onnx.ModelProto, cap: int):
        self.model, self.cap = model, int(cap)
        self.free = fetch_independent(model)
        self.made = {o for n in model.graph.node for o in n.output if o}
        self.held: dict = {}       # name -> [array per batch]
        self.fetched_with: dict = {}   # name -> the names its run fetched (when not ``free``)
        self.nbytes = 0
        self.ahead: list = []      # names to fetch with the next run, in priority order
        self.refused: set = set()  # wanted ahead, but did not fit: not fetched ahead again
        self.runs = 0              # runs of ``model`` that used the cache
        self._key = self._data = None

    def want(self, names) -> None:
        """Fetch ``names`` (tensors of ``model``) with the next run, first named kept first (only
        where values do not depend on what a run fetches)."""
        if not self.free:
            return
        for n in names:
            if n in self.made and n not in self.held and n not in self.refused and n not in self.ahead:
                self.ahead.append(n)

    def _check(self, data, batch_size, fixed) -> None:
        key = (int(batch_size), fixed)
        if data is not self._data or key != self._key:   # other data or batching: nothing held applies
            self.held, self.fetched_with, self.nbytes, self._key, self._data = {}, {}, 0, key, data

    def summary(self) -> dict:
        """For the report: runs of the model that went through the cache, tensors and MiB held."""
        return {"runs": self.runs, "tensors": len(self.held), "mib": round(self.nbytes / (1 << 20), 1),
                "cap_mib": round(self.cap / (1 << 20), 1), "ahead": self.free}

    def plan(self, ys) -> tuple:
        """(held names served, names to fetch and keep, in priority order) for a run reading ``ys``."""
        mine = [n for n in ys if n in self.made]
        group = frozenset(mine)
        if self.free:
            held = [n for n in mine if n in self.held]
        else:
            held = mine if mine and all(self.fetched_with.get(n) == group for n in mine) else []
        ahead = [n for n in self.ahead if n not in self.held and n not in ys]
        self.ahead = []
        return held, ahead + [n for n in mine if n not in held]


def _nbytes(arrays) -> int:
    return sum(getattr(a, "nbytes", 0) for a in arrays)


class _Keeper:
    """The tensors of one run going into a cache (``TensorCache``, ``RunCache``: ``.nbytes`` held,
    ``.cap``), batch by batch: ``order`` is their priority (over the cap, the last is given up and
    added to ``refused`` when given); ``accept(array)`` False leaves a tensor out from then on (and
    adds it to ``left_out`` when given). Kept arrays are made read-only. ``complete(batches)``:
    [(name, [array per batch])] of the tensors kept for every batch. It serves both caches: the
    reference's ``TensorCache`` (``_Recording``) and a refit's ``RunCache`` (``_CachedRunner``)."""

    def __init__(self, cache, order: list, accept=None, refused: set | None = None, left_out: set | None = None):
        self.cache, self.order, self.parts = cache, list(order), {n: [] for n in order}
        self.accept, self.refused, self.left_out = accept, refused, left_out
        self.nbytes = 0

    def add(self, arrays: dict) -> None:
        for n in list(self.order):
            a = arrays[n]
            if self.accept is not None and not self.accept(a):
                self.order.remove(n)
                self.nbytes -= _nbytes(self.parts.pop(n))
                if self.left_out is not None:
                    self.left_out.add(n)
                continue
            if isinstance(a, np.ndarray):
                a.flags.writeable = False
            self.parts[n].append(a)
            self.nbytes += getattr(a, "nbytes", 0)
        while self.order and self.cache.nbytes + self.nbytes > self.cache.cap:
            n = self.order.pop()
            self.nbytes -= _nbytes(self.parts.pop(n))
            if self.refused is not None:
                self.refused.add(n)

    def complete(self, batches: int) -> list:
        return [(n, self.parts[n]) for n in self.order if len(self.parts[n]) == batches]


class _Recording(_Keeper):
    """The tensors of one run going into a ``TensorCache``: ``order`` is their priority (one given
    up over the cap is not fetched ahead again)."""

    def __init__(self, cache: TensorCache, order: list):
        super().__init__(cache, order, refused=cache.refused)
        self.group = frozenset(order)

    def finish(self, batches: int) -> None:
        for n, parts in self.complete(batches):
            if n in self.cache.held:
                self.cache.nbytes -= _nbytes(self.cache.held[n])
            self.cache.held[n] = parts
            self.cache.fetched_with[n] = self.group
            self.cache.nbytes += _nbytes(parts)


class RunCache:
    """Tensors of a sequence of related models run over the same data (a refit's candidates: each
    model the last one with a few weight layers changed), kept where the last run stopped, so that
    a run of the next model computes only the nodes between them and what it fetches: the levels
    of a refit together cost about one pass over the network instead of one pass up to each level.

    A tensor is named by a digest of how it is computed (a hash over the graph: its producer as
    written, subgraph captures included, the initializers it reads and the digests of its inputs),
    so a tensor held is served to a model only where its digest there is the same: anything
    downstream of a changed node or initializer is computed again. After a run the cache holds
    the run's frontier: the tensors it fetched or was fed that nodes it did not run still read,
    while they fit in ``cap`` bytes, the latest in the graph first (over the cap a tensor is not
    kept and a later run computes it: the cap bounds memory, never the result). A tensor that is
    the output of a producer ONNX Runtime fuses with its consumer (``VALUE_FUSIONS``) is not
    fetched for the frontier, where fetching it would change values downstream. A served
    tensor was computed by the run that fetched it: where that run's fusions differed from a
    whole-model run's (a fetched Conv output a BatchNormalization reads), values can differ from
    such a run in the last bits. A frontier tensor that is not floating point (shapes, indices:
    cheap to recompute) is not kept, and once a run has seen one it leaves the frontier of later
    runs' plans (``unkept``), not fetched batch after batch only to be dropped. Nothing goes to
    disk."""

    def __init__(self, cap: int):
        self.cap = int(cap)
        self.held: dict = {}     # name -> (digest, [array per batch])
        self.nbytes = 0
        self.runs = self.served = 0   # runs through the cache; tensors served instead of computed
        self._key = self._data = None
        self._digests = (None, None)  # (model, {tensor: digest}) of the last model digested
        self._initializers: dict = {}   # name -> (TensorProto, digest) of the last model digested
        self.unkept: set = set()      # frontier tensors a run found not floating point: not fetched again

    def _check(self, data, batch_size, fixed) -> None:
        key = (int(batch_size), fixed)
        if data is not self._data or key != self._key:
            self.held, self.nbytes, self._key, self._data = {}, 0, key, data
            self.unkept = set()

    def _drop(self, name) -> None:
        entry = self.held.pop(name, None)
        if entry is not None:
            self.nbytes -= _nbytes(entry[1])

    def digests(self, model: onnx.ModelProto) -> dict:
        """{tensor made by a node of ``model``: digest} (None downstream of a random draw or of an
        input not yet made: a graph that is not sorted)."""
        if self._digests[0] is model:
            return self._digests[1]
        g = model.graph
        known = self._initializer_digests(g)
        known.update((t.values.name, hashlib.sha1(t.SerializeToString()).digest()) for t in g.sparse_initializer)
        known.update((vi.name, b"input:" + vi.name.encode()) for vi in g.input if vi.name not in known)
        made = {o for n in g.node for o in n.output if o}
        out = {}
        for node in g.node:
            h = hashlib.sha1(node.SerializeToString())
            ok = not node.op_type.startswith("Random") and node.op_type != "Multinomial"   # a draw: never served
            for t in list(node.input) + sorted(_subgraph_names(node)):
                d = known.get(t, b"" if not t else None)
                if d is None:
                    if t in made:   # produced later: not sorted
                        ok = False
                        break
                    d = b"inner:" + t.encode()   # a subgraph's own tensor (not a capture)
                h.update(d)
            for j, o in enumerate(node.output):
                if o:
                    d = h.copy()
                    d.update(str(j).encode())
                    out[o] = known[o] = d.digest() if ok else None
        self._digests = (model, out)
        return out

    def _initializer_digests(self, g) -> dict:
        """{initializer: sha1 of its serialization}. A refit's next candidate is the last model
        with a few initializers replaced: one equal (protobuf equality: the same fields and bytes)
        to the last model's initializer of its name has that one's digest, without serializing
        and hashing its bytes again (a model run through the cache is not changed in place
        afterwards, as the identity check of ``digests`` assumes too)."""
        last = self._initializers
        out, self._initializers = {}, {}
        for t in g.initializer:
            was = last.get(t.name)
            d = was[1] if was is not None and was[0] == t else hashlib.sha1(t.SerializeToString()).digest()
            out[t.name] = d
            self._initializers[t.name] = (t, d)
        return out

    def plan(self, model: onnx.ModelProto, names) -> tuple:
        """(held tensors the run is fed or served, its frontier to fetch and keep, the held tensors
        only nodes it runs read, the digests of ``model``) for a run of ``model`` fetching
        ``names``; held tensors whose digest differs in ``model`` are dropped."""
        dig = self.digests(model)
        for n in list(self.held):
            if dig.get(n) is None or dig[n] != self.held[n][0]:
                self._drop(n)
        g = model.graph
        region, seen = _upstream(g, names, self.held)
        stops = {t for t in seen if t in self.held}
        readers: dict = {}
        for i, node in enumerate(g.node):
            for t in set(node.input) | _subgraph_names(node):
                readers.setdefault(t, []).append(i)
        ops = [n.op_type for n in g.node]
        frontier = []
        for i in sorted(region, reverse=True):   # the latest first: kept first under the cap
            fused = VALUE_FUSIONS.get(ops[i], ())
            for o in g.node[i].output:
                outside = [j for j in readers.get(o, ()) if j not in region]
                if not o or dig.get(o) is None or not outside or o in self.unkept:
                    continue
                if o not in names and any(ops[j] in fused for j in readers.get(o, ())):
                    continue
                frontier.append(o)
        stale = [s for s in stops if all(j in region for j in readers.get(s, ()))]
        return stops, frontier, stale, dig

    def summary(self) -> dict:
        return {"runs": self.runs, "served": self.served, "tensors": len(self.held),
                "mib": round(self.nbytes / (1 << 20), 1), "cap_mib": round(self.cap / (1 << 20), 1)}


class _CachedRunner:
    """``_Runner`` through a ``RunCache``: held tensors are fed (or served) instead of computed,
    and the run's frontier is fetched and kept."""

    def __init__(self, cache: RunCache, model, names):
        inputs = {i[0] for i in model_inputs(model)}
        self.cache = cache
        self.from_feed = [n for n in names if n in inputs]
        wanted = [n for n in names if n not in inputs]
        stops, frontier, stale, self.dig = cache.plan(model, wanted)
        self.names = list(names)
        self.served = [n for n in wanted if n in stops]
        self.fetch = [n for n in wanted if n not in stops] + [n for n in frontier if n not in wanted]
        given = {s: onnx.helper.np_dtype_to_tensor_dtype(np.asarray(cache.held[s][1][0]).dtype) for s in stops}
        sub = upstream_of(model, self.fetch, given=given) if self.fetch else None
        names_in = {vi.name for vi in sub.graph.input} if sub is not None else set()
        self.fed = sorted(s for s in stops if s in names_in)
        self.sess = session(sub) if sub is not None else None
        cache.runs += 1
        cache.served += len(self.served) + len(self.fed)
        # a sequence or map, or an integer/bool tensor (shapes, sizes, indices: cheap to
        # recompute, and fed as an input it hides its values from ONNX Runtime's shape
        # inference, which then refuses e.g. a Resize whose `sizes` it computed): not kept
        # (and a later run's plan leaves it out of the frontier: ``RunCache.unkept``)
        self.keep = _Keeper(cache, frontier, accept=lambda a: isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating),
                            left_out=cache.unkept)
        self.stale = stale

    def __call__(self, feed, b):
        held = self.cache.held
        out = {n: feed[n] for n in self.from_feed}
        if self.sess is not None:
            run_feed = {k: v for k, v in feed.items()}
            run_feed.update((s, held[s][1][b]) for s in self.fed)
            vals = self.sess.run(self.fetch, run_feed)
            got = dict(zip(self.fetch, vals))
        else:
            got = {}
        for n in self.served:
            got[n] = held[n][1][b]
        self.keep.add(got)
        out.update((n, got[n]) for n in self.names if n not in out)
        return out

    def finish(self, batches: int) -> None:
        cache = self.cache
        for n in self.stale:   # every reader of it ran: the frontier holds what comes after
            cache._drop(n)
        for n, parts in self.keep.complete(batches):
            cache._drop(n)
            cache.held[n] = (self.dig[n], parts)
            cache.nbytes += _nbytes(parts)


def collect(data: DataSource, requests, model_x: onnx.ModelProto, model_y: onnx.ModelProto | None = None,
            batch_size: int = 64, progress=None, seed: int = 0, cache: TensorCache | None = None,
            runs: RunCache | None = None) -> dict:
    """Run the data once and return {request.key: accumulator}.

    ``x`` tensors are read from ``model_x``, ``y`` tensors from ``model_y`` (default: model_x).
    ``cache``: a ``TensorCache`` of ``model_y``: its y tensors held are not fetched again, and
    those fetched (with the ones wanted ahead) are kept under its cap; where ``model_y`` is
    ``model_x`` and the cache fetches ahead (values do not depend on what a run fetches), one run
    of the model serves both sides.
    ``runs``: a ``RunCache`` for ``model_x`` (a refit's candidates): its held tensors are fed
    instead of computed and the run's frontier is kept (not where one run serves both models).
    """
    requests = list(requests)
    if not requests:
        return {}
    xs = sorted({t for r in requests for t in r.tensors()["x"]})
    ys = sorted({t for r in requests for t in r.tensors()["y"]})
    if cache is not None and (model_y is None or cache.model is not model_y or cache.cap <= 0):
        cache = None
    held, record = [], None
    fetch_y = ys
    if cache is not None:
        cache._check(data, batch_size, fixed_batch(model_x))
        held, keep = cache.plan(ys)
        fetch_y = [n for n in ys if n not in held] + [n for n in keep if n not in ys]
        record = _Recording(cache, keep)
    # one run for both sides where they are one model and values do not depend on what it fetches
    one = cache is not None and cache.free and model_y is model_x
    names_x = sorted(set(xs) | set(ys)) if model_y is None else sorted(set(xs) | set(fetch_y)) if one else xs
    if runs is not None and not one and runs.cap > 0:
        runs._check(data, batch_size, fixed_batch(model_x))
        run_x = _CachedRunner(runs, model_x, names_x)
    else:
        run_x = _Runner(model_x, names_x)
    run_y = _Runner(model_y, fetch_y) if model_y is not None and fetch_y and not one else None
    if cache is not None and (run_y is not None and run_y.sess is not None or one and fetch_y):
        cache.runs += 1
    accs = {}
    batches, count = _batches(data, batch_size, model_x)
    if progress is not None:
        batches = progress(batches, total=count)
    seen = 0
    for b, feed in enumerate(batches):
        xa = run_x(feed, b)
        if model_y is None:
            ya = xa
        else:
            ya = {n: xa[n] for n in fetch_y} if one else run_y(feed) if run_y is not None else {}
            if record is not None:
                record.add(ya)
            for n in held:
                ya[n] = cache.held[n][b]
        seen += 1
        for r in requests:
            if r.key not in accs:
                accs[r.key] = r.new(xa, ya)
            rng = np.random.default_rng([seed, b, zlib.crc32(r.key.encode())])
            r.update(accs[r.key], xa, ya, rng)
    if record is not None:
        record.finish(seen)
    if isinstance(run_x, _CachedRunner):
        run_x.finish(seen)
    return accs


def run_model(model: onnx.ModelProto, data: DataSource, batch_size: int = 256, threads: int = 0, sess=None):
    """All outputs of the model over the data, concatenated: {name: array}. ``sess``: an ONNX
    Runtime session of this model already made (one is created otherwise). Feeds whose outputs
    differ in shape do not concatenate: compare them feed by feed (``validate``) instead."""
    sess = sess if sess is not None else session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    outs = {n: [] for n in names}
    for feed in _batches(data, batch_size, model)[0]:
        for n, v in zip(names, sess.run(names, feed)):
            outs[n].append(v)
    if not outs[names[0]]:
        raise CalibrationError(f"{data.origin}: {data.n} sample(s), fewer than the model's fixed batch "
                               f"of {fixed_batch(model)}")
    try:
        return {n: np.concatenate(v, axis=0) if v and v[0].ndim else np.stack(v) for n, v in outs.items()}
    except ValueError:
        raise CalibrationError(f"{data.origin}: outputs of feeds of different shapes do not concatenate") from None


class ShapeObserver:
    """Shapes of every tensor, observed by running the model on one feed per input-shape signature
    (``DataSource.representatives``): ``observe(model, input_shapes)`` runs the model with all
    intermediate tensors exposed on the representative whose shapes are ``input_shapes`` and
    returns {tensor: shape}, or None when no representative has those shapes. Results are cached
    per graph structure and input shapes."""

    def __init__(self, feeds):
        self.feeds = [f for f in feeds if f]
        self.cache = {}

    def _feed_for(self, model, input_shapes):
        for feed in self.feeds:
            if all(tuple(np.shape(feed.get(k, ()))) == tuple(s) for k, s in input_shapes.items()) \
                    and set(feed) <= set(input_shapes):
                return feed
        return None

    @staticmethod
    def _key(model, input_shapes):
        h = zlib.crc32(repr(sorted((k, tuple(v)) for k, v in input_shapes.items())).encode())
        for n in model.graph.node:
            h = zlib.crc32(n.SerializeToString(), h)
        for t in model.graph.initializer:   # dims, and the values of small integer tensors (Reshape targets)
            h = zlib.crc32(repr((t.name, tuple(t.dims), t.data_type)).encode(), h)
            if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(t.dims) <= 1 \
                    and (not t.dims or t.dims[0] <= 16):
                h = zlib.crc32(t.SerializeToString(), h)
        return h

    def observe(self, model, input_shapes):
        feed = self._feed_for(model, input_shapes)
        if feed is None:
            return None
        key = self._key(model, input_shapes)
        if key not in self.cache:
            inputs = {i[0] for i in model_inputs(model)}
            init = {t.name for t in model.graph.initializer}
            names = sorted({o for n in model.graph.node for o in n.output if o and o not in inputs and o not in init})
            try:
                sess = session(with_outputs(model, names))
                vals = sess.run(names, {k: v for k, v in feed.items() if k in inputs})
                self.cache[key] = {n: tuple(v.shape) for n, v in zip(names, vals) if hasattr(v, "shape")}
            except Exception:
                self.cache[key] = {}
        return self.cache[key]
