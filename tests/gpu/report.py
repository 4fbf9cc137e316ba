#!/usr/bin/env python3
"""report.py - the summary of tests/gpu/run.sh: $OUT/report.json and $OUT/report.txt.

run.sh calls it before and after every step, so the report in $OUT always says how far
the run got, even when the run is cut off. It reads what the steps left:
- WORK/steps.tsv: one row per finished step (name, status passed/failed/skipped, exit
  status, seconds, why), WORK/running: the step in progress (name, start, limit),
  WORK/device.txt: nvidia-smi's name and driver;
- the step logs WORK/NAME.log (libs, golden, accuracy, sanitizer);
- OUT/op_parity.json, op_parity_ref.json, op_parity_small.json (tests/gpu/op_parity.c;
  rewritten after every case, "complete": false while it ran or when it was cut),
  OUT/bench_vlm.json (cogvlm bench-vlm) and WORK/bench_torch.json (bench_torch.py).
Derived numbers:
- hbm_fraction: bytes one decode step must read (weights of the language expert and
  lm_head + the batch's keys and values, as bench-vlm counts them) / step time / peak
  HBM bandwidth; per batch, and the batch-1 value as the headline. bench-vlm's sequences
  share the prompt's KV blocks, so at batch > 1 part of the KV traffic can hit L2: the
  fraction is then an upper bound.
- tensor_core_fraction: the vision tower's matrix FLOPs (cogvlm-model.md §10) / its time /
  the dense BF16 tensor peak.
Peaks (datasheet, SXM): H100 3.35 TB/s, H200 4.8 TB/s, both 989 TFLOP/s dense BF16;
H100 PCIe 2.0 TB/s, 756 TFLOP/s; A100 80GB 2.0 TB/s, 312 TFLOP/s.
Missing inputs become null; the report never fails because a step did.
"""
import argparse
import ast
import json
import os
import re
import time


def peaks(name):
    n = (name or "").upper()
    if "H200" in n:
        return 4.8e12, 989e12
    if "H100" in n and "PCIE" in n:
        return 2.0e12, 756e12
    if "H100" in n:
        return 3.35e12, 989e12
    if "A100" in n:
        return 2.0e12, 312e12
    return None, None


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def steps_table(work):
    """The finished steps in run order, then the one in progress (status "running")."""
    out = {}
    for line in read(os.path.join(work, "steps.tsv")).splitlines():
        p = line.split("\t")
        if len(p) >= 4:
            out[p[0]] = {"status": p[1], "rc": int(p[2]) if p[2].lstrip("-").isdigit() else None,
                         "seconds": int(p[3]) if p[3].isdigit() else None,
                         "why": p[4] if len(p) > 4 and p[4] else None}
    run = read(os.path.join(work, "running")).split()
    if len(run) >= 3 and run[1].isdigit():
        out[run[0]] = {"status": "running", "rc": None,
                       "seconds": int(time.time()) - int(run[1]),
                       "why": "in progress (limit %ss) when this report was written" % run[2]}
    return out


def libs(work):
    """What libs.sh resolved: soname -> path (or "not found"), the path it built."""
    text = read(os.path.join(work, "libs.log"))
    res = {}
    for m in re.finditer(r"^\s+(\S+) => (.+?)(?: \(0x[0-9a-f]+\))?$", text, re.M):
        res[m.group(1)] = m.group(2).strip()
    ldp = re.search(r"LD_LIBRARY_PATH for the binaries: (.*)", text)
    drv = re.search(r"driver libcuda.so.1: (.*)", text)
    return {"ld_library_path": ldp.group(1) if ldp else None,
            "driver_libcuda": drv.group(1) if drv else None,
            "missing": sorted(k for k, v in res.items() if v == "not found"),
            "resolved": res or None}


def parity(out, name):
    """A pass of op-parity: counts, whether it finished, why it stopped, its failures."""
    par = load(os.path.join(out, name))
    if not par:
        return None
    res = par.get("results", [])
    return {"complete": par.get("complete"), "passed": par.get("passed"),
            "failed": par.get("failed"), "skipped": par.get("skipped"),
            "fatal": par.get("fatal"), "last_case": (res[-1].get("op") + " " + res[-1].get(
                "shape", "")) if res else None,
            "failures": [{k: r.get(k) for k in ("op", "shape", "max_rel", "tol", "error")}
                         for r in res if not r.get("pass") and not r.get("skipped")]}


def golden(work, st):
    text = read(os.path.join(work, "golden.log"))
    rels = [float(m) for m in re.findall(r"max rel ([0-9.eE+-]+|nan|inf)", text)]
    tol = re.search(r"tolerance ([0-9.eE+-]+)", text)
    agree = re.search(r"tokens reported: (\d+)/(\d+)", text)
    return {"max_rel_err": max(rels) if rels else None,
            "pass": st.get("golden", {}).get("status") == "passed",
            "tol": float(tol.group(1)) if tol else None,
            "tokens_agree": "%s/%s" % agree.groups() if agree else None,
            "token_differences": re.findall(r"^\s+(step \d+: reference .*)$", text, re.M)[:20],
            "summary": next((l for l in text.splitlines() if l.startswith("golden:")), None)}


