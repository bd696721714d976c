"""``shrink``'s grouped arguments (data, targets, checks, run) against the flat short form, and the
budget object: goals per pass, the tolerance in ``Goal.met``, the verdict."""

import math

import numpy as np
import pytest

from onnxshrink import Data, Run, TargetError, Targets, Tolerances, UsageError, shrink
from onnxshrink.arguments import FLAT, grouped
from onnxshrink.budget import TOLERANCE, Budget, Goal
from onnxshrink.registry import get_pass


def _feeds(n=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def _same(a, b):
    assert a.model.SerializeToString() == b.model.SerializeToString()
    for key in ("before", "after", "targets"):
        assert a.report[key] == b.report[key], key
    assert a.report["validation"]["outputs"] == b.report["validation"]["outputs"]


def test_grouped_and_flat_give_the_same_result(tiny_cnn):
    x, v = _feeds(), _feeds(6, seed=1)
    flat = shrink(tiny_cnn, ["foldbn", "pfa"], x, validation=v, target_params=0.7, min_cosine=0.5,
                  max_error=None, seed=3, options={"pfa": {"channel_multiple": 1}}, force=True)
    grouped_ = shrink(tiny_cnn, ["foldbn", "pfa"], data=Data(calibration=x, validation=v),
                      targets=Targets(params=0.7), checks=Tolerances(min_cosine=0.5),
                      run=Run(seed=3, options={"pfa": {"channel_multiple": 1}}, force=True))
    _same(flat, grouped_)
    assert flat.report["targets"]["params"]["reached"] <= 0.7 * (1 + TOLERANCE)
    # groups and flat keywords of other groups mix
    mixed = shrink(tiny_cnn, ["foldbn", "pfa"], x, validation=v, targets=Targets(params=0.7), min_cosine=0.5,
                   run=Run(seed=3, options={"pfa": {"channel_multiple": 1}}, force=True))
    _same(flat, mixed)


def test_a_group_is_given_one_way(tiny_cnn):
    x = _feeds()
    with pytest.raises(UsageError, match="give either data= or calibration="):
        shrink(tiny_cnn, ["foldbn"], x, data=Data(validation=x))
    with pytest.raises(UsageError, match="give either checks= or min_cosine="):
        shrink(tiny_cnn, ["foldbn"], x, checks=Tolerances(), min_cosine=0.5)
    with pytest.raises(UsageError, match="give either run= or seed="):
        shrink(tiny_cnn, ["foldbn"], x, run=Run(), seed=1)
    with pytest.raises(UsageError, match="give either tolerances= or min_cosine="):
        shrink(tiny_cnn, ["foldbn"], x, tolerances=Tolerances(), min_cosine=0.5)
    with pytest.raises(UsageError, match=r"give checks= \(tolerances= is its older name\)"):
        shrink(tiny_cnn, ["foldbn"], x, tolerances=Tolerances(), checks=Tolerances())
    with pytest.raises(UsageError, match=r"give target_size= \(target_bytes= is its older name\)"):
        shrink(tiny_cnn, ["pq"], x, target_bytes=0.5, target_size=0.5)
    with pytest.raises(UsageError, match="targets= must be an onnxshrink.Targets, got dict"):
        shrink(tiny_cnn, ["foldbn"], x, targets={"flops": 0.5})
    with pytest.raises(TypeError, match="unexpected keyword argument 'min_cosin'"):
        shrink(tiny_cnn, ["foldbn"], x, min_cosin=0.5)
    with pytest.raises(UsageError, match=r"target_flops must be in \(0, 1\]"):   # named as the CLI maps it
        shrink(tiny_cnn, ["pfa"], x, targets=Targets(flops=2))


def test_every_flat_keyword_fills_one_field():
    groups = grouped({}, {k: f"v-{k}" for k in FLAT if FLAT[k][0] != "checks"})
    for k, (g, field) in FLAT.items():
        if g != "checks":
            assert getattr(groups[g], field) == f"v-{k}", k
    assert grouped({}, {"target_bytes": 0.3})["targets"].size == 0.3
    # the older spellings given as None are not given (as before the groups)
    g = grouped({"checks": Tolerances(min_cosine=0.5)}, {"target_bytes": None, "target_size": 0.4, "tolerances": None})
    assert g["targets"].size == 0.4 and g["checks"].min_cosine == 0.5
    assert grouped({}, {})["checks"] == Tolerances()


def test_goal_met_applies_its_tolerance_in_one_place():
    aim = Goal("flops", 100.0)              # a pass's goal: exact
    assert aim.met(100.0) and not aim.met(100.0 + 1e-9) and not hasattr(aim, "target")
    verdict = Goal("flops", 0.5, tolerance=TOLERANCE)
    assert verdict.met(0.5 * (1 + TOLERANCE)) and not verdict.met(0.5 * (1 + TOLERANCE) + 1e-9)
    assert aim.overshot(100 * (1 - TOLERANCE) - 1e-9) and not aim.overshot(100 * (1 - TOLERANCE))


def test_budget_splits_the_target_over_the_capable_passes():
    chain = [get_pass(n) for n in ("foldbn", "pfa", "lowrank", "pq")]
    budget = Budget.of({"flops": 0.25, "bytes": 0.5}, chain).at({"flops": 1000.0, "params": 50.0, "bytes": 400.0})
    assert budget.goals(0, {"flops": 1000.0, "params": 50, "bytes": 400}) == {}      # foldbn searches nothing
    g1 = budget.goals(1, {"flops": 1000.0, "params": 50, "bytes": 400})
    assert list(g1) == ["flops"] and math.isclose(g1["flops"].limit, 1000 * 0.25 ** 0.5)   # 2 flops passes left
    assert g1["flops"].final == 250.0 and g1["flops"].fraction == 0.25 and g1["flops"].tolerance == 0
    g2 = budget.goals(2, {"flops": 600.0, "params": 40, "bytes": 300})
    assert g2["flops"].limit == 250.0                                                 # the last aims at the end
    assert budget.goals(3, {"flops": 240.0, "params": 40, "bytes": 300})["bytes"].limit == 200.0
    reached, err = budget.verdict({"flops": 260.0, "params": 40, "bytes": 210.0})
    assert reached["flops"]["met"] and reached["bytes"]["met"] and err is None        # within 5 %
    reached, err = budget.verdict({"flops": 300.0, "params": 40, "bytes": 210.0})
    assert not reached["flops"]["met"] and isinstance(err, TargetError) and "flops 0.300" in str(err)
    with pytest.raises(UsageError, match="target_size needs a pass that can search a bytes budget; none of foldbn,pfa"):
        Budget.of({"bytes": 0.5}, chain[:2])
