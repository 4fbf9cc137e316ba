#!/usr/bin/env python3
"""bench_torch.py - the PyTorch eager baseline of the GPU benchmark (tests/gpu/run.sh).

The same layers as engine/model/model_rank.c for the cogvlm-chat-hf 17B shape (cogvlm-model.md §1,
§3, §4), random BF16 weights generated on the GPU (uniform, std 0.02), written the way the
reference HF modeling code runs them (eager, no fusion, no CUDA graphs):
- vision: patch conv, CLS + positions, 63 post-norm layers (qkv, attention, dense,
  LayerNorm, residual; fc1, exact GELU, fc2, LayerNorm, residual), GLU adapter, boi/eoi;
- prefill: BOS + 1227 image rows + 50 question tokens (T = 1278) through 32 decoder layers
  with both experts (boolean-mask routing as in HF), RoPE (fp32 angles), causal
  attention, lm_head on the last token;
- decode at batch 1, 16 and 64: one token per sequence per step with a KV cache of
  ~1300 slots per sequence (contiguous [B, H, ctx, hd] tensors, one per layer; the
  sequences do not share keys), language expert only.
Attention is torch.nn.functional.scaled_dot_product_attention everywhere (PyTorch picks
its flash / memory-efficient kernel). Times are CUDA-event timed after a warm-up.
--layers / --vit-layers run fewer layers and scale the layer part linearly to the full
depth (the JSON says "extrapolated": true); the script also drops to fewer LM layers by
itself when the batch-64 KV cache does not fit. Output: JSON (--json FILE) and a summary.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

D, H, HD, I, V, L = 4096, 32, 128, 11008, 32000, 32
VD, VH, VF, VL, IMG, P = 1792, 16, 15360, 63, 490, 14
NP = (IMG // P) ** 2          # 1225 patches
N = NP + 1                    # + CLS
IMG_TOKENS = NP + 2           # boi, patches, eoi
DEV = "cuda"
BF = torch.bfloat16


def rand(*shape):
    a = 0.02 * 3 ** 0.5
    return torch.empty(*shape, dtype=BF, device=DEV).uniform_(-a, a)


def ones(n):
    return torch.ones(n, dtype=BF, device=DEV)


def zeros(n):
    return torch.zeros(n, dtype=BF, device=DEV)


def cuda_time(fn, reps=1, warm=1):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / reps  # ms


# ---- vision ------------------------------------------------------------------------------

def vit_weights(layers):
    w = {"patch_w": rand(VD, 3, P, P), "patch_b": zeros(VD), "cls": rand(1, 1, VD),
         "pos": rand(1, N, VD), "layers": []}
    for _ in range(layers):
        w["layers"].append({
            "qkv_w": rand(3 * VD, VD), "qkv_b": zeros(3 * VD), "dense_w": rand(VD, VD),
            "dense_b": zeros(VD), "ln_in_w": ones(VD), "ln_in_b": zeros(VD),
            "fc1_w": rand(VF, VD), "fc1_b": zeros(VF), "fc2_w": rand(VD, VF), "fc2_b": zeros(VD),
            "ln_post_w": ones(VD), "ln_post_b": zeros(VD)})
    w.update(proj=rand(D, VD), proj_ln_w=ones(D), proj_ln_b=zeros(D), gate=rand(I, D),
             up=rand(I, D), down=rand(D, I), boi=rand(1, 1, D), eoi=rand(1, 1, D))
    return w


def vit_forward(w, px):
    x = F.conv2d(px, w["patch_w"], w["patch_b"], stride=P).flatten(2).transpose(1, 2)
    x = torch.cat([w["cls"], x], dim=1) + w["pos"]                       # [1, N, VD]
    for lw in w["layers"]:
        qkv = F.linear(x, lw["qkv_w"], lw["qkv_b"]).view(1, N, 3, VH, VD // VH)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                   # [1, VH, N, 112]
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, N, VD)
        x = x + F.layer_norm(F.linear(o, lw["dense_w"], lw["dense_b"]), (VD,), lw["ln_in_w"],
                             lw["ln_in_b"], 1e-6)
        m = F.linear(F.gelu(F.linear(x, lw["fc1_w"], lw["fc1_b"])), lw["fc2_w"], lw["fc2_b"])
        x = x + F.layer_norm(m, (VD,), lw["ln_post_w"], lw["ln_post_b"], 1e-6)
    h = F.linear(x[:, 1:], w["proj"])
    h = F.gelu(F.layer_norm(h, (D,), w["proj_ln_w"], w["proj_ln_b"], 1e-5))
    y = F.linear(F.silu(F.linear(h, w["gate"])) * F.linear(h, w["up"]), w["down"])
    return torch.cat([w["boi"], y, w["eoi"]], dim=1)                     # [1, 1227, D]


# ---- language model ------------------------------------------------------------------------

def expert():
    return {"qkv": rand(3 * D, D), "dense": rand(D, D), "gate": rand(I, D), "up": rand(I, D),
            "down": rand(D, I)}


def lm_weights(layers, vision_expert=True):
    return {"embed": rand(V, D), "norm": ones(D), "lm_head": rand(V, D),
            "layers": [{"in_norm": ones(D), "post_norm": ones(D), "lang": expert(),
                        "vis": expert() if vision_expert else None} for _ in range(layers)]}


def rms(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(BF)


def rope_tables(pos):
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2, device=DEV).float() / HD))
    f = pos.float()[:, None] * inv[None]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos().to(BF), emb.sin().to(BF)


def rope(x, cos, sin):  # x [..., T, HD], cos/sin [T, HD]
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def mlp(e, h):
    return F.linear(F.silu(F.linear(h, e["gate"])) * F.linear(h, e["up"]), e["down"])


def routed(lw, name, h, vis):
    """HF's visual-expert routing: both experts on their token subsets of one buffer."""
    lang = ~vis
    out_dim = lw["lang"][name].shape[0]
    out = torch.empty(h.shape[0], out_dim, dtype=BF, device=DEV)
    out[vis] = F.linear(h[vis], lw["vis"][name])
    out[lang] = F.linear(h[lang], lw["lang"][name])
    return out


