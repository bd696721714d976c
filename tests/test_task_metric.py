"""The user's metric through the API and the CLI: values of the original and the result on the
validation feeds, max_drop as a gate, and the accuracy-controlled search of the smallest model
within the drop (digits MLP, pfa, real test accuracy)."""

import json
import os

import numpy as np
import pytest

from models import digits
from onnxshrink import CheckFailed, UsageError, ValidationFailed, cli, shrink

MLP = digits.model_path("mlp")
PLAIN = digits.model_path("cnn_plain")


def _calib():
    return np.load(digits.calib_path("mlp"))["input"]


def _write_accuracy_metric(folder):
    """A user metric with real labels: digits accuracy, labels looked up by the image's bytes
    (the same function serves the search's held-out part and the validation part)."""
    path = os.path.join(folder, "digits_metric.py")
    with open(path, "w") as f:
        f.write(
            "import numpy as np\n"
            "from sklearn.datasets import load_digits\n"
            "d = load_digits()\n"
            "LABELS = {(img / 16).astype(np.float32).reshape(-1).tobytes(): int(y) for img, y in zip(d.images, d.target)}\n"
            "def accuracy(outputs, feeds):\n"
            "    pred = np.concatenate([o['logits'].argmax(1) for o in outputs])\n"
            "    rows = np.concatenate([f['input'].reshape(len(f['input']), -1) for f in feeds])\n"
            "    labels = np.array([LABELS[r.astype(np.float32).tobytes()] for r in rows])\n"
            "    return float((pred == labels).mean())\n")
    return path


def test_search_finds_a_small_model_within_the_drop():
    """The whole training split (1347 images): the search scores each step on 216 held-out
    calibration samples, the validation on 270; with the 512 of ``_calib`` a step scores on 82,
    where one flipped label is a drop of 0.012 and 0 of 82 says little about a 1 % drop."""
    res = shrink(MLP, ["pfa"], calibration=digits.calibration("mlp", n=1347), metric="top1", max_drop=0.01)
    search = res.report["search"]
    assert search["budget"] == "flops" and search["metric"] == "top1"
    assert search["steps"] and search["chosen"] is not None
    # the chosen step: within the drop at the chosen fraction (the correction's candidate can share
    # its fraction with a failing bisection step: it keeps a unit whole there)
    at = [s for s in search["steps"] if s["fraction"] == search["chosen"] and s["within"]]
    assert at, search["steps"]
    chosen = min(at, key=lambda s: s["reached"])
    assert chosen["within"] and chosen["drop"] <= 0.01
    # no step that was within the drop reached a smaller model than the one chosen
    assert all(s["reached"] >= chosen["reached"] - 1e-9 for s in search["steps"] if s["within"])
    m = res.report["validation"]["metric"]
    assert m["name"] == "top1" and m["original"] == 1.0 and m["drop"] <= 0.01 and m["within"]
    assert res.report["ratios"]["flops"] < 0.5          # it did compress: the search was not idle
    # the held-out test set, seen neither by the search nor by validation
    assert digits.accuracy(MLP, "mlp") - digits.accuracy(res.model, "mlp") <= 0.015


def test_user_metric_from_a_file_with_a_target_reports_both_values(tmp_path):
    path = _write_accuracy_metric(str(tmp_path))
    res = shrink(MLP, ["pfa"], calibration=_calib(), target_params=0.5, metric=f"{path}:accuracy", max_drop=0.05)
    m = res.report["validation"]["metric"]
    assert m["name"].endswith("digits_metric.py:accuracy")
    assert 0.9 < m["original"] <= 1.0 and m["candidate"] > 0.85 and m["drop"] == pytest.approx(m["original"] - m["candidate"])
    assert "search" not in res.report                     # a target was given: no search


def test_a_drop_over_max_drop_fails_validation():
    with pytest.raises(ValidationFailed, match="metric 'top1' dropped"):
        shrink(PLAIN, ["pfa"], calibration=digits.calib_path("cnn_plain"), target_flops=0.03, metric="top1",
               max_drop=0.0)


def test_max_drop_needs_a_metric():
    with pytest.raises(UsageError, match="max_drop needs metric"):
        shrink(MLP, ["pfa"], calibration=_calib(), max_drop=0.01)


