"""``python bench/run.py --zoo [--zoo-models NAME ...]``: the real-model zoo (``realzoo.py``).

Per zoo model and applicable pass (modest budget, as in ``tests/real``): params/FLOPs/bytes ratios,
ONNX Runtime latency ratio (1 thread, over the held-out feeds, stacked into one batch where the model
allows, interleaved, median of rounds), the task metric on the
held-out feeds and the tool's wall time; beside them, on the same feeds, ONNX Runtime's int8 dynamic
quantization (``quantize_dynamic``) and 4-bit ``MatMulNBits`` (when importable). Failures are printed
as such, with the tool's message.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import onnx

import common
import realzoo
from onnxshrink.cost import model_cost
from onnxshrink.errors import ValidationFailed

HEADER = (f"{'model':16} {'method':16} {'params':>7} {'flops':>7} {'bytes':>7} {'latency':>8} "
          f"{'metric':>18} {'fidelity':>8} {'ok':>4} {'tool s':>7}  note")


def _row(model, method, r, e, note=""):
    f = lambda k: f"{r[k]:7.3f}" if r.get(k) is not None else f"{'-':>7}"  # noqa: E731
    fid = r.get("fidelity")
    ok = "-" if fid is None else ("yes" if fid >= e.threshold else "NO")
    lat = f"{r['latency']:8.2f}" if r.get("latency") is not None else f"{'-':>8}"
    wall = f"{r['wall_s']:7.1f}" if r.get("wall_s") is not None else f"{'-':>7}"
    fids = f"{fid:8.3f}" if fid is not None else f"{'-':>8}"
    return (f"{model:16} {method:16} {f('params')} {f('flops')} {f('bytes')} {lat} {e.metric_name[:18]:>18} "
            f"{fids} {ok:>4} {wall}  {note}")


def _peer_models(path):
    """(name, ModelProto) of ONNX Runtime's int8 dynamic and 4-bit MatMulNBits quantizations."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    out = []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "in.onnx")
        onnx.save(onnx.load(path), src)  # one self-contained file (external data pulled in)
        dst = os.path.join(d, "int8.onnx")
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
            out.append(("ort int8 dynamic", onnx.load(dst)))
        except Exception as exc:  # noqa: BLE001 - reported as the peer's failure
            out.append(("ort int8 dynamic", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError:
            return out
        try:
            q = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=True)
            q.process()
            m = q.model.model
            if not any(n.op_type == "MatMulNBits" for n in m.graph.node):
                out.append(("ort MatMulNBits4", "no MatMul with a constant weight quantized"))
            else:
                out.append(("ort MatMulNBits4", m))
        except Exception as exc:  # noqa: BLE001
            out.append(("ort MatMulNBits4", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
    return out


def latency_ratio(model_a, model_b, feeds, runs):
    """Median over ``runs`` of (time of b over all feeds) / (time of a over all feeds), a and b
    interleaved, one thread each: robust to load on a shared machine and to tiny models."""
    sa, sb = common.session(model_a), common.session(model_b)
    ratios = []
    for r in range(runs + 1):
        ta = tb = 0.0
        for f in feeds:
            t = time.perf_counter()
            sa.run(None, f)
            ta += time.perf_counter() - t
            t = time.perf_counter()
            sb.run(None, f)
            tb += time.perf_counter() - t
        if r:  # the first round warms up
            ratios.append(tb / ta)
    return float(sorted(ratios)[len(ratios) // 2])


def latency_feeds(model, feeds):
    """The held-out feeds stacked into one batch when they share a shape and the model runs at that
    batch (less call overhead, steadier timing on tiny models); else the feeds one by one."""
    import numpy as np
    if len({tuple((k, v.shape) for k, v in f.items()) for f in feeds}) == 1:
        batch = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        try:
            common.session(model).run(None, batch)
            return [batch]
        except Exception:  # noqa: BLE001 - a model fixed at batch 1
            pass
    return feeds


def _measure(e, original, model, val, orig_out, shapes, runs, report=None):
    """Ratios (the tool's report for its rows; for the peers params counted by ``model_cost`` and no
    FLOPs, which that count does not define for integer ops), latency and the task metric."""
    if report is not None:
        r = dict(report["ratios"])
    else:
        cb, ca = model_cost(original, shapes), model_cost(model, shapes)
        r = {"params": ca["params"] / cb["params"], "flops": None}
    r["bytes"] = model.ByteSize() / original.ByteSize()
    r["latency"] = latency_ratio(original, model, latency_feeds(original, val), runs)
    r["fidelity"] = e.metric(orig_out, realzoo.run(model, val), val)
    return r


def run_zoo(names=None, runs=25, json_path=None):
    print("ratios are new/original; latency: ONNX Runtime, 1 thread, all held-out feeds (one batch where the model allows), median of "
          f"{runs} interleaved rounds; fidelity: the task metric vs the original on the held-out feeds "
          "(ok: ≥ the model's threshold)")
    print(HEADER)
    rows = []
    for name in names or list(realzoo.ZOO):
        e = realzoo.ZOO[name]
        try:
            path = e.model_path()
        except realzoo.Unavailable as exc:
            print(f"{name:16} unavailable: {exc}")
            continue
        original = onnx.load(path)
        calib, val = e.feeds("calib"), e.feeds("val")
        orig_out = realzoo.run(path, val)
        shapes = {k: v.shape for k, v in calib[0].items()}
        for p in realzoo.PASSES:
            if not realzoo.planned(e, p):
                continue
            rec = {"model": name, "method": p}
            t = time.perf_counter()
            try:
                res, _ = realzoo.shrink_entry(e, p, calib, val)
                note = ""
            except ValidationFailed as exc:
                res, note = exc.result, f"validation failed: {exc}"
            except Exception as exc:  # noqa: BLE001 - the tool's failure is a row of the table
                rec.update(error=f"{type(exc).__name__}: {exc}", wall_s=time.perf_counter() - t)
                rows.append(rec)
                print(_row(name, p, rec, e, f"FAILED {rec['error'][:200]}"), flush=True)
                continue
            rec["wall_s"] = time.perf_counter() - t
            rec.update(_measure(e, original, res.model, val, orig_out, shapes, runs, res.report))
            rec["note"] = note
            rec["validation_passed"] = bool(res.report.get("validation", {}).get("passed"))
            rows.append(rec)
            print(_row(name, p, rec, e, note[:200]), flush=True)
        for peer, m in _peer_models(path):
            rec = {"model": name, "method": peer}
            if isinstance(m, str):
                rec["error"] = m
                print(_row(name, peer, rec, e, f"FAILED {m}"), flush=True)
            else:
                try:
                    rec.update(_measure(e, original, m, val, orig_out, shapes, runs))
                    print(_row(name, peer, rec, e), flush=True)
                except Exception as exc:  # noqa: BLE001
                    rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    print(_row(name, peer, rec, e, f"FAILED {rec['error']}"), flush=True)
            rows.append(rec)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return rows
