"""``--inspect``: a per-layer table (op, output shape, params, FLOPs share) and, per node, which
passes would rewrite it (from each built pass's ``plan``). With calibration data the table is at the
data's real input shapes (output shapes of the first feed; FLOPs per sample averaged over all feeds,
shapes static inference misses taken from running the data) and says which shapes were used."""

from __future__ import annotations

from .calibrate import ShapeObserver, load_data
from .cost import signature_costs
from .graph import normalize, observing
from .model_io import load_model
from .registry import all_passes, get_pass, make_config


def inspect_model(path, passes=None, options=None, calibration=None, image_options=None) -> str:
    """``options``: {pass: {key: value}} as ``--set`` gives them, applied to each pass's plan;
    ``calibration``: data (any form ``shrink`` takes) whose shapes the table is counted at."""
    model = normalize(load_model(path))
    if calibration is None:
        return _table(model, passes, options, None)
    data = load_data(calibration, model, image_options, "calibration data")
    try:
        with observing(ShapeObserver(data.representatives())):
            return _table(model, passes, options, data.signatures())
    finally:
        data.close()


def _table(model, passes, options, signatures) -> str:
    per = signature_costs(model, signatures or None)
    costs = per[0][0]
    weight = sum(w for _, w in per) or 1
    flops = {c.name: 0.0 for c in costs}
    for cs, w in per:
        for c in cs:
            flops[c.name] = flops.get(c.name, 0.0) + w * c.flops / weight
    total_flops = sum(flops.values()) or 1
    countable = all(c.flops_known for cs, _ in per for c in cs)
    names = [n.strip() for n in passes.split(",") if n.strip()] if passes else None
    chosen = [get_pass(n) for n in names] if names else [cls() for _, cls in sorted(all_passes().items())]
    applies, skips = {}, {}
    for p in chosen:
        name = p.name
        plan = p.plan(model, make_config(p, (options or {}).get(p.name, {})))
        for node in plan.nodes:
            applies.setdefault(node, []).append(name)
        for s in plan.skipped:
            skips.setdefault(s.node, []).append(f"{name}: {s.reason}")
    lines = [f"{'node':32} {'op':20} {'output shape':18} {'params':>10} {'flops%':>7}  passes"]
    for c in costs:
        if c.op in ("Constant", "Identity", "Shape", "Reshape", "Flatten", "Transpose") and not c.params:
            continue
        shape = "x".join(str(d) for d in c.out_shape) if c.out_shape else "?"
        name = c.name if len(c.name) <= 32 else "…" + c.name[-31:]
        lines.append(f"{name:32} {c.op[:20]:20} {shape[:18]:18} {c.params:>10} "
                     f"{100 * flops[c.name] / total_flops:>6.1f}%  {','.join(applies.get(c.name, [])) or '-'}")
        for s in skips.get(c.name, []):
            lines.append(f"{'':32}   skip {s}")
    total = f"{round(sum(flops.values()))} FLOPs per sample" if countable else "FLOPs not countable (shapes unknown)"
    lines.append(f"total: {sum(c.params for c in costs)} params, {total}, {model.ByteSize()} bytes")
    shapes = dict(signatures[0]["inputs"]) if signatures else None
    lines.extend(reach_lines(model, chosen, options, shapes))
    if signatures:
        used = "; ".join(", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in sig["inputs"].items())
                         + f" ({sig['samples']} sample{'s' if sig['samples'] != 1 else ''})" for sig in signatures)
        lines.append(f"shapes (calibration data; output shapes of the first): {used}")
    return "\n".join(lines)


def _pct(v):
    return "?" if v is None else f"{100 * v:.1f}%"


def _frac(v):
    return "?" if v is None else f"{v:.3f}"


def floors(model, metrics, shapes, exclude=()) -> dict:
    """{metric: {pass name: the lowest fraction of it the pass alone could leave}} for the built
    passes outside ``exclude`` that can search a budget of ``metric`` (their ``reach`` at default
    options; a pass whose reach fails is left out): which other passes could meet a target."""
    out = {m: {} for m in metrics}
    for name, cls in sorted(all_passes().items()):
        p = cls()
        wanted = [m for m in metrics if m in getattr(p, "budgets", ())]
        if name in exclude or not wanted or not hasattr(p, "reach"):
            continue
        try:
            floor = p.reach(model, make_config(p, {}), shapes)["floor"]
        except Exception:   # never let the message of another failure break
            continue
        for m in wanted:
            if floor.get(m) is not None:
                out[m][name] = floor[m]
    return out


def reach_lines(model, chosen, options, shapes) -> list:
    """Per budget-capable pass: the share of the model's params and FLOPs it can act on, and the
    lowest fraction of each it alone could leave (so a user sees whether a target is reachable)."""
    rows = []
    for p in chosen:
        if not hasattr(p, "reach"):
            continue
        try:
            r = p.reach(model, make_config(p, (options or {}).get(p.name, {})), shapes)
        except Exception as e:  # never let the summary break the table
            rows.append(f"  {p.name:10} reach unknown ({type(e).__name__}: {e})")
            continue
        a, f = r["acts_on"], r["floor"]
        rows.append(f"  {p.name:10} acts on {_pct(a['params']):>6} of params, {_pct(a['flops']):>6} of FLOPs; "
                    f"alone it could leave params {_frac(f['params'])}, FLOPs {_frac(f['flops'])} of the original")
    if not rows:
        return []
    return ["reach (a --target-params/--target-flops below a pass's floor cannot be met by it):"] + rows
