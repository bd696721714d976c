"""``python bench/run.py --zoo [--zoo-models NAME ...]``: the real-model zoo (``realzoo.py``).

Per zoo model and applicable pass (modest budget, as in ``tests/real``): params/FLOPs/bytes ratios,
ONNX Runtime latency ratio (1 thread, over the held-out feeds, stacked into one batch where the model
allows, interleaved, median of rounds), the task metric on the
held-out feeds, the tool's wall time, its calibration inference time (and runs over the data) and their
ratio; beside them, on the same feeds, ONNX Runtime's int8 dynamic
quantization (``quantize_dynamic``) and 4-bit ``MatMulNBits`` (when importable). Failures are printed
as such, with the tool's message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import onnx

import common
import realzoo
from onnxshrink.errors import TargetError, ValidationFailed

HEADER = (f"{'model':16} {'method':16} {'params':>7} {'flops':>7} {'bytes':>7} {'latency':>8} "
          f"{'metric':>18} {'fidelity':>8} {'ok':>4} {'tool s':>7} {'calib s':>7} {'tool/cal':>8}  note")


def _row(model, method, r, e, note=""):
    f = lambda k: f"{r[k]:7.3f}" if r.get(k) is not None else f"{'-':>7}"  # noqa: E731
    fid = r.get("fidelity")
    ok = "-" if fid is None else ("yes" if fid >= e.threshold else "NO")
    lat = f"{r['latency']:8.2f}" if r.get("latency") is not None else f"{'-':>8}"
    wall = f"{r['wall_s']:7.1f}" if r.get("wall_s") is not None else f"{'-':>7}"
    fids = f"{fid:8.3f}" if fid is not None else f"{'-':>8}"
    calib = f"{r['calib_s']:7.1f}" if r.get("calib_s") is not None else f"{'-':>7}"
    ratio = common.tool_over_calibration(r.get("wall_s"), r.get("calib_s"))
    ratio = f"{ratio:8.1f}" if ratio is not None else f"{'-':>8}"
    return (f"{model:16} {method:16} {f('params')} {f('flops')} {f('bytes')} {lat} {e.metric_name[:18]:>18} "
            f"{fids} {ok:>4} {wall} {calib} {ratio}  {note}")


def _peer_models(path):
    """(name, ModelProto) of ONNX Runtime's int8 dynamic and 4-bit MatMulNBits quantizations (int8: where
    ``quantize_dynamic`` refuses the file as it is, after ORT's ``quant_pre_process``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    out = []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "in.onnx")
        onnx.save(onnx.load(path), src)  # one self-contained file (external data pulled in)
        dst = os.path.join(d, "int8.onnx")
        try:
            try:
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
            except Exception:  # noqa: BLE001 - e.g. weights in Constant nodes (Paddle2ONNX): ORT's own
                # pre-processing step (constant folding into initializers) first, as its docs advise
                from onnxruntime.quantization.shape_inference import quant_pre_process
                pre = os.path.join(d, "pre.onnx")
                quant_pre_process(src, pre, skip_symbolic_shape=True)
                quantize_dynamic(pre, dst, weight_type=QuantType.QInt8)
            out.append(("ort int8 dynamic", onnx.load(dst)))
        except Exception as exc:  # noqa: BLE001 - reported as the peer's failure
            out.append(("ort int8 dynamic", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError as exc:
            try:  # the module's name before onnxruntime 1.20
                from onnxruntime.quantization.matmul_4bits_quantizer import MatMul4BitsQuantizer as MatMulNBitsQuantizer
            except ImportError:  # e.g. onnx_ir missing: pip install -e '.[bench]'
                out.append(("ort MatMulNBits4", f"cannot import the quantizer: {exc}"))
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
    """Ratios (the tool's report for its rows; for the quantizing peers only bytes), latency and the
    task metric."""
    if report is not None:
        r = dict(report["ratios"])
    else:
        r = {"params": None, "flops": None}  # quantization keeps every parameter; FLOPs of integer ops are not counted
    r["bytes"] = model.ByteSize() / original.ByteSize()
    r["latency"] = latency_ratio(original, model, latency_feeds(original, val), runs) if runs else None
    r["fidelity"] = e.metric(orig_out, realzoo.run(model, val), val)
    return r


def _validation_cosine(report):
    """The lowest per-output cosine of the tool's validation (one of the default gate's checks)."""
    vals = [o.get("cosine") for o in (report.get("validation") or {}).get("outputs", {}).values()]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return min(vals) if vals else None


def measure_pair(name, method, runs=5, latency=True):
    """One record for zoo model ``name`` and ``method`` (a pass of ``realzoo.PASSES``, or "peers"
    for ONNX Runtime's quantizers: then a list of records). ``outcome`` is what ``tests/real`` asserts:
    "pass" (checker + ORT load, validation passed, task metric >= threshold), "fail" (with the
    reason), "n/a" (the pass's plan names no node), "unavailable" (the package cannot be had)."""
    e = realzoo.ZOO[name]
    rec = {"model": name, "method": method, "metric_name": e.metric_name, "threshold": e.threshold}
    try:
        path = e.model_path()
    except realzoo.Unavailable as exc:
        return {**rec, "outcome": "unavailable", "reason": str(exc)}
    original = onnx.load(path)
    calib, val = e.feeds("calib"), e.feeds("val")
    orig_out = realzoo.run(path, val)
    shapes = {k: v.shape for k, v in calib[0].items()}
    if method == "peers":
        out = []
        for peer, m in _peer_models(path):
            r = {**rec, "method": peer}
            if isinstance(m, str):
                r.update(outcome="n/a" if m.startswith("no MatMul") else "error", reason=m)
            else:
                try:
                    r.update(_measure(e, original, m, val, orig_out, shapes, runs if latency else 0))
                    r["outcome"] = "pass" if r["fidelity"] >= e.threshold else "fail"
                except Exception as exc:  # noqa: BLE001 - the peer's failure is a row
                    r.update(outcome="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            out.append(r)
        return out
    if not realzoo.planned(e, method):
        return {**rec, "outcome": "n/a", "reason": f"the plan of {method} names no node of {name}"}
    t, cpu = time.perf_counter(), _cpu_seconds()
    try:
        res, _ = realzoo.shrink_entry(e, method, calib, val)
        reason = ""
    except ValidationFailed as exc:
        res, reason = exc.result, str(exc).splitlines()[0][:240]
    except TargetError as exc:
        short = unreachable(exc, method)
        rec.update(wall_s=time.perf_counter() - t, cpu_s=_cpu_seconds() - cpu)
        if short:   # a correct refusal: the pass cannot act on enough of the model
            return {**rec, "outcome": "unreachable", "reason": short}
        return {**rec, "outcome": "fail", "reason": f"TargetError: {str(exc).splitlines()[0][:240]}"}
    except Exception as exc:  # noqa: BLE001 - the tool's failure is the pair's outcome
        return {**rec, "outcome": "fail", "wall_s": time.perf_counter() - t, "cpu_s": _cpu_seconds() - cpu,
                "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:240]}"}
    rec["wall_s"], rec["cpu_s"] = time.perf_counter() - t, _cpu_seconds() - cpu
    rec.update(common.report_times(res.report))   # calibration inference (wall s), runs, fit + search
    try:
        realzoo.check_valid(res.model)
    except Exception as exc:  # noqa: BLE001
        reason = reason or f"invalid model: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    rec.update(_measure(e, original, res.model, val, orig_out, shapes, runs if latency else 0, res.report))
    rec["validation_passed"] = bool(res.report.get("validation", {}).get("passed"))
    rec["validation_cosine"] = _validation_cosine(res.report)
    if not reason and rec["fidelity"] < e.threshold:
        reason = f"{e.metric_name} {rec['fidelity']:.3f} < {e.threshold}"
    rec["outcome"] = "fail" if reason else "pass"
    rec["reason"] = reason
    return rec


def task_metric(e):
    """The zoo model's own task metric as the tool's metric: agreement with the original's outputs
    on the same feeds (relative, as the built-in metrics are)."""
    from onnxshrink.metrics import Metric
    return Metric(e.metric_name, lambda ref, outs: e.metric(ref, outs, None), relative=True)


def measure_max_drop(name, method, max_drop=0.01):
    """The accuracy-controlled budget on a zoo model: ``method`` with the model's own metric and
    ``max_drop``, no target; the record has the budget the search reached, the drop the tool
    measured on the validation feeds (and the task metric there), the search's steps and time.
    ``outcome``: "within" (validation passed, drop within max_drop), "none" (no budget the search
    tried keeps the drop within max_drop: the model is left as it was), "over" (the chosen budget
    drops more on the validation feeds), "fail" (the tool's error), "n/a"."""
    e = realzoo.ZOO[name]
    rec = {"model": name, "method": method, "max_drop": max_drop, "metric_name": e.metric_name}
    path = e.model_path()
    if not realzoo.planned(e, method):
        return {**rec, "outcome": "n/a", "reason": f"the plan of {method} names no node of {name}"}
    calib, val = e.feeds("calib"), e.feeds("val")
    orig_out = realzoo.run(path, val)
    t, cpu = time.perf_counter(), _cpu_seconds()
    reason = ""
    try:
        res, _ = realzoo.shrink_entry(e, method, calib, val, target_flops=None, target_params=None,
                                      metric=task_metric(e), max_drop=max_drop)
    except ValidationFailed as exc:
        res, reason = exc.result, str(exc).splitlines()[0][:240]
    except Exception as exc:  # noqa: BLE001 - the tool's failure is the row's outcome
        return {**rec, "outcome": "fail", "wall_s": time.perf_counter() - t, "cpu_s": _cpu_seconds() - cpu,
                "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:240]}"}
    rec["wall_s"], rec["cpu_s"] = time.perf_counter() - t, _cpu_seconds() - cpu
    rec.update({k: res.report["ratios"].get(k) for k in ("params", "flops", "bytes")})
    search = res.report.get("search") or {}
    rec["budget"] = search.get("budget")
    rec["steps"] = len(search.get("steps", []))
    rec["protected"] = len((search.get("correction") or {}).get("protected", []))
    m = (res.report.get("validation") or {}).get("metric") or {}
    rec["drop"] = m.get("drop")
    rec["fidelity"] = e.metric(orig_out, realzoo.run(res.model, val), val)
    outs = (res.report.get("validation") or {}).get("outputs") or {}
    rel = {k: o.get("rel_l2") for k, o in outs.items() if not o.get("probability")}
    rec["worst_output"] = max(rel.items(), key=lambda kv: kv[1]) if rel else None   # what the metric does not read
    within = bool(res.report.get("validation", {}).get("passed")) and m.get("within")
    rec["outcome"] = "within" if within and not reason else ("none" if search.get("chosen") is None else "over")
    rec["reason"] = reason
    return rec


def magnitude_prune(model, recipe, shapes):
    """The plain baseline beside pfa: every group that pfa shrank keeps pfa's count (the same
    FLOPs), but its channels are the ones with the largest summed squared weight norms of their
    sources (a head: its Q, K and V columns), the smallest removed, and nothing is refit."""
    import numpy as np
    from onnxshrink.channels import analyze
    from onnxshrink.graph import import_graph, normalize
    from onnxshrink.passes.pfa.edits import weight_row_norms
    model = normalize(model)
    an = analyze(model, shapes)
    nodes = {n.name: n for n in import_graph(model).nodes}
    kept = {r["group"]: r["kept"] for r in recipe if r["kept"] < r["channels"]}
    keep = {}
    for g in an.groups:
        if g.name not in kept:
            continue
        score = np.zeros(g.size)
        for s in g.sources:
            if s.prunable:
                np.add.at(score, an.class_index[an.roots[s.comps]], weight_row_norms(nodes[s.node]))
        keep[g.index] = np.sort(np.argsort(score, kind="stable")[g.size - kept[g.name]:])
    if len(keep) != len(kept):
        raise RuntimeError(f"magnitude baseline: {len(kept) - len(keep)} of pfa's groups not found")
    return an.prune(model, keep)


def measure_heads(name, flops=0.5, runs=5, latency=True):
    """pfa on a transformer at ``flops`` (heads, FFN units and whatever else it prunes, refit),
    beside plain magnitude pruning of the same groups to the same counts without refit
    (``magnitude_prune``): two records with ratios, latency ratio and the task metric."""
    from onnxshrink.cost import model_cost
    from onnxshrink.graph import observing
    from onnxshrink.calibrate import ShapeObserver, load_data
    e = realzoo.ZOO[name]
    original = onnx.load(e.model_path())
    calib, val = e.feeds("calib"), e.feeds("val")
    orig_out = realzoo.run(e.model_path(), val)
    shapes = {k: v.shape for k, v in calib[0].items()}
    rec = {"model": name, "metric_name": e.metric_name, "threshold": e.threshold, "target_flops": flops}
    t, cpu = time.perf_counter(), _cpu_seconds()
    try:
        res, _ = realzoo.shrink_entry(e, "pfa", calib, val, target_flops=flops)
        reason = ""
    except ValidationFailed as exc:
        res, reason = exc.result, str(exc).splitlines()[0][:240]
    pfa = {**rec, "method": f"pfa @ FLOPs {flops}", "wall_s": time.perf_counter() - t, "cpu_s": _cpu_seconds() - cpu}
    pfa.update(_measure(e, original, res.model, val, orig_out, shapes, runs if latency else 0, res.report))
    recipe = res.report["passes"][0]["recipe"]
    pfa["groups"] = {r["group"]: [r["channels"], r["kept"]] for r in recipe if r["kept"] < r["channels"]}
    pfa["outcome"] = "fail" if reason or pfa["fidelity"] < e.threshold else "pass"
    pfa["reason"] = reason or (f"{e.metric_name} {pfa['fidelity']:.3f} < {e.threshold}" if pfa["outcome"] == "fail" else "")
    data = load_data(calib[:2], original, None, "calibration data")
    try:
        with observing(ShapeObserver(data.representatives())):
            mag = magnitude_prune(original, recipe, shapes)
            before, after = model_cost(original, shapes), model_cost(mag, shapes)
    finally:
        data.close()
    base = {**rec, "method": f"magnitude @ FLOPs {flops}, no refit"}
    base.update(_measure(e, original, mag, val, orig_out, shapes, runs if latency else 0,
                         {"ratios": {m: after[m] / before[m] for m in ("params", "flops")}}))
    base["outcome"] = "pass" if base["fidelity"] >= e.threshold else "fail"
    base["reason"] = "" if base["outcome"] == "pass" else f"{e.metric_name} {base['fidelity']:.3f} < {e.threshold}"
    return [pfa, base]


def unreachable(exc, method) -> str:
    """For a ``TargetError``: "acts on X % of the M; floor F (target T)" when the pass's own reach
    (``details["reach"]``) shows the target is out of its range whatever its settings, else ""."""
    report = getattr(getattr(exc, "result", None), "report", None) or {}
    rep = next((p for p in report.get("passes", []) if p.get("name") == method), {})
    reach = rep.get("reach") or (rep.get("details") or {}).get("reach") or {}
    for m, t in (report.get("targets") or {}).items():
        floor, acts = (reach.get("floor") or {}).get(m), (reach.get("acts_on") or {}).get(m)
        target = t.get("target") if isinstance(t, dict) else None
        if floor is not None and acts is not None and target is not None and floor > target:
            return f"{method} acts on {acts:.1%} of the {m}; floor {floor:.3f} (target {target:.3f})"
    return ""


def _cpu_seconds():
    """CPU seconds of this process, all threads (user + system): on a loaded machine a steadier
    measure of a pair's cost than wall time."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _limit_cpu(seconds):
    def apply():
        import resource
        resource.setrlimit(resource.RLIMIT_CPU, (int(seconds), int(seconds) + 10))
    return apply


def _run_child(name, method, runs, latency, timeout, cpu_limit=None):
    """``measure_pair`` in a child process (at most ``cpu_limit`` CPU seconds, SIGXCPU past them,
    and ``timeout`` seconds of wall time, its process group killed on expiry, against a hang);
    returns a list of records."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rec.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--pair", name, method, "--runs", str(runs),
               "--out", out] + ([] if latency else ["--no-latency"])
        t = time.perf_counter()
        p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_limit_cpu(cpu_limit) if cpu_limit else None)
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            return [{"model": name, "method": method, "outcome": "timeout", "wall_s": time.perf_counter() - t,
                     "reason": f"over {timeout:.0f} s of wall time (killed)"}]
        if p.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and cpu_limit:
            return [{"model": name, "method": method, "outcome": "timeout", "wall_s": time.perf_counter() - t,
                     "cpu_s": float(cpu_limit), "reason": f"over {cpu_limit:.0f} CPU s (stopped)"}]
        if p.returncode != 0 or not os.path.exists(out):
            last = (err.strip().splitlines() or ["no output"])[-1]
            return [{"model": name, "method": method, "outcome": "error", "reason": f"exit {p.returncode}: {last[:240]}"}]
        with open(out) as f:
            rec = json.load(f)
    return rec if isinstance(rec, list) else [rec]


def _environment():
    import platform
    import onnxruntime
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load1": load, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def run_zoo(names=None, runs=5, json_path=None, methods=None, timeout=3600.0, markdown=None, latency=True,
            cpu_limit=900.0):
    """Every (model, method) pair in a child process with a time bound; rows printed as they come,
    merged into ``json_path`` (rows of other pairs kept, so the table can be filled model by model)
    and rendered to ``markdown``."""
    print("ratios are new/original; latency: ONNX Runtime, 1 thread, all held-out feeds (one batch where the model allows), median of "
          f"{runs} interleaved rounds; fidelity: the task metric vs the original on the held-out feeds "
          "(ok: ≥ the model's threshold)")
    print(HEADER)
    table = load_table(json_path) if json_path else {}
    rows = []
    for name in names or list(realzoo.ZOO):
        e = realzoo.ZOO[name]
        for method in [m for m in (*realzoo.PASSES, "peers") if not methods or m in methods]:
            env = _environment()
            for rec in _run_child(name, method, runs, latency, timeout, cpu_limit):
                rec.update(env)
                rows.append(rec)
                table[(rec["model"], rec["method"])] = rec
                if rec["outcome"] != "n/a":
                    print(_row(name, rec["method"], rec, e, rec.get("reason", "") if rec["outcome"] != "pass" else ""), flush=True)
                else:
                    print(f"{name:16} {rec['method']:16} n/a: {rec.get('reason', '')}", flush=True)
            if json_path:
                save_table(table, json_path)
                if markdown:
                    with open(markdown, "w") as f:
                        f.write(render_markdown(table))
    return rows


