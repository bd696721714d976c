"""pfa bench: the issue's acceptance cases, and a peer at the same FLOPs.

Peer: onnxsim 0.8.1 ``apply_structured_pruning`` (L2-magnitude filter pruning) followed by its
``apply_pruning_finetune`` (ridge refit of surviving layers), given the same 512 calibration
images. Its ``sparsity`` is searched (bisection) until the pruned model's FLOPs match the pfa row's
FLOPs. The peer expects BatchNormalization already fused, so it gets the model after our exact
``foldbn`` pass. onnxsim is a bench-only dependency (pip install 'onnxshrink[bench]').
"""

from __future__ import annotations

import time

from common import Case, data, load, measure

CASES = [
    Case("cnn_plain", ["pfa"], label="pfa target-flops 0.5", target_flops=0.5),
    Case("cnn_residual", ["pfa"], label="pfa target-flops 0.6", target_flops=0.6),
    Case("cnn_residual", ["pfa"], label="pfa-paper 0.6 (pearson, energy)", target_flops=0.6,
         options={"pfa": {"selection": "pearson", "allocation": "energy"}}),
    Case("mlp", ["pfa"], label="pfa target-params 0.5", target_params=0.5),
    Case("transformer", ["pfa"], label="pfa target-params 0.5", target_params=0.5),
    Case("cnn_plain", ["pfa"], label="pfa-KL (mode=kl)", options={"pfa": {"mode": "kl"}}),
    Case("cnn_plain", ["pfa"], label="pfa-En energy 0.98", options={"pfa": {"energy": 0.98, "mode": "energy"}}),
]

ACCEPTANCE = {  # (model, label) -> (max pp lost, max latency ratio or None)
    ("cnn_plain", "pfa target-flops 0.5"): (1.0, 0.7),
    ("cnn_residual", "pfa target-flops 0.6"): (1.5, None),
    ("mlp", "pfa target-params 0.5"): (1.0, None),
    ("transformer", "pfa target-params 0.5"): (1.0, None),
}


def _peer(model_name, flops_goal, runs):
    try:
        import onnxsim
        prune, finetune = onnxsim.apply_structured_pruning, onnxsim.apply_pruning_finetune
    except (ImportError, AttributeError) as e:
        return None, f"onnxsim peer unavailable ({type(e).__name__}: {e}); pip install onnxsim==0.8.1"
    from onnxshrink import shrink
    from onnxshrink.cost import model_cost

    original = load(model_name)
    kind, calib, val = data(model_name)
    folded = shrink(original, ["foldbn"], quiet=True, force=True).model
    shapes = {original.graph.input[0].name: calib.shape[1:]}
    base = model_cost(original, shapes)["flops"]
    batches = [{original.graph.input[0].name: calib[i:i + 64]} for i in range(0, len(calib), 64)]
    t = time.perf_counter()
    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        sp = 0.5 * (lo + hi)
        pruned = prune(folded, sparsity=sp)
        f = model_cost(pruned, shapes)["flops"] / base
        if f <= flops_goal:
            hi, best = sp, (sp, pruned, f)
        else:
            lo = sp
    if best is None:
        return None, f"onnxsim peer could not reach {flops_goal:.3f} of the FLOPs on {model_name}"
    sp, pruned, f = best
    rows = []
    for label, model in ((f"onnxsim prune sp={sp:.2f}", pruned),
                         ("onnxsim prune+finetune", finetune(folded, pruned, calibration_data=batches))):
        row = measure(original, model, kind, 256, runs)
        row.update({"model": model_name, "label": label, "wall_s": time.perf_counter() - t, "calib_s": None})
        rows.append(row)
    return rows, None


def extra(rows, args):
    import common

    print("\n-- peer at the same FLOPs: onnxsim 0.8.1 structured pruning (L2 magnitude) + its ridge finetune")
    for r in rows:
        if r["model"] not in ("cnn_plain", "cnn_residual") or "target-flops" not in r["label"]:
            continue
        peer_rows, why = _peer(r["model"], r["flops"], args.runs)
        print(common.format_row(r))
        if peer_rows is None:
            print(f"{r['model']:13} {why}")
            continue
        for p in peer_rows:
            print(common.format_row(p))
    print("\n-- acceptance (issue 3) and the pass's own time split")
    for r in rows:
        key = (r["model"], r["label"])
        p = next((q for q in r["report"]["passes"] if q["name"] == "pfa"), {})
        secs, calib = p.get("seconds", 0.0), p.get("calibration_seconds", 0.0)
        timing = f"pass {secs:.2f}s = calibration inference {calib:.2f}s + fitting/rewriting {secs - calib:.2f}s"
        if key not in ACCEPTANCE:
            print(f"{r['model']:13} {r['label']:28} {timing}")
            continue
        max_pp, max_lat = ACCEPTANCE[key]
        lost = 100 * (r["acc_before"] - r["acc_after"])
        ok = lost <= max_pp and (max_lat is None or r["latency"] <= max_lat)
        lat = f", latency {r['latency']:.3f} (<= {max_lat})" if max_lat else ""
        print(f"{r['model']:13} {r['label']:28} lost {lost:5.2f} pp (<= {max_pp}){lat} "
              f"flops {r['flops']:.3f} params {r['params']:.3f}: {'MET' if ok else 'NOT MET'}; {timing}")
