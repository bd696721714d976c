"""Task metrics: built-ins score the original as perfect and a damaged candidate lower; user
metrics load from a file or a module; bad specs are one-line usage errors."""

import numpy as np
import pytest

from onnxshrink.errors import UsageError
from onnxshrink.metrics import check_max_drop, resolve


def _outs(rng, n_feeds=3, rows=5, classes=4):
    return [{"scores": rng.standard_normal((rows, classes)), "emb": rng.standard_normal((rows, 8))}
            for _ in range(n_feeds)]


def test_builtins_score_the_original_as_perfect(rng):
    ref = _outs(rng)
    for name, perfect in (("top1", 1.0), ("cosine", 1.0), ("rel_l2", 0.0), ("mse", 0.0)):
        orig, cand = resolve(name).values(ref, ref, [{}] * 3)
        assert orig == pytest.approx(perfect) and cand == pytest.approx(perfect)


def test_top1_counts_flipped_labels(rng):
    ref = _outs(rng)
    new = [{k: v.copy() for k, v in o.items()} for o in ref]
    # swap the best and worst class of 3 of the 15 samples
    for f, r in ((0, 0), (1, 2), (2, 4)):
        s = new[f]["scores"][r]
        s[[s.argmax(), s.argmin()]] = s[[s.argmin(), s.argmax()]]
    orig, cand = resolve("top1").values(ref, new, [{}] * 3)
    assert orig == 1.0
    assert cand == pytest.approx(12 / 15)


def test_cosine_is_the_worst_sample(rng):
    ref = _outs(rng)
    new = [{k: v.copy() for k, v in o.items()} for o in ref]
    new[1]["emb"][3] = -new[1]["emb"][3]      # one sample reversed: cosine -1
    _, cand = resolve("cosine").values(ref, new, [{}] * 3)
    assert cand == pytest.approx(-1.0)


def test_rel_l2_and_mse(rng):
    ref = _outs(rng)
    new = [{k: v * 1.1 for k, v in o.items()} for o in ref]
    _, r = resolve("rel_l2").values(ref, new, [{}] * 3)
    assert r == pytest.approx(-0.1)
    _, m = resolve("mse").values(ref, new, [{}] * 3)
    worst = max(np.mean([((0.1 * o[k]) ** 2).mean() for o in ref]) for k in ("scores", "emb"))
    assert m == pytest.approx(-worst)


def test_top1_without_score_outputs_says_so(rng):
    ref = [{"y": rng.standard_normal((4, 1))}]
    with pytest.raises(UsageError, match="scores"):
        resolve("top1").values(ref, ref, [{}])


def test_user_metric_from_a_file(tmp_path, rng):
    path = tmp_path / "my_metric.py"
    path.write_text("import numpy as np\n"
                    "def accuracy(outputs, feeds):\n"
                    "    labels = np.concatenate([f['labels'] for f in feeds])\n"
                    "    pred = np.concatenate([o['scores'].argmax(1) for o in outputs])\n"
                    "    return float((pred == labels).mean())\n")
    ref = _outs(rng)
    feeds = [{"labels": o["scores"].argmax(1)} for o in ref]
    new = [{"scores": -o["scores"], "emb": o["emb"]} for o in ref]
    m = resolve(f"{path}:accuracy")
    orig, cand = m.values(ref, new, feeds)
    assert orig == 1.0 and cand < 0.5
    assert m.name.endswith("my_metric.py:accuracy")


def test_user_metric_from_a_module_and_a_callable(rng):
    ref = _outs(rng)
    m = resolve("math:fsum")          # a module function that is not a metric: its error is one line
    with pytest.raises(UsageError, match="metric 'math:fsum' raised"):
        m.values(ref, ref, [{}])
    c = resolve(lambda outs, feeds: 0.5)
    assert c.values(ref, ref, [{}]) == (0.5, 0.5)


@pytest.mark.parametrize("spec, match", [
    ("nope", "unknown metric 'nope'"),
    ("missing_file.py:f", "does not exist"),
    ("no_such_module_xyz:f", "cannot import module"),
    ("math:no_such_function", "has no function"),
    (3, "metric must be"),
])
def test_bad_metric_specs(spec, match):
    with pytest.raises(UsageError, match=match):
        resolve(spec)


def test_metric_must_return_a_finite_number(rng):
    ref = _outs(rng)
    with pytest.raises(UsageError, match="finite"):
        resolve(lambda o, f: float("nan")).values(ref, ref, [{}])
    with pytest.raises(UsageError, match="number"):
        resolve(lambda o, f: "good").values(ref, ref, [{}])


@pytest.mark.parametrize("value", ["x", -0.1, float("nan"), float("inf")])
def test_bad_max_drop(value):
    with pytest.raises(UsageError, match="max-drop"):
        check_max_drop(value)
