"""Reliability of the CLI/API/save path: what is written (and never written), exit codes, and the
messages of the failure paths. Each case runs through ``cli.main`` or a real subprocess."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, conv_bn_net
from onnx import TensorProto, helper

import onnxshrink
from onnxshrink import cli, model_io


def _files(folder):
    return sorted(os.listdir(folder))


@pytest.fixture
def env(tmp_path, rng):
    """in/tiny.onnx + in/calib.npy, an empty out/ folder."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    model = tmp_path / "in" / "tiny.onnx"
    onnx.save(conv_bn_net(), str(model))
    calib = tmp_path / "in" / "calib.npy"
    np.save(calib, rng.standard_normal((20, 3, 8, 8)).astype(np.float32))

    class Env:
        root, inp, out_dir = tmp_path, tmp_path / "in", tmp_path / "out"

        def argv(self, *extra, model=model, out=None, passes="foldbn"):
            out = out if out is not None else self.out_dir / "o.onnx"
            return [str(a) for a in [model, out, "--passes", passes, "--calibration-data", calib, *extra]]
    e = Env()
    e.model, e.calib = model, calib
    return e


def _main(argv, capfd):
    rc = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- 1: never the input
@pytest.mark.parametrize("force", [False, True])
def test_report_on_the_input_or_out_is_refused_before_any_work(env, capfd, force):
    before = env.model.read_bytes()
    sym, hard = env.inp / "sym.onnx", env.inp / "hard.onnx"
    sym.symlink_to(env.model)
    os.link(env.model, hard)
    out = env.out_dir / "o.onnx"
    flags = ["--force"] if force else []
    for report, match in ((env.model, "input"), (sym, "input"), (hard, "input"), (out, "output path")):
        rc, _, err = _main(env.argv("--report", report, *flags), capfd)
        assert rc == 2, err
        assert match in err and err.count("\n") == 1, err
        assert env.model.read_bytes() == before
        assert _files(env.out_dir) == []                    # refused before any work: nothing written
    # OUT a hard link or symlink to IN without --force: refused, the input untouched
    for out in (hard, sym):
        rc, _, err = _main(env.argv(out=out), capfd)
        assert rc == 2 and "input" in err, err
        assert env.model.read_bytes() == before


def test_out_or_report_on_a_data_file_is_refused(env, capfd):
    before = env.calib.read_bytes()
    rc, _, err = _main(env.argv("--report", env.calib), capfd)
    assert rc == 2 and "data file" in err, err
    assert env.calib.read_bytes() == before


# ----------------------------------------------------------------------------- 2: checked first, published together
def test_report_folder_missing_fails_before_the_run(env, capfd, monkeypatch):
    from onnxshrink import pipeline
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the run started"))
    rc, _, err = _main(env.argv("--report", env.out_dir / "nodir" / "r.json"), capfd)
    assert rc == 2 and "report directory" in err and "does not exist" in err, err
    assert _files(env.out_dir) == []


def test_a_failed_report_write_leaves_neither_file(env, capfd, monkeypatch):
    out, rep = env.out_dir / "o.onnx", env.out_dir / "r.json"
    out.write_bytes(b"previous model")
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith("r.json"):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real(src, dst, *a, **k)
    monkeypatch.setattr(model_io.os, "replace", replace)
    rc, _, err = _main(env.argv("--report", rep, "--quiet"), capfd)
    assert rc == 2 and "r.json: Input/output error" in err and "internal error" not in err, err
    assert out.read_bytes() == b"previous model"            # the model published first was rolled back
    assert _files(env.out_dir) == ["o.onnx"]                # no report, no temporary files
    monkeypatch.setattr(model_io.os, "replace", real)
    rc, _, err = _main(env.argv("--report", rep, "--quiet"), capfd)
    assert rc == 0, err
    assert _files(env.out_dir) == ["o.onnx", "r.json"]
    onnx.checker.check_model(onnx.load(str(out)))
    assert json.loads(rep.read_text())["validation"]["passed"] is True


# ----------------------------------------------------------------------------- 3: finite tolerances
@pytest.mark.parametrize("flag,value", [("--min-cosine", "nan"), ("--max-error", "inf"), ("--max-rel-l2", "-inf"),
                                        ("--min-top1", "nan")])
def test_non_finite_tolerance_is_a_usage_error(env, capfd, flag, value):
    rc, _, err = _main(env.argv(f"{flag}={value}"), capfd)
    assert rc == 2 and flag in err and "finite" in err and err.count("\n") == 1, err
    assert _files(env.out_dir) == []


