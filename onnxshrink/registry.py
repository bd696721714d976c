"""Pass registry and the pass interface.

A pass is small and declarative::

    class FoldBN(Pass):
        name = "foldbn"
        summary = "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm"
        Config = FoldBNConfig           # a dataclass; --set foldbn.KEY=VALUE fills it
        requires = Requires()           # what the pipeline checks before apply: data, opsets
        budgets = ()                    # metrics ("flops", "params", "bytes") it can search a goal for
        def plan(self, model, cfg) -> Plan             # which nodes it would touch, skips with reasons
        def apply(self, model, cfg, ctx) -> (model, PassReport)

The built-in passes are listed in ``passes/__init__.py``; a third-party pass registers itself
with ``@register``. The registry refuses a second class under a name already taken. A skip is a
value with a reason (``Skip(node, reason)``), never an exception.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from .errors import UsageError


@dataclass
class Skip:
    node: str
    reason: str

    def as_dict(self):
        return {"node": self.node, "reason": self.reason}


@dataclass
class Plan:
    """What a pass would do to a model: ``nodes`` it would rewrite and ``skipped`` ones with their
    reasons."""

    nodes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


@dataclass
class Unit:
    """One thing a pass changed and could have left whole: a layer, or a coupling group of layers.
    ``nodes``: the node names whose protection (``PassContext.protected``) keeps it whole;
    ``amount``: the share of it the pass removed (channels, rank, bytes), 0..1."""

    label: str
    nodes: tuple
    amount: float


@dataclass
class PassReport:
    name: str
    changed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    units: list = field(default_factory=list)   # [Unit] it changed (the accuracy search's handles; not in the JSON)

    def skip(self, node, reason):
        self.skipped.append(Skip(getattr(node, "name", node), reason))

    def unit(self, label, nodes, amount):
        """Record a changed unit (see ``Unit``)."""
        self.units.append(Unit(str(label), tuple(nodes), float(amount)))

    def as_dict(self):
        d = {"name": self.name, "changed": list(self.changed),
             "skipped": [s.as_dict() for s in self.skipped]}
        d.update(self.details)
        return d


@dataclass
class NoConfig:
    pass


@dataclass(frozen=True)
class Requires:
    """What a pass needs before it can run; the pipeline checks it before ``apply`` and names the
    pass when it is not there. ``data``: calibration data (``ctx.data``, ``ctx.collect``);
    ``opsets``: (lowest, highest) opset of the default ONNX domain the pass rewrites (None: any the
    pipeline accepts; a bound of None: open)."""

    data: bool = False
    opsets: tuple | None = None

    def problem(self, pass_name, *, has_data: bool | None = None, model_opset: int | None = None) -> str | None:
        """Why the pass cannot run (one line naming it), or None; an argument left None is not
        checked."""
        if self.data and has_data is False:
            return (f"pass '{pass_name}' needs calibration data: give calibration= "
                    "(or random_calibration=N to use random inputs)")
        if self.opsets is not None and model_opset is not None:
            lo, hi = self.opsets
            if (lo is not None and model_opset < lo) or (hi is not None and model_opset > hi):
                span = f"{lo if lo is not None else ''}-{hi if hi is not None else ''}"
                return (f"pass '{pass_name}' rewrites opsets {span} of the default ONNX domain; the model "
                        f"uses opset {model_opset} (convert it first, e.g. onnx.version_converter)")
        return None


class Pass:
    name = ""
    summary = ""
    Config = NoConfig
    requires = Requires()
    needs_data = False      # older spelling of requires.data, kept in step with it
    budgets: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "requires" in own:
            if "needs_data" in own and bool(own["needs_data"]) != own["requires"].data:
                raise TypeError(f"pass class {cls.__name__}: needs_data and requires.data disagree")
            cls.needs_data = own["requires"].data
        elif "needs_data" in own:   # a pass written before requires: the same requirement
            cls.requires = dataclasses.replace(cls.requires, data=bool(own["needs_data"]))

    def plan(self, model, cfg) -> Plan:
        return Plan()

    def apply(self, model, cfg, ctx):
        raise NotImplementedError


_REGISTRY: dict[str, type] = {}


def register(cls):
    """Add a pass class to the registry (a decorator; returns the class)."""
    if not cls.name:
        raise ValueError(f"pass class {cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a pass named '{cls.name}' is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def all_passes() -> dict:
    """{name: pass class}: the built-in passes (``onnxshrink.passes``) and those registered since."""
    return dict(_REGISTRY)


def get_pass(name: str) -> Pass:
    passes = all_passes()
    if name not in passes:
        raise UsageError(f"unknown pass '{name}'; available: {', '.join(sorted(passes))}")
    return passes[name]()


# ----------------------------------------------------------------------------- options
def _coerce(value, typ, where):
    origin = typing.get_origin(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "types.UnionType"):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("none", "null", ""):
            return None
        typ = args[0]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{where}: expected true/false, got '{value}'")
    if typ in (int, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected {typ.__name__}, got '{value}'") from None
        if typ is int:
            if not number.is_integer():
                raise UsageError(f"{where}: expected an integer, got '{value}'")
            return int(number)
        return number
    if typ is str:
        return str(value)
    return value


def make_config(p: Pass, values: dict):
    """Build the pass's Config dataclass from a {key: value} dict (strings allowed); unknown keys
    and out-of-range values raise UsageError naming the pass and key."""
    cls = p.Config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise UsageError(f"unknown option '{p.name}.{key}' (options of {p.name}: {known})")
        kwargs[key] = _coerce(value, hints.get(key, str), f"{p.name}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(f"bad option for pass '{p.name}': {e}") from None
