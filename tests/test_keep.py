"""``keep``: nodes the user names (or matches by pattern) stay as they are in every pass."""

import fnmatch
import json

import numpy as np
import onnx
import pytest
from graphs import conv_bn_net
from test_cli import PLAIN, PLAIN_CALIB, _fails_cleanly, _run

from onnxshrink import UsageError, shrink
from onnxshrink.graph import import_graph
from onnxshrink.layers import WeightLayer


def _weights(model):
    """{node name: (weight, bias or None)} of the Conv/Gemm/MatMul nodes with a constant weight."""
    g = import_graph(model)
    out = {}
    for n in g.nodes:
        layer = WeightLayer.of(n, g)
        if isinstance(layer, WeightLayer):
            out[n.name] = (layer.matrix(), layer.bias())
    return out


def _same(a, b):
    return a[0].shape == b[0].shape and np.array_equal(a[0], b[0]) and (
        (a[1] is None and b[1] is None) or np.array_equal(a[1], b[1]))


def test_pfa_leaves_a_kept_conv_and_the_group_feeding_it_whole():
    """cnn_plain at 0.7 of the FLOPs with its second Conv kept: that Conv keeps its weights (its
    input channels too: the first Conv's group is pinned, as the report says), the FLOPs target is
    still met by the other groups."""
    kept = "/features/features.3/Conv"
    res = shrink(PLAIN, ["pfa"], calibration=PLAIN_CALIB, target_flops=0.7, keep=[kept])
    before, after = _weights(onnx.load(PLAIN)), _weights(res.model)
    assert _same(before[kept], after[kept])
    assert res.report["keep"] == [kept] and res.report["targets"]["flops"]["met"]
    skipped = {s["node"]: s["reason"] for s in res.report["passes"][0]["skipped"]}
    assert "keep '/features/features.3/Conv'" in skipped[kept]
    assert skipped["/features/features.0/Conv"].startswith(f"its channels pass through {kept}")
    changed = [n for n in before if not _same(before[n], after[n])]
    assert len(changed) >= 3 and kept not in changed


def test_pfa_leaves_the_channels_of_a_kept_batchnorm():
    """A kept BatchNormalization between two Convs: the group whose channels it scales is not pruned,
    so the BN's parameters are as they were."""
    bn = "/features/features.18/BatchNormalization"
    res = shrink(PLAIN, ["pfa"], calibration=PLAIN_CALIB, target_flops=0.7, keep=bn)
    node = lambda m: next(n for n in m.graph.node if n.name == bn)   # noqa: E731
    inits = lambda m: {t.name: t for t in m.graph.initializer}   # noqa: E731
    orig = onnx.load(PLAIN)
    for a, b in zip(node(orig).input[1:], node(res.model).input[1:]):
        assert np.array_equal(onnx.numpy_helper.to_array(inits(orig)[a]), onnx.numpy_helper.to_array(inits(res.model)[b]))
    skipped = {s["node"]: s["reason"] for s in res.report["passes"][0]["skipped"]}
    assert skipped["/features/features.17/Conv"].startswith(f"its channels pass through {bn}")


def test_a_pattern_keeps_every_match_in_pq():
    """A shell-style pattern: every Conv of the classifier's last block stays float in pq."""
    res = shrink(PLAIN, ["pq"], calibration=PLAIN_CALIB, keep=["/features/features.2[0-9]/*"],
                 options={"pq": {"iters": 1, "refine": 0, "kmeans_iters": 2}})
    names = [n.name for n in onnx.load(PLAIN).graph.node if fnmatch.fnmatchcase(n.name, "/features/features.2[0-9]/*")]
    assert res.report["keep"] == sorted(names) and len(names) >= 3
    before, after = _weights(onnx.load(PLAIN)), _weights(res.model)
    for n in names:
        if n in before:
            assert _same(before[n], after[n]), n
    assert res.report["after"]["bytes"] < 0.9 * res.report["before"]["bytes"]   # the rest is quantized
    assert "/features/features.17/Conv" in res.report["passes"][0]["changed"]


def test_foldbn_keeps_a_kept_batchnorm():
    model = conv_bn_net()
    bns = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    res = shrink(model, ["foldbn"], random_calibration=8, keep=[bns[0]], force=True)
    left = [n.name for n in res.model.graph.node if n.op_type == "BatchNormalization"]
    assert left == [bns[0]]


def test_a_pattern_that_names_no_node_is_refused():
    with pytest.raises(UsageError, match="keep '/nowhere/\\*' names no node"):
        shrink(PLAIN, ["pfa"], calibration=PLAIN_CALIB, target_flops=0.7, keep="/nowhere/*")
    with pytest.raises(UsageError, match="keep expects node names"):
        shrink(PLAIN, ["pfa"], calibration=PLAIN_CALIB, target_flops=0.7, keep=[3])


def test_cli_keep(tmp_path, capsys):
    out, rep = tmp_path / "out.onnx", tmp_path / "rep.json"
    rc, _, err = _run([PLAIN, out, "--passes", "pfa", "--calibration-data", PLAIN_CALIB, "--target-flops", "0.7",
                       "--keep", "/features/features.3/Conv", "--keep", "/fc/*", "--report", rep], capsys)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    assert "/features/features.3/Conv" in report["keep"] and len(report["keep"]) >= 2
    _fails_cleanly([PLAIN, tmp_path / "o2.onnx", "--passes", "pfa", "--calibration-data", PLAIN_CALIB,
                    "--target-flops", "0.7", "--keep", "/nowhere"], capsys, tmp_path, match="names no node")


@pytest.mark.parametrize("pass_name,target", [("basisconv", {"target_flops": 0.8}), ("lowrank", {"options": {"lowrank": {"conv": True}}, "target_flops": 0.8})])
def test_the_factorisations_leave_a_kept_conv(pass_name, target):
    kept = "/features/features.20/Conv"
    res = shrink(PLAIN, [pass_name], calibration=PLAIN_CALIB, keep=kept, force=True, **target)
    rep = res.report["passes"][0]
    assert kept not in rep["changed"] and rep["changed"], rep["changed"]
    assert any(s["node"] == kept and "keep" in s["reason"] for s in rep["skipped"])
    assert _same(_weights(onnx.load(PLAIN))[kept], _weights(res.model)[kept])