def routed_mlp(lw, h, vis):
    out = torch.empty_like(h)
    out[vis] = mlp(lw["vis"], h[vis])
    out[~vis] = mlp(lw["lang"], h[~vis])
    return out


def prefill(w, feats, T):
    ids = torch.randint(3, V, (T,), device=DEV)
    vis = torch.zeros(T, dtype=torch.bool, device=DEV)
    vis[1:1 + IMG_TOKENS - 1] = True                  # boi + patches (eoi: language)
    pos = torch.cat([torch.tensor([0, 1], device=DEV), torch.full((NP,), 2, device=DEV),
                     torch.arange(3, 3 + T - 1 - IMG_TOKENS + 1, device=DEV)])[:T]
    cos, sin = rope_tables(pos)
    x = F.embedding(ids, w["embed"])
    x[1:1 + IMG_TOKENS] = feats[0]
    for lw in w["layers"]:
        qkv = routed(lw, "qkv", rms(x, lw["in_norm"]), vis).view(T, 3, H, HD).permute(1, 2, 0, 3)
        q, k, v = rope(qkv[0], cos, sin), rope(qkv[1], cos, sin), qkv[2]
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)
        x = x + routed(lw, "dense", o[0].transpose(0, 1).reshape(T, D), vis)
        x = x + routed_mlp(lw, rms(x, lw["post_norm"]), vis)
    return F.linear(rms(x[-1:], w["norm"]), w["lm_head"])


def decode_step(w, cache, ids, pos, cos, sin):
    B = ids.shape[0]
    x = F.embedding(ids, w["embed"])                                     # [B, D]
    for lw, (kc, vc) in zip(w["layers"], cache):
        qkv = F.linear(rms(x, lw["in_norm"]), lw["lang"]["qkv"]).view(B, 3, H, 1, HD)
        q, k, v = rope(qkv[:, 0], cos, sin), rope(qkv[:, 1], cos, sin), qkv[:, 2]
        kc[:, :, pos:pos + 1] = k
        vc[:, :, pos:pos + 1] = v
        o = F.scaled_dot_product_attention(q, kc[:, :, :pos + 1], vc[:, :, :pos + 1])
        x = x + F.linear(o.reshape(B, D), lw["lang"]["dense"])
        x = x + mlp(lw["lang"], rms(x, lw["post_norm"]))
    return F.linear(rms(x, w["norm"]), w["lm_head"]).argmax(-1)


def bench_decode(layers, batch, ctx, steps):
    w = lm_weights(layers, vision_expert=False)
    cache = [(rand(batch, H, ctx + steps + 1, HD), rand(batch, H, ctx + steps + 1, HD))
             for _ in range(layers)]
    ids = torch.randint(3, V, (batch,), device=DEV)
    state = {"pos": ctx}

    def step():
        p = state["pos"]
        cos, sin = rope_tables(torch.tensor([p - 1224], device=DEV))
        ids.copy_(decode_step(w, cache, ids, p, cos, sin))
        state["pos"] = p + 1

    step()  # warm-up
    state["pos"] = ctx
    ms = cuda_time(step, reps=steps, warm=0)
    del w, cache
    torch.cuda.empty_cache()
    return ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=L, help="LM layers to run (scaled to 32)")
    ap.add_argument("--vit-layers", type=int, default=VL, help="ViT layers (scaled to 63)")
    ap.add_argument("--question-tokens", type=int, default=50)
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--context", type=int, default=1300, help="decode KV slots per sequence")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "attention": "torch.nn.functional.scaled_dot_product_attention",
           "layers": a.layers, "vit_layers": a.vit_layers,
           "extrapolated": a.layers != L or a.vit_layers != VL}
    T = 1 + IMG_TOKENS + a.question_tokens
    with torch.no_grad():
        t0 = time.time()
        vw = vit_weights(a.vit_layers)
        px = torch.randn(1, 3, IMG, IMG, dtype=BF, device=DEV)
        vis_ms = cuda_time(lambda: vit_forward(vw, px), reps=3) * VL / a.vit_layers
        feats = vit_forward(vw, px)
        del vw
        torch.cuda.empty_cache()
        lw = lm_weights(a.layers)
        pre_ms = cuda_time(lambda: prefill(lw, feats, T), reps=2) * L / a.layers
        del lw
        torch.cuda.empty_cache()
        res.update(prompt_tokens=T, vision_ms=round(vis_ms, 3), prefill_ms=round(pre_ms, 3),
                   vision_prefill_ms=round(vis_ms + pre_ms, 3), decode=[],
                   decode_context=a.context)
        for B in [int(b) for b in a.batch.split(",")]:
            layers = a.layers
            while True:
                try:
                    ms = bench_decode(layers, B, a.context, a.steps) * L / layers
                    break
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    if layers <= 1:
                        raise
                    layers //= 2
                    res["extrapolated"] = True
            res["decode"].append({"batch": B, "step_ms": round(ms, 4),
                                  "tok_s": round(B * 1000.0 / ms, 3), "layers_run": layers})
        res["wall_s"] = round(time.time() - t0, 1)
    print(f"torch eager ({res['device']}, torch {res['torch']}): vision {res['vision_ms']:.1f} ms, "
          f"prefill {T} tokens {res['prefill_ms']:.1f} ms"
          + "".join(f", decode b{d['batch']} {d['tok_s']:.1f} tok/s" for d in res["decode"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
