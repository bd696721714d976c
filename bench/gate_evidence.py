"""Evidence for the default validation gate: run the tool on zoo model × pass pairs (and a few
deliberately broken variants), keep each result, and record its gate statistics and task metric.

    python bench/gate_evidence.py run OUT_DIR [PAIR ...]   # PAIR: model/pass[/variant]
    python bench/gate_evidence.py stats OUT_DIR            # gate statistics of every kept result

``run`` keeps OUT_DIR/<model>_<pass>[_<variant>].onnx and a .json (task metric, seconds, the old
verdict); ``stats`` validates each kept result against its original with the default tolerances
of this checkout (and with the former default, cosine ≥ 0.9 only) and prints one row per pair.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import realzoo  # noqa: E402

# deliberately broken variants: options that wreck the model
VARIANTS = {"tinyk": {"options": {"pq": {"centroids": 2}}},
            "e03": {"target_flops": 0.3},
            "p03": {"target_params": 0.3}}

DEFAULT_PAIRS = """mtcnn_pnet/pfa mtcnn_pnet/basisconv mtcnn_pnet/pq mtcnn_rnet/pfa mtcnn_rnet/basisconv
mtcnn_rnet/lowrank mtcnn_rnet/pq mtcnn_rnet/pq/tinyk mtcnn_onet/pfa mtcnn_onet/basisconv mtcnn_onet/lowrank
mtcnn_onet/pq mtcnn_onet/pfa/e03 oww_melspec/pfa oww_melspec/basisconv oww_hey_jarvis/lowrank oww_hey_jarvis/pq
oww_hey_jarvis/lowrank/p03 oww_embedding/pfa oww_embedding/basisconv khmer_segmenter/lowrank captcha_crnn/pfa
captcha_crnn/basisconv vit_focus/foldbn""".split()


def key(pair):
    return pair.replace("/", "_")


def do_run(out, pairs):
    from onnxshrink.errors import OnnxShrinkError
    for pair in pairs:
        name, pass_name, *variant = pair.split("/")
        e = realzoo.ZOO[name]
        calib, val = e.feeds("calib"), e.feeds("val")
        kw = dict(VARIANTS[variant[0]]) if variant else {}
        if variant:
            kw = {**{k: v for k, v in realzoo.PASS_ARGS.get(pass_name, {}).items() if k not in kw
                     and not k.startswith("target")}, **kw}
        t = time.perf_counter()
        row = {"pair": pair}
        try:
            from onnxshrink import shrink
            args = {**({} if variant else realzoo.PASS_ARGS.get(pass_name, {})), **kw}
            res = shrink(e.model_path(), [pass_name], calibration=calib, validation=val, force=True, **args)
        except OnnxShrinkError as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            res = getattr(exc, "result", None)
        row["seconds"] = round(time.perf_counter() - t, 1)
        if res is not None:
            orig = realzoo.run(e.model_path(), val)
            row["metric"] = e.metric(orig, realzoo.run(res.model, val), val)
            row["threshold"] = e.threshold
            row["passed_at_run"] = res.report["validation"]["passed"]
            row["problems_at_run"] = res.report["validation"]["problems"]
            import onnx
            onnx.save(res.model, os.path.join(out, key(pair) + ".onnx"), save_as_external_data=
                      res.model.ByteSize() > 1 << 30 if hasattr(res.model, "ByteSize") else False)
        with open(os.path.join(out, key(pair) + ".json"), "w") as f:
            json.dump(row, f)
        print(json.dumps(row), flush=True)


def do_stats(out):
    import onnx

    from onnxshrink.calibrate import load_data
    from onnxshrink.graph import normalize
    from onnxshrink.model_io import load_model
    from onnxshrink.validate import Tolerances, validate
    rows = []
    for fn in sorted(os.listdir(out)):
        if not fn.endswith(".json"):
            continue
        row = json.load(open(os.path.join(out, fn)))
        path = os.path.join(out, fn[:-5] + ".onnx")
        if not os.path.exists(path):
            continue
        name = row["pair"].split("/")[0]
        e = realzoo.ZOO[name]
        original = normalize(load_model(e.model_path()))
        val = load_data(e.feeds("val"), original, origin="validation data")
        from onnxshrink.calibrate import probe_batching
        probe_batching(original, val)
        result = onnx.load(path)
        old = validate(original, result, val, Tolerances.cosine_only())
        row["passed_cosine_only"] = old["passed"]
        v = validate(original, result, val, Tolerances())
        row["passed_now"] = v["passed"]
        row["problems_now"] = v["problems"]
        row["outputs"] = {k: {s: m.get(s) for s in ("cosine", "rel_l2", "range_error", "probability", "distribution",
                                                   "top1_agreement", "worst", "worst_rel_l2", "values_per_sample",
                                                   "decision_iou", "decision_iou_at")}
                          for k, m in v["outputs"].items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(out, "stats.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        do_run(sys.argv[2], sys.argv[3:] or DEFAULT_PAIRS)
    else:
        do_stats(sys.argv[2])