def golden_pairs(work, st, name):
    """run.sh's golden_pair runs in step NAME: per '== LABEL: BACKEND' section, the largest
    max rel error and golden's summary line"""
    text = read(os.path.join(work, name + ".log"))
    runs = []
    for sec in re.split(r"^== ", text, flags=re.M)[1:]:
        head, _, body = sec.partition("\n")
        rels = [float(m) for m in re.findall(r"max rel ([0-9.eE+-]+|nan|inf)", body)]
        agree = re.search(r"tokens reported: (\d+)/(\d+)", body)
        runs.append({"run": head.strip(), "max_rel_err": max(rels) if rels else None,
                     "tokens_agree": "%s/%s" % agree.groups() if agree else None,
                     "summary": next((l for l in body.splitlines() if l.startswith("golden:")),
                                     None)})
    return {"status": st.get(name, {}).get("status"), "runs": runs}


def accuracy(work, st):
    text = read(os.path.join(work, "accuracy.log"))
    m = re.search(r"accuracy per kind: (\{.*?\})", text)
    res = {"pass": st.get("accuracy", {}).get("status") == "passed"}
    if m:
        try:
            res["per_kind"] = ast.literal_eval(m.group(1))
        except (ValueError, SyntaxError):
            pass
    tail = [l for l in text.splitlines() if "passed" in l or "failed" in l or "error" in l]
    res["pytest"] = tail[-1] if tail else None
    return res


def sanitizer(work, st):
    text = read(os.path.join(work, "sanitizer.log"))
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    return {"ran": "sanitizer" in st and st["sanitizer"]["status"] != "skipped",
            "errors": int(m.group(1)) if m else None,
            "first_errors": re.findall(r"^=+ (Invalid .*|.*error.*)$", text, re.M)[:10]}


def perf(out, work, name):
    bw, tc = peaks(name)
    vlm = load(os.path.join(out, "bench_vlm.json")) or {}
    tor = load(os.path.join(work, "bench_torch.json")) or {}
    dec = {str(d["batch"]): d for d in vlm.get("decode", [])}
    tdec = {str(d["batch"]): d for d in tor.get("decode", [])}
    hbm = {b: (d["bytes_per_step"] / (d["step_ms"] / 1e3) / bw if bw and d.get("step_ms") else None)
           for b, d in dec.items()}
    vis_tf = vlm.get("vision_tflop")
    tcf = (vis_tf * 1e12 / (vlm["vision_ms"] / 1e3) / tc
           if tc and vis_tf and vlm.get("vision_ms") else None)
    speed = {}
    if vlm.get("vision_prefill_ms") and tor.get("vision_prefill_ms"):
        speed["vision_prefill"] = round(tor["vision_prefill_ms"] / vlm["vision_prefill_ms"], 3)
    for b in dec:
        if b in tdec and tdec[b].get("tok_s"):
            speed["decode_" + b] = round(dec[b]["tok_s"] / tdec[b]["tok_s"], 3)
    return {
        "vision_ms": vlm.get("vision_ms"),
        "prefill_ms": vlm.get("prefill_ms"),
        "vision_prefill_ms": vlm.get("vision_prefill_ms"),
        "decode_tok_s": {b: d.get("tok_s") for b, d in dec.items()},
        "hbm_fraction": hbm.get("1"),
        "hbm_fraction_per_batch": hbm,
        "tensor_core_fraction": tcf,
        "torch": tor or None,
        "speedup_vs_torch": speed,
    }


def build(a):
    dev = read(os.path.join(a.work, "device.txt")).strip().split(", ")
    name = dev[0] if dev and dev[0] else os.environ.get("GPU_NAME", "")
    bw, tc = peaks(name)
    st = steps_table(a.work)
    bench = (load(os.path.join(a.out, "op_parity.json")) or {}).get("bench")
    r = {
        "device": name or None,
        "driver": dev[1] if len(dev) > 1 else None,
        "complete": os.path.exists(os.path.join(a.work, "finished")),
        "elapsed_s": a.elapsed,
        "peaks": {"hbm_bytes_s": bw, "bf16_dense_flop_s": tc},
        "steps": st,
        "libs": libs(a.work),
        "op_parity": {"main": parity(a.out, "op_parity.json"),
                      "reference": parity(a.out, "op_parity_ref.json"),
                      "small": parity(a.out, "op_parity_small.json"), "bench": bench},
        "sanitizer": sanitizer(a.work, st),
        "golden": golden(a.work, st),
        "golden_cogvlm2": golden_pairs(a.work, st, "golden-cogvlm2"),
        "golden_quant": golden_pairs(a.work, st, "golden-quant"),
        "bench_vlm_q4": load(os.path.join(a.work, "bench_vlm_q4.json")),
        "accuracy": accuracy(a.work, st),
    }
    r.update(perf(a.out, a.work, name))
    again = [n for n, s in st.items() if s["status"] in ("failed", "running") or
             (s["status"] == "skipped" and (s["why"] or "").startswith("out of time"))]
    again = [n for n in again if n not in ("nvidia-smi", "build", "libs", "python-deps")]
    r["rerun"] = "GPU_STEPS=%s bash tests/gpu/run.sh" % ",".join(again) if again else None
    return r


