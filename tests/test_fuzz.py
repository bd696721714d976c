"""Byte-level fuzzing of the model file: mutants of a valid model (flipped, overwritten, inserted,
deleted bytes, truncations, spliced chunks), seeded. For each, the CLI either succeeds and writes
a model that passes the checker and loads in ONNX Runtime, or fails cleanly: exit code 1 or 2,
one ``onnxshrink: error:`` line, no traceback, no "internal error", nothing in the output folder
(no partial file, no temporary file), the input file untouched. Output is captured at the file-
descriptor level, so messages ONNX Runtime prints itself count too.
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import conv_bn_net

from onnxshrink import cli

N_MUTANTS = 300


def structural_offsets(model: onnx.ModelProto, data: bytes) -> np.ndarray:
    """Byte offsets outside the weights' raw data (names, types, dims, attributes, opsets),
    where a mutation changes the model's structure rather than a weight value."""
    mask = np.ones(len(data), bool)
    for t in model.graph.initializer:
        i = data.find(t.raw_data)
        if t.raw_data and i >= 0:
            mask[i:i + len(t.raw_data)] = False
    return np.flatnonzero(mask)


def mutate(data: bytes, rng, where=None) -> bytes:
    """One random edit; positions drawn from ``where`` (default: anywhere)."""
    b = bytearray(data)
    kind = rng.integers(6)
    n = int(rng.integers(1, 9))

    def pos():
        p = int(rng.choice(where)) if where is not None and len(where) else int(rng.integers(len(b)))
        return min(p, len(b) - 1)
    if kind == 0:  # flip bits
        for _ in range(n):
            b[pos()] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # overwrite bytes with random values
        for _ in range(n):
            b[pos()] = int(rng.integers(256))
    elif kind == 2:  # insert random bytes
        i = pos()
        b[i:i] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif kind == 3:  # delete a run of bytes
        i = pos()
        del b[i:i + n]
    elif kind == 4:  # truncate
        b = b[:max(1, pos())]
    else:  # duplicate a chunk somewhere else (splices fields)
        i, j = sorted(int(v) for v in rng.integers(0, len(b), 2))
        k = pos()
        b[k:k] = b[i:min(j, i + 64)]
    return bytes(b)


@pytest.fixture(scope="module")
def valid_model():
    m = conv_bn_net(seed=3, c=4)
    data = m.SerializeToString()
    return data, structural_offsets(m, data)


def test_fuzzed_models_fail_cleanly_or_succeed(tmp_path, capfd, valid_model):
    valid_model_bytes, structural = valid_model
    rng = np.random.default_rng(2024)
    outcomes = {"ok": 0, "refused": 0}
    messages = set()
    for k in range(N_MUTANTS):
        # most edits hit the structure (weights are most of the bytes but least of the risk)
        data = mutate(valid_model_bytes, rng, structural if rng.random() < 0.8 else None)
        if rng.random() < 0.3:  # a second edit for some
            data = mutate(data, rng)
        case = tmp_path / f"m{k}"
        (case / "out").mkdir(parents=True)
        src = case / "in.onnx"
        src.write_bytes(data)
        out = case / "out" / "o.onnx"
        rc = cli.main([str(src), str(out), "--passes", "foldbn", "--quiet"])
        stdout, err = capfd.readouterr()
        assert src.read_bytes() == data, f"mutant {k}: input modified"
        assert "Traceback" not in err + stdout, f"mutant {k}: {err}"
        assert "internal error" not in err, f"mutant {k}: {err}"
        if rc == 0:
            assert os.listdir(case / "out") == ["o.onnx"], f"mutant {k}: stray files"
            m = onnx.load(str(out))
            onnx.checker.check_model(m, full_check=True)
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            outcomes["ok"] += 1
        else:
            assert rc in (1, 2), f"mutant {k}: exit code {rc}: {err}"
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("onnxshrink: error:"), f"mutant {k}: {err}"
            assert os.listdir(case / "out") == [], f"mutant {k}: wrote {os.listdir(case / 'out')}"
            messages.add(lines[0].split(":")[2].strip()[:40])
            outcomes["refused"] += 1
    # the mutants exercise both outcomes (weight-byte mutations still give valid models)
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0, outcomes
    assert len(messages) > 1, messages
