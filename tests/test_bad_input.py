"""Bad input is refused cleanly: one line on stderr, exit code 2, nothing written next to OUT
(no stray temporary files either), the input left byte-for-byte untouched.

Each case goes through the CLI entry point ``onnxshrink.cli.main``; a few also through a real
subprocess (``python -m onnxshrink.cli``) so the console behaviour itself is covered.
"""

import hashlib
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, conv_bn_net
from onnx import TensorProto, helper

from onnxshrink import cli
from onnxshrink.registry import all_passes

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _snapshot(folder):
    """{relative path: sha256} of every file under the folder."""
    snap = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                snap[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return snap


class Setup:
    """``in/`` holds the input model (tiny.onnx) and calibration files, ``out/`` is where OUT goes."""

    def __init__(self, tmp_path, rng):
        self.root = tmp_path
        self.inp = tmp_path / "in"
        self.out_dir = tmp_path / "out"
        self.inp.mkdir()
        self.out_dir.mkdir()
        self.model = self.inp / "tiny.onnx"
        onnx.save(conv_bn_net(), str(self.model))
        self.calib = self.inp / "calib.npy"
        np.save(self.calib, rng.standard_normal((20, 3, 8, 8)).astype(np.float32))
        self.out = self.out_dir / "o.onnx"

    def argv(self, *extra, model=None, out=None, passes="foldbn", calib=True):
        a = [model or self.model, out or self.out, "--passes", passes]
        if calib:
            a += ["--calibration-data", self.calib if calib is True else calib]
        return [str(x) for x in a + list(extra)]


@pytest.fixture
def setup(tmp_path, rng):
    return Setup(tmp_path, rng)


def fails_cleanly(setup, argv, capfd, match="", code=2):
    before = _snapshot(setup.root)
    rc = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    assert rc == code, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("onnxshrink: warning:")]
    assert len(lines) == 1 and lines[0].startswith("onnxshrink: error:"), err
    assert "internal error" not in err, err
    assert match.lower() in err.lower(), err
    assert _snapshot(setup.root) == before  # nothing written, nothing changed, no temp files
    return lines[0]


# ----------------------------------------------------------------------------- the model file
def _write(setup, name, data):
    p = setup.inp / name
    p.write_bytes(data)
    return p


def test_not_a_file(setup, capfd):
    fails_cleanly(setup, setup.argv(model=setup.inp / "missing.onnx"), capfd, "does not exist")
    fails_cleanly(setup, setup.argv(model=setup.inp), capfd, "not a file")


def test_empty_truncated_random_bytes(setup, capfd):
    data = setup.model.read_bytes()
    fails_cleanly(setup, setup.argv(model=_write(setup, "empty.onnx", b"")), capfd, "empty")
    for cut in (1, 17, len(data) // 2, len(data) - 3):
        fails_cleanly(setup, setup.argv(model=_write(setup, f"cut{cut}.onnx", data[:cut])), capfd)
    rnd = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    fails_cleanly(setup, setup.argv(model=_write(setup, "random.onnx", rnd)), capfd)
    fails_cleanly(setup, setup.argv(model=_write(setup, "text.onnx", b"this is not a model\n" * 20)), capfd)


def test_unreadable_file(setup, capfd, monkeypatch):
    real_open = open

    def deny(path, *a, **k):
        if os.fspath(path) == str(setup.model):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)
    import onnxshrink.model_io as mio
    monkeypatch.setattr(mio, "open", deny, raising=False)  # only the tool's reads are denied
    fails_cleanly(setup, setup.argv(), capfd, "permission denied")


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode")
def test_unreadable_file_mode(setup, capfd):
    setup.model.chmod(0)
    try:
        fails_cleanly(setup, setup.argv(), capfd, "cannot read")
    finally:
        setup.model.chmod(0o644)


@pytest.mark.parametrize("proto", ["tensor", "graph", "node", "model_without_graph"])
def test_valid_protobuf_that_is_not_a_model(setup, capfd, proto):
    m = conv_bn_net()
    msg = {"tensor": m.graph.initializer[0], "graph": m.graph, "node": m.graph.node[0],
           "model_without_graph": helper.make_model(helper.make_graph([], "g", [], []))}[proto]
    if proto == "model_without_graph":
        msg.ClearField("graph")
    p = _write(setup, f"{proto}.onnx", msg.SerializeToString())
    fails_cleanly(setup, setup.argv(model=p), capfd)