def load_table(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {(r["model"], r["method"]): r for r in json.load(f)}


def save_table(table, path):
    order = {m: i for i, m in enumerate(realzoo.ZOO)}
    meth = {m: i for i, m in enumerate((*realzoo.PASSES, "ort int8 dynamic", "ort MatMulNBits4"))}
    rows = sorted(table.values(), key=lambda r: (order.get(r["model"], 99), meth.get(r["method"], 99)))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, default=str)
    os.replace(tmp, path)


def _seconds(r):
    if r.get("wall_s") is None:
        return "–"
    return f"{r['wall_s']:.0f}" + (f" ({r['cpu_s']:.0f})" if r.get("cpu_s") is not None else "")


def _calibration(r):
    """The calibration inference seconds (wall) of the tool's report and its runs over the data."""
    if r.get("calib_s") is None:
        return "–"
    return f"{r['calib_s']:.1f} ({r.get('calib_runs', 0)})"


def _short(r):
    """The failure's reason in a table cell: the tool's first clause, no advice."""
    reason = (r.get("reason") or "").replace("validation failed: validation failed:", "validation failed:")
    reason = reason.split(" (not saved")[0].split("; reachable")[0]
    if not reason and r.get("fidelity") is not None:
        reason = f"{r.get('metric_name', 'metric')} below {r.get('threshold')}"
    return reason


