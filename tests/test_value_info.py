"""Written models keep only the ``value_info`` the input declared: the shapes normalisation infers
and the types a re-exported graph writes for every tensor are not saved (runtimes infer them)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphs import assert_close, conv_bn_net, gemm_chain, run
from onnxshrink import shrink


def _names(model):
    return [vi.name for vi in model.graph.value_info]


def _relu_outputs(model):
    return [n.output[0] for n in model.graph.node if n.op_type == "Relu"]


@pytest.mark.parametrize("declare", [False, True])
def test_foldbn_output_keeps_only_declared_value_info(tmp_path, rng, declare):
    """conv_bn_net (Conv -> BN -> Relu twice, GAP, Gemm) through foldbn: the output declares
    nothing the input did not; a declared intermediate (the first Relu's output) stays declared;
    the file passes the full checker and runs as the input does; the input is untouched."""
    model = conv_bn_net(seed=3)
    if declare:
        name = _relu_outputs(model)[0]
        model.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 8, 8, 8]))
    before = model.SerializeToString()
    x = rng.standard_normal((24, 3, 8, 8)).astype(np.float32)
    res = shrink(model, ["foldbn"], x, quiet=True)
    assert model.SerializeToString() == before
    path = tmp_path / "o.onnx"
    res.save(str(path))
    out = onnx.load(str(path))
    assert len(_names(res.model)) == (1 if declare else 0)
    assert _names(out) == _names(res.model)
    if declare:
        assert _names(out) == [name] and name in _relu_outputs(out)
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    onnx.checker.check_model(out, full_check=True)
    assert_close(model, out, {"input": x[:4]})
    # the report's bytes are the written file's
    assert res.report["after"]["bytes"] == path.stat().st_size


def test_pq_output_declares_nothing_the_input_did_not(tmp_path, rng):
    """pq on a Gemm chain: no value_info in the output (the input has none), the decode's new
    tensors included; the checker accepts the file, the report's bytes are its size and it runs
    as the returned model does."""
    model = gemm_chain(4, [64, 128, 128, 10])
    assert not _names(model)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    res = shrink(model, ["pq"], x, quiet=True, force=True)
    assert res.report["passes"][0]["changed"]
    assert any(n.op_type == "Gather" for n in res.model.graph.node)
    path = tmp_path / "o.onnx"
    res.save(str(path))
    out = onnx.load(str(path))
    assert _names(out) == []
    onnx.checker.check_model(out, full_check=True)
    assert path.stat().st_size == res.model.ByteSize()
    assert res.report["after"]["bytes"] == path.stat().st_size
    np.testing.assert_array_equal(run(out, {"x": x[:8]})[0], run(res.model, {"x": x[:8]})[0])
