"""CLI: error paths (one line, exit code, nothing written), atomic writes, an end-to-end run."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from graphs import conv_bn_net

from models import digits
from onnxshrink import OutputError, cli, model_io

PLAIN = digits.model_path("cnn_plain")
PLAIN_CALIB = digits.calib_path("cnn_plain")


@pytest.fixture
def tiny(tmp_path, rng):
    path = tmp_path / "tiny.onnx"
    onnx.save(conv_bn_net(), str(path))
    np.save(tmp_path / "calib.npy", rng.standard_normal((20, 3, 8, 8)).astype(np.float32))
    return path


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _fails_cleanly(argv, capsys, tmp_path, code=2, match=""):
    before = sorted(os.listdir(tmp_path))
    rc, out, err = _run(argv, capsys)
    assert rc == code, err
    lines = [ln for ln in err.strip().splitlines() if "warning" not in ln]
    assert len(lines) == 1 and lines[0].startswith("onnxshrink: error:"), err
    assert "Traceback" not in err
    assert match.lower() in err.lower(), err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temp files left
    return err


def test_end_to_end_foldbn_accuracy_and_report(tmp_path, capsys):
    out, rep = tmp_path / "small.onnx", tmp_path / "report.json"
    rc, stdout, err = _run([PLAIN, out, "--passes", "foldbn", "--calibration-data", PLAIN_CALIB, "--report", rep], capsys)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    assert report["validation"]["passed"] is True
    assert report["before"]["params"] > report["after"]["params"]
    assert report["validation"]["outputs"]["logits"]["top1_agreement"] == 1.0
    assert report["passes"][0]["name"] == "foldbn" and len(report["passes"][0]["changed"]) == 9
    assert digits.accuracy(str(out), "cnn") == pytest.approx(digits.accuracy(PLAIN, "cnn"), abs=1e-9)
    assert digits.accuracy(str(out), "cnn") > 0.97
    assert "params" in stdout and "validation" in stdout


def test_console_script_subprocess(tmp_path, tiny):
    out = tmp_path / "o.onnx"
    p = subprocess.run([sys.executable, "-m", "onnxshrink.cli", str(tiny), str(out), "--passes", "foldbn",
                        "--calibration-data", str(tmp_path / "calib.npy"), "--quiet"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    p = subprocess.run([sys.executable, "-m", "onnxshrink.cli", str(tmp_path / "missing.onnx"), str(out), "--passes",
                        "foldbn"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "does not exist" in p.stderr


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"), ("corrupt", "not a valid ONNX model"), ("unknown_pass", "unknown pass"),
    ("bad_shape", "shape"), ("bad_dtype", "dtype"), ("bad_name", "do not match"),
    ("unreachable", "target"), ("bad_target", "(0, 1]"), ("no_data", "calibration data"),
    ("out_is_in", "input"), ("bad_set", "unknown option"), ("bad_outdir", "does not exist"),
])
def test_error_paths(case, match, tmp_path, tiny, capsys):
    out = tmp_path / "out.onnx"
    calib = tmp_path / "calib.npy"
    argv = [tiny, out, "--passes", "foldbn", "--calibration-data", calib]
    if case == "missing":
        argv[0] = tmp_path / "nope.onnx"
    elif case == "corrupt":
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(tiny.read_bytes()[:300])
        argv[0] = bad
    elif case == "unknown_pass":
        argv[3] = "foldbn,nosuchpass"
    elif case == "bad_shape":
        np.save(calib, np.zeros((4, 3, 7, 8), np.float32))
    elif case == "bad_dtype":
        np.save(calib, np.zeros((4, 3, 8, 8), np.int32))
    elif case == "bad_name":
        np.savez(tmp_path / "c.npz", wrong=np.zeros((4, 3, 8, 8), np.float32), other=np.zeros((4, 3, 8, 8), np.float32))
        argv[5] = tmp_path / "c.npz"
    elif case == "unreachable":
        argv += ["--target-flops", "0.5"]
    elif case == "bad_target":
        argv += ["--target-params", "1.5"]
    elif case == "no_data":
        from onnxshrink.registry import all_passes
        data_passes = [n for n, c in all_passes().items() if c.requires.data]
        if not data_passes:
            pytest.skip("no built pass needs data")
        argv = [tiny, out, "--passes", data_passes[0]]
    elif case == "out_is_in":
        argv[1] = tiny
    elif case == "bad_set":
        argv += ["--set", "foldbn.nosuchkey=1"]
    elif case == "bad_outdir":
        argv[1] = tmp_path / "nodir" / "o.onnx"
    before = tiny.read_bytes()
    _fails_cleanly(argv, capsys, tmp_path, match=match)
    assert tiny.read_bytes() == before  # the input is never modified


def test_validation_failure_writes_nothing_unless_forced(tmp_path, tiny, capsys):
    out = tmp_path / "o.onnx"
    argv = [tiny, out, "--passes", "foldbn", "--calibration-data", tmp_path / "calib.npy", "--max-error", "0"]
    _fails_cleanly(argv, capsys, tmp_path, code=1, match="validation failed")
    rc, _, err = _run(argv + ["--force"], capsys)
    assert rc == 3 and out.exists()  # written, but the exit code says a check failed
    assert "validation failed" in err and "--force" in err


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "o.onnx"
    target.write_bytes(b"previous")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(model_io.os, "replace", boom)
    with pytest.raises(OutputError, match="o.onnx: disk full"):
        model_io.save_model(conv_bn_net(), str(target))
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["o.onnx"]


def test_external_data_round_trip(tmp_path):
    m = conv_bn_net()
    written = model_io.save_model(m, str(tmp_path / "ext.onnx"), external=True)
    assert len(written) == 2 and os.path.exists(tmp_path / "ext.onnx.data")
    modes = {os.stat(f).st_mode & 0o777 for f in written}
    assert len(modes) == 1 and modes.pop() & 0o044  # data file as readable as the model, not private
    back = model_io.load_model(str(tmp_path / "ext.onnx"))
    ref = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for t in back.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), ref[t.name])


def test_list_passes_and_inspect(capsys):
    rc, out, _ = _run(["--list-passes"], capsys)
    assert rc == 0
    for name in ("pfa", "basisconv", "lowrank", "hadamard", "pq", "foldbn"):
        assert name in out
    rc, out, _ = _run(["--inspect", PLAIN], capsys)
    assert rc == 0 and "Conv" in out and "foldbn" in out and "total:" in out


def test_report_json_is_valid_with_numpy_nan_and_inf():
    from onnxshrink.report import to_json
    report = {"a": np.float32("nan"), "b": np.float64("inf"), "c": np.array([1.0, -np.inf]), "d": [float("nan")],
              "e": np.int64(3)}
    assert json.loads(to_json(report)) == {"a": "nan", "b": "inf", "c": [1.0, "-inf"], "d": ["nan"], "e": 3}


def test_validation_fails_on_nan_outputs_whatever_the_tolerances():
    from onnxshrink.validate import Tolerances, _tolerance_failures, compare_outputs
    x = np.ones((4, 3))
    x[1, 2] = np.inf  # the original's own inf, reproduced: fine
    y = x.copy()
    assert _tolerance_failures(compare_outputs({"o": x}, {"o": y}), Tolerances(max_error=0.0)) == []
    y[0, 0] = np.nan
    m = compare_outputs({"o": x}, {"o": y})
    assert m["o"]["nonfinite_mismatch"] == 1 and m["o"]["max_abs"] == 0.0
    fails = _tolerance_failures(m, Tolerances(max_error=1.0, min_cosine=None))
    assert len(fails) == 1 and "NaN" in fails[0]


@pytest.mark.parametrize("flags,match", [
    (["--image-size", "8"], "--image-size expects H,W"), (["--image-size", "8,8,8"], "--image-size expects H,W"),
    (["--image-size", "8.5,8"], "--image-size expects H,W"), (["--image-size", "0,8"], "--image-size expects H,W"),
    (["--image-size", "8,8", "--mean", "0.5,0.5"], "--mean has 2 values"), (["--std", "0"], "--std"),
])
def test_bad_image_options(flags, match, tmp_path, tiny, capsys):
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    _fails_cleanly([tiny, tmp_path / "o.onnx", "--passes", "foldbn", "--calibration-data", folder] + flags,
                   capsys, tmp_path, match=match)


@pytest.mark.parametrize("flags,match", [
    (["--random-calibration", "0"], "--random-calibration"), (["--random-calibration", "-2"], "--random-calibration"),
    (["--random-calibration", "4", "--batch-size", "0"], "--batch-size"),
])
def test_bad_counts(flags, match, tmp_path, tiny, capsys):
    _fails_cleanly([tiny, tmp_path / "o.onnx", "--passes", "pfa", "--quiet"] + flags, capsys, tmp_path, match=match)


def test_random_calibration_warns_and_runs(tmp_path, tiny, capsys):
    rc, out, err = _run([tiny, tmp_path / "o.onnx", "--passes", "pfa", "--random-calibration", "16",
                         "--report", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    assert "warning: using random calibration inputs" in err
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["samples"] == 3


def test_inspect_with_passes(tmp_path, tiny, capsys):
    rc, out, _ = _run(["--inspect", tiny, "--passes", "pfa"], capsys)
    assert rc == 0 and "pfa" in out and "foldbn" not in out
    _fails_cleanly(["--inspect", tiny, "--passes", "foldbn,nosuch"], capsys, tmp_path, match="unknown pass 'nosuch'")


def test_inspect_applies_set_options(tmp_path, capsys):
    rc, out, _ = _run(["--inspect", PLAIN, "--passes", "pq"], capsys)
    assert rc == 0 and "first conv stays dense" in out
    rc, out, _ = _run(["--inspect", PLAIN, "--passes", "pq", "--set", "pq.first_conv=true"], capsys)
    assert rc == 0 and "first conv stays dense" not in out
    _fails_cleanly(["--inspect", PLAIN, "--passes", "pq", "--set", "pq.nosuchkey=1"], capsys, tmp_path,
                   match="unknown option 'pq.nosuchkey'")
