#!/usr/bin/env python3
"""bench_all.py - `make bench`: measure the CPU backend, compare with llama.cpp, write
docs/PERFORMANCE.md.

Steps (about 8 minutes on a 2-core machine once llama-cpp-python is installed):
1. `cogvlm bench` on the LLaMA-shaped preset (hidden 2048, 22 layers, 32 heads, MLP 5632,
   vocab 32000) with BF16 weights, plus the 17B-shaped vision tower (--vision-layers), and
   the same text model with F16 weights; each run saves its random weights;
2. llama.cpp on each saved checkpoint (tools/bench/llama_compare.py: same weights, same
   dtype, same thread count), interleaved with our runs, --reps times each (best kept),
   unless llama-cpp-python is missing and cannot be installed;
3. the tables, the machine description and the method into docs/PERFORMANCE.md, and
   `cogvlm bench-tokenizer` (both tokenizers, one thread) into its own section;
4. the serving benchmark over HTTP (tools/bench/bench_serving.py: the tiny model under
   load, cogvlm-server vs llama.cpp's server), which updates its own sections;
5. the GPU section, from the JSON report of tests/gpu/run.sh given with --gpu-report (a
   copy is kept in docs/perf/gpu-report.json, so later runs regenerate it), or a note
   that no GPU run has been made yet.

Each part rewrites only its own sections of the document (perfdoc.py); the others stay.

Usage: bench_all.py --cogvlm build/cogvlm --work build/bench --out docs/PERFORMANCE.md
       [--threads N] [--vision-layers 4] [--no-llama] [--install] [--no-serving]
       [--serving-only] [--gpu-report FILE] [--gpu-only]
"""
import argparse
import json
import os
import shutil
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import perfdoc  # noqa: E402


def sh(cmd):
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def machine():
    info = {"cpu": platform.processor() or "unknown", "cores": os.cpu_count(), "flags": ""}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and info["cpu"] in ("unknown", "", "x86_64"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not info["flags"]:
                flags = line.split(":", 1)[1].split()
                keep = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                        "avx512_vnni"]
                info["flags"] = " ".join(f for f in keep if f in flags)
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem_gb"] = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return info


def load():
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


ISAS = ["scalar", "avx2", "avx512", "avx512bf16"]  # the CPU backend's paths, in order
# llama.cpp's CMake switches that build it for exactly one of our paths (no AVX-512 for avx2)
LLAMA_CMAKE = {
    "avx2": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
            "-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF "
            "-DGGML_AVX512_BF16=OFF",
}


def best_isa(flags):
    """The path our CPU backend picks on this CPU (cvlm_cpu_detect_isa's rule)."""
    f = set(flags.split())
    if not {"avx2", "fma", "f16c"} <= f:
        return "scalar"
    if not {"avx512f", "avx512bw", "avx512vl"} <= f:
        return "avx2"
    return "avx512bf16" if "avx512_bf16" in f else "avx512"


def bench_isas(flags):
    """One table per path worth comparing: the best one, and AVX2 (the ISA of most laptops,
    desktops and many cloud VMs) when the best is AVX-512. The scalar path is the portable
    fallback (tested for exactness, not benchmarked: minutes per 512-token prefill)."""
    best = best_isa(flags)
    return [best] + (["avx2"] if best.startswith("avx512") else [])


def have_llama(install):
    try:
        import llama_cpp  # noqa: F401
        import gguf  # noqa: F401
        return True
    except ImportError:
        if not install:
            return False
    print("bench: installing llama-cpp-python (builds llama.cpp from source, several minutes)",
          flush=True)
    env = dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "numpy", "gguf",
                        "llama-cpp-python"], env=env)
    return r.returncode == 0


def llama_path(args, isa, native, install):
    """PYTHONPATH for the llama.cpp build that runs `isa`: "" for the installed (native)
    one when isa is the machine's best path, else a build of the same version with only
    that ISA's instructions (pip --target under the work folder, built once), or None."""
    if isa == native:
        return ""
    if isa not in LLAMA_CMAKE:
        return None
    import llama_cpp
    target = os.path.join(os.path.abspath(args.work), "llama-" + isa)
    if not os.path.isdir(os.path.join(target, "llama_cpp")):
        if not install:
            return None
        print("bench: building llama.cpp for %s (%s)" % (isa, LLAMA_CMAKE[isa]), flush=True)
        env = dict(os.environ, CMAKE_ARGS=LLAMA_CMAKE[isa])
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--target", target, "llama-cpp-python==" + llama_cpp.__version__],
                           env=env)
        if r.returncode:
            return None
    return target


