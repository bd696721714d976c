"""The arguments of ``shrink``, grouped: which data, what to reach, which checks, how to run::

    shrink("m.onnx", ["pfa"], data=Data(calibration="calib.npz"), targets=Targets(flops=0.5),
           checks=Tolerances(min_cosine=0.95), run=Run(seed=1))

The flat keywords (``calibration=``, ``target_flops=``, ``min_cosine=``, ``force=``, ...) are the
short form of the same arguments, and the CLI's flags are named after them; ``FLAT`` says which
field of which group each one fills. A group is given either as its object or by its flat
keywords, not both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UsageError
from .validate import Tolerances


@dataclass
class Data:
    """Where the samples come from. ``calibration``/``validation``: a .npz/.npy path, a folder of
    .npz feeds or images, an array, a {input: array} dict, or an iterable of feeds (validation:
    default, the last 20 % of the calibration feeds); ``image_options``: for an image folder
    (image_size, mean, std, layout, channel_order, scale, max_side, size_multiple); ``random``: N
    random inputs as calibration data (warns); ``base_dir``: where a model given as bytes or a
    ModelProto finds its external data."""

    calibration: object = None
    validation: object = None
    image_options: dict | None = None
    random: int | None = None
    base_dir: object = None


@dataclass
class Targets:
    """What the chain must reach: cost fractions of the original model (0 < f ≤ 1) for ``flops``,
    ``params`` and ``size`` (bytes), and a task ``metric`` (a built-in name, "file.py:function",
    "module:function" or a callable) with the largest ``max_drop`` allowed (without a cost
    fraction: the budget is searched for the smallest model within the drop)."""

    flops: float | None = None
    params: float | None = None
    size: float | None = None
    metric: object = None
    max_drop: float | None = None


@dataclass
class Run:
    """How to run: ``force`` returns (and the CLI writes) a result that failed a check;
    ``quiet`` hides progress bars; ``batch_size`` of calibration runs; ``seed`` of every random
    choice; ``options``: {pass: {key: value}} for the passes' Config (``--set PASS.KEY=VALUE``);
    ``threads``: workers for independent solves during fitting (None: the usable cores; the model
    written does not depend on it, see ``parallel``); ``keep``: node names or shell-style patterns
    (``fnmatch``: ``/decoder/*``) whose nodes every pass leaves as they are (``--keep``)."""

    force: bool = False
    quiet: bool = True
    batch_size: int = 64
    seed: int = 0
    options: dict | None = None
    threads: int | None = None
    keep: tuple | list | str | None = None


GROUPS = {"data": Data, "targets": Targets, "checks": Tolerances, "run": Run}

# flat keyword -> (group, field)
FLAT = {
    "calibration": ("data", "calibration"), "validation": ("data", "validation"),
    "image_options": ("data", "image_options"), "random_calibration": ("data", "random"),
    "base_dir": ("data", "base_dir"),
    "target_flops": ("targets", "flops"), "target_params": ("targets", "params"),
    "target_size": ("targets", "size"), "metric": ("targets", "metric"), "max_drop": ("targets", "max_drop"),
    **{f.name: ("checks", f.name) for f in dataclasses.fields(Tolerances)},
    "force": ("run", "force"), "quiet": ("run", "quiet"), "batch_size": ("run", "batch_size"),
    "seed": ("run", "seed"), "options": ("run", "options"),
    "threads": ("run", "threads"), "keep": ("run", "keep"),
}
OLDER = {"target_bytes": "target_size", "tolerances": "checks"}   # older spellings


def grouped(groups: dict, flat: dict, caller: str = "shrink") -> dict:
    """{group name: group object} from the group objects given (None: not given) and the flat
    keywords; every group is filled (defaults where nothing was given). Raises TypeError for an
    unknown keyword, UsageError for a group given both ways or an object of the wrong type."""
    flat = dict(flat)
    for old, new in OLDER.items():
        if old not in flat or flat[old] is None:   # an older spelling given as None: not given
            flat.pop(old, None)
            continue
        if new == "checks":
            if groups.get("checks") is not None:
                raise UsageError("give checks= (tolerances= is its older name), not both")
            _check_type("tolerances", flat[old], Tolerances)
            given = [k for k in flat if FLAT.get(k, ("",))[0] == "checks"]
            if given:
                raise UsageError(f"give either tolerances= or {', '.join(k + '=' for k in given)} not both")
            groups = dict(groups, checks=flat.pop(old))
            continue
        if new in flat:
            raise UsageError(f"give {new}= ({old}= is its older name), not both")
        flat[new] = flat.pop(old)
    out = {}
    for name, cls in GROUPS.items():
        keys = {k: field for k, (g, field) in FLAT.items() if g == name and k in flat}
        obj = groups.get(name)
        if obj is not None:
            _check_type(name, obj, cls)
            if keys:
                raise UsageError(f"give either {name}= or {', '.join(k + '=' for k in keys)} not both")
            if cls is Tolerances:
                Tolerances.__post_init__(obj)   # fields may have been set after construction
            out[name] = obj
        else:
            out[name] = cls(**{field: flat[k] for k, field in keys.items()})
    unknown = [k for k in flat if k not in FLAT]
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument '{unknown[0]}'")
    return out


def _check_type(name, obj, cls):
    if not isinstance(obj, cls):
        raise UsageError(f"{name}= must be an onnxshrink.{cls.__name__}, got {type(obj).__name__}")
