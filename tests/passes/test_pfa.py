"""pfa: recipes on known spectra, filter selection, and accuracy on the digits reference models."""

import numpy as np
import onnx
import pytest

from graphs import assert_close, conv_bn_net
from models import digits
from onnxshrink import shrink
from onnxshrink.cost import model_cost
from onnxshrink.errors import UsageError
from onnxshrink.passes.pfa import (kept_energy, kept_kl, pearson_removal_order, round_up, spectrum)
from onnxshrink.validate import Tolerances


def test_energy_and_kl_recipes_on_known_spectra():
    lam = spectrum(np.diag([8.0, 4.0, 2.0, 1.0, 1.0]))          # normalised: /16
    np.testing.assert_allclose(lam, [0.5, 0.25, 0.125, 0.0625, 0.0625])
    assert kept_energy(lam, 0.5) == 1
    assert kept_energy(lam, 0.8) == 3          # 0.5 + 0.25 + 0.125 = 0.875 ≥ 0.8 > 0.75
    assert kept_energy(lam, 0.9) == 4
    assert kept_energy(lam, 1.0) == 5
    # KL = Σ λ log(n λ); keep ceil(n (1 − KL / log n))
    assert kept_kl(np.array([0.25, 0.25, 0.25, 0.25])) == 4                # uniform: KL = 0
    assert kept_kl(np.array([0.5, 0.5, 0.0, 0.0])) == 2                     # KL = log 2 = ½ log 4
    assert kept_kl(np.array([1.0, 0.0, 0.0, 0.0])) == 1                     # KL = log n: one filter
    kl = 0.5 * np.log(5 * 0.5) + 0.25 * np.log(5 * 0.25) + 0.125 * np.log(5 * 0.125) + 2 * 0.0625 * np.log(5 * 0.0625)
    assert kept_kl(lam) == int(np.ceil(5 * (1 - kl / np.log(5))))
    assert round_up(3, 32, 8) == 8 and round_up(9, 12, 8) == 12 and round_up(5, 32, 1) == 5


def test_pearson_selection_removes_redundant_channels_first():
    rng = np.random.default_rng(0)
    a, b, c = rng.standard_normal((3, 2000))
    r = np.stack([a, b, a + 0.05 * c, 2 * b + 0.01 * c, c, np.full(2000, 3.0)], axis=1)
    order = pearson_removal_order(np.cov(r.T))
    assert order[0] == 5                                   # constant channel first
    # then one channel of each near-duplicate pair (0, 2) and (1, 3)
    nxt = set(order[1:3].tolist())
    assert len(nxt & {0, 2}) == 1 and len(nxt & {1, 3}) == 1
    assert 4 in order[-3:].tolist()                          # the independent channel is kept


def test_energy_one_leaves_model_unchanged(tiny_cnn):
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    res = shrink(tiny_cnn, ["pfa"], calibration=x, options={"pfa": {"energy": 1.0}}, force=True)
    assert res.report["passes"][0]["changed"] == []
    assert_close(tiny_cnn, res.model, {"input": x[:8]}, rtol=1e-6, atol=1e-6)


def test_small_cnn_prunes_and_reconstructs(tiny_cnn):
    x = np.random.default_rng(1).standard_normal((256, 3, 8, 8)).astype(np.float32)
    res = shrink(tiny_cnn, ["pfa"], calibration=x, options={"pfa": {"energy": 0.9, "channel_multiple": 2}},
                 tolerances=Tolerances(min_cosine=None), force=True)
    rep = res.report["passes"][0]
    assert rep["changed"], rep
    assert rep["mode"] == "energy"
    assert model_cost(res.model)["params"] < model_cost(tiny_cnn)["params"]
    assert any(s["reason"].startswith("channels reach graph output") for s in rep["skipped"])


def test_options_are_validated(tiny_cnn):
    x = np.zeros((8, 3, 8, 8), np.float32)
    with pytest.raises(UsageError):
        shrink(tiny_cnn, ["pfa"], calibration=x, options={"pfa": {"mode": "bogus"}})
    with pytest.raises(UsageError):
        shrink(tiny_cnn, ["pfa"], calibration=x, options={"pfa": {"energy": 1.5}})
    with pytest.raises(UsageError):
        shrink(tiny_cnn, ["pfa"], calibration=x, options={"pfa": {"mode": "budget"}})


def _run(name, **kw):
    kind = digits.MODELS[name]
    split = digits.load_split()
    calib = digits.to_model_input(split["x_train"][:512], kind)
    val = digits.to_model_input(split["x_train"][512:768], kind)
    original = onnx.load(digits.model_path(name))
    res = shrink(original, ["pfa"], calibration=calib, validation=val, tolerances=Tolerances(min_cosine=None),
                 force=True, **kw)
    shapes = {original.graph.input[0].name: calib.shape[1:]}
    before, after = model_cost(original, shapes), model_cost(res.model, shapes)
    lost = 100 * (digits.accuracy(original, kind) - digits.accuracy(res.model, kind))
    return res, before, after, lost


def test_cnn_plain_half_flops_keeps_accuracy():
    res, before, after, lost = _run("cnn_plain", target_flops=0.5)
    assert after["flops"] <= 0.5 * before["flops"] * 1.01
    assert lost <= 1.0
    rep = res.report["passes"][0]
    assert rep["mode"] == "budget" and all(r["kept"] % 8 == 0 for r in rep["recipe"])


def test_mlp_and_transformer_half_params_keep_accuracy():
    for name in ("mlp", "transformer"):
        res, before, after, lost = _run(name, target_params=0.5)
        assert after["params"] <= 0.5 * before["params"] * 1.01, name
        assert lost <= 1.0, name


def test_cnn_residual_kl_recipe_runs_and_keeps_accuracy():
    res, before, after, lost = _run("cnn_residual", options={"pfa": {"mode": "kl"}})
    rep = res.report["passes"][0]
    assert rep["mode"] == "kl" and rep["changed"]
    assert after["flops"] < before["flops"]
    assert lost <= 3.0