def render_markdown(table) -> str:
    """The README's zoo table from the JSON rows (n/a pairs left out, listed below the table)."""
    fmt = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| model | method | params | FLOPs | file | latency | task metric (threshold) | fidelity | tool s (CPU s) "
             "| calib s (runs) | tool/calib | outcome |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    na = []
    for r in table.values():
        if r["outcome"] == "n/a":
            na.append(f"{r['model']}/{r['method']}")
            continue
        fid = r.get("fidelity")
        fids = fmt(fid) if fid is None or fid >= r.get("threshold", 0) else f"**{fid:.3f}**"
        outcome = "pass" if r["outcome"] == "pass" else f"{r['outcome']}: {_short(r)}".replace("|", "/")
        if r["outcome"] == "unreachable":   # an expected, correct refusal, not a fidelity failure
            outcome = f"unreachable (expected): {r.get('reason', '')}"
        lines.append(f"| {r['model']} | {r['method']} | {fmt(r.get('params'))} | {fmt(r.get('flops'))} | "
                     f"{fmt(r.get('bytes'))} | {fmt(r.get('latency'), 2)} | {r.get('metric_name', '')} "
                     f"({r.get('threshold', '')}) | {fids} | {_seconds(r)} | {_calibration(r)} | "
                     f"{fmt(common.tool_over_calibration(r.get('wall_s'), r.get('calib_s')), 1)} | {outcome} |")
    if na:
        lines.append("")
        lines.append("Not applicable (the pass's plan names no node; for MatMulNBits4: no MatMul with a constant "
                     "weight): " + ", ".join(sorted(na)) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="one zoo pair in this process (used by run_zoo's children)")
    ap.add_argument("--pair", nargs=2, metavar=("MODEL", "METHOD"))
    ap.add_argument("--heads", metavar="MODEL", help="instead of a pair: pfa at --flops beside magnitude pruning "
                                                     "of the same groups to the same counts, no refit")
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--max-drop", type=float, default=None,
                    help="with --pair: the pass with the model's own metric and this max_drop, no target")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if (a.pair is None) == (a.heads is None):
        ap.error("give one of --pair MODEL METHOD or --heads MODEL")
    if a.heads:
        rec = measure_heads(a.heads, a.flops, runs=a.runs, latency=not a.no_latency)
    elif a.max_drop is not None:
        rec = measure_max_drop(*a.pair, max_drop=a.max_drop)
    else:
        rec = measure_pair(*a.pair, runs=a.runs, latency=not a.no_latency)
    with open(a.out, "w") as f:
        json.dump(rec, f, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
