"""``--inspect``: a per-layer table (op, output shape, params, FLOPs share) and, per node, which
passes would rewrite it (from each built pass's ``plan``)."""

from __future__ import annotations

from .cost import node_costs
from .graph import normalize
from .model_io import load_model
from .registry import all_passes, get_pass, make_config


def inspect_model(path, passes=None, options=None) -> str:
    """``options``: {pass: {key: value}} as ``--set`` gives them, applied to each pass's plan."""
    model = normalize(load_model(path))
    costs = node_costs(model)
    total_flops = sum(c.flops for c in costs) or 1
    names = [n.strip() for n in passes.split(",") if n.strip()] if passes else None
    chosen = [get_pass(n) for n in names] if names else [cls() for _, cls in sorted(all_passes().items())]
    applies, skips = {}, {}
    for p in chosen:
        if not p.ready:
            continue
        name = p.name
        plan = p.plan(model, make_config(p, (options or {}).get(p.name, {})))
        for t in plan.targets:
            applies.setdefault(t, []).append(name)
        for s in plan.skipped:
            skips.setdefault(s.node, []).append(f"{name}: {s.reason}")
    lines = [f"{'node':32} {'op':20} {'output shape':18} {'params':>10} {'flops%':>7}  passes"]
    for c in costs:
        if c.op in ("Constant", "Identity", "Shape", "Reshape", "Flatten", "Transpose") and not c.params:
            continue
        shape = "x".join(str(d) for d in c.out_shape) if c.out_shape else "?"
        name = c.name if len(c.name) <= 32 else "…" + c.name[-31:]
        lines.append(f"{name:32} {c.op[:20]:20} {shape[:18]:18} {c.params:>10} "
                     f"{100 * c.flops / total_flops:>6.1f}%  {','.join(applies.get(c.name, [])) or '-'}")
        for s in skips.get(c.name, []):
            lines.append(f"{'':32}   skip {s}")
    lines.append(f"total: {sum(c.params for c in costs)} params, {sum(c.flops for c in costs)} FLOPs per sample, "
                 f"{model.ByteSize()} bytes")
    return "\n".join(lines)
