#!/usr/bin/env python3
"""bench_serving.py - the serving sections of docs/PERFORMANCE.md (part of `make bench`).

1. The load generator's own capacity (tools/bench_serve.py --self-test).
2. cogvlm-server on the default tiny model (models/cogvlm-tiny-shapes) under an open-loop
   Poisson load at several request rates, light to overload, half the requests with an
   image: TTFT / TPOT / ITL / e2e percentiles, throughput, failures, and the server's
   vision- and prefix-cache hits from /metrics, as tables and PNG plots (docs/perf/).
3. cogvlm-server against llama.cpp's server (llama-cpp-python[server]) on the same random
   LLaMA-shaped weights (written by `cogvlm bench --write-checkpoint`, converted to GGUF
   with the real LLaMA-2 vocabulary by llama_compare.py), text only, /v1/completions
   streaming, the same seeded request sequence at each rate, the same thread count, one
   server at a time; every prompt is checked to tokenize to the same ids in both.

Sections are replaced in place (perfdoc.update); the rest of the document is kept.
Needs matplotlib for the plots (tables only without it) and numpy, gguf, sentencepiece,
llama-cpp-python[server] for the comparison (skipped without them).

Usage: bench_serving.py [--server build/cogvlm-server] [--cogvlm build/cogvlm]
       [--out docs/PERFORMANCE.md] [--plots docs/perf] [--work build/bench/serving]
       [--threads 2] [--no-llama] [--quick]
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import perfdoc  # noqa: E402

BENCH_SERVE = os.path.join(ROOT, "tools", "bench_serve.py")

# Offered request rates (requests/s). The tiny model answers a request in a few ms of
# engine time, so its sweep goes from a light load to past the rate the 2-core machine
# sustains; the llama.cpp server handles one request at a time (~0.5 s each on the shape
# below), so its sweep brackets that: under, near and over its capacity.
TINY_RATES = [50, 100, 200, 400, 800, 1600]
TINY_SECONDS = 8           # requests per rate = rate x this, clamped to [200, 2000]
TINY_TIMEOUT = 10          # s; answers take < 1.5 s even in overload: a stream still open
                           # after this is one the server left hanging (see the doc text)
LLAMA_RATES = [1, 2, 4]
LLAMA_REQUESTS = 40
LLAMA_MAX_TOKENS = 32
LLAMA_PROMPT_WORDS = "64:160"  # ~90-210 tokens
# A LLaMA-shaped model of ~170M parameters (LLaMA-2 vocabulary): large enough that the
# engines, not HTTP, dominate; small enough that a rate takes well under a minute.
LLAMA_SHAPE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 1024,
               "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
               "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
               "bos_token_id": 1, "eos_token_id": 2}


def log(msg):
    print("bench-serving: " + msg, flush=True)


def loadavg():
    try:
        with open("/proc/loadavg") as fl:
            return float(fl.read().split()[0])
    except (OSError, ValueError):
        return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1:port, its output in a log file; stop() sends SIGTERM
    (both servers drain or exit on it) and kills after a grace period."""

    def __init__(self, name, cmd, port, logdir):
        self.name, self.cmd, self.port = name, cmd, port
        self.log_path = os.path.join(logdir, name + ".log")
        self.proc = None

    def start(self, ready_path="/v1/models", timeout=120):
        log("starting %s: %s" % (self.name, " ".join(self.cmd)))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s:\n%s" % (self.name, self.proc.returncode,
                                                               self.tail()))
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.port, ready_path),
                                            timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError("%s not ready after %d s:\n%s" % (self.name, timeout, self.tail()))

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def tail(self, n=20):
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()


def metrics(port):
    """Counters of our /metrics (name -> value; labelled series summed by name)."""
    out = {}
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                pass
    return out


