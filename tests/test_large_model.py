"""Large models. The slow test: a ~2.5 GB model with external data (over the 2 GB protobuf
limit): onnxshrink runs a cheap pass on it, the output is saved with external data, and the tool's
peak memory stays within 2× the model size plus a calibration batch. Slow (writes ~5 GB to disk):
``pytest -m slow``. The model is written tensor by tensor straight to its data file, so the test
process never holds it; the tool runs in a subprocess whose peak RSS (``RUSAGE_CHILDREN``) is
measured.

The fast tests run the same large-model code path on a small model by lowering the thresholds:
weights stay in their files, rewritten ones are spilled, and the result equals the in-memory path;
each ``shrink()`` call's spill folder goes away with its Result (close, ``with``, garbage
collection) or at once when the call fails, and the CLI leaves no temporary files after success,
failure or SIGTERM.
"""

import gc
import os
import resource
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxshrink import model_io
from onnxshrink.calibrate import run_model
from onnxshrink.errors import InputError, PassError, UsageError, ValidationFailed
from onnxshrink.model_io import lazy_tensors, load_model, materialized
from onnxshrink.passes.foldbn import FoldBN
from onnxshrink.pipeline import shrink
from onnxshrink.validate import Tolerances

D = 4096            # Gemm width: one weight is 64 MiB
LAYERS = 38         # 38 × 64 MiB ≈ 2.55 GB of weights
BATCH = 32          # calibration samples


