"""The report: one dict (also written as JSON) and a short console table.

Keys: {"model": the input path or "<ModelProto>", "input": {nonstandard_ops, problems}, "before":
{params, flops, bytes}, "after": {...}, "passes": [{name, changed, skipped:
[{node, reason}], ...}], "validation": {outputs: {NAME: {max_abs, rel_l2, cosine,
top1_agreement}}, passed}, "targets": {...}, "timing": {...}}.
"""

from __future__ import annotations

import json
import math


def make_report(before, after, passes, validation, targets=None, timing=None, model=None):
    return {
        "model": model,
        "before": dict(before),
        "after": dict(after),
        "ratios": {k: (after[k] / before[k] if before[k] and after.get(k) is not None else None) for k in before},
        "passes": [p.as_dict() if hasattr(p, "as_dict") else p for p in passes],
        "targets": targets or {},
        "validation": validation,
        "timing": timing or {},
    }


def _clean(o):
    """JSON-safe: numpy scalars and arrays become Python values, NaN and ±inf become strings."""
    if hasattr(o, "tolist"):  # numpy scalars and arrays
        o = o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def to_json(report) -> str:
    return json.dumps(_clean(report), indent=2, allow_nan=False)


def _human(n):
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def console_table(report) -> str:
    b, a = report["before"], report["after"]
    lines = [f"{'':8}{'before':>12}{'after':>12}{'ratio':>9}"]
    for k in ("params", "flops", "bytes"):
        if b[k] is None or a[k] is None:   # FLOPs not countable at unknown shapes
            lines.append(f"{k:8}{'?' if b[k] is None else _human(b[k]):>12}{'?' if a[k] is None else _human(a[k]):>12}")
            continue
        ratio = a[k] / b[k] if b[k] else float("nan")
        lines.append(f"{k:8}{_human(b[k]):>12}{_human(a[k]):>12}{ratio:>9.3f}")
    shapes = report.get("cost_shapes") or []
    if shapes:
        text = "; ".join(", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in sig["inputs"].items())
                         for sig in shapes[:3])
        lines.append(f"FLOPs per sample at the data's {len(shapes)} input shape(s): {text}"
                     + (f"; ... {len(shapes) - 3} more" if len(shapes) > 3 else ""))
    for p in report["passes"]:
        lines.append(f"pass {p['name']}: {len(p['changed'])} changed, {len(p['skipped'])} skipped")
        for s in p["skipped"][:5]:
            lines.append(f"  skipped {s['node']}: {s['reason']}")
        if len(p["skipped"]) > 5:
            lines.append(f"  ... {len(p['skipped']) - 5} more skipped (see --report)")
    sr = report.get("search")
    if sr:
        for st in sr["steps"]:
            kept = f" [{st.get('kind')}, kept whole: {', '.join(st['protected'])}]" if st.get("protected") else ""
            lines.append(f"search {sr['budget']} {st['fraction']:.3f}: reached {st['reached']:.3f}, "
                         f"{sr['metric']} {st['metric']:.4g} (drop {st['drop']:.4g})" + ("" if st["within"] else ", over")
                         + kept)
        corr = sr.get("correction") or {}
        for p in corr.get("protected") or []:
            lines.append(f"search kept {p['unit']} whole: {p['reason']}")
        if corr.get("note"):
            lines.append(f"search correction: {corr['note']}")
        lines.append(f"search chose {sr['budget']} {sr['chosen']}" if sr.get("chosen") is not None
                     else "search: " + sr.get("problem", "nothing within the drop"))
    v = report.get("validation") or {}
    for name, m in (v.get("outputs") or {}).items():
        t1 = m.get("top1_agreement")
        iou = m.get("decision_iou")
        lines.append(f"output {name}: max_abs {m['max_abs']:.4g}, rel_l2 {m['rel_l2']:.4g}, "
                     f"cosine {m['cosine']:.5f}" + (f", top1 agreement {t1:.4f}" if t1 is not None else "")
                     + (f", decision IoU {iou:.4f}" if iou is not None else ""))
    if v.get("tensorrt_unparseable"):
        lines.append("warning: the rewrite introduced ops TensorRT's ONNX parser does not accept: "
                     + ", ".join(v["tensorrt_unparseable"]))
    if v:
        worst = [f"{name} cosine {m['worst']['cosine']:.4f} at " + (f"feed {m['worst']['feed']}" if m['worst'].get('feed')
                 is not None else f"sample {m['worst']['sample']}") for name, m in (v.get("outputs") or {}).items()
                 if isinstance(m.get("worst"), dict)]
        if worst:
            lines.append("worst: " + "; ".join(worst))
        for note in v.get("notes") or []:
            lines.append(f"note: {note}")
        t = v.get("metric")
        if t:
            lines.append(f"metric {t['name']}: original {t['original']:.4g}, result {t['candidate']:.4g}, "
                         f"drop {t['drop']:.4g}" + (f" (max_drop {t['max_drop']})" if t.get("max_drop") is not None else ""))
        feeds = f" in {v['feeds']} feeds" if v.get("feeds") else ""
        lines.append(f"validation on {v.get('samples', 0)} held-out samples{feeds}: "
                     + ("passed" if v.get("passed") else "FAILED: " + "; ".join(v.get("problems", []))))
    return "\n".join(lines)
