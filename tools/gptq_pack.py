#!/usr/bin/env python3
"""gptq_pack.py - writes a GPTQ int4 checkpoint of a CogVLM safetensors checkpoint, for tests.

Written from the GPTQ format's description (not from any library's code): each quantized
Linear X gets, instead of X.weight [N, K],
  X.qweight I32 [K/8, N]   row k of the [K, N] code matrix q: (qweight[k//8][n] >> 4*(k%8)) & 15
  X.qzeros  I32 [G, N/8]   the zero points z, packed the same way along N (v1: z - 1)
  X.scales  F16 [G, N]
  X.g_idx   I32 [K]        the group of input row k
and W[n][k] = scales[g][n] * (q[k][n] - z[g][n]), g = g_idx[k].

Quantization is round-to-nearest (no GPTQ error feedback: the loader only needs the format):
sym: scale = 2 max|w| / 15 and z = 8; asym: scale = (max - min) / 15, z = round(-min / scale)
(v1 keeps z in 1..15: its stored z - 1 cannot hold -1). With --desc-act every input row gets
a random group (each group still holds group_size rows, as GPTQ's act-order makes them).
Quantized: the decoder's linear layers (both experts' query_key_value, dense, gate, up,
down) whose input width is a multiple of 32 and output width of 8; every other tensor is
copied. --dequant DIR also writes the dequantized weights (everything as F32), the exact
reference for the loader.

  tools/gptq_pack.py SRC_DIR OUT_DIR [--dequant DIR] [--asym] [--desc-act] [--v2]
                     [--group-size 128|-1] [--seed N]
"""
import argparse
import json
import os
import re
import struct
import sys

import numpy as np

LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(language|vision)_expert_"
                    r"(query_key_value|dense)|mlp\.(language|vision)_mlp\.(gate|up|down)_proj)"
                    r"\.weight$")
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32}


def read_st(path):
    """name -> (safetensors dtype, numpy array) of one .safetensors file."""
    with open(path, "rb") as f:
        buf = f.read()
    n = struct.unpack("<Q", buf[:8])[0]
    hdr = json.loads(buf[8:8 + n])
    out = {}
    for name, d in hdr.items():
        if name == "__metadata__":
            continue
        b, e = d["data_offsets"]
        a = np.frombuffer(buf, DTYPES[d["dtype"]], (e - b) // np.dtype(DTYPES[d["dtype"]]).itemsize,
                          8 + n + b).reshape(d["shape"])
        out[name] = (d["dtype"], a)
    return out


def to_f32(dt, a):
    if dt == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def write_st(path, tensors):
    """tensors: name -> (safetensors dtype, numpy array), written in name order."""
    hdr, blobs, at = {}, [], 0
    for name in sorted(tensors):
        dt, a = tensors[name]
        raw = np.ascontiguousarray(a).tobytes()
        hdr[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    hdr["__metadata__"] = {"format": "pt"}
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def pack_rows(v, axis):
    """4-bit values (0..15) packed 8 per int32 along `axis` (value i in bits 4i..4i+3)."""
    v = np.moveaxis(v.astype(np.uint32), axis, 0)
    v = v.reshape(v.shape[0] // 8, 8, *v.shape[1:])
    p = np.zeros(v.shape[:1] + v.shape[2:], np.uint32)
    for i in range(8):
        p |= v[:, i] << np.uint32(4 * i)
    return np.moveaxis(p.view(np.int32), 0, axis)


def quantize(w, args, rng):
    """w [N, K] float32 -> dict of the GPTQ tensors and the dequantized [N, K] float32."""
    N, K = w.shape
    gs = K if args.group_size == -1 else args.group_size
    G = (K + gs - 1) // gs
    g_idx = np.arange(K, dtype=np.int32) // gs
    if args.desc_act:
        g_idx = g_idx[rng.permutation(K)]  # a random assignment, gs rows per group
    wt = w.T  # [K, N]
    scales = np.zeros((G, N), np.float16)
    zeros = np.zeros((G, N), np.int64)
    for g in range(G):
        rows = wt[g_idx == g]
        if args.asym:
            lo = np.minimum(rows.min(axis=0), 0)
            hi = np.maximum(rows.max(axis=0), 0)
            s = ((hi - lo) / 15).astype(np.float16)
            s[s == 0] = 1
            z = np.rint(-lo / s.astype(np.float32))
            z = np.clip(z, 0 if args.v2 else 1, 15)
        else:
            s = (np.abs(rows).max(axis=0) * 2 / 15).astype(np.float16)
            s[s == 0] = 1
            z = np.full(N, 8)
        scales[g] = s
        zeros[g] = z
    s32 = scales.astype(np.float32)[g_idx]  # [K, N]
    q = np.clip(np.rint(wt / s32) + zeros[g_idx], 0, 15).astype(np.int64)
    deq = (s32 * (q - zeros[g_idx]).astype(np.float32)).astype(np.float32).T
    stored_z = zeros if args.v2 else zeros - 1
    parts = {
        "qweight": ("I32", pack_rows(q, 0)),
        "qzeros": ("I32", pack_rows(stored_z & 15, 1)),
        "scales": ("F16", scales),
        "g_idx": ("I32", g_idx.astype(np.int32)),
    }
    return parts, np.ascontiguousarray(deq)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--dequant")
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--desc-act", action="store_true")
    ap.add_argument("--v2", action="store_true")
    ap.add_argument("--group-size", type=int, default=128, choices=[128, -1])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    src = read_st(os.path.join(args.src, "model.safetensors"))
    with open(os.path.join(args.src, "config.json")) as f:
        cfg = json.load(f)
    gptq, deq, nq = {}, {}, 0
    for name in sorted(src):
        dt, a = src[name]
        if LINEAR.match(name) and a.shape[1] % 32 == 0 and a.shape[0] % 8 == 0:
            parts, d = quantize(to_f32(dt, a), args, rng)
            base = name[:-len(".weight")]
            for p, v in parts.items():
                gptq[base + "." + p] = v
            deq[name] = ("F32", d)
            nq += 1
        else:
            gptq[name] = (dt, a)
            deq[name] = ("F32", to_f32(dt, a))
    cfg["quantization_config"] = {
        "quant_method": "gptq", "bits": 4, "group_size": args.group_size,
        "desc_act": args.desc_act, "sym": not args.asym, "static_groups": False,
        "true_sequential": True, "damp_percent": 0.01,
        "checkpoint_format": "gptq_v2" if args.v2 else "gptq"}
    os.makedirs(args.out, exist_ok=True)
    write_st(os.path.join(args.out, "model.safetensors"), gptq)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if args.dequant:
        del cfg["quantization_config"]
        cfg["torch_dtype"] = "float32"
        os.makedirs(args.dequant, exist_ok=True)
        write_st(os.path.join(args.dequant, "model.safetensors"), deq)
        with open(os.path.join(args.dequant, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    print(f"gptq_pack: {nq} matrices quantized -> {args.out}")
    return 0 if nq else 1


if __name__ == "__main__":
    sys.exit(main())