def bench(url, json_path, flags):
    """One tools/bench_serve.py run in its own process; returns its JSON."""
    cmd = [sys.executable, BENCH_SERVE, "--url", url, "--json", json_path, "--quiet"] + flags
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(json_path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- runs
def self_test(a):
    js = os.path.join(a.work, "self-test.json")
    cmd = [sys.executable, BENCH_SERVE, "--self-test", "--json", js]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(js) as f:
        return json.load(f)["self_test"]


def tiny_sweep(a):
    """Our server on the tiny model at each rate (fresh caches per rate: one server per
    rate would cost a start each; instead the vision/prefix cache hit counts are reported)."""
    port = free_port()
    srv = Server("cogvlm-tiny", [a.server, "--model", a.tiny, "--port", str(port),
                                 "--threads", str(a.threads), "--log-level", "warn"],
                 port, a.work).start()
    runs = []
    try:
        for i, rate in enumerate(a.tiny_rates):
            n = max(200, min(2000, int(rate * TINY_SECONDS)))
            n = max(20, n // 4) if a.quick else n
            m0 = metrics(srv.port)
            # A seed per rate and one distinct image per image request: no run is helped
            # by the caches an earlier one filled, none by repeated images.
            r = bench(srv.url, os.path.join(a.work, "tiny-%g.json" % rate), [
                "--endpoint", "chat", "--num-requests", str(n), "--request-rate", str(rate),
                "--synthetic-images", str((n + 1) // 2), "--image-size", "112",
                "--image-ratio", "0.5", "--prompt-words", "4:24",
                "--max-tokens-dist", "uniform:8:64", "--seed", str(a.seed + i), "--warmup", "2",
                "--goodput", "ttft:100,tpot:20", "--timeout", str(TINY_TIMEOUT)])
            m1 = metrics(srv.port)
            r["server_metrics"] = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
            r["rate"] = rate
            runs.append(r)
            s = r["summary"]
            log("tiny rate %g: %d ok, %d failed, %.1f req/s, %.0f tok/s, TTFT p50 %.1f ms" % (
                rate, s["completed"], s["failed"], s["request_throughput"],
                s["output_throughput"], s["ttft_ms"]["median"] or 0))
    finally:
        srv.stop()
    return runs


def have_llama_stack():
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
        import llama_cpp.server.app  # noqa: F401  (the [server] extra: fastapi, uvicorn, ...)
        import numpy  # noqa: F401
        import sentencepiece  # noqa: F401
        return None
    except ImportError as e:
        return str(e)


def token_check(a, gguf_path, ckpt_flags):
    """Tokenizes the benchmark's prompts with both engines' tokenizers: ours through
    `cogvlm tokenize` (+ BOS, as our /v1/completions adds it), llama.cpp's through the
    GGUF's vocabulary as its server's completion path does. Returns (same, total)."""
    import bench_serve
    from llama_cpp import Llama

    args = bench_serve.parse_args(ckpt_flags)
    prompts = [json.loads(r["body"])["prompt"] for r in bench_serve.build_requests(args, "m")]
    p = subprocess.run([a.cogvlm, "tokenize", "--tokenizer", a.tokenizer], check=True,
                       input="".join(json.dumps({"text": t}) + "\n" for t in prompts),
                       capture_output=True, text=True)
    ours = [[1] + json.loads(line)["ids"] for line in p.stdout.splitlines()]
    voc = Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    theirs = [voc.tokenize(t.encode(), add_bos=True, special=True) for t in prompts]
    same = sum(1 for x, y in zip(ours, theirs) if x == y)
    return same, len(prompts), [len(x) for x in ours]


def llama_compare(a):
    import llama_compare as lc

    ckpt = os.path.join(a.work, "llama-ckpt")
    cfg_path = os.path.join(a.work, "llama-shape.json")
    with open(cfg_path, "w") as f:
        json.dump(LLAMA_SHAPE, f)
    subprocess.run([a.cogvlm, "bench", "--config", cfg_path, "--dtype", "bf16", "--threads",
                    str(a.threads), "--prompt-tokens", "1", "--decode-tokens", "0",
                    "--vision-layers", "0", "--write-checkpoint", ckpt], check=True,
                   stdout=subprocess.DEVNULL)
    gguf_path = os.path.join(a.work, "llama.gguf")
    lc.write_gguf(ckpt, gguf_path, tokenizer=a.tokenizer)
    n = max(8, LLAMA_REQUESTS // 3) if a.quick else LLAMA_REQUESTS
    common = ["--endpoint", "completions", "--num-requests", str(n), "--prompt-words",
              LLAMA_PROMPT_WORDS, "--max-tokens", str(LLAMA_MAX_TOKENS), "--seed", str(a.seed),
              "--warmup", "2", "--timeout", "120"]
    same, total, prompt_lens = token_check(a, gguf_path, common)
    log("tokenization: %d of %d prompts give identical ids" % (same, total))

    p_ours, p_llama = free_port(), free_port()
    servers = [
        ("cogvlm", Server("cogvlm-llama", [
            a.server, "--model", ckpt, "--tokenizer", a.tokenizer, "--threads", str(a.threads),
            "--port", str(p_ours), "--kv-memory", "1G", "--log-level", "warn"], p_ours, a.work)),
        ("llama.cpp", Server("llama-cpp-server", [
            sys.executable, "-m", "llama_cpp.server", "--model", gguf_path,
            "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads),
            "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(p_llama),
            # a queued request must not cut the running one short (its default)
            "--interrupt_requests", "False", "--verbose", "False"], p_llama, a.work)),
    ]
    out = {"shape": LLAMA_SHAPE, "requests": n, "tokens_same": same, "tokens_total": total,
           "mean_prompt_tokens": sum(prompt_lens) / len(prompt_lens), "runs": {}}
    try:
        import llama_cpp
        out["llama_cpp_version"] = llama_cpp.__version__
    except ImportError:
        pass
    # One server at a time, alternating at each rate (a fresh start per run), so that
    # both see the same background load on a shared machine as nearly as possible.
    for rate in a.llama_rates:
        for name, srv in servers:
            srv.start()
            try:
                load0 = loadavg()
                r = bench(srv.url, os.path.join(a.work, "cmp-%s-%g.json" % (name, rate)),
                          common + ["--request-rate", str(rate)])
                r["loadavg"] = (load0, loadavg())
            finally:
                srv.stop()
            out["runs"][(name, rate)] = r
            s = r["summary"]
            log("%s rate %g: %.2f req/s, %.1f tok/s, TTFT p50 %.0f ms, TPOT p50 %.1f ms" % (
                name, rate, s["request_throughput"], s["output_throughput"],
                s["ttft_ms"]["median"] or 0, s["tpot_ms"]["median"] or 0))
    # Both servers got the same prompts; ours reports prompt_tokens, check them against
    # llama.cpp's tokenization of the same text (BOS included).
    r0 = out["runs"][("cogvlm", a.llama_rates[0])]
    ptoks = [q.get("prompt_tokens") for q in r0["requests"]]
    out["prompt_tokens_match"] = sum(1 for x, y in zip(ptoks, prompt_lens) if x == y)
    for f in os.listdir(ckpt):  # ~340 MB: keep the disk free
        os.remove(os.path.join(ckpt, f))
    os.rmdir(ckpt)
    os.remove(gguf_path)
    return out


# ----------------------------------------------------------------------------- plots
def plots(a, tiny, cmp):
    """PNG plots into a.plots; returns [(file name, caption)] (empty without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plots")
        return []
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: "%g" % v)

    def log_axes(ax, xticks):
        """Log axes labelled with plain numbers: the rates on x, 1-2-5 steps on y."""
        ax.set_xscale("log")
        ax.set_xticks(xticks)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())

    os.makedirs(a.plots, exist_ok=True)
    made = []
    if tiny:
        rates = [r["rate"] for r in tiny]
        fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
        for ax, key, name in zip(axes.flat, ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"),
                                 ("TTFT", "TPOT", "ITL (per stream chunk)", "End-to-end")):
            for q, style in (("median", "o-"), ("p90", "s--"), ("p99", "^:"), ("mean", "x-.")):
                ys = [r["summary"][key][q] for r in tiny]
                ax.plot(rates, [y if y is not None else float("nan") for y in ys], style,
                        label=q)
            ax.set_yscale("log")
            log_axes(ax, rates)
            ax.set_title(name)
            ax.set_xlabel("offered load (requests/s)")
            ax.set_ylabel("ms")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("cogvlm-server, cogvlm-tiny-shapes, %d threads: latency vs request rate"
                     % a.threads)
        fig.tight_layout()
        fig.savefig(os.path.join(a.plots, "serving-latency.png"), dpi=90)
        plt.close(fig)
        made.append(("serving-latency.png", "Latency percentiles against the offered request "
                     "rate (tiny model, half the requests with an image)"))

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ach = [r["summary"]["request_throughput"] for r in tiny]
        ax.plot(rates, ach, "o-", label="completed requests/s")
        ax.plot(rates, rates, "k:", label="offered = completed")
        ax2 = ax.twinx()
        ax2.plot(rates, [r["summary"]["output_throughput"] for r in tiny], "s--", color="C1",
                 label="output tokens/s")
        ax.set_yscale("log")
        log_axes(ax, rates)
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("requests/s")
        ax2.set_ylabel("output tokens/s")
        ax.grid(True, which="both", alpha=0.3)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
        ax.set_title("cogvlm-server, tiny model: throughput vs request rate")
        fig.tight_layout()
        fig.savefig(os.path.join(a.plots, "serving-throughput.png"), dpi=90)
        plt.close(fig)
        made.append(("serving-throughput.png", "Achieved throughput against the offered rate"))
    if cmp and cmp.get("runs"):
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for name, color in (("cogvlm", "C0"), ("llama.cpp", "C3")):
            rates = [r for r in a.llama_rates if (name, r) in cmp["runs"]]
            ss = [cmp["runs"][(name, r)]["summary"] for r in rates]
            axes[0].plot(rates, [s["ttft_ms"]["median"] for s in ss], "o-", color=color,
                         label=name + " p50")
            axes[0].plot(rates, [s["ttft_ms"]["p99"] for s in ss], "^:", color=color,
                         label=name + " p99")
            axes[1].plot(rates, [s["tpot_ms"]["median"] for s in ss], "o-", color=color,
                         label=name + " p50")
            axes[2].plot(rates, [s["output_throughput"] for s in ss], "o-", color=color,
                         label=name)
        for ax, t, y in zip(axes, ("TTFT", "TPOT", "output throughput"),
                            ("ms", "ms", "tokens/s")):
            ax.set_xlabel("offered load (requests/s)")
            ax.set_ylabel(y)
            ax.set_title(t)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        for ax in axes:
            ax.set_xticks(a.llama_rates)
            ax.xaxis.set_major_formatter(plain)
        for ax in axes[1:]:
            ax.set_ylim(bottom=0)
        axes[0].set_yscale("log")  # the two servers' TTFTs differ by orders of magnitude
        axes[0].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes[0].yaxis.set_major_formatter(plain)
        axes[0].yaxis.set_minor_formatter(NullFormatter())
        fig.suptitle("Same LLaMA-shaped weights, /v1/completions streaming, %d threads each"
                     % a.threads)
        fig.tight_layout()
        fig.savefig(os.path.join(a.plots, "serving-vs-llamacpp.png"), dpi=90)
        plt.close(fig)
        made.append(("serving-vs-llamacpp.png", "cogvlm-server vs llama.cpp's server"))
    return made


# ----------------------------------------------------------------------------- markdown
def f(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def tiny_md(a, st, tiny, figs):
    lines = [
        "`tools/bench_serve.py` against `cogvlm-server --model models/cogvlm-tiny-shapes "
        "--threads %d` (defaults otherwise: 64 running sequences, queue limit 256, vision "
        "and prefix caches on), %s. Open loop: Poisson arrivals at each offered rate, "
        "%d s worth of requests per rate (200 to 2000), half of them /v1/chat/completions "
        "with a question and an image of their own (synthetic 112x112 PNGs of 1-3 coloured "
        "shapes, all distinct, so the vision tower runs for every one), half text-only "
        "(4-24 random words); max_tokens uniform in 8..64, temperature 0, streamed with "
        "usage; seed %d + the rate's index, 2 warm-up requests; one server for the whole "
        "sweep. The generator runs on the same 2 cores as the server; its CPU share is in "
        "the last column." % (a.threads, time.strftime("%Y-%m-%d"), TINY_SECONDS, a.seed),
        "",
        "The tiny model often stops before max_tokens (mean generated tokens below), and the "
        "server writes whatever tokens are ready when its loop wakes, so several tokens can "
        "share one SSE chunk (%s stream chunks per output token, lowest to highest rate): "
        "TTFT then covers several tokens and TPOT/ITL shrink. Latencies in ms." % (
            " to ".join(f(r["summary"]["chunks_per_output_token"], ".2f")
                        for r in (tiny[0], tiny[-1])) if tiny else "-"), "",
        "| offered req/s | requests | ok | failed (429 / timeout) | req/s | output tok/s | total tok/s "
        "| mean out tokens | TTFT p50 | TTFT p90 | TTFT p99 | TPOT p50 | TPOT p99 | ITL p50 "
        "| ITL p99 | e2e p50 | e2e p90 | e2e p99 | goodput req/s | vision cache hits "
        "| generator CPU |",
        "|" + "---:|" * 21]
    for r in tiny:
        s, m = r["summary"], r.get("server_metrics", {})
        vh, vm = m.get("cogvlm_vision_cache_hits_total"), m.get("cogvlm_vision_cache_misses_total")
        vc = "%.0f %%" % (100 * vh / (vh + vm)) if vh is not None and vm is not None and \
            vh + vm > 0 else "-"
        lines.append("| %g | %d | %d | %d (%d / %d) | %.1f | %.0f | %.0f | %.1f | %s | %s | %s | %s | "
                     "%s | %s | %s | %s | %s | %s | %.1f | %s | %.0f %% |" % (
                         r["rate"], r["config"]["num_requests"], s["completed"], s["failed"],
                         s["http_429"], s["timeouts"], s["request_throughput"],
                         s["output_throughput"],
                         s["total_token_throughput"], s["mean_output_tokens"],
                         f(s["ttft_ms"]["median"]), f(s["ttft_ms"]["p90"]),
                         f(s["ttft_ms"]["p99"]), f(s["tpot_ms"]["median"], ".2f"),
                         f(s["tpot_ms"]["p99"], ".2f"), f(s["itl_ms"]["median"], ".2f"),
                         f(s["itl_ms"]["p99"], ".2f"), f(s["e2e_ms"]["median"]),
                         f(s["e2e_ms"]["p90"]), f(s["e2e_ms"]["p99"]),
                         s["goodput"]["request_goodput"], vc,
                         100 * s["generator"]["cpu_fraction_of_one_core"]))
    stalled = sum(r["summary"]["timeouts"] for r in tiny)
    if stalled:
        lines += ["", "%d request(s) in all timed out (%d s): their streams stopped after a few "
                  "events (sometimes right after the response headers) although the engine had "
                  "finished them (/metrics: no request running or waiting) and never resumed, "
                  "even when other requests arrived. A server bug under load that this "
                  "benchmark exposes; the rates above exclude the time spent waiting for them."
                  % (stalled, TINY_TIMEOUT)]
    img = [(r["rate"], r) for r in tiny]
    lines += ["", "Goodput: requests/s with TTFT <= 100 ms and TPOT <= 20 ms. Image vs text "
              "requests at each rate (TTFT p50 / e2e p50, ms): " + "; ".join(
                  "%g/s: image %s / %s, text %s / %s" % (
                      rate, *split_p50(r, True), *split_p50(r, False)) for rate, r in img) + "."]
    for name, cap in figs:
        if name.startswith("serving-") and "llama" not in name:
            lines += ["", "![%s](perf/%s)" % (cap, name)]
    lines += ["", "Generator capacity on this machine (`tools/bench_serve.py --self-test`, an "
              "instant fake server in the same process): %.0f requests/s with 2-token answers, "
              "%.0f stream chunks/s with 128-token answers; its own CPU cost %.0f us per "
              "request and %.1f us per chunk, i.e. one core would carry %.0f requests/s or "
              "%.0f chunks/s. In the runs above its whole-process CPU cost was %s us per "
              "request." % (st["max_request_rate"], st["max_chunk_rate"],
                            st["requests"]["loop_thread_cpu_us_per_request"],
                            st["chunks"]["loop_thread_cpu_us_per_chunk"],
                            st["generator_only_request_ceiling"],
                            st["generator_only_chunk_ceiling"],
                            "-".join("%.0f" % x for x in (
                                min(r["summary"]["generator"]["cpu_us_per_request"] for r in tiny),
                                max(r["summary"]["generator"]["cpu_us_per_request"] for r in tiny)))
                            if tiny else "-")]
    return "\n".join(lines)


def split_p50(run, image):
    from bench_serve import pct
    rs = [q for q in run["requests"] if q["ok"] and q["image"] == image]
    t = [q["ttft_s"] for q in rs if "ttft_s" in q]
    e = [q["e2e_s"] for q in rs]
    return (f(1e3 * pct(t, 50)) if t else "-", f(1e3 * pct(e, 50)) if e else "-")


def llama_md(a, cmp):
    sh = cmp["shape"]
    params = (2 * sh["vocab_size"] * sh["hidden_size"] + sh["num_hidden_layers"] * (
        4 * sh["hidden_size"] ** 2 + 3 * sh["hidden_size"] * sh["intermediate_size"]))
    lines = [
        "Both servers serve the same random BF16 weights of a LLaMA-shaped model (hidden %d, "
        "%d layers, %d heads, MLP %d, vocabulary %d: %.0fM parameters), written by `cogvlm "
        "bench --config ... --write-checkpoint` and converted to GGUF by "
        "tools/bench/llama_compare.py with the real LLaMA-2 SentencePiece vocabulary "
        "(pieces, scores, types, BOS/EOS). Ours: `cogvlm-server --model DIR --tokenizer "
        "llama2-tokenizer.model --threads %d --kv-memory 1G`; llama.cpp: `python -m "
        "llama_cpp.server --n_threads %d --n_threads_batch %d --n_ctx 2048 "
        "--interrupt_requests False` (llama-cpp-python %s; it runs one request at a time, "
        "queued requests wait). One server at a time on the same machine, alternating at each "
        "rate (each run on a freshly started server), the same seeded "
        "sequence of %d /v1/completions streaming requests per rate (Poisson arrivals; "
        "prompts of 64-160 random words, %.0f tokens on average; max_tokens %d, temperature "
        "0; random weights rarely emit EOS, so answers run to max_tokens), 2 warm-up "
        "requests each." % (
            sh["hidden_size"], sh["num_hidden_layers"], sh["num_attention_heads"],
            sh["intermediate_size"], sh["vocab_size"], params / 1e6, a.threads, a.threads,
            a.threads, cmp.get("llama_cpp_version", "?"), cmp["requests"],
            cmp["mean_prompt_tokens"], LLAMA_MAX_TOKENS),
        "",
        "Same tokens: %d of %d prompts tokenize to identical ids in both (our tokenizer vs "
        "the GGUF's vocabulary in llama.cpp), and our server's reported prompt_tokens equal "
        "llama.cpp's count for %d of %d requests. llama.cpp's stream carries no usage; its "
        "output tokens are counted from finish_reason \"length\" (= max_tokens). Load "
        "average (1 min) before each run: %s." % (
            cmp["tokens_same"], cmp["tokens_total"], cmp["prompt_tokens_match"],
            cmp["tokens_total"], ", ".join(
                "%s at %g/s %s" % (k[0], k[1], f(v.get("loadavg", (None,))[0], ".2f"))
                for k, v in cmp["runs"].items())),
        "",
        "| offered req/s | server | ok/failed | req/s | output tok/s | TTFT mean | TTFT p50 "
        "| TTFT p99 | TPOT p50 | TPOT p99 | ITL p50 | e2e p50 | e2e p99 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rate in a.llama_rates:
        for name in ("cogvlm", "llama.cpp"):
            r = cmp["runs"].get((name, rate))
            if not r:
                continue
            s = r["summary"]
            lines.append("| %g | %s | %d/%d | %.2f | %.1f | %s | %s | %s | %s | %s | %s | %s | "
                         "%s |" % (rate, name, s["completed"], s["failed"],
                                   s["request_throughput"], s["output_throughput"],
                                   f(s["ttft_ms"]["mean"], ".0f"), f(s["ttft_ms"]["median"], ".0f"),
                                   f(s["ttft_ms"]["p99"], ".0f"), f(s["tpot_ms"]["median"]),
                                   f(s["tpot_ms"]["p99"]), f(s["itl_ms"]["median"]),
                                   f(s["e2e_ms"]["median"], ".0f"), f(s["e2e_ms"]["p99"], ".0f")))
    lines += ["", "Ratios ours / llama.cpp (throughput: above 1 is better for us; TTFT: below "
              "1 is better for us):", "",
              "| offered req/s | output throughput | request throughput | TTFT mean | TTFT p50 "
              "| TTFT p99 | TPOT p50 |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for rate in a.llama_rates:
        o, t = cmp["runs"].get(("cogvlm", rate)), cmp["runs"].get(("llama.cpp", rate))
        if not (o and t):
            continue
        so, st = o["summary"], t["summary"]

        def ratio(x, y):
            return f(x / y, ".2f") if x is not None and y else "-"
        lines.append("| %g | %s | %s | %s | %s | %s | %s |" % (
            rate, ratio(so["output_throughput"], st["output_throughput"]),
            ratio(so["request_throughput"], st["request_throughput"]),
            ratio(so["ttft_ms"]["mean"], st["ttft_ms"]["mean"]),
            ratio(so["ttft_ms"]["median"], st["ttft_ms"]["median"]),
            ratio(so["ttft_ms"]["p99"], st["ttft_ms"]["p99"]),
            ratio(so["tpot_ms"]["median"], st["tpot_ms"]["median"])))
    lo, hi = a.llama_rates[0], a.llama_rates[-1]
    pairs = [(cmp["runs"].get(("cogvlm", r)), cmp["runs"].get(("llama.cpp", r))) for r in (lo, hi)]
    if all(o and t for o, t in pairs):
        (o1, t1), (o2, t2) = [(o["summary"], t["summary"]) for o, t in pairs]
        lines += ["", "At %g request/s: TPOT p50 %s ms (ours) vs %s ms (llama.cpp), TTFT p50 %s "
                  "vs %s ms. At %g requests/s: output %s vs %s tokens/s, TTFT p50 %s vs %s ms. "
                  "llama.cpp's server decodes one request at a time (later ones wait in its "
                  "queue); ours batches every running request into each step." % (
                      lo, f(o1["tpot_ms"]["median"]), f(t1["tpot_ms"]["median"]),
                      f(o1["ttft_ms"]["median"], ".0f"), f(t1["ttft_ms"]["median"], ".0f"),
                      hi, f(o2["output_throughput"]), f(t2["output_throughput"]),
                      f(o2["ttft_ms"]["median"], ".0f"), f(t2["ttft_ms"]["median"], ".0f"))]
    lines += ["", "![cogvlm-server vs llama.cpp server](perf/serving-vs-llamacpp.png)"]
    return "\n".join(lines)


TOOL_DOC = """\
`tools/bench_serve.py` is an open-loop load generator for any OpenAI-compatible server
(Python 3.11 standard library only: asyncio streams speaking HTTP/1.1 with keep-alive
connections, its own SSE parser). It sends a seeded request sequence at a Poisson (or
fixed) rate, streams every answer with `stream_options: {"include_usage": true}` and
prints a summary like vLLM's benchmark_serving; `--json FILE` keeps every request's
record (arrival, TTFT, every chunk gap, tokens, status) and the summary for plotting.

```sh
make run &   # or any OpenAI-compatible server
tools/bench_serve.py --url http://127.0.0.1:8000 --num-requests 500 --request-rate 50 \\
    --synthetic-images 64 --image-ratio 0.5 --max-tokens-dist uniform:8:64 \\
    --goodput ttft:100,tpot:20 --json run.json
tools/bench_serve.py --endpoint completions --request-rate inf --concurrency 16   # closed burst
tools/bench_serve.py --self-test      # the generator's own ceiling on this machine
```

| flag | meaning |
|---|---|
| `--url URL` | server base URL (`http://host:port`, with or without `/v1`) |
| `--endpoint chat\\|completions` | `/v1/chat/completions` (default; images possible) or `/v1/completions` |
| `--model ID` | model id to send (default: the first one `GET /v1/models` lists) |
| `--api-key KEY` | sent as `Authorization: Bearer` (default `$OPENAI_API_KEY`) |
| `--num-requests N` | requests in the measured run (200) |
| `--request-rate R` | mean arrivals per second; `inf` (default) sends all at once |
| `--arrival poisson\\|fixed` | exponential gaps (default) or evenly spaced arrivals |
| `--concurrency N` | at most N requests in flight; later arrivals wait client-side (their wait is reported as client_queue, not latency) |
| `--prompt-words N\\|LO:HI` | text prompt length in random common words (8:32) |
| `--image-dir DIR`, `--synthetic-images N`, `--image-size PX` | image pool: jpg/png/webp/gif files of DIR and/or N drawn PNGs of coloured shapes (224 px); each image is used once, in seeded order, before any repeats |
| `--image-ratio F` | fraction of chat requests with an image, exactly (rounded), at seeded positions (0) |
| `--max-tokens N`, `--max-tokens-dist uniform:LO:HI\\|choice:A,B\\|exp:MEAN[:MAX]` | fixed (32) or sampled max_tokens |
| `--temperature T`, `--extra-body JSON` | sampling temperature (0); fields merged into every body (e.g. `{"ignore_eos": true}` where a server supports it; ours does not, so report actual output tokens) |
| `--warmup N` | requests sent one by one first, not recorded (0) |
| `--goodput ttft:MS,tpot:MS,e2e:MS` | goodput = completed requests/s meeting every stated target |
| `--seed S` | the request sequence (prompts, images, max_tokens) depends only on it, not on the rate; arrival times are a separate stream (0) |
| `--timeout S` | per request, whole stream (600); a timed-out request counts as failed and does not stretch the duration |
| `--no-keep-alive` | a new connection per request (default: pooled keep-alive connections) |
| `--json FILE`, `--label TEXT`, `--quiet` | full records + summary; a label stored in the JSON; no printed summary |
| `--self-test` | runs against an instant in-process fake server; prints the request and chunk rates it sustains and its CPU cost per request/chunk |

Definitions: TTFT = first chunk carrying text - request sent; ITL = gaps between
successive text chunks (a chunk may hold several tokens; the summary gives chunks per
token); TPOT = (e2e - TTFT) / (output tokens - 1); e2e = end of stream - request sent;
output tokens from `usage.completion_tokens`, else max_tokens when finish_reason is
"length", else the number of text chunks (reported as `output_tokens_from`). Failures
(HTTP errors, 429 separately, broken streams) are counted, not averaged in. Percentiles
interpolate linearly (numpy's default). The generator reports its own process CPU time
per request and per chunk and the lateness of its dispatches (`dispatch_lag`), so that
a run where it was the bottleneck can be recognised.

`make bench` runs tools/bench/bench_serving.py after the engine benchmarks; on its own:
`build/bench-venv/bin/python tools/bench/bench_serving.py` (`--no-llama` skips the
comparison, `--quick` shortens every run)."""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="build/cogvlm-server")
    ap.add_argument("--cogvlm", default="build/cogvlm")
    ap.add_argument("--tiny", default="models/cogvlm-tiny-shapes")
    ap.add_argument("--tokenizer", default=os.path.join(
        os.environ.get("COGVLM_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data")),
        "llama2-tokenizer.model"))
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    ap.add_argument("--plots", default="docs/perf")
    ap.add_argument("--work", default="build/bench/serving")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp comparison")
    ap.add_argument("--quick", action="store_true", help="a quarter of the requests (testing)")
    a = ap.parse_args()
    for k in ("server", "cogvlm", "tiny", "out", "plots", "work"):
        setattr(a, k, os.path.abspath(getattr(a, k)))
    a.tiny_rates, a.llama_rates = TINY_RATES, LLAMA_RATES
    os.makedirs(a.work, exist_ok=True)
    t0 = time.time()
    st = self_test(a)
    tiny = tiny_sweep(a)
    cmp, why = None, None
    if a.no_llama:
        why = "skipped (--no-llama)"
    else:
        why = have_llama_stack()
        if why:
            why = "skipped: %s (pip install numpy gguf sentencepiece 'llama-cpp-python[server]')" % why
        else:
            cmp = llama_compare(a)
    figs = plots(a, tiny, cmp)
    sections = {
        "Serving benchmark (HTTP, tiny model)": tiny_md(a, st, tiny, figs),
        "Serving: cogvlm-server vs llama.cpp server": llama_md(a, cmp) if cmp else
        "The comparison was %s." % why,
        "The load generator (tools/bench_serve.py)": TOOL_DOC,
    }
    perfdoc.update(a.out, sections)
    with open(os.path.join(a.work, "summary.json"), "w") as fo:
        json.dump({"self_test": st,
                   "tiny": [{"rate": r["rate"], "summary": r["summary"],
                             "server_metrics": r.get("server_metrics")} for r in tiny],
                   "llama": None if not cmp else {
                       **{k: v for k, v in cmp.items() if k != "runs"},
                       "runs": [{"server": k[0], "rate": k[1], "summary": v["summary"]}
                                for k, v in cmp["runs"].items()]}}, fo, indent=1)
    log("updated %s in %.0f s" % (a.out, time.time() - t0))


if __name__ == "__main__":
    main()