def _external(name, array, data_file, offset):
    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    t.dims.extend(array.shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", os.path.basename(data_file.name)), ("offset", str(offset)),
                 ("length", str(array.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    data_file.write(array.tobytes())
    return t, offset + array.nbytes


def write_large_model(folder, layers=LAYERS, d=D, seed=0):
    """x(N,D) ─ [Gemm(D×D) ─ BatchNormalization ─ Relu] × layers ─ y(N,D); weights in model.onnx.data."""
    rng = np.random.default_rng(seed)
    path = os.path.join(folder, "large.onnx")
    nodes, inits, offset = [], [], 0
    h = "x"
    with open(path + ".data", "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((d, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
            t, offset = _external(f"w{i}", w, f, offset)
            inits.append(t)
            b = np.zeros(d, np.float32)
            inits.append(onnx.numpy_helper.from_array(b, f"b{i}"))
            bn = [rng.uniform(0.5, 1.5, d), 0.1 * rng.standard_normal(d), 0.1 * rng.standard_normal(d),
                  rng.uniform(0.5, 1.5, d)]
            bn_names = []
            for j, v in enumerate(bn):
                inits.append(onnx.numpy_helper.from_array(v.astype(np.float32), f"bn{i}_{j}"))
                bn_names.append(f"bn{i}_{j}")
            nodes.append(helper.make_node("Gemm", [h, f"w{i}", f"b{i}"], [f"g{i}"], name=f"gemm{i}", transB=1))
            nodes.append(helper.make_node("BatchNormalization", [f"g{i}"] + bn_names, [f"n{i}"], name=f"bn{i}"))
            h = "y" if i == layers - 1 else f"r{i}"
            nodes.append(helper.make_node("Relu", [f"n{i}"], [h], name=f"relu{i}"))
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path, offset


@pytest.mark.slow
def test_large_model_memory_and_external_output(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    if free < 12e9:
        pytest.skip(f"needs ~12 GB free disk, {free / 1e9:.1f} GB free")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if mem < 12e9:
        pytest.skip(f"needs ~12 GB RAM, {mem / 1e9:.1f} GB")
    path, weight_bytes = write_large_model(str(tmp_path))
    size = os.path.getsize(path) + os.path.getsize(path + ".data")
    assert size > 2**31  # over the protobuf limit
    calib = tmp_path / "calib.npy"
    batch = np.random.default_rng(1).standard_normal((BATCH, D)).astype(np.float32)
    np.save(calib, batch)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "small.onnx"
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "onnxshrink.cli", path, str(out), "--passes", "foldbn",
                        "--calibration-data", str(calib), "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    print(f"\nmodel {size / 1e9:.2f} GB, tool peak RSS {peak / 1e9:.2f} GB "
          f"({peak / size:.2f}x the model), {seconds:.0f} s")
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(out_dir)) == ["small.onnx", "small.onnx.data"]  # saved with external data
    assert os.path.getsize(out_dir / "small.onnx") < 10_000_000
    assert os.path.getsize(out_dir / "small.onnx.data") > 2e9
    back = onnx.load(str(out), load_external_data=False)
    assert not any(n.op_type == "BatchNormalization" for n in back.graph.node)  # foldbn did its work
    assert peak <= 2 * size + 8 * batch.nbytes, f"peak RSS {peak / 1e9:.2f} GB > 2x model {size / 1e9:.2f} GB"


# ----------------------------------------------------------------------------- fast: the same path, small
@pytest.fixture
def small_limits(monkeypatch):
    """Treat a model with over 100 kB of external weights as large, tensors of 4 kB and more lazy."""
    monkeypatch.setattr(model_io, "EXTERNAL_THRESHOLD", 100_000)
    monkeypatch.setattr(model_io, "LAZY_MIN_BYTES", 4096)


def _weights(model):
    m = materialized(model)
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


def test_large_path_keeps_weights_on_disk_and_matches_in_memory_path(tmp_path, small_limits):
    path, _ = write_large_model(str(tmp_path), layers=3, d=128)   # 3 × 64 kB weights
    lazy = load_model(path)
    assert sorted(t.name for t in lazy_tensors(lazy)) == ["w0", "w1", "w2"]
    assert lazy.ByteSize() < 20_000                                 # the weights are not in memory
    x = np.random.default_rng(1).standard_normal((40, 128)).astype(np.float32)
    res = shrink(path, "foldbn", calibration=x)
    assert res.report["validation"]["passed"], res.report["validation"]
    assert not any(n.op_type == "BatchNormalization" for n in res.model.graph.node)
    assert sorted(t.name for t in lazy_tensors(res.model)) == ["w0", "w1", "w2"]  # spilled, not inline
    assert res.model.ByteSize() < 20_000
    eager = shrink(onnx.load(path), "foldbn", calibration=x)        # weights in memory from the start
    got, want = _weights(res.model), _weights(eager.model)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    ref = run_model(onnx.load(path), model_io_source(x))["y"]
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    res.save(out)
    assert sorted(os.listdir(out.parent)) == ["small.onnx", "small.onnx.data"]
    back = run_model(onnx.load(str(out)), model_io_source(x))["y"]
    np.testing.assert_allclose(back, ref, rtol=1e-4, atol=1e-5)
    inline = tmp_path / "inline.onnx"
    res.save(inline, external=False)                                # read back into one file
    assert not os.path.exists(str(inline) + ".data")
    np.testing.assert_array_equal(run_model(onnx.load(str(inline)), model_io_source(x))["y"], back)


def model_io_source(x):
    from onnxshrink.calibrate import DataSource
    return DataSource({"x": x})


def test_large_path_refuses_short_data_file(tmp_path, small_limits):
    path, size = write_large_model(str(tmp_path), layers=2, d=128)
    with open(path + ".data", "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(InputError, match="external data"):
        load_model(path)


def test_large_path_sessions_across_file_systems(tmp_path, small_limits, monkeypatch):
    """Data files that cannot be hard-linked into the work folder are copied there once."""
    path, _ = write_large_model(str(tmp_path), layers=3, d=128)
    real_link = os.link

    def link(src, dst):
        if os.path.realpath(src).startswith(os.path.realpath(str(tmp_path))):
            raise OSError(18, "Invalid cross-device link")
        return real_link(src, dst)
    monkeypatch.setattr(model_io.os, "link", link)
    x = np.random.default_rng(2).standard_normal((8, 128)).astype(np.float32)
    lazy = load_model(path)
    assert lazy_tensors(lazy)
    got = run_model(lazy, model_io_source(x))["y"]
    np.testing.assert_allclose(got, run_model(onnx.load(path), model_io_source(x))["y"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- fast: temporary files
def _spill_dirs():
    d = model_io._WORK.get("dir")
    return {n for n in os.listdir(d) if n.startswith("spill-")} if d and os.path.isdir(d) else set()


def _tree_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def test_repeated_calls_do_not_grow_the_work_folder(tmp_path, small_limits):
    path, _ = write_large_model(str(tmp_path), layers=3, d=128)
    x = np.random.default_rng(3).standard_normal((24, 128)).astype(np.float32)
    before = _spill_dirs()
    sizes = []
    for i in range(3):
        res = shrink(path, "foldbn", calibration=x)
        assert sorted(t.name for t in lazy_tensors(res.model)) == ["w0", "w1", "w2"]   # spilled
        assert len(_spill_dirs() - before) == 1 and os.path.getsize(res.spill.path) >= 3 * 128 * 128 * 4
        res.save(tmp_path / f"out{i}.onnx")
        del res
        gc.collect()
        assert _spill_dirs() == before                     # gone with the Result
        sizes.append(_tree_bytes(model_io._work_dir()))
    assert sizes[1] == sizes[0] and sizes[2] == sizes[0], sizes
    ref = run_model(onnx.load(path), model_io_source(x))["y"]
    for i in range(3):                                     # the saved outputs do not need the spill
        got = run_model(onnx.load(str(tmp_path / f"out{i}.onnx")), model_io_source(x))["y"]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_result_close_and_with_block_remove_the_spill(tmp_path, small_limits):
    path, _ = write_large_model(str(tmp_path), layers=3, d=128)
    x = np.random.default_rng(4).standard_normal((24, 128)).astype(np.float32)
    with shrink(path, "foldbn", calibration=x) as res:
        spill = res.spill.dir
        assert os.path.isdir(spill)
        res.save(tmp_path / "a.onnx")
    assert not os.path.exists(spill)
    with pytest.raises(UsageError, match="closed or garbage-collected"):
        res.save(tmp_path / "b.onnx")                      # a clear error, not a missing-file one
    with pytest.raises(UsageError, match="closed or garbage-collected"):
        materialized(res.model)
    assert not os.path.exists(tmp_path / "b.onnx")
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith("large")) == ["a.onnx", "a.onnx.data"]
    res.close()                                            # twice is fine
    small, _ = write_large_model(str(tmp_path / ".."), layers=1, d=16)   # under the threshold
    with shrink(small, "foldbn", calibration=x[:, :16]) as res:
        assert res.spill.dir is None                       # nothing spilled, no folder made


def test_failing_call_leaves_no_spill(tmp_path, small_limits, monkeypatch):
    path, _ = write_large_model(str(tmp_path), layers=3, d=128)
    x = np.random.default_rng(5).standard_normal((24, 128)).astype(np.float32)
    before = _spill_dirs()
    real = FoldBN.apply
    seen = []

    def apply(self, model, cfg, ctx):
        real(self, model, cfg, ctx)
        seen.append(_spill_dirs() - before)                # the pass's output was spilled
        raise RuntimeError("boom")
    monkeypatch.setattr(FoldBN, "apply", apply)
    with pytest.raises(PassError, match="boom"):
        shrink(path, "foldbn", calibration=x)
    assert len(seen) == 1 and len(seen[0]) == 1
    assert _spill_dirs() == before                         # removed at once, no GC needed
    monkeypatch.setattr(FoldBN, "apply", real)
    # a failed validation keeps the spill for e.result (the CLI writes its report; --force-like use)
    with pytest.raises(ValidationFailed) as info:
        shrink(path, "foldbn", calibration=x, tolerances=Tolerances(min_cosine=1.5))
    partial = info.value.result
    assert len(_spill_dirs() - before) == 1
    assert sorted(_weights(partial.model)) == sorted(["w0", "w1", "w2", "b0", "b1", "b2"])
    partial.close()
    assert _spill_dirs() == before


_CLI = """
import os, signal, sys
from onnxshrink import model_io
from onnxshrink.cli import main
from onnxshrink.passes.foldbn import FoldBN
model_io.EXTERNAL_THRESHOLD, model_io.LAZY_MIN_BYTES = 100_000, 4096
mode, real = sys.argv[1], FoldBN.apply

def apply(self, model, cfg, ctx):
    out = real(self, model, cfg, ctx)
    spilled = [n for n in os.listdir(model_io._work_dir()) if n.startswith("spill-")]
    print("spilled", len(spilled), file=sys.stderr)
    if mode == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif mode == "error":
        raise RuntimeError("boom")
    return out
FoldBN.apply = apply
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("mode, flags, code", [("ok", [], 0), ("error", [], 2),
                                               ("ok", ["--min-cosine", "1.5"], 1), ("term", [], 143)])
def test_cli_leaves_no_temporary_files(tmp_path, mode, flags, code):
    path, _ = write_large_model(str(tmp_path), layers=3, d=128)
    np.save(tmp_path / "calib.npy", np.random.default_rng(6).standard_normal((24, 128)).astype(np.float32))
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    out.mkdir()
    p = subprocess.run([sys.executable, "-c", _CLI, mode, path, str(out / "small.onnx"), "--passes", "foldbn",
                        "--calibration-data", str(tmp_path / "calib.npy"), "--quiet", "--report",
                        str(out / "report.json"), *flags],
                       capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)}, timeout=300)
    assert p.returncode == code, p.stderr
    assert "spilled 1" in p.stderr                         # the large-model path ran
    # work folder, spill and sessions removed (importing ONNX Runtime leaves its own `.ses` file)
    assert [n for n in os.listdir(tmp) if n != ".ses"] == []
    written = {"ok": ["report.json", "small.onnx", "small.onnx.data"], "error": [], "term": []}
    assert sorted(os.listdir(out)) == (["report.json"] if code == 1 else written[mode])
    if mode == "term":
        assert "terminated" in p.stderr