@pytest.mark.parametrize("location", ["../secret.bin", "../../etc/passwd", "/etc/passwd", "sub/../../x.bin",
                                      "C:\\weights.bin"])
def test_external_data_outside_the_model_folder(setup, capfd, location):
    (setup.root / "secret.bin").write_bytes(b"\0" * 4096)
    m = conv_bn_net()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    del t.float_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(t.dims))))):
        e = t.external_data.add()
        e.key, e.value = k, v
    p = setup.inp / "evil.onnx"
    p.write_bytes(m.SerializeToString())
    fails_cleanly(setup, setup.argv(model=p), capfd, "refusing external data")


def test_external_data_file_missing_or_short(setup, capfd):
    from onnxshrink.model_io import save_model
    save_model(conv_bn_net(), str(setup.inp / "ext.onnx"), external=True)
    data = setup.inp / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])  # truncated weights
    fails_cleanly(setup, setup.argv(model=setup.inp / "ext.onnx"), capfd)
    data.unlink()
    fails_cleanly(setup, setup.argv(model=setup.inp / "ext.onnx"), capfd, "not found")


@pytest.mark.parametrize("domain", ["", "com.example"])
def test_op_no_runtime_knows(setup, capfd, domain):
    b = GraphBuilder(0)
    x = b.input("input", ["batch", 3, 8, 8])
    h = b.conv(x, 3, 4)
    b.nodes.append(helper.make_node("FrobnicateX", [h], ["y"], name="frob", domain=domain))
    b.output("y", None)
    g = helper.make_graph(b.nodes, "g", b.inputs, b.outputs, b.inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    m = helper.make_model(g, opset_imports=opsets)
    m.ir_version = 8
    p = setup.inp / "unknown_op.onnx"
    p.write_bytes(m.SerializeToString())
    line = fails_cleanly(setup, setup.argv(model=p), capfd, "FrobnicateX")
    assert "input model" in line  # blamed on the input, not on a pass


# ----------------------------------------------------------------------------- calibration data
@pytest.mark.parametrize("case,match", [
    ("wrong_name", "do not match"), ("rank", "rank"), ("shape", "shape"), ("dtype", "dtype"),
    ("nan", "nan"), ("inf", "inf"), ("zero", "zero samples"),
    ("string", "dtype"), ("pickle", "cannot read"), ("missing", "does not exist"),
    ("mismatched_counts", "sample counts"),
])
def test_bad_calibration_data(setup, capfd, case, match):
    good = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    path = setup.inp / "bad.npz"
    if case == "wrong_name":
        np.savez(path, image=good)
        np.savez(path, image=good, other=good)
    elif case == "rank":
        np.savez(path, input=good[:, 0])
    elif case == "shape":
        np.savez(path, input=good[:, :, :4])
    elif case == "dtype":
        np.savez(path, input=good.astype(np.int64))
    elif case in ("nan", "inf"):
        good[3, 1, 2, 2] = np.nan if case == "nan" else -np.inf
        np.savez(path, input=good)
    elif case == "zero":
        np.savez(path, input=good[:0])
    elif case == "string":
        np.savez(path, input=np.full((8, 3, 8, 8), "a"))
    elif case == "pickle":
        path = setup.inp / "bad.npy"
        np.save(path, np.array([{"input": 1}], dtype=object), allow_pickle=True)
    elif case == "missing":
        path = setup.inp / "nowhere.npz"
    elif case == "mismatched_counts":
        # a two-input model with 8 and 5 samples
        b = GraphBuilder(0)
        a, c = b.input("a", ["n", 4]), b.input("b", ["n", 4])
        b.node("Add", [b.gemm(a, 4, 4), c], out="y")
        b.output("y", ["n", 4])
        model = setup.inp / "two.onnx"
        onnx.save(b.model(), str(model))
        np.savez(path, a=np.zeros((8, 4), np.float32), b=np.zeros((5, 4), np.float32))
        fails_cleanly(setup, setup.argv(model=model, calib=path), capfd, match)
        return
    fails_cleanly(setup, setup.argv(calib=path), capfd, match)


def test_image_folder_with_unreadable_files(setup, capfd):
    from PIL import Image
    folder = setup.inp / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"ok{i}.png")
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "zz_empty.jpg").write_bytes(b"")
    fails_cleanly(setup, setup.argv(calib=folder), capfd, "cannot read image")
    # and a folder holding no images at all
    empty = setup.inp / "no_images"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    fails_cleanly(setup, setup.argv(calib=empty), capfd, "no images")


