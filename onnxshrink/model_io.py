"""Loading and saving models.

- load: parse the protobuf, refuse external data whose ``location`` leaves the model's folder
  (absolute paths, ``..``), then read the external tensors.
- save: atomic. Everything is written to a temporary folder inside the output's folder and moved
  into place with ``os.replace``; on any failure nothing is left behind. Models whose weights
  exceed the 2 GB protobuf limit (or that came with external data) are saved with their weights
  in ``OUT.data`` beside the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import onnx
from onnx import external_data_helper

from .errors import InputError, UsageError

PROTOBUF_LIMIT = 2**31 - 1
# Keep a margin: the graph itself also needs room inside the 2 GB message.
EXTERNAL_THRESHOLD = 1_800_000_000


def _external_locations(model: onnx.ModelProto):
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            yield tensor.name, info.get("location", "")


def check_external_paths(model: onnx.ModelProto, base_dir: str) -> None:
    base = os.path.realpath(base_dir)
    for name, loc in _external_locations(model):
        if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ":" in loc[:3]:
            raise InputError(f"refusing external data of tensor '{name}': location '{loc}' is not a "
                             "relative path inside the model's folder")
        target = os.path.realpath(os.path.join(base, loc))
        if os.path.commonpath([base, target]) != base:
            raise InputError(f"refusing external data of tensor '{name}': location '{loc}' points "
                             "outside the model's folder")
        if not os.path.isfile(target):
            raise InputError(f"external data file '{loc}' of tensor '{name}' not found next to the model")


def load_model(path_or_model) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ModelProto (which is copied, never modified)."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)
        return model
    if isinstance(path_or_model, (bytes, bytearray)):
        return _parse(bytes(path_or_model), "<bytes>")
    path = os.fspath(path_or_model)
    if not os.path.exists(path):
        raise InputError(f"model file '{path}' does not exist")
    if os.path.isdir(path):
        raise InputError(f"model path '{path}' is a directory, not an .onnx file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read model file '{path}': {e.strerror}") from None
    model = _parse(data, path)
    base_dir = os.path.dirname(os.path.abspath(path))
    if any(True for _ in _external_locations(model)):
        check_external_paths(model, base_dir)
        try:
            external_data_helper.load_external_data_for_model(model, base_dir)
        except Exception as e:  # truncated data files and the like
            raise InputError(f"cannot read external data of '{path}': {e}") from None
    return model


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise InputError(f"model file '{where}' is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:
        raise InputError(f"'{where}' is not a valid ONNX model (protobuf parse failed; "
                         "truncated or not an .onnx file)") from None
    if not model.HasField("graph") or not model.opset_import:
        raise InputError(f"'{where}' parses as protobuf but is not an ONNX model "
                         "(no graph or no opset_import)")
    if len(model.graph.node) == 0 or len(model.graph.output) == 0:
        raise InputError(f"'{where}' is not a usable ONNX model: its graph has no nodes or no outputs")
    return model


def weight_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in external_data_helper._get_all_tensors(model):
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            total += t.ByteSize()
    return total


def check_output_path(out_path: str, in_path: str | None = None, force: bool = False) -> str:
    out_path = os.fspath(out_path)
    out_dir = os.path.dirname(os.path.abspath(out_path)) or "."
    if not os.path.isdir(out_dir):
        raise UsageError(f"output directory '{out_dir}' does not exist")
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"output directory '{out_dir}' is not writable")
    if os.path.isdir(out_path):
        raise UsageError(f"output path '{out_path}' is a directory")
    if in_path is not None and os.path.exists(out_path) and os.path.exists(in_path):
        if os.path.samefile(out_path, in_path) and not force:
            raise UsageError("output path is the input file; refusing to overwrite the input "
                             "(pass --force to allow)")
    return out_path


def save_model(model: onnx.ModelProto, out_path: str, external: bool | None = None) -> list[str]:
    """Write atomically; returns the list of files written."""
    out_path = os.path.abspath(os.fspath(out_path))
    out_dir = os.path.dirname(out_path)
    name = os.path.basename(out_path)
    if external is None:
        external = weight_bytes(model) > EXTERNAL_THRESHOLD
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    try:
        tmp_model = os.path.join(tmp_dir, name)
        written = [out_path]
        if external:
            data_name = name + ".data"
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            onnx.save_model(to_save, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            if os.path.exists(os.path.join(tmp_dir, data_name)):
                os.replace(os.path.join(tmp_dir, data_name), os.path.join(out_dir, data_name))
                written.append(os.path.join(out_dir, data_name))
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_model, out_path)
        return written
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_text(path: str, text: str) -> None:
    path = os.path.abspath(os.fspath(path))
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        raise UsageError(f"report directory '{d}' does not exist")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
