"""Calibration data and the ONNX Runtime run that gathers statistics.

Data sources (all end up as a ``DataSource`` that yields feed-dict batches):
- a dict of arrays keyed by input name, an ``.npz`` file (keyed by input name; a single-input model
  may use one unnamed array), a ``.npy`` file (single-input models);
- a folder of images (``--image-size H,W --mean --std --layout``), decoded lazily per batch;
- an iterable of feed dicts, or an onnxruntime ``CalibrationDataReader`` (materialised once,
  since passes that reconstruct layer by layer read the data several times).

``collect`` runs a model once over the data with the requested tensors exposed as extra outputs
and updates each request's accumulator batch by batch; with a second model (``model_y``) the same
batches also run through it, so a request can pair inputs from the rewritten network with targets
from the original one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib

import numpy as np
import onnx
import onnxruntime as ort

from .errors import CalibrationError, InputError
from .model_io import EXTERNAL_THRESHOLD, has_lazy, is_lazy, save_model, session_folder, weight_bytes

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


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
    """The batch size the model's inputs fix (a model exported with batch 1), or None when dim 0
    is dynamic."""
    fixed = {shape[0] for _, shape, _ in model_inputs(model) if shape and shape[0] is not None}
    return fixed.pop() if len(fixed) == 1 else None


def _batches(data: "DataSource", batch_size: int, model: onnx.ModelProto):
    """(batches, count): feed dicts of ``batch_size`` samples, or of exactly the model's fixed
    batch size (a last, shorter batch is left out)."""
    fixed = fixed_batch(model)
    if fixed is None:
        return data.batches(batch_size), -(-data.n // batch_size)
    return (f for f in data.batches(fixed) if len(next(iter(f.values()))) == fixed), data.n // fixed


# ----------------------------------------------------------------------------- data sources
class DataSource:
    """Arrays keyed by input name, all with the same number of samples (axis 0)."""

    def __init__(self, arrays: dict, origin: str = "calibration data", cast: dict | None = None):
        self.arrays = arrays
        self.origin = origin
        self.cast = cast or {}   # input name -> dtype, applied per batch (memory-mapped arrays stay on disk)
        ns = {k: len(v) for k, v in arrays.items()}
        if len(set(ns.values())) > 1:
            raise CalibrationError(f"{origin}: inputs have different sample counts {ns}")
        self.n = next(iter(ns.values())) if ns else 0

    def take(self, idx) -> dict:
        return {k: np.ascontiguousarray(v[idx], dtype=self.cast.get(k)) for k, v in self.arrays.items()}

    def subset(self, start: int, stop: int) -> "DataSource":
        return DataSource({k: v[start:stop] for k, v in self.arrays.items()}, self.origin, self.cast)

    def batches(self, batch_size: int = 64):
        for s in range(0, self.n, batch_size):
            yield self.take(slice(s, min(s + batch_size, self.n)))

    def sample_shapes(self):
        return {k: tuple(v.shape[1:]) for k, v in self.arrays.items()}

    def check(self, model: onnx.ModelProto) -> "DataSource":
        """Validate names, ranks, fixed dims, dtypes and values against the model inputs; returns
        a source with arrays cast to the model's dtype."""
        inputs = model_inputs(model)
        names = [i[0] for i in inputs]
        if self.n == 0:
            raise CalibrationError(f"{self.origin}: zero samples")
        batch = fixed_batch(model)
        if batch is not None and self.n < batch:
            raise CalibrationError(f"{self.origin}: {self.n} sample(s), but the model's inputs take a fixed "
                                   f"batch of {batch}")
        missing = [n for n in names if n not in self.arrays]
        extra = [k for k in self.arrays if k not in names]
        if missing or extra:
            raise CalibrationError(
                f"{self.origin}: input names {sorted(self.arrays)} do not match the model's inputs {names}"
                + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else ""))
        out = {}
        for name, shape, dtype in inputs:
            a = self.arrays[name]
            if a.ndim != len(shape):
                raise CalibrationError(f"{self.origin}: input '{name}' has rank {a.ndim} (shape {tuple(a.shape)}) "
                                       f"but the model expects rank {len(shape)} {_fmt_shape(shape)}")
            for i, (got, want) in enumerate(zip(a.shape, shape)):
                if i > 0 and want is not None and got != want:
                    raise CalibrationError(f"{self.origin}: input '{name}' has shape {tuple(a.shape)} "
                                           f"but the model expects {_fmt_shape(shape)}")
            a_kind, m_kind = np.dtype(a.dtype).kind, np.dtype(dtype).kind
            if (m_kind == "f") != (a_kind == "f") or a_kind not in "fiub":
                raise CalibrationError(f"{self.origin}: input '{name}' has dtype {a.dtype} but the model "
                                       f"expects {np.dtype(dtype).name}")
            if a_kind == "f" and not all(np.isfinite(a[s:s + 1024]).all() for s in range(0, len(a), 1024)):
                raise CalibrationError(f"{self.origin}: input '{name}' contains NaN or Inf values")
            out[name] = a
        return DataSource(out, self.origin, {name: np.dtype(dtype) for name, _, dtype in inputs})


