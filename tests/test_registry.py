"""The registry and what a pass declares: the explicit list of built-in passes, ``requires``
checked by the pipeline before ``apply`` (naming the pass), and the older ``needs_data`` spelling.

The third-party passes below are registered for one test each and removed after it."""

import numpy as np
import pytest

import onnxshrink
import onnxshrink.passes as builtin
from onnxshrink import UsageError, shrink
from onnxshrink import registry
from onnxshrink.pipeline import PassContext
from onnxshrink.registry import Pass, PassReport, Plan, Requires, all_passes, get_pass, register


@pytest.fixture
def registered():
    """register(cls) for the test; the registry is restored after it."""
    before = dict(registry._REGISTRY)
    yield register
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


def _feeds(n=8):
    return np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)


def test_the_builtin_passes_are_the_explicit_list():
    names = [cls.name for cls in builtin.BUILTIN]
    assert names == ["foldbn", "pfa", "basisconv", "lowrank", "hadamard", "pq"]
    assert sorted(all_passes()) == sorted(names)
    assert not hasattr(registry, "_load_builtin")   # no import back from the registry into passes
    assert {n: type(get_pass(n)) for n in names} == {cls.name: cls for cls in builtin.BUILTIN}


def test_builtin_requires():
    assert not get_pass("foldbn").requires.data
    for name in ("pfa", "basisconv", "lowrank", "hadamard", "pq"):
        assert get_pass(name).requires.data, name
        assert get_pass(name).needs_data, name   # the older spelling agrees


def test_register_refuses_a_second_class_under_a_name(registered):
    class A(Pass):
        name = "plugin_a"

    class B(Pass):
        name = "plugin_a"

    assert registered(A) is A and registered(A) is A      # the same class again: fine
    with pytest.raises(ValueError, match="already registered"):
        registered(B)


def test_needs_data_is_an_alias_of_requires_data():
    class Old(Pass):
        name = "old"
        needs_data = True

    class New(Pass):
        name = "new"
        requires = Requires(data=True, opsets=(13, None))

    class Child(New):
        pass

    assert Old.requires == Requires(data=True) and New.needs_data and Child.needs_data
    assert Child.requires.opsets == (13, None) and not Pass.requires.data and not Pass.needs_data
    with pytest.raises(TypeError, match="disagree"):
        class Both(Pass):   # noqa: F841
            name = "both"
            needs_data = False
            requires = Requires(data=True)


class _Counting(Pass):
    """Counts its apply calls; changes nothing."""
    calls = 0

    def apply(self, model, cfg, ctx):
        type(self).calls += 1
        return model, PassReport(self.name)


def test_missing_data_is_refused_before_apply_naming_the_pass(registered, tiny_cnn):
    @registered
    class NeedsData(_Counting):
        name = "plugin_needs_data"
        requires = Requires(data=True)

    with pytest.raises(UsageError, match=r"pass 'plugin_needs_data' needs calibration data: give calibration="):
        shrink(tiny_cnn, ["foldbn", "plugin_needs_data"])
    assert NeedsData.calls == 0
    # with data it runs, once
    shrink(tiny_cnn, ["plugin_needs_data"], calibration=_feeds())
    assert NeedsData.calls == 1


@pytest.mark.parametrize("opsets,ok", [((11, None), True), ((None, 12), False), ((18, 21), False),
                                       ((17, 17), True)])
def test_opsets_are_checked_before_apply_naming_the_pass(registered, tiny_cnn, opsets, ok):
    assert onnxshrink.graph.opset(tiny_cnn) == 17

    @registered
    class Picky(_Counting):
        name = "plugin_picky"
        requires = Requires(opsets=opsets)

    if ok:
        shrink(tiny_cnn, ["plugin_picky"], calibration=_feeds())
        assert Picky.calls == 1
        return
    with pytest.raises(UsageError, match=r"pass 'plugin_picky' rewrites opsets .* the model uses opset 17"):
        shrink(tiny_cnn, ["foldbn", "plugin_picky"], calibration=_feeds())
    assert Picky.calls == 0


def test_collect_without_data_names_the_pass(tiny_cnn):
    ctx = PassContext(None, tiny_cnn, tiny_cnn, pass_name="mypass")
    with pytest.raises(UsageError, match="pass 'mypass' needs calibration data"):
        ctx.collect([])
    with pytest.raises(UsageError, match="pass 'other' needs"):   # the older call with a name
        ctx.require_data("other")


def test_plan_lists_nodes_and_skips():
    p = Plan(nodes=["a"])
    p.nodes.append("b")
    assert p.nodes == ["a", "b"] and Plan().nodes == [] and Plan().skipped == []
    with pytest.raises(TypeError):
        Plan(targets=["b"])   # the older name is gone: "target" means the user's fraction only
