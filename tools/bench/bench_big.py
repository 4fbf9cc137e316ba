#!/usr/bin/env python3
"""bench_big.py - a CogVLM-17B-shaped model on this machine, quantized, through the daemon.

cogvlm-chat's shapes (cogvlm-model.md section 1: decoder 32 x (4096, 32 heads, MLP 11008)
with both experts, EVA2-CLIP-E 63 x (1792, 16 heads, MLP 15360) at 490 px) are 35 GB in
BF16. With `--dummy-weights --quantize int4` the daemon generates the decoder's int4 codes
directly (no 16-bit copy ever exists) and the rest (embeddings, norms, the vision tower
unless --quantize-vision) at 16 bits, so the model fits a 24 GB machine. This script starts
cogvlm-server that way, sends one chat request with an image (streamed, greedy, 32 tokens)
and reports: load time, peak RSS (VmHWM), the vision tower's time (the daemon's
encode_images phase counter), prefill time (time to first token minus the vision tower),
prompt tokens, decode tokens/s (tokens after the first over their time). The answers are
noise (random weights); the shapes, memory and arithmetic are the real model's.

Usage: bench_big.py --server build/cogvlm-server --out docs/PERFORMANCE.md
       [--quantize int4] [--quantize-vision] [--threads N] [--work DIR]
"""
import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import perfdoc  # noqa: E402
from bench_serving import Server, free_port  # noqa: E402

CONFIG_17B = {
    "architectures": ["CogVLMForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
    "rms_norm_eps": 1e-05, "template_version": "chat", "vocab_size": 32000,
    "torch_dtype": "bfloat16",
    "vision_config": {"hidden_act": "gelu", "hidden_size": 1792, "image_size": 490,
                      "in_channels": 3, "intermediate_size": 15360, "layer_norm_eps": 1e-06,
                      "num_heads": 16, "num_hidden_layers": 63, "num_positions": 1226,
                      "patch_size": 14}}

TITLE = "CogVLM-17B shapes, quantized, through the daemon (this machine)"


def metric(text, name, label=None):
    for line in text.splitlines():
        if line.startswith(name) and (label is None or label in line):
            return float(line.split()[-1])
    return 0.0


def peak_rss_gb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="build/cogvlm-server")
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    ap.add_argument("--work", default="build/bench/big")
    ap.add_argument("--quantize", default="int4", choices=["int8", "int4"])
    ap.add_argument("--quantize-vision", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    shared = os.environ.get("COGVLM_SHARED_DATA", os.path.join(HERE, "../../../shared/data"))
    model = os.path.join(args.work, "cogvlm-17b")
    os.makedirs(model, exist_ok=True)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(CONFIG_17B, f, indent=1)
    port = free_port()
    cmd = [args.server, "--model", model, "--tokenizer",
           os.path.join(shared, "llama2-tokenizer.model"), "--dummy-weights",
           "--quantize", args.quantize, "--port", str(port), "--kv-memory", "2G",
           "--served-model-name", "cogvlm-17b"]
    if args.quantize_vision:
        cmd += ["--quantize-vision"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.time()
    srv = Server("cogvlm-17b-" + args.quantize, cmd, port, args.work).start(
        ready_path="/health", timeout=1800)
    load_s = time.time() - t0
    with open(os.path.join(shared, "images/demo.jpg"), "rb") as f:
        url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
    body = {"model": "cogvlm-17b", "stream": True, "temperature": 0, "max_tokens": args.max_tokens,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in this image? Describe it in detail."},
                {"type": "image_url", "image_url": {"url": url}}]}]}
    req = urllib.request.Request(srv.url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t_send, times, usage = time.time(), [], {}
    try:
        try:
            r = urllib.request.urlopen(req, timeout=3600)
        except urllib.error.HTTPError as e:
            raise RuntimeError("the request failed: %d %s" % (e.code, e.read()[:500]))
        with r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    usage = ev["usage"]
                if ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                    times.append(time.time())
        with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
            metrics = r.read().decode()
        rss = peak_rss_gb(srv.proc.pid)
    finally:
        srv.stop()
    vision = metric(metrics, "cogvlm_step_phase_seconds_total", 'phase="encode_images"')
    ttft = times[0] - t_send if times else float("nan")
    n_dec = len(times) - 1
    dec = n_dec / (times[-1] - times[0]) if n_dec > 0 else float("nan")
    prompt = usage.get("prompt_tokens", 0)
    what = "decoder int4" if args.quantize == "int4" else "decoder int8"
    what += ", vision tower %s" % (args.quantize if args.quantize_vision else "BF16")
    rows = [
        "`tools/bench/bench_big.py` (`make bench`): cogvlm-server with `--dummy-weights "
        "--quantize %s%s` on a config.json of cogvlm-chat-hf's shapes (35 GB in BF16), one "
        "streamed chat request with demo.jpg (greedy, %d tokens), %s threads. The daemon "
        "generates the quantized codes directly; the answers are noise, the shapes, memory "
        "and arithmetic are the real model's." % (
            args.quantize, " --quantize-vision" if args.quantize_vision else "", args.max_tokens,
            args.threads or os.cpu_count()), "",
        "| %s | value |" % what, "|---|---:|",
        "| load (weights generated and quantized, model built) | %.0f s |" % load_s,
        "| peak RSS of the daemon | %.1f GB |" % rss,
        "| vision tower (63 layers, 1226 tokens) | %.1f s |" % vision,
        "| prefill (%d prompt tokens, 1226 of them image tokens) | %.1f s (%.1f tokens/s) |" % (
            prompt, ttft - vision, prompt / max(1e-9, ttft - vision)),
        "| time to first token | %.1f s |" % ttft,
        "| decode | %.2f tokens/s (%d tokens) |" % (dec, n_dec),
    ]
    print("\n".join(rows))
    perfdoc.update(args.out, {TITLE: "\n".join(rows)})


if __name__ == "__main__":
    main()