# ----------------------------------------------------------------------------- options and targets
def _tunable():
    """(pass, numeric key) of a built pass with a range-checked option, if any."""
    for name, cls in sorted(all_passes().items()):
        if "energy" in getattr(cls.Config, "__dataclass_fields__", {}):
            return name, "energy"
    return None


@pytest.mark.parametrize("item,match", [
    ("nosuchpass.energy=0.9", "unknown pass"), ("foldbn.nosuchkey=1", "unknown option"),
    ("foldbn", "PASS.KEY=VALUE"), ("=3", "PASS.KEY=VALUE"),
])
def test_bad_set(setup, capfd, item, match):
    fails_cleanly(setup, setup.argv("--set", item), capfd, match)


@pytest.mark.parametrize("value", ["1.5", "0", "-1", "abc", "nan"])
def test_set_out_of_range(setup, capfd, value):
    tunable = _tunable()
    if tunable is None:
        pytest.skip("no built pass has a range-checked 'energy' option yet")
    name, key = tunable
    fails_cleanly(setup, setup.argv("--set", f"{name}.{key}={value}", passes=name), capfd)


def test_set_for_a_pass_not_in_the_chain(setup, capfd):
    other = sorted(n for n in all_passes() if n != "foldbn")[0]
    fails_cleanly(setup, setup.argv("--set", f"{other}.x=1"), capfd)


@pytest.mark.parametrize("flag", ["--target-flops", "--target-params", "--target-size"])
@pytest.mark.parametrize("value", ["0", "-0.5", "1.0001", "2", "abc", "nan", "inf"])
def test_bad_targets(setup, capfd, flag, value):
    fails_cleanly(setup, setup.argv(flag, value), capfd)


# ----------------------------------------------------------------------------- the output path
def test_out_directory_missing(setup, capfd):
    fails_cleanly(setup, setup.argv(out=setup.out_dir / "nodir" / "o.onnx"), capfd, "does not exist")
    fails_cleanly(setup, setup.argv(out=setup.calib / "o.onnx"), capfd, "does not exist")  # under a file
    fails_cleanly(setup, setup.argv(out=setup.out_dir), capfd, "directory")  # OUT is a folder


def test_out_directory_not_writable(setup, capfd, monkeypatch):
    import onnxshrink.model_io as mio
    real = os.access
    monkeypatch.setattr(mio.os, "access", lambda p, mode: False if (mode & os.W_OK and os.fspath(p) == str(setup.out_dir))
                        else real(p, mode))
    fails_cleanly(setup, setup.argv(), capfd, "not writable")


@pytest.mark.skipif(IS_ROOT, reason="root writes whatever a folder's mode")
def test_out_directory_mode_readonly(setup, capfd):
    setup.out_dir.chmod(0o555)
    try:
        fails_cleanly(setup, setup.argv(), capfd, "not writable")
    finally:
        setup.out_dir.chmod(0o755)


def test_out_is_in(setup, capfd):
    fails_cleanly(setup, setup.argv(out=setup.model), capfd, "input")
    other_spelling = setup.inp / ".." / "in" / "tiny.onnx"
    fails_cleanly(setup, setup.argv(out=other_spelling), capfd, "input")
    link = setup.out_dir / "link.onnx"
    link.symlink_to(setup.model)
    fails_cleanly(setup, setup.argv(out=link), capfd, "input")


def test_good_run_still_works(setup, capfd):
    """The same setup with nothing wrong succeeds (so the failures above are the bad input's)."""
    rc = cli.main(setup.argv("--quiet"))
    assert rc == 0, capfd.readouterr().err
    assert sorted(os.listdir(setup.out_dir)) == ["o.onnx"]
    onnx.checker.check_model(onnx.load(str(setup.out)), full_check=True)


# ----------------------------------------------------------------------------- real subprocesses
def _proc(argv):
    return subprocess.run([sys.executable, "-m", "onnxshrink.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=120)


def test_subprocess_errors_are_one_line(setup):
    before = _snapshot(setup.root)
    rnd = _write(setup, "random.onnx", os.urandom(2048))
    before = _snapshot(setup.root)
    for argv in (setup.argv(model=rnd), setup.argv("--target-flops", "0"), setup.argv(out=setup.model),
                 setup.argv("--set", "foldbn.nosuchkey=1")):
        p = _proc(argv)
        assert p.returncode == 2, p.stderr
        assert p.stderr.startswith("onnxshrink: error:") and p.stderr.count("\n") == 1, p.stderr
        assert "Traceback" not in p.stderr
    assert _snapshot(setup.root) == before