def fmt(v, spec=".3g"):
    return "n/a" if v is None else format(v, spec)


def parity_line(label, p):
    if not p:
        return f"  {label:<16} n/a"
    s = f"  {label:<16} {p['passed']} passed, {p['failed']} failed, {p['skipped']} skipped"
    s += "" if p["complete"] else f" (cut after: {p['last_case']})"
    return s + (f"; {p['fatal']}" if p["fatal"] else "")


def text(r):
    p, g, acc, san = r["op_parity"], r["golden"], r["accuracy"], r["sanitizer"]
    lines = [f"GPU report: {r['device'] or 'unknown device'} (driver {r['driver'] or 'n/a'}), "
             f"{'complete' if r['complete'] else 'INCOMPLETE'} after {r['elapsed_s']}s",
             f"  libraries        missing: {', '.join(r['libs']['missing']) or 'none'}; "
             f"path {r['libs']['ld_library_path']}",
             parity_line("op parity", p["main"]),
             parity_line("  reference", p["reference"]),
             parity_line("  small (memchk)", p["small"]),
             f"  sanitizer        {fmt(san['errors'])} errors" if san["ran"] else
             "  sanitizer        not run",
             f"  golden (cuda)    max rel {fmt(g['max_rel_err'])} (tol {fmt(g['tol'])}), tokens "
             f"{g['tokens_agree'] or 'n/a'} agree: {'PASS' if g['pass'] else 'FAIL'}",
             f"  tiny accuracy    {acc.get('per_kind')}: {'PASS' if acc['pass'] else 'FAIL'}",
             f"  golden cogvlm2   {r['golden_cogvlm2']['status'] or 'not run'}",
             *[f"    {g['run']:<30} max rel {fmt(g['max_rel_err'])}, tokens "
               f"{g['tokens_agree'] or 'n/a'}" for g in r["golden_cogvlm2"]["runs"]],
             f"  golden quantized {r['golden_quant']['status'] or 'not run'}",
             *[f"    {g['run']:<30} max rel {fmt(g['max_rel_err'])}, tokens "
               f"{g['tokens_agree'] or 'n/a'}" for g in r["golden_quant"]["runs"]],
             "  quantized gemm   " + ", ".join(
                 f"{k} {fmt(v)}" for k, v in (p.get("bench") or {}).items()
                 if k.startswith(("gemv_q", "gemm_q"))),
             "  int4 decode      " + ", ".join(
                 f"b{d.get('batch')}: {fmt(d.get('tok_s'), '.1f')} tok/s"
                 for d in (r["bench_vlm_q4"] or {}).get("decode", [])),
             f"  vision+prefill   {fmt(r['vision_prefill_ms'], '.1f')} ms (vision "
             f"{fmt(r['vision_ms'], '.1f')}, prefill {fmt(r['prefill_ms'], '.1f')})",
             "  decode tok/s     " + ", ".join(f"b{b}: {fmt(v, '.1f')}"
                                                for b, v in r["decode_tok_s"].items()),
             f"  HBM fraction     {fmt(r['hbm_fraction'], '.2f')} (batch 1)",
             f"  tensor cores     {fmt(r['tensor_core_fraction'], '.2f')} of peak (vision tower)"]
    t = r["torch"] or {}
    if t:
        lines.append("  torch eager      vision+prefill "
                     f"{fmt(t.get('vision_prefill_ms'), '.1f')} ms, " +
                     ", ".join(f"b{d['batch']}: {d['tok_s']:.1f} tok/s"
                               for d in t.get("decode", [])))
    lines.append(f"  speedup vs torch {r['speedup_vs_torch']}")
    lines.append(f"  rerun            {r['rerun'] or 'nothing to rerun'}")
    lines.append("  steps:")
    for name, s in r["steps"].items():
        lines.append(f"    {name:<14} {s['status']:<8} {fmt(s['seconds'], 'd'):>4}s"
                     + (f"  {s['why']}" if s["why"] else ""))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--elapsed", type=int, default=None, help="seconds since run.sh started")
    a = ap.parse_args()
    r = build(a)
    for name, data in (("report.json", json.dumps(r, indent=1)), ("report.txt", text(r))):
        tmp = os.path.join(a.out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, os.path.join(a.out, name)) # never half written when the run is cut
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