def test_cli_metric_and_max_drop(tmp_path, capsys):
    path = _write_accuracy_metric(str(tmp_path))
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    calib = tmp_path / "calib.npy"
    np.save(calib, _calib())
    rc = cli.main([MLP, str(out), "--passes", "pfa", "--calibration-data", str(calib), "--target-params", "0.5",
                   "--metric", f"{path}:accuracy", "--max-drop", "0.05", "--report", str(report), "--quiet"])
    assert rc == 0 and out.exists()
    m = json.loads(report.read_text())["validation"]["metric"]
    assert m["within"] is True and m["drop"] <= 0.05
    # an impossible drop: exit 1, no model written, the report says why
    out2 = tmp_path / "small2.onnx"
    rc = cli.main([PLAIN, str(out2), "--passes", "pfa", "--calibration-data", digits.calib_path("cnn_plain"),
                   "--target-flops", "0.03",
                   "--metric", "top1", "--max-drop", "0", "--report", str(report), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and not out2.exists() and "dropped" in err
    assert json.loads(report.read_text())["validation"]["metric"]["within"] is False
    # bad specs are usage errors (exit 2) before any work
    assert cli.main([MLP, str(out2), "--passes", "pfa", "--calibration-data", str(calib), "--metric", "nope"]) == 2
    assert cli.main([MLP, str(out2), "--passes", "pfa", "--calibration-data", str(calib), "--max-drop", "0.1"]) == 2
    assert not out2.exists()
    assert issubclass(ValidationFailed, CheckFailed)


@pytest.fixture
def logits_scaled():
    """A plug-in pass that scales the output layer's weights and bias by 1.5: every argmax is kept
    (top-1 drop 0) while the logits' relative L2 error is 0.5, over the default gate's 0.2."""
    import onnx
    from onnx import numpy_helper

    from onnxshrink import registry
    from onnxshrink.registry import Pass, PassReport, register

    class ScaleLogits(Pass):
        name = "plugin_scale_logits"

        def apply(self, model, cfg, ctx):
            model = onnx.ModelProto.FromString(model.SerializeToString())
            g = model.graph
            last = next(n for n in g.node if g.output[0].name in n.output)
            inits = {t.name: t for t in g.initializer}
            for name in last.input:
                if name in inits:
                    inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * 1.5, name))
            return model, PassReport(self.name)

    before = dict(registry._REGISTRY)
    register(ScaleLogits)
    yield ScaleLogits.name
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


def test_the_metric_with_max_drop_is_the_gate_unless_tolerances_are_given(logits_scaled):
    # without a metric: the default gate fails the scaled logits on their relative L2 error
    with pytest.raises(ValidationFailed) as e:
        shrink(MLP, [logits_scaled], calibration=_calib())
    v = e.value.result.report["validation"]
    assert v["gate"] == "default" and abs(v["outputs"]["logits"]["rel_l2"] - 0.5) < 1e-3
    assert any("relative L2" in q for q in v["problems"])
    # with the user's metric and max_drop, the metric judges: same top-1, passed; the outputs are reported
    res = shrink(MLP, [logits_scaled], calibration=_calib(), metric="top1", max_drop=0.01)
    v = res.report["validation"]
    assert v["gate"] == "metric" and v["passed"] and v["metric"]["drop"] == 0.0
    assert abs(v["outputs"]["logits"]["rel_l2"] - 0.5) < 1e-3
    # tolerances given explicitly still apply beside the metric
    with pytest.raises(ValidationFailed) as e:
        shrink(MLP, [logits_scaled], calibration=_calib(), metric="top1", max_drop=0.01, max_rel_l2=0.2)
    assert e.value.result.report["validation"]["gate"] == "given"


def test_cli_gate_follows_metric_and_max_drop(logits_scaled, tmp_path, capsys):
    out = str(tmp_path / "o.onnx")
    calib = str(tmp_path / "c.npy")
    np.save(calib, _calib())
    base = [MLP, out, "--passes", logits_scaled, "--calibration-data", calib, "--quiet"]
    assert cli.main(base) == 1 and not os.path.exists(out)
    assert cli.main(base + ["--metric", "top1", "--max-drop", "0.01", "--report", str(tmp_path / "r.json")]) == 0
    assert json.load(open(tmp_path / "r.json"))["validation"]["gate"] == "metric"
    os.remove(out)
    assert cli.main(base + ["--metric", "top1", "--max-drop", "0.01", "--gate", "default"]) == 1
    assert cli.main(base + ["--gate", "metric"]) == 2
    assert "--gate metric needs --metric and --max-drop" in capsys.readouterr().err


