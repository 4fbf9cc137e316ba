#!/usr/bin/env python3
"""report.py - the summary of tests/gpu/run.sh: $OUT/report.json and $OUT/report.txt.

Reads what the steps left: op_parity.json, bench_vlm.json (cogvlm bench-vlm),
bench_torch.json, the step table (name, exit status, seconds) and the step logs (golden,
accuracy). Derived numbers:
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


def steps_table(path):
    out = {}
    for line in read(path).splitlines():
        p = line.split()
        if len(p) == 3:
            out[p[0]] = {"status": p[1], "seconds": int(p[2]) if p[2].isdigit() else None}
    return out


def golden(logs, st):
    text = read(os.path.join(logs, "golden.log"))
    rels = [float(m) for m in re.findall(r"max rel ([0-9.eE+-]+|nan|inf)", text)]
    tol = re.search(r"tolerance ([0-9.eE+-]+)", text)
    return {"max_rel_err": max(rels) if rels else None,
            "pass": st.get("golden", {}).get("status") == "0",
            "tol": float(tol.group(1)) if tol else None,
            "summary": next((l for l in text.splitlines() if l.startswith("golden:")), None)}


def accuracy(logs, st):
    text = read(os.path.join(logs, "accuracy.log"))
    m = re.search(r"accuracy per kind: (\{.*?\})", text)
    res = {"pass": st.get("accuracy", {}).get("status") == "0"}
    if m:
        try:
            res["per_kind"] = ast.literal_eval(m.group(1))
        except (ValueError, SyntaxError):
            pass
    tail = [l for l in text.splitlines() if "passed" in l or "failed" in l or "error" in l]
    res["pytest"] = tail[-1] if tail else None
    return res


def build(a):
    name = os.environ.get("GPU_NAME", "")
    bw, tc = peaks(name)
    st = steps_table(a.steps)
    par = load(os.path.join(a.out, "op_parity.json")) or {}
    vlm = load(os.path.join(a.out, "bench_vlm.json")) or {}
    tor = load(os.path.join(a.out, "bench_torch.json")) or {}
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
        "device": name or None,
        "peaks": {"hbm_bytes_s": bw, "bf16_dense_flop_s": tc},
        "steps": st,
        "op_parity": {"passed": par.get("passed"), "failed": par.get("failed"),
                      "bench": par.get("bench"),
                      "failures": [r for r in par.get("results", []) if not r.get("pass")]},
        "golden": golden(a.logs, st),
        "accuracy": accuracy(a.logs, st),
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


def fmt(v, spec=".3g"):
    return "n/a" if v is None else format(v, spec)


def text(r):
    p, g, acc = r["op_parity"], r["golden"], r["accuracy"]
    lines = [f"GPU report: {r['device'] or 'unknown device'}",
             f"  op parity        {p['passed']} passed, {p['failed']} failed",
             f"  golden (cuda)    max rel {fmt(g['max_rel_err'])} (tol {fmt(g['tol'])}): "
             f"{'PASS' if g['pass'] else 'FAIL'}",
             f"  tiny accuracy    {acc.get('per_kind')}: {'PASS' if acc['pass'] else 'FAIL'}",
             f"  vision+prefill   {fmt(r['vision_prefill_ms'], '.1f')} ms (vision "
             f"{fmt(r['vision_ms'], '.1f')}, prefill {fmt(r['prefill_ms'], '.1f')})",
             "  decode tok/s     " + ", ".join(f"b{b}: {fmt(v, '.1f')}"
                                                for b, v in r["decode_tok_s"].items()),
             f"  HBM fraction     {fmt(r['hbm_fraction'], '.2f')} (batch 1)",
             f"  tensor cores     {fmt(r['tensor_core_fraction'], '.2f')} of peak (vision tower)"]
    t = r["torch"] or {}
    if t:
        lines.append(f"  torch eager      vision+prefill {fmt(t.get('vision_prefill_ms'), '.1f')} ms, "
                     + ", ".join(f"b{d['batch']}: {d['tok_s']:.1f} tok/s" for d in t.get("decode", [])))
    lines.append(f"  speedup vs torch {r['speedup_vs_torch']}")
    for name, s in r["steps"].items():
        lines.append(f"  step {name:<12} {s['status']:>8} {s['seconds']}s")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", required=True)
    ap.add_argument("--logs", required=True)
    a = ap.parse_args()
    r = build(a)
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(a.out, "report.txt"), "w") as f:
        f.write(text(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
