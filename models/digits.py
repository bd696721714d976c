"""Data recipe for the digits reference models (numpy + scikit-learn only).

All images come from scikit-learn's bundled ``load_digits`` data set (no
downloads).  Pixels are scaled to [0, 1] by dividing by 16 and stored as
float32; labels are int64.  The split is
``train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)``.

Model input layouts ("kind"):

* ``"cnn"``: (N, 1, 8, 8)
* ``"mlp"``: (N, 64)
* ``"seq"``: (N, 8, 8)  -- the 8 image rows as 8 tokens of 8 features
"""

from __future__ import annotations

import functools
import os

import numpy as np

MODELS_DIR = os.path.dirname(os.path.abspath(__file__))

# model name -> input layout kind
MODELS = {
    "cnn_plain": "cnn",
    "cnn_residual": "cnn",
    "mlp": "mlp",
    "transformer": "seq",
}

KINDS = ("cnn", "mlp", "seq")


@functools.lru_cache(maxsize=1)
def _split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / np.float32(16.0)).astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return {
        "x_train": np.ascontiguousarray(x_train, dtype=np.float32),
        "y_train": np.ascontiguousarray(y_train, dtype=np.int64),
        "x_test": np.ascontiguousarray(x_test, dtype=np.float32),
        "y_test": np.ascontiguousarray(y_test, dtype=np.int64),
    }


def load_split():
    """Return ``{"x_train", "y_train", "x_test", "y_test"}``.

    Images are float32 of shape (N, 8, 8) in [0, 1]; labels are int64.
    Fresh copies are returned, so callers may modify them.
    """
    return {k: v.copy() for k, v in _split().items()}


def to_model_input(x, kind):
    """Reshape (N, 8, 8) images into the layout expected by a model kind."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    if kind == "cnn":
        out = x.reshape(n, 1, 8, 8)
    elif kind == "mlp":
        out = x.reshape(n, 64)
    elif kind == "seq":
        out = x.reshape(n, 8, 8)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return np.array(out, dtype=np.float32, order="C", copy=True)


def calibration(kind, n=512):
    """The first ``n`` training images in the layout of ``kind``."""
    return to_model_input(_split()["x_train"][:n], kind)


def test_set(kind):
    """Return ``(x, y)`` for the test split, ``x`` in the layout of ``kind``."""
    s = _split()
    return to_model_input(s["x_test"], kind), s["y_test"].copy()


def model_path(name):
    """Path of the ONNX file for a model name in this folder."""
    return os.path.join(MODELS_DIR, f"{name}.onnx")


def calib_path(name):
    """Path of the calibration ``.npz`` for a model name in this folder."""
    return os.path.join(MODELS_DIR, f"{name}_calib.npz")


def _session(onnx_path_or_model):
    import onnxruntime as ort

    if isinstance(onnx_path_or_model, (str, os.PathLike)):
        src = os.fspath(onnx_path_or_model)
    elif isinstance(onnx_path_or_model, (bytes, bytearray)):
        src = bytes(onnx_path_or_model)
    else:  # onnx.ModelProto
        src = onnx_path_or_model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def predict(onnx_path_or_model, x, batch_size=256):
    """Run a model with onnxruntime and return the logits as float32."""
    sess = _session(onnx_path_or_model)
    name = sess.get_inputs()[0].name
    outs = []
    for i in range(0, x.shape[0], batch_size):
        outs.append(sess.run(None, {name: x[i : i + batch_size]})[0])
    return np.concatenate(outs, axis=0).astype(np.float32)


def accuracy(onnx_path_or_model, kind):
    """Top-1 accuracy (float in [0, 1]) of a model on the test split.

    ``onnx_path_or_model`` may be a file path, serialized bytes or an
    ``onnx.ModelProto``.
    """
    x, y = test_set(kind)
    logits = predict(onnx_path_or_model, x)
    return float(np.mean(np.argmax(logits, axis=1) == y))