class ImageFolderSource(DataSource):
    """Images decoded lazily, resized, normalised: (x/255 - mean) / std, NCHW or NHWC."""

    def __init__(self, folder, input_name, image_size, mean=(0.0,), std=(1.0,), layout="NCHW",
                 channels=None, dtype=np.float32):
        try:
            from PIL import Image  # noqa: F401
        except ImportError:
            raise InputError("reading an image folder needs Pillow: pip install 'onnxshrink[images]'") from None
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise CalibrationError(f"image folder '{folder}' holds no images ({', '.join(IMAGE_EXTS)})")
        self.files = [os.path.join(folder, f) for f in files]
        self.input_name, self.size, self.layout = input_name, tuple(image_size), layout
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.channels = channels or max(len(self.mean), len(self.std), 1)
        if len(self.size) != 2 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in self.size):
            raise CalibrationError(f"--image-size expects H,W (two positive integers), got {image_size}")
        for flag, v in (("--mean", self.mean), ("--std", self.std)):
            if v.ndim != 1 or len(v) not in (1, self.channels):
                raise CalibrationError(f"{flag} has {v.size} values; the model's input has {self.channels} "
                                       f"channel(s) (give 1 or {self.channels})")
        if not (self.std > 0).all():
            raise CalibrationError(f"--std must be > 0, got {tuple(self.std.tolist())}")
        self.dtype = dtype
        self.origin = f"image folder '{folder}'"
        self.n = len(self.files)
        self.arrays = None

    def _load(self, path):
        from PIL import Image
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB").resize(self.size[::-1])
                a = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as e:
            raise CalibrationError(f"cannot read image '{path}': {e}") from None
        if a.ndim == 2:
            a = a[..., None]
        a = (a - self.mean) / self.std
        return a.transpose(2, 0, 1) if self.layout == "NCHW" else a

    def take(self, idx):
        files = self.files[idx] if isinstance(idx, slice) else [self.files[i] for i in idx]
        return {self.input_name: np.stack([self._load(f) for f in files]).astype(self.dtype)}

    def subset(self, start, stop):
        new = object.__new__(ImageFolderSource)
        new.__dict__.update(self.__dict__)
        new.files = self.files[start:stop]
        new.n = len(new.files)
        return new

    def sample_shapes(self):
        return {self.input_name: tuple(self.take(slice(0, 1))[self.input_name].shape[1:])}

    def check(self, model):
        DataSource(self.take(slice(0, fixed_batch(model) or 1)), self.origin).check(model)  # shape/dtype check
        return self


def _fmt_shape(shape):
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def from_feeds(feeds, origin="calibration data") -> DataSource:
    """Materialise an iterable of feed dicts (or a CalibrationDataReader) into arrays."""
    chunks = {}
    if hasattr(feeds, "get_next"):
        reader = feeds
        feeds = iter(lambda: reader.get_next(), None)
    for feed in feeds:
        if not isinstance(feed, dict):
            raise CalibrationError(f"{origin}: expected dicts of input name -> array, got {type(feed).__name__}")
        for k, v in feed.items():
            chunks.setdefault(k, []).append(np.asarray(v))
    if not chunks:
        raise CalibrationError(f"{origin}: zero samples")
    try:
        return DataSource({k: np.concatenate(v, axis=0) for k, v in chunks.items()}, origin)
    except ValueError as e:
        raise CalibrationError(f"{origin}: feeds do not stack into one array per input ({e})") from None


def load_data(spec, model: onnx.ModelProto, image_options: dict | None = None,
              origin: str = "calibration data") -> DataSource:
    """Any supported calibration spec -> a checked DataSource."""
    inputs = model_inputs(model)
    if isinstance(spec, DataSource):
        src = spec
    elif isinstance(spec, (str, os.PathLike)):
        src = _load_path(os.fspath(spec), inputs, image_options or {}, origin)
    elif isinstance(spec, np.ndarray):
        if len(inputs) != 1:
            raise CalibrationError(f"{origin}: a single array needs a single-input model; the model has "
                                   f"inputs {[i[0] for i in inputs]}")
        src = DataSource({inputs[0][0]: spec}, origin)
    elif isinstance(spec, dict):
        src = DataSource({k: np.asarray(v) for k, v in spec.items()}, origin)
    else:
        src = from_feeds(spec, origin)
    return src.check(model)