def _one_label(label=3):
    """Digits images the MLP labels ``label``, all of them: feeds on which a model that ignores its
    input keeps top-1 agreement at 1.0."""
    import onnxruntime as ort
    from sklearn.datasets import load_digits
    x = (load_digits().images / 16).astype(np.float32).reshape(-1, 64)
    pred = ort.InferenceSession(MLP, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].argmax(1)
    return x[pred == label]


def test_constant_outputs_and_the_blind_spot():
    from onnxshrink.metrics import blind_spot, constant_outputs, resolve
    rng = np.random.default_rng(0)
    ref = [{"y": rng.standard_normal((4, 3)).astype(np.float32)}, {"y": rng.standard_normal((2, 3)).astype(np.float32)}]
    const = constant_outputs(ref)
    mean = np.concatenate([r["y"] for r in ref]).mean(0)
    assert [c["y"].shape for c in const] == [(4, 3), (2, 3)]
    assert all(np.allclose(c["y"], mean, atol=1e-6) for c in const)
    top1 = resolve("top1")
    same = [{"y": np.tile([[0.0, 5.0, 1.0]], (4, 1)) + rng.normal(0, 0.1, (4, 3))} for _ in range(3)]
    assert blind_spot(top1, same, [{}] * 3, 0.01, "feeds") is not None        # one label: blind
    assert blind_spot(top1, ref, [{}] * 2, 0.01, "feeds") is None              # labels differ: it judges
    # a large drop allowed makes a metric blind on feeds where it would judge a small one
    mixed = [{"y": np.array([[1.0, 0, 0]] * 9 + [[0, 1.0, 0]])}]
    assert blind_spot(top1, mixed, [{}], 0.05, "feeds") is None and blind_spot(top1, mixed, [{}], 0.1, "feeds")


def test_a_search_on_feeds_of_one_label_is_refused():
    """max_drop without a target on calibration feeds that all hold one label: a model that ignores
    its input keeps top-1 agreement, so the search would prune to nothing; refused, one line."""
    from onnxshrink.errors import CalibrationError
    with pytest.raises(CalibrationError) as e:
        shrink(MLP, ["pfa"], calibration=_one_label(), metric="top1", max_drop=0.01)
    msg = str(e.value)
    assert "cannot judge" in msg and "constant" in msg and "\n" not in msg


def test_a_metric_gate_on_feeds_of_one_label_fails_validation():
    """With a target, the metric as the only judge on validation feeds of one label fails validation
    (it could not see a broken model); beside the default gate it is a note."""
    with pytest.raises(ValidationFailed) as e:
        shrink(MLP, ["pfa"], calibration=_calib(), validation=_one_label(), target_flops=0.5,
               metric="top1", max_drop=0.01)
    v = e.value.result.report["validation"]
    assert v["gate"] == "metric" and any("cannot judge on the validation feeds" in p for p in v["problems"])
    assert v["metric"]["drop"] <= 0.01 and v["metric"]["blind"]
    res = shrink(MLP, ["pfa"], calibration=_calib(), validation=_one_label(), target_flops=0.5,
                 metric="top1", max_drop=0.01, max_rel_l2=0.5)
    v = res.report["validation"]
    assert v["passed"] and any("cannot judge" in n for n in v["notes"])


def test_the_search_says_when_its_held_out_part_is_too_coarse_for_max_drop():
    """512 calibration images: the search scores on 82, where one flipped label is 0.012 > 0.01: the
    report's search says so, and a warning; on the 1347 training images (216 scored) it does not."""
    import warnings
    with pytest.warns(UserWarning, match="scores each step on 82 held-out"):
        res = shrink(MLP, ["pfa"], calibration=_calib(), metric="top1", max_drop=0.01, force=True)
    assert "0.0122" in res.report["search"]["resolution"] and "at least 100 samples" in res.report["search"]["resolution"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fine = shrink(MLP, ["pfa"], calibration=digits.calibration("mlp", n=1347), metric="top1", max_drop=0.01)
    assert "resolution" not in fine.report["search"]