def test_non_finite_tolerance_through_the_api():
    with pytest.raises(onnxshrink.UsageError, match="min_cosine must be a finite number"):
        onnxshrink.Tolerances(min_cosine=float("nan"))
    with pytest.raises(onnxshrink.UsageError, match="max_error"):
        onnxshrink.shrink(conv_bn_net(), "foldbn", max_error=float("inf"))
    tol = onnxshrink.Tolerances()
    tol.min_cosine = float("nan")                           # set after construction: checked by shrink
    with pytest.raises(onnxshrink.UsageError, match="min_cosine"):
        onnxshrink.shrink(conv_bn_net(), "foldbn", tolerances=tol)


# ----------------------------------------------------------------------------- 4: the input's own contrib ops
def _contrib_net():
    """input -> Conv -> BN -> com.microsoft::Gelu -> y (ONNX Runtime runs it; the onnx checker
    cannot infer the output shape of a contrib op)."""
    b = GraphBuilder(0)
    x = b.input("input", ["batch", 3, 8, 8])
    h = b.bn(b.conv(x, 3, 4), 4)
    b.nodes.append(helper.make_node("Gelu", [h], ["y"], name="gelu", domain="com.microsoft"))
    b.output("y", None)
    g = helper.make_graph(b.nodes, "g", b.inputs, b.outputs, b.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


def test_contrib_ops_of_the_input_do_not_fail_the_run(env, capfd):
    path = env.inp / "contrib.onnx"
    onnx.save(_contrib_net(), str(path))
    rep = env.out_dir / "r.json"
    rc, _, err = _main(env.argv("--report", rep, "--quiet", model=path), capfd)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    assert report["input"]["nonstandard_ops"] == ["com.microsoft::Gelu"]
    assert report["validation"]["passed"] is True and report["validation"]["problems"] == []
    changed = report["passes"][0]["changed"]
    assert len(changed) == 1 and changed[0].startswith("batchnormalization")
    assert report["validation"]["outputs"]["y"]["cosine"] > 0.9999


def _quantized_net():
    """input -> Conv -> BN -> Flatten -> DynamicQuantizeLinear -> MatMulInteger -> Cast -> y"""
    b = GraphBuilder(0)
    x = b.input("input", ["batch", 3, 4, 4])
    h = b.node("Flatten", [b.bn(b.conv(x, 3, 2), 2)], axis=1)
    q, scale, zp = b.node("DynamicQuantizeLinear", [h], n_out=3)
    w = b.const(np.random.default_rng(0).integers(0, 255, (32, 5)).astype(np.uint8), "wq")
    wzp = b.const(np.array(128, np.uint8), "wzp")
    acc = b.node("MatMulInteger", [q, w, zp, wzp])
    b.node("Cast", [acc], out="y", to=TensorProto.FLOAT)
    b.output("y", ["batch", 5])
    return b.model()


def test_quantized_layers_are_skipped_with_a_reason(tmp_path, capfd, rng):
    path, out, rep = tmp_path / "q.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    model = _quantized_net()
    onnx.save(model, str(path))
    qnodes = [n.name for n in model.graph.node if n.op_type == "MatMulInteger"]
    np.save(tmp_path / "c.npy", rng.standard_normal((20, 3, 4, 4)).astype(np.float32))
    rc, _, err = _main([path, out, "--passes", "foldbn", "--calibration-data", tmp_path / "c.npy", "--report", rep,
                        "--min-cosine", "0", "--quiet"], capfd)
    assert rc == 0, err
    skipped = json.loads(rep.read_text())["passes"][0]["skipped"]
    assert [s["node"] for s in skipped if "quantized layer (MatMulInteger" in s["reason"]] == qnodes


# ----------------------------------------------------------------------------- 5: long names, stale temps
def test_a_250_character_output_name_works(env, capfd):
    out = env.out_dir / ("m" * 245 + ".onnx")
    rep = env.out_dir / ("r" * 245 + ".json")
    rc, _, err = _main(env.argv("--report", rep, "--quiet", out=out), capfd)
    assert rc == 0, err
    assert _files(env.out_dir) == sorted([out.name, rep.name])
    onnx.checker.check_model(onnx.load(str(out)))


def test_too_long_output_name_is_refused_up_front(env, capfd, monkeypatch):
    from onnxshrink import pipeline
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the run started"))
    rc, _, err = _main(env.argv(out=env.out_dir / ("m" * 300 + ".onnx")), capfd)
    assert rc == 2 and "output file name" in err and "too long (305 bytes" in err, err


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(env, capfd):
    stale = env.out_dir / f".onnxshrink-{_dead_pid()}-0123abcd.tmp"
    stale.write_bytes(b"x" * 100)
    alive = env.out_dir / f".onnxshrink-{os.getppid()}-0123abcd.tmp"   # a live process's: kept
    alive.write_bytes(b"y")
    rc, _, err = _main(env.argv("--quiet"), capfd)
    assert rc == 0, err
    assert _files(env.out_dir) == sorted([alive.name, "o.onnx"])


_KILL_DURING_SAVE = """
import os, signal, sys
from onnxshrink import cli, model_io
real = model_io.Staging.publish
def publish(self):
    os.kill(os.getpid(), signal.SIGKILL)     # killed between writing the temporary files and renaming
model_io.Staging.publish = publish
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkill_during_save_leaves_temps_the_next_run_removes(env):
    argv = env.argv("--quiet", "--report", env.out_dir / "r.json")
    p = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9
    left = _files(env.out_dir)
    assert len(left) == 2 and all(n.startswith(".onnxshrink-") and n.endswith(".tmp") for n in left), left
    p = subprocess.run([sys.executable, "-m", "onnxshrink.cli", *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert _files(env.out_dir) == ["o.onnx", "r.json"]


# ----------------------------------------------------------------------------- 6: supported opsets
def test_opset_below_the_supported_range_is_refused_up_front(env, capfd):
    m = conv_bn_net()
    m.opset_import[0].version = 7
    path = env.inp / "old.onnx"
    onnx.save(m, str(path))
    rc, _, err = _main(env.argv(model=path), capfd)
    assert rc == 2 and "opset 7" in err and "11-21" in err and err.count("\n") == 1, err
    assert _files(env.out_dir) == []


# ----------------------------------------------------------------------------- 7: external data of a ModelProto
def test_model_proto_without_its_external_data_needs_base_dir(tmp_path, monkeypatch, rng):
    folder = tmp_path / "m"
    folder.mkdir()
    model_io.save_model(conv_bn_net(), str(folder / "ext.onnx"), external=True)
    proto = onnx.load(str(folder / "ext.onnx"), load_external_data=False)
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    monkeypatch.chdir(folder)     # its data file is in the working folder: still not resolved there
    with pytest.raises(onnxshrink.UsageError, match="base_dir="):
        onnxshrink.shrink(proto, "foldbn", calibration=x)
    res = onnxshrink.shrink(proto, "foldbn", calibration=x, base_dir=str(folder))
    assert res.report["model"] == "<ModelProto>" and len(res.report["passes"][0]["changed"]) == 2
    with pytest.raises(onnxshrink.InputError, match="not found"):   # checked like a path's folder
        onnxshrink.shrink(proto, "foldbn", calibration=x, base_dir=str(tmp_path))


# ----------------------------------------------------------------------------- 8: OS errors
def test_no_space_left_is_one_line_with_the_path(env, capfd, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(model_io.os, "fsync", fsync)
    rc, _, err = _main(env.argv("--quiet"), capfd)
    assert rc == 2, err
    assert err.strip() == f"onnxshrink: error: {env.out_dir / 'o.onnx'}: No space left on device"
    assert _files(env.out_dir) == []


# ----------------------------------------------------------------------------- 9: --force, --quiet, exit 3
def test_force_quiet_failed_validation_writes_and_exits_3(env, capfd):
    out = env.out_dir / "o.onnx"
    rc, stdout, err = _main(env.argv("--max-error", "0", "--force", "--quiet"), capfd)
    assert rc == 3 and out.exists()
    assert stdout == ""
    assert "validation failed" in err and "written anyway because of --force" in err and err.count("\n") == 1, err


def test_missed_target_exits_1_and_3_with_force(env, capfd):
    argv = env.argv("--target-flops", "0.01", "--quiet", "--set", "pfa.channel_multiple=1", passes="pfa")
    rc, _, err = _main(argv, capfd)
    assert rc == 1 and "target cannot be met" in err and "--force writes it anyway" in err, err
    assert _files(env.out_dir) == []
    rc, _, err = _main(argv + ["--force"], capfd)
    assert rc == 3 and "target cannot be met" in err and _files(env.out_dir) == ["o.onnx"], err


def test_quiet_still_prints_warnings(env, capfd):
    rc, stdout, err = _main([env.model, env.out_dir / "o.onnx", "--passes", "foldbn", "--random-calibration", "8",
                             "--quiet"], capfd)
    assert rc == 0 and stdout == ""
    assert "warning: using random calibration inputs" in err


# ----------------------------------------------------------------------------- 10: --help, --version, pipes
def test_help_lists_every_exit_code_and_version(capfd):
    rc, out, _ = _main(["--help"], capfd)
    assert rc == 0
    codes = out[out.index("exit codes:"):]
    for code in ("0", "1", "2", "3", "130", "141", "143"):
        assert f"  {code} " in codes or f", {code} " in codes, code
    rc, out, _ = _main(["--version"], capfd)
    assert rc == 0 and out.strip() == f"onnxshrink {onnxshrink.__version__}"


def test_closed_stdout_exits_quietly(env):
    p = subprocess.Popen([sys.executable, "-m", "onnxshrink.cli", "--inspect", str(env.model)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                           # like `| head -1` having read its line
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    p.stderr.close()
    assert err == "" and p.returncode == 141


# ----------------------------------------------------------------------------- 11: a run that changes nothing
def test_a_run_that_changes_nothing_copies_the_input_bytes(env, capfd):
    b = GraphBuilder(0)
    x = b.input("input", ["batch", 3, 8, 8])
    h = b.conv(x, 3, 4)
    b.nodes.append(helper.make_node("Relu", [h], ["y"]))   # unnamed: a re-serialised model would differ
    b.output("y", ["batch", 4, 8, 8])
    path = env.inp / "nobn.onnx"
    onnx.save(b.model(), str(path))
    out = env.out_dir / "o.onnx"
    rc, _, err = _main(env.argv("--quiet", "--report", env.out_dir / "r.json", model=path), capfd)
    assert rc == 0, err
    assert out.read_bytes() == path.read_bytes()
    assert "nothing changed (foldbn: no layer it rewrites)" in err
    report = json.loads((env.out_dir / "r.json").read_text())
    assert report["unchanged"] is True and report["nothing_changed"] == ["foldbn: no layer it rewrites"]


# ----------------------------------------------------------------------------- 12: the report names the model
def test_report_records_the_input_path(env, capfd):
    rc, _, err = _main(env.argv("--quiet", "--report", env.out_dir / "r.json"), capfd)
    assert rc == 0, err
    assert json.loads((env.out_dir / "r.json").read_text())["model"] == str(env.model)


# ----------------------------------------------------------------------------- 13: API/CLI parity
def test_api_arguments_mirror_the_flags(rng):
    x = rng.standard_normal((20, 3, 8, 8)).astype(np.float32)
    with pytest.raises(onnxshrink.ValidationFailed) as info:
        onnxshrink.shrink(conv_bn_net(), "foldbn", calibration=x, max_error=0.0)
    msg = str(info.value)
    assert "force=True" in msg and "--" not in msg
    assert info.value.result is not None and info.value.result.passed is False
    res = onnxshrink.shrink(conv_bn_net(), "foldbn", calibration=x, max_error=0.0, force=True)
    assert res.passed is False and res.report["check_failed"].startswith("validation failed")
    res = onnxshrink.shrink(conv_bn_net(), "foldbn", calibration=x, min_cosine=0.999, max_rel_l2=1e-3, min_top1=1.0)
    assert res.passed is True
    with pytest.raises(onnxshrink.UsageError, match="target_size must be in"):
        onnxshrink.shrink(conv_bn_net(), "pq", calibration=x, target_size=2)
    with pytest.raises(onnxshrink.UsageError, match="target_bytes"):
        onnxshrink.shrink(conv_bn_net(), "pq", calibration=x, target_size=0.5, target_bytes=0.5)
    with pytest.raises(onnxshrink.UsageError, match="not both"):
        onnxshrink.shrink(conv_bn_net(), "foldbn", tolerances=onnxshrink.Tolerances(), min_cosine=0.5)
    for name in ("ValidationFailed", "TargetError", "UsageError", "InputError", "CalibrationError", "PassError",
                 "OutputError", "OnnxShrinkError"):
        assert issubclass(getattr(onnxshrink, name), onnxshrink.OnnxShrinkError)


def test_cli_rephrases_api_arguments_as_flags():
    assert cli.cli_message("target_flops must be in (0, 1]; force=True writes it") == \
        "--target-flops must be in (0, 1]; --force writes it"
    assert cli.cli_message("give calibration= (or random_calibration=N to use random inputs)") == \
        "give --calibration-data PATH (or --random-calibration N to use random inputs)"


def test_work_folders_of_killed_processes_are_removed():
    import tempfile
    dead = tempfile.mkdtemp(prefix=f"onnxshrink-{_dead_pid()}-")
    live = tempfile.mkdtemp(prefix=f"onnxshrink-{os.getppid()}-")
    try:
        model_io._remove_stale_work_dirs()
        assert not os.path.exists(dead) and os.path.isdir(live)
    finally:
        os.rmdir(live)