def _load_path(path, inputs, image_options, origin):
    if not os.path.exists(path):
        raise CalibrationError(f"{origin} '{path}' does not exist")
    if os.path.isdir(path):
        if len(inputs) != 1:
            raise CalibrationError("an image folder needs a single-input model")
        name, shape, dtype = inputs[0]
        opts = dict(image_options)
        if "image_size" not in opts or not opts["image_size"]:
            layout = opts.get("layout", "NCHW")
            hw = shape[2:4] if layout == "NCHW" else shape[1:3]
            if len(shape) != 4 or None in hw:
                raise CalibrationError("image folder: the model's input size is dynamic; give --image-size H,W")
            opts["image_size"] = tuple(hw)
        if "channels" not in opts and len(shape) == 4:
            opts["channels"] = shape[1] if opts.get("layout", "NCHW") == "NCHW" else shape[3]
        return ImageFolderSource(path, name, dtype=dtype, **opts)
    label = f"{origin} '{path}'"
    try:
        # .npy files are memory-mapped: batches are read from disk as they are needed
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if path.endswith(".npy") else None)
    except Exception as e:
        raise CalibrationError(f"cannot read {label}: not a .npy/.npz file or an image folder ({e})") from None
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
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape, dtype in model_inputs(model):
        dims = [n] + [d if d is not None else (sample_shapes or {}).get(name, [1] * len(shape))[i - 1]
                      for i, d in enumerate(shape) if i > 0]
        arrays[name] = rng.standard_normal(dims).astype(dtype) if np.dtype(dtype).kind == "f" else \
            np.zeros(dims, dtype)
    return DataSource(arrays, "random calibration data")


def split_holdout(src: DataSource, fraction: float = 0.2):
    """(fit, held-out): the last ``fraction`` of the samples are held out."""
    n_val = max(1, int(round(src.n * fraction)))
    if src.n - n_val < 1:
        raise CalibrationError(f"{src.origin}: {src.n} sample(s) is too few to hold out validation "
                               "data; give more samples or --validation-data")
    return src.subset(0, src.n - n_val), src.subset(src.n - n_val, src.n)


# ----------------------------------------------------------------------------- running
def session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
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


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of the model exposing the named intermediate tensors as extra graph outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(m.graph.value_info) + list(m.graph.input)}
    if any(n not in types and n not in existing for n in names):
        try:
            inferred = onnx.shape_inference.infer_shapes(m)
            types.update({vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info})
        except Exception:
            pass
    for name in names:
        if name not in existing:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
            existing.add(name)
    return m


class _Runner:
    def __init__(self, model, names):
        inputs = {i[0] for i in model_inputs(model)}
        self.from_feed = [n for n in names if n in inputs]
        wanted = [n for n in names if n not in inputs]
        self.sess = session(with_outputs(model, wanted)) if wanted or not self.from_feed else None
        self.wanted = wanted

    def __call__(self, feed):
        out = {n: feed[n] for n in self.from_feed}
        if self.sess is not None and self.wanted:
            vals = self.sess.run(self.wanted, feed)
            out.update(zip(self.wanted, vals))
        return out


def collect(data: DataSource, requests, model_x: onnx.ModelProto, model_y: onnx.ModelProto | None = None,
            batch_size: int = 64, progress=None, seed: int = 0) -> dict:
    """Run the data once and return {request.key: accumulator}.

    ``x`` tensors are read from ``model_x``, ``y`` tensors from ``model_y`` (default: model_x).
    """
    requests = list(requests)
    if not requests:
        return {}
    xs = sorted({t for r in requests for t in r.tensors()["x"]})
    ys = sorted({t for r in requests for t in r.tensors()["y"]})
    run_x = _Runner(model_x, xs if model_y is not None else sorted(set(xs) | set(ys)))
    run_y = _Runner(model_y, ys) if model_y is not None and ys else None
    accs = {}
    batches, count = _batches(data, batch_size, model_x)
    if progress is not None:
        batches = progress(batches, total=count)
    for b, feed in enumerate(batches):
        xa = run_x(feed)
        ya = run_y(feed) if run_y is not None else xa
        for r in requests:
            if r.key not in accs:
                accs[r.key] = r.new(xa, ya)
            rng = np.random.default_rng([seed, b, zlib.crc32(r.key.encode())])
            r.update(accs[r.key], xa, ya, rng)
    return accs


def run_model(model: onnx.ModelProto, data: DataSource, batch_size: int = 256, threads: int = 0, sess=None):
    """All outputs of the model over the data, concatenated: {name: array}. ``sess``: an ONNX
    Runtime session of this model already made (one is created otherwise)."""
    sess = sess if sess is not None else session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    outs = {n: [] for n in names}
    for feed in _batches(data, batch_size, model)[0]:
        for n, v in zip(names, sess.run(names, feed)):
            outs[n].append(v)
    if not outs[names[0]]:
        raise CalibrationError(f"{data.origin}: {data.n} sample(s), fewer than the model's fixed batch "
                               f"of {fixed_batch(model)}")
    return {n: np.concatenate(v, axis=0) if v and v[0].ndim else np.stack(v) for n, v in outs.items()}
