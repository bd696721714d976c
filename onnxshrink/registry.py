"""Pass registry and the pass interface.

A pass is small and declarative::

    @register
    class FoldBN(Pass):
        name = "foldbn"
        summary = "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm"
        Config = FoldBNConfig           # a dataclass; --set foldbn.KEY=VALUE fills it
        def plan(self, model, cfg) -> Plan             # what it would touch, skips with reasons
        def apply(self, model, cfg, ctx) -> (model, PassReport)

``needs_data`` passes get calibration data through ``ctx``; ``budgets`` names the metrics
("flops", "params", "bytes") whose target the pass can search its own knob for. A skip is a
value with a reason (``Skip(node, reason)``), never an exception. The registry refuses duplicate
names.
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
    targets: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


@dataclass
class PassReport:
    name: str
    changed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def skip(self, node, reason):
        self.skipped.append(Skip(getattr(node, "name", node), reason))

    def as_dict(self):
        d = {"name": self.name, "changed": list(self.changed),
             "skipped": [s.as_dict() for s in self.skipped]}
        d.update(self.details)
        return d


@dataclass
class NoConfig:
    pass


class Pass:
    name = ""
    summary = ""
    Config = NoConfig
    needs_data = False
    budgets: tuple = ()
    ready = True

    def plan(self, model, cfg) -> Plan:
        return Plan()

    def apply(self, model, cfg, ctx):
        raise NotImplementedError


_REGISTRY: dict[str, type] = {}


def register(cls):
    if not cls.name:
        raise ValueError(f"pass class {cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a pass named '{cls.name}' is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin():
    from . import passes  # noqa: F401  (registers the built-in passes)


def all_passes() -> dict:
    _load_builtin()
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