def run_llama(args, path, gguf, threads, P, D, vocab, quant=None):
    """llama.cpp in its own process (tools/bench/llama_compare.py --run-only), with the
    build found on PYTHONPATH `path` ("" = the installed one); `quant` (q8_0, q4_0) has
    llama.cpp quantize the GGUF itself first."""
    js = os.path.join(args.work, "llama-run.json")
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, os.path.join(HERE, "llama_compare.py"), "--run-only", gguf,
                    "--threads", str(threads), "--prompt", str(P), "--decode", str(D),
                    "--vocab", str(vocab), "--out", js] + (["--quantize", quant] if quant else []),
                   env=env, check=True)
    with open(js) as f:
        r = json.load(f)
    import numpy as np
    r["logits"] = np.load(js + ".logits.npy")
    return r


def run_ours(args, isa, dtype, rep, vision_layers, quant=None):
    """One `cogvlm bench` run on the `isa` path (weights quantized to `quant` at load when
    given); the first of a dtype also saves the weights and logits."""
    js = os.path.join(args.work, "ours-%s-%s-%s-%d.json" % (isa, dtype, quant or "none", rep))
    # the KV cache as llama.cpp keeps it by default (F16; ours defaults to F32, exact)
    cmd = [args.cogvlm, "bench", "--preset", "llama-2048", "--dtype", dtype,
           "--vision-layers", str(vision_layers), "--kv-cache-dtype", "f16", "--json", js]
    if quant:
        cmd += ["--quantize", quant]
    if rep == 0:
        cmd += ["--logits-out", os.path.join(args.work, "logits-%s.bin" % dtype),
                "--write-checkpoint", os.path.join(args.work, "ckpt-" + dtype)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    os.environ["COGVLM_CPU_ISA"] = isa
    try:
        sh(cmd)
    finally:
        del os.environ["COGVLM_CPU_ISA"]
    return json.load(open(js))


def best_of(runs):
    """Per metric the fastest of the repeated runs (others' load only ever slows a run)."""
    best = dict(runs[0])
    for key in ("prefill_s", "decode_s"):
        best[key] = min(r[key] for r in runs)
    best["prefill_tok_s"] = best["prompt_tokens"] / best["prefill_s"]
    for key in ("prefill_gflops", "fma_peak_gflops", "gemm_gflops", "gemm16_gflops", "read_gbs",
                "copy_gbs"):
        best[key] = max(r.get(key, 0) for r in runs)
    if best["decode_tokens"]:
        best["decode_tok_s"] = best["decode_tokens"] / best["decode_s"]
        best["decode_gbs"] = best["decode_weight_gb"] * best["decode_tok_s"]
    return best


LLAMA_QUANT = {"int8": "q8_0", "int4": "q4_0"}  # ours -> llama.cpp's nearest format


def measure(args, isa, dtype, vision_layers, llama, quant=None):
    """`reps` interleaved runs of ours (on the `isa` path; weights quantized to `quant` at
    load when given) and llama.cpp (the build for that ISA: PYTHONPATH `llama`, "" for the
    installed one, None for none; with quant, its own Q8_0 / Q4_0 of the same weights);
    returns (ours, markdown or None)."""
    import numpy as np

    ck = os.path.join(args.work, "ckpt-" + dtype)
    ours, theirs, md = [], [], None
    for rep in range(args.reps):
        ours.append(run_ours(args, isa, dtype, rep, vision_layers if rep == 0 else 0, quant))
        if llama is None:
            continue
        import llama_compare as lc
        if rep == 0:
            gguf = os.path.join(args.work, "model-%s.gguf" % dtype)
            cfg, _ = lc.write_gguf(ck, gguf)
        print("+ llama.cpp run %d (%s, %s)" % (rep + 1, isa, dtype), flush=True)
        theirs.append(run_llama(args, llama, gguf, ours[0]["threads"], ours[0]["prompt_tokens"],
                                ours[0]["decode_tokens"], cfg["vocab_size"],
                                LLAMA_QUANT.get(quant)))
    best = best_of(ours)
    if llama is not None:
        import llama_compare as lc
        t = {k: min(r[k] for r in theirs) for k in ("prefill_s", "decode_s")}
        md = lc.table(best, t, best["prompt_tokens"], best["decode_tokens"],
                      "%s -> %s (llama.cpp %s)" % (dtype.upper(), quant, LLAMA_QUANT[quant].upper())
                      if quant else dtype.upper(), best["threads"])
        mine = np.fromfile(os.path.join(args.work, "logits-%s.bin" % dtype), dtype=np.float32)
        ref = theirs[0]["logits"]
        err = float(np.max(np.abs(mine - ref)) / max(1e-30, float(np.max(np.abs(ref)))))
        md += ("\n\nLast prompt token logits, cogvlm vs llama.cpp: max |diff| / max |logit| = "
               "%.2e, same argmax: %s." % (err, "yes" if np.argmax(mine) == np.argmax(ref)
                                         else "no"))
        md += ("\n\nllama.cpp: llama-cpp-python %s, system info `%s`." % (
            theirs[0].get("version", "?"), theirs[0].get("system_info", "?")))
        os.remove(gguf)
    for f in os.listdir(ck):  # 2.5 GB each: keep the disk free
        os.remove(os.path.join(ck, f))
    os.rmdir(ck)
    return best, md


DESIGN = """\
- **Decode (matrix-vector).** Each thread streams a disjoint range of weight rows once,
  widening in registers. AVX-512: 4 rows per pass, all x rows (up to 4) per weight load;
  BF16 weights on AVX512_BF16 CPUs: x is split once per call into hi + lo BF16 terms and
  each 64-byte weight load feeds two `vdpbf16ps` (exact products, F32 accumulation): three
  instructions per cache line, which is what lets a core keep up with DRAM. AVX2: one row
  of x runs 4 weight rows x 2 accumulators (8 independent FMA chains: with 2 the loop was
  bound by FMA latency, not by the weight stream). BF16 -> F32 by a 16-bit shift, F16 by
  `vcvtph2ps`, F32 FMA. Plain (unmasked) loads in the loops: masked loads measurably
  slowed the stream on Zen 5.
- **Batched decode and other small M (AVX2: up to 32 rows of x).** Pairs of weight rows
  against register blocks of 6 rows of x (12 accumulators): each weight pair comes from
  memory once and from L1 for the other blocks, so 16 sequences cost one pass over the
  weights instead of 16, and nothing is packed (packing W per GEMM cost as much as the
  arithmetic at 16 rows: 36 % of a batched step in `cvlm_cpu_pack_b_avx2` before). The
  crossover with the packed GEMM, measured on Zen 3, is at about 32-40 rows.
- **Prefill and ViT (packed GEMM).** K is cut in 512-wide slices; x is packed once per
  slice into 12-row micro-panels shared by the threads; each thread widens/transposes its
  block of W (<= 256 output columns) into 32-column panels with in-register transposes
  (16x16 on AVX-512, 8x8 on AVX2; prefetching the next panel's rows), then runs a 12 x 32
  micro-kernel: AVX-512 24 accumulators; AVX2 four 6 x 16 register blocks of 12
  accumulators, every row loop unrolled so they stay in registers (the first AVX2 kernel
  kept them on the stack: 51 GFLOP/s, 27 % of peak, on the 2-core Zen 3 where the current
  one reaches about 80 %). Every W element is widened once per GEMM; accumulation is F32.
- **Quantized weights (`--quantize int8|int4`).** int8: one scale per output channel, the
  codes sign-extended and converted in registers, the scale applied to each finished dot
  product. int4: groups of 128 along K, 32 weights per 16 bytes (low nibbles the first 16,
  high the next 16). Decode with one row of x rounds x to 8 bits per 32-element block and
  multiplies codes by codes (`vpmaddubsw` + `vpmaddwd`, as llama.cpp's Q4_0 x Q8_0): the
  float path spent more instructions per weight than DRAM delivered weights. int4 prefill
  (more than 32 rows) rounds x the same way (per group of 128) and runs an integer GEMM:
  tiles of 3 x rows by 2 W rows, each unpacked slot of codes serving 3 rows, a group's
  products summed in int16 and scaled once per group (about 2.7x the float GEMM's rate on
  one Zen 3 core, L2-resident). int8 prefill and 2..32 rows dequantize into the same F32
  panels / matrix-vector kernel as 16-bit weights.
- **Attention.** ViT (1226 x 1226, head 112) and prefill runs of >= 12 tokens use the same
  micro-kernel: keys packed per head as 32-key panels, S = q K^T, row softmax (vector exp,
  masked keys exactly 0), O = P V. Decode tokens: per (head, token) vector dot products
  and value accumulation over the KV blocks, head-major so a thread's keys stay in L2.
- **Thread pool.** A run is one 64-bit atomic word (generation | task count | next task);
  workers spin on it (pause hint), claim tasks by compare-and-swap and count themselves
  in and out; the caller runs tasks too and waits only for workers inside a task, never
  for one that has not woken up. No lock or system call on the fast path: 0.1-0.5 us per
  parallel op with 2 threads, against 11 us for the first mutex/condition-variable pool
  (a loop of empty 2-task runs), and no collapse when other processes take a core (the
  llama-small decode went from 16 to ~200 tokens/s in that situation).
- **Element-wise.** GELU (erf via Abramowitz-Stegun 7.1.26, |error| <= 1.5e-7, as PyTorch's
  vectorised CPU GELU), SiLU and softmax exp (range reduction + degree-7 polynomial) are
  vectorised; norms, RoPE and embedding stay scalar (negligible time).
- **Memory.** Weight and activation buffers >= 4 MiB are 2 MiB aligned and advised as
  transparent huge pages (fewer TLB misses while streaming weights).

"""

HISTORY = """\
| 2 threads | first CPU backend (its first machine) | AVX2 path before the AVX2 work (2-core Zen 3, issue 21) | now (this machine, best path) |
|---|---:|---:|---:|
| prefill 512 tokens, BF16 (tokens/s) | 24.1 | 25.3 | {pf:.1f} |
| decode, BF16 (tokens/s) | 3.03 | 9.07 | {dc:.2f} |
| decode weight stream (GB/s) | 7.3 | 21.7 | {gb:.1f} |
| ViT, 4 layers at 17B shapes (GFLOP/s) | 41.6 | | {vit:.1f} |

The first column is the backend as first written (row-by-row widening into scratch, one
dot product per output, scalar element-wise ops); the second the AVX2 path as issue 21
found it (a micro-kernel whose accumulators lived on the stack, scalar panel packing, GEMV
passes of 4 rows), both measured with the same `cogvlm bench`.
"""


def ours_table(o):
    step = o["decode_s"] / max(1, o["decode_tokens"])
    name = o["dtype"] + (" -> " + o["quantize"] if o.get("quantize", "none") != "none" else "")
    rows = ["| %s weights, %d threads | value |" % (name, o["threads"]), "|---|---:|",
            "| prefill %d tokens | %.1f tokens/s (%.0f GFLOP/s) |" % (
                o["prompt_tokens"], o["prefill_tok_s"], o["prefill_gflops"]),
            "| decode %d tokens | %.2f tokens/s (%.1f ms/token) |" % (
                o["decode_tokens"], o["decode_tok_s"], step * 1e3),
            "| decode weight stream | %.1f GB/s (%.2f GB of weights per token) |" % (
                o["decode_gbs"], o["decode_weight_gb"]),
            "| decode weights + KV cache stream | %.1f GB/s (+%.2f GB of F16 keys/values per "
            "token at the mean context) |" % (
                (o["decode_weight_gb"] + o.get("decode_kv_gb", 0)) * o["decode_tok_s"],
                o.get("decode_kv_gb", 0)),
            "| decode weight stream / best read-only pass | %.0f %% |" % (
                100.0 * o["decode_gbs"] / o["read_gbs"]),
            "| machine memcpy bandwidth | %.1f GB/s (read + write), best read-only pass %.1f "
            "GB/s |" % (o["copy_gbs"], o["read_gbs"])]
    if o.get("fma_peak_gflops"):
        pk = o["fma_peak_gflops"]
        rows += ["| FMA peak, %s, %d threads (register-only FMA loop) | %.1f GFLOP/s |" % (
                     o.get("isa", "?"), o["threads"], pk),
                 "| GEMM 512 x 2048 x 2048 (prefill shape) | %.1f GFLOP/s (%.0f %% of peak) |" % (
                     o["gemm_gflops"], 100.0 * o["gemm_gflops"] / pk),
                 "| GEMM 16 x 2048 x 2048 (16 batched decode rows) | %.1f GFLOP/s (%.0f %% of "
                 "peak) |" % (o["gemm16_gflops"], 100.0 * o["gemm16_gflops"] / pk)]
    if o.get("vision_layers"):
        rows.append("| vision tower, %d of 63 layers at 17B shapes | %.2f s, %.0f GFLOP/s "
                    "(%.0f GFLOP incl. patch embedding and adapter) |" % (
                        o["vision_layers"], o["vision_s"], o["vision_gflops"], o["vision_gflop"]))
    return "\n".join(rows)


def batch_bench(args):
    """Scheduler throughput (cogvlm bench-batch) on the tiny model and on the LLaMA-shaped
    random model: generated tokens/s at 1, 4, 16, 64 concurrent requests, image TTFT."""
    out = []
    shared = os.environ.get("COGVLM_SHARED_DATA", "../shared/data")
    tok = os.path.join(shared, "llama2-tokenizer.model")
    tiny = "models/cogvlm-tiny-shapes"
    if os.path.exists(os.path.join(tiny, "config.json")):
        models = [("cogvlm-tiny-shapes (the default model)", ["--model", tiny])]
    else:
        models = [("golden-tiny (random weights)",
                   ["--model", os.path.join(shared, "golden-tiny/model-bf16"), "--tokenizer", tok])]
    ckpt = os.path.join(args.work, "ckpt-batch")
    sh([args.cogvlm, "bench", "--preset", "llama-2048", "--dtype", "bf16", "--prompt-tokens", "1",
        "--decode-tokens", "0", "--vision-layers", "0", "--write-checkpoint", ckpt])
    models.append(("LLaMA-shaped 1.1B, BF16 random weights", ["--model", ckpt, "--tokenizer", tok]))
    for name, margs in models:
        js = os.path.join(args.work, "batch.json")
        extra = ["--image", os.path.join(shared, "images/demo.jpg")] if "tiny" in name else []
        sh([args.cogvlm, "bench-batch"] + margs + ["--max-tokens", "32", "--json", js] + extra)
        with open(js) as f:
            r = json.load(f)
        out += ["### %s" % name, "", "| concurrent requests | generated tokens/s | mean TTFT (ms) |",
                "|---:|---:|---:|"]
        out += ["| %d | %.1f | %.1f |" % (l["concurrency"], l["tokens_per_s"], l["ttft_ms"])
                for l in r["levels"]]
        by = {l["concurrency"]: l["tokens_per_s"] for l in r["levels"]}
        if 1 in by and 16 in by and by[1] > 0:
            out += ["", "16 concurrent requests: %.2fx the throughput of one at a time." % (
                by[16] / by[1])]
        if "image_ttft_ms" in r:
            t = r["image_ttft_ms"]
            out += ["", "Time to first token of a demo.jpg question: %.1f ms cold, %.1f ms with a "
                    "vision-cache hit (prefix cache off), %.1f ms with a prefix-cache hit." % (
                        t["cold"], t["vision_cache_hit"], t["prefix_cache_hit"])]
        out.append("")
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


ISA_TITLE = {"scalar": "portable C", "avx2": "AVX2 + FMA + F16C",
             "avx512": "AVX-512 F/BW/VL/DQ", "avx512bf16": "AVX-512 with AVX512_BF16"}


def write_doc(args, m, results, tables):
    """The engine sections (and the preamble) of the document; the serving and GPU
    sections, written by others, are kept. results[isa][dtype], tables[isa][dtype]."""
    isas = list(results)
    bf = results[isas[0]]["bf16"]
    preamble = "\n".join([
        "# Performance", "",
        "Generated by `make bench` (tools/bench/bench_all.py, tools/bench/bench_serving.py) "
        "on %s: the CPU engine, the HTTP server under load, and the GPU report when one "
        "exists." % time.strftime("%Y-%m-%d")])
    sec = {}
    sec["Machine"] = "\n".join([
        "- CPU: %s, %s cores/threads visible; ISA: %s" % (m["cpu"], m["cores"], m["flags"]),
        "- Memory: %.0f GB; measured in the same run: memcpy %.1f GB/s (read + write "
        "counted), read-only pass %.1f GB/s (%d threads)" % (
            m.get("mem_gb", 0), bf["copy_gbs"], bf["read_gbs"], bf["threads"]),
        "- Load average when the run started / ended: %s / %s (other processes on the "
        "machine share its cores and memory bandwidth; the llama.cpp runs are "
        "interleaved with ours, so the ratios are fairer than the absolute numbers)." % (
            args.load_start, load())] + (["- " + args.note] if args.note else []))
    sec["Method"] = "\n".join([
        "- `cogvlm bench --preset llama-2048`: random weights (uniform, std 0.02; norms 1)"
        " of a LLaMA-shaped model: hidden 2048, 22 layers, 32 heads (multi-head), MLP 5632,"
        " vocab 32000 (TinyLlama-1.1B's shapes). Prefill: one forward of a 512-token "
        "prompt after a 64-token warm-up; decode: 64 greedy single-token steps after it.",
        "- Decode weight stream = bytes of weights one decode step reads (all layers' "
        "language weights + lm_head; quantized: codes and scales) / time per step. The "
        "machine's read bandwidth it is compared with is the best of read-only passes over "
        "1 GiB with 1, 2, 4, 8 and 16 interleaved sequential streams per thread (all threads,"
        " best of 3 each), meant as an upper bound of what a streaming kernel can get.",
        "- FMA peak: a register-only loop of independent FMAs (12 chains of 8 lanes on AVX2, "
        "16 of 16 on AVX-512, enough to cover the FMA latency) on every thread, best of 3; "
        "the GEMM rows (cache-hot, best of 5) are stated as a fraction of it.",
        "- Vision: one 490x490 image through the ViT at CogVLM-17B's per-layer shapes "
        "(hidden 1792, 16 heads, MLP 15360, 1226 tokens) with only the first layers; FLOPs "
        "counted as 2N(4d^2 + 2dF) + 4N^2 d per layer plus patch embedding and adapter.",
        "- llama.cpp: tools/bench/llama_compare.py converts the same checkpoint to GGUF "
        "(same dtype; q/k rows permuted to llama.cpp's RoPE layout) and times the same "
        "prompt ids and decode steps through llama-cpp-python with the same threads.",
        "- Exactness: activations are F32 throughout. For BF16 weights on CPUs with "
        "AVX512_BF16, matrix-vector products (decode, <= 8 rows) split each activation "
        "into two BF16 terms (16 significant bits; |error| <= 2^-17 |x|) and use "
        "vdpbf16ps; the golden conformance test still passes at 3e-5 (tolerance 1e-4)."
        " llama.cpp rounds activations to BF16/F16, hence the logit difference below."
        " The KV cache is F16 in these runs (`--kv-cache-dtype f16`), as llama.cpp keeps"
        " it by default; ours defaults to F32 (exact against the reference), which reads"
        " twice the bytes per decode step at long context."])
    res = ["Best of %d interleaved runs per engine and metric (prefill and decode times "
           "taken separately; the vision tower runs once per instruction set). One table per "
           "instruction-set path: ours forced with `COGVLM_CPU_ISA`, llama.cpp built for the "
           "same ISA (the AVX2 build with AVX-512 off in its CMake flags)." % args.reps, ""]
    for isa in isas:
        for dt in ("bf16", "f16", "int8", "int4"):
            if dt not in results[isa]:
                continue
            what = ("%s weights" % dt.upper() if dt in ("bf16", "f16") else
                    "%s weights (`--quantize %s` of the BF16 checkpoint at load)" % (dt, dt))
            res += ["### %s path (`%s`), %s" % (ISA_TITLE.get(isa, isa), isa, what), "",
                    ours_table(results[isa][dt]), ""]
            if dt in tables.get(isa, {}):
                res += ["Same weights through llama.cpp%s:" % (
                    " (quantized by llama.cpp itself to %s)" % LLAMA_QUANT[dt].upper()
                    if dt in LLAMA_QUANT else ""), "", tables[isa][dt].strip(), ""]
            if dt in ("int8", "int4") and "bf16" in results[isa]:
                res += ["Decode: %.2fx our BF16 decode (%.2f vs %.2f tokens/s); prefill %.2fx." % (
                    results[isa][dt]["decode_tok_s"] / results[isa]["bf16"]["decode_tok_s"],
                    results[isa][dt]["decode_tok_s"], results[isa]["bf16"]["decode_tok_s"],
                    results[isa][dt]["prefill_tok_s"] / results[isa]["bf16"]["prefill_tok_s"]),
                    ""]
    sec["Results"] = "\n".join(res)
    if getattr(args, "batch", None):
        sec["Batched serving throughput (scheduler)"] = "\n".join([
            "`cogvlm bench-batch`: N requests submitted at once through the engine API "
            "(continuous batching, 32 generated tokens each, distinct prompts), generated "
            "tokens/s over the wall time.", ""] + args.batch)
    sec["How the CPU backend gets there"] = DESIGN
    hist = HISTORY.format(pf=bf["prefill_tok_s"], dc=bf["decode_tok_s"], gb=bf["decode_gbs"],
                          vit=bf.get("vision_gflops", 0.0))
    if not any(tables.values()):
        hist += ("\nllama.cpp comparison skipped (llama-cpp-python not installed; "
                 "`make bench BENCH_ARGS=--install` installs it).\n")
    sec["Before / after"] = hist
    perfdoc.update(args.out, sec, preamble=preamble)
    print("bench: wrote %s" % args.out)


# ----------------------------------------------------------------------------- GPU
GPU_NONE = """\
No GPU run has been made yet. On a machine with an NVIDIA GPU, `tests/gpu/run.sh`
(build, op parity, golden, accuracy, bench-vlm, PyTorch baseline) writes its report to
build-cuda/gpu-out/report.json (`OUT=DIR` to change); then

```sh
python3 tools/bench/bench_all.py --gpu-only --gpu-report build-cuda/gpu-out/report.json
make bench BENCH_ARGS="--install --gpu-report build-cuda/gpu-out/report.json"   # with the rest
```

fills this section from it (decode throughput per batch size, HBM bandwidth fraction,
vision tower time, tensor-core use, comparisons with PyTorch: whatever the report holds).
The report is kept as docs/perf/gpu-report.json, so later `make bench` runs keep the
section."""


def gpu_value(v):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "%.4g" % v
    if isinstance(v, (int, str)):
        return str(v).replace("|", "\\|").replace("\n", " ")
    return "`%s`" % json.dumps(v, sort_keys=True)[:200].replace("|", "\\|")


def gpu_rows(prefix, v, rows, tables):
    """Flattens nested objects into (key path, value) rows; a list of objects becomes a
    table of its own (e.g. per-op comparisons)."""
    if isinstance(v, dict):
        for k in v:
            gpu_rows("%s / %s" % (prefix, k) if prefix else str(k), v[k], rows, tables)
    elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        tables.append((prefix, v))
    else:
        rows.append((prefix, gpu_value(v)))


def gpu_section(report_path, keep_dir):
    """Markdown of the GPU section from the report (read defensively: any keys, nested
    objects, lists of objects), or the note when there is none."""
    saved = os.path.join(keep_dir, "gpu-report.json")
    if report_path:
        os.makedirs(keep_dir, exist_ok=True)
        if os.path.abspath(report_path) != os.path.abspath(saved):
            shutil.copyfile(report_path, saved)
    elif os.path.exists(saved):
        report_path = saved
    else:
        return GPU_NONE
    try:
        with open(report_path) as f:
            rep = json.load(f)
    except (OSError, ValueError) as e:
        return "The GPU report %s could not be read (%s).\n\n%s" % (report_path, e, GPU_NONE)
    if not isinstance(rep, dict):
        rep = {"report": rep}
    lines = ["From the JSON report of `tests/gpu/run.sh` (kept as docs/perf/gpu-report.json)"
             + ("; device: %s." % gpu_value(rep["device"]) if "device" in rep else "."), ""]
    # The headline numbers first (the keys tests/gpu/report.py writes), then the rest.
    first = ("decode_tok_s", "hbm_fraction", "tensor_core_fraction", "vision_ms",
             "vision_prefill_ms", "prefill_ms", "speedup_vs_torch", "op_parity", "golden",
             "accuracy")
    keys = [k for k in first if k in rep] + [k for k in rep if k not in first and k != "device"]
    rows, tables = [], []
    gpu_rows("", {k: rep[k] for k in keys}, rows, tables)
    if rows:
        lines += ["| metric | value |", "|---|---:|"]
        lines += ["| %s | %s |" % (k, v) for k, v in rows]
    for name, items in tables:
        keys = []
        for it in items:
            keys += [k for k in it if k not in keys]
        lines += ["", "%s:" % name, "", "| " + " | ".join(keys) + " |",
                  "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(gpu_value(it.get(k, "")) for k in keys) + " |"
                  for it in items]
    return "\n".join(lines)


def tokenizer_bench(args):
    """`cogvlm bench-tokenizer`: single-threaded encoding throughput of the SentencePiece
    (LLaMA-2) and byte-level BPE (LLaMA-3, CogVLM2) tokenizers on the repository's English
    documents (README.md + docs/*.md, repeated to 1 MB; run from the repository root)."""
    shared = os.environ.get("COGVLM_SHARED_DATA", "../shared/data")
    toks = [("SentencePiece BPE (LLaMA-2, CogVLM)", os.path.join(shared, "llama2-tokenizer.model")),
            ("byte-level BPE (LLaMA-3, CogVLM2)", os.path.join(shared, "llama3-tokenizer"))]
    toks = [(n, p) for n, p in toks if os.path.exists(p)]
    if not toks:
        return None
    js = os.path.join(args.work, "tokenizer.json")
    cmd = [args.cogvlm, "bench-tokenizer", "--seconds", "2", "--json", js]
    for _, p in toks:
        cmd += ["--tokenizer", p]
    sh(cmd)
    with open(js) as f:
        r = json.load(f)
    out = ["`cogvlm bench-tokenizer`: %.2f MB of English (README.md + docs/*.md, repeated), "
           "encoded on one thread; MB/s (10^6 bytes of input) and tokens/s of that thread's CPU "
           "time, each way repeated for 2 s. Whole: the text in one call; prompts: cut at line "
           "ends into pieces of at most %d bytes, one call each (per-call costs included). "
           "Target (issue 17): at least 5 MB/s per core." % (r["text_bytes"] / 1e6, r["chunk"]),
           "", "| tokenizer | bytes/token | whole: MB/s | tokens/s | prompts: MB/s | tokens/s |",
           "|---|---:|---:|---:|---:|---:|"]
    for (name, _), t in zip(toks, r["tokenizers"]):
        out.append("| %s | %.2f | %.1f | %.0f | %.1f | %.0f |" % (
            name, t["bytes_per_token"], t["whole"]["mb_s"], t["whole"]["tok_s"],
            t["prompts"]["mb_s"], t["prompts"]["tok_s"]))
    return "\n".join(out)


def big(args):
    """tools/bench/bench_big.py: CogVLM-17B shapes, int4 (decoder and vision tower), through
    the daemon; writes its own section. A failure is reported, not fatal."""
    cmd = [sys.executable, os.path.join(HERE, "bench_big.py"), "--server", args.server,
           "--out", args.out, "--work", os.path.join(args.work, "big"), "--quantize", "int4",
           "--quantize-vision", "--threads", str(args.threads or os.cpu_count())]
    print("+ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
        print("bench: the 17B-shaped int4 run failed", flush=True)


def serving(args):
    """tools/bench/bench_serving.py in its own process. A failure is reported; the GPU
    section is still written, then bench_all exits with the failure's status."""
    cmd = [sys.executable, os.path.join(HERE, "bench_serving.py"), "--out", args.out,
           "--cogvlm", args.cogvlm, "--server", args.server,
           "--work", os.path.join(args.work, "serving"),
           "--plots", os.path.join(os.path.dirname(os.path.abspath(args.out)), "perf"),
           "--threads", str(args.threads or 2)]
    if args.no_llama:
        cmd.append("--no-llama")
    print("+ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd)
    if r.returncode:
        print("bench: the serving benchmark failed (exit %d)" % r.returncode, flush=True)
    return r.returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cogvlm", default="build/cogvlm")
    ap.add_argument("--work", default="build/bench")
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3, help="interleaved runs per engine, best kept")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--note", default="", help="a line for the machine section")
    ap.add_argument("--install", action="store_true", help="pip install llama-cpp-python if missing")
    ap.add_argument("--server", default="build/cogvlm-server", help="for the serving benchmark")
    ap.add_argument("--no-serving", action="store_true", help="skip the serving benchmark")
    ap.add_argument("--no-big", action="store_true",
                    help="skip the 17B-shaped int4 run through the daemon (bench_big.py)")
    ap.add_argument("--serving-only", action="store_true",
                    help="only the serving benchmark (and the GPU section)")
    ap.add_argument("--gpu-report", help="JSON report of tests/gpu/run.sh for the GPU section")
    ap.add_argument("--gpu-only", action="store_true", help="only (re)write the GPU section")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()
    keep = os.path.join(os.path.dirname(os.path.abspath(args.out)), "perf")
    if not (args.gpu_only or args.serving_only):
        args.load_start = load()
        llama = not args.no_llama and have_llama(args.install)
        m = machine()
        native = best_isa(m["flags"])
        results, tables = {}, {}
        for isa in bench_isas(m["flags"]):
            path = llama_path(args, isa, native, args.install) if llama else None
            results[isa], tables[isa] = {}, {}
            runs = [("bf16", args.vision_layers, None), ("f16", 0, None)]
            if isa == native:  # quantized weights: the machine's own path
                runs += [("bf16", 0, "int8"), ("bf16", 0, "int4")]
            for dt, vl, q in runs:
                key = q or dt
                results[isa][key], md = measure(args, isa, dt, vl, path, q)
                if md:
                    tables[isa][key] = md
        args.batch = batch_bench(args)
        write_doc(args, m, results, tables)
        tok = tokenizer_bench(args)
        if tok:
            perfdoc.update(args.out, {"Tokenizer throughput": tok})
        if not args.no_big and m.get("mem_gb", 0) >= 20:
            big(args)
        print("bench: engine part took %.0f s" % (time.time() - t0), flush=True)
    rc = 0
    if not (args.gpu_only or args.no_serving):
        rc = serving(args)
    perfdoc.update(args.out, {"GPU": gpu_section(args.gpu_report, keep)})
    print("bench: done in %.0f s" % (time.time() - t0), flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
