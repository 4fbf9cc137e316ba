#!/usr/bin/env python3
"""llama_compare.py - run llama.cpp on the same random weights as `cogvlm bench`.

`build/cogvlm bench --write-checkpoint DIR` saves its text model (config.json +
model.safetensors, HF CogVLM/LLaMA tensor names, one expert). This script converts that
checkpoint to a LLaMA GGUF in the same dtype (BF16 or F16; norms in F32 as llama.cpp's
own converter writes them), with

- the fused query_key_value matrix split into attn_q / attn_k / attn_v,
- the rows of q and k permuted from the HF rotate-half RoPE layout to llama.cpp's
  interleaved-pair layout (the permutation of llama.cpp's convert_hf_to_gguf.py),
- a placeholder SentencePiece vocabulary (token ids are fed directly; no text involved),
  or, with a tokenizer.model (write_gguf(..., tokenizer=PATH); the serving comparison
  sends text), that model's real vocabulary: pieces, scores, token types, BOS/EOS/UNK
  ids and add-BOS, so llama.cpp tokenizes text exactly as our SentencePiece tokenizer,

then measures llama.cpp (through llama-cpp-python) with the same thread count:
prefill tokens/s of the same prompt ids in one batch, and decode tokens/s of greedy
single-token steps after it. If --ours-logits is given, the last prompt token's logits
of both engines are compared (same weights, so they must agree closely).

Prints a table with the ratios ours / llama.cpp and can write it as markdown.
Needs: pip install numpy gguf llama-cpp-python
"""
import argparse
import json
import os
import sys
import time

import numpy as np


def read_safetensors(path):
    """name -> (dtype string, shape, numpy view: uint16 for BF16/F16, float32 for F32)"""
    with open(path, "rb") as f:
        hlen = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(hlen))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + hlen)
    out = {}
    for name, d in header.items():
        if name == "__metadata__":
            continue
        b, e = d["data_offsets"]
        raw = data[b:e]
        np_dt = np.float32 if d["dtype"] == "F32" else np.uint16
        out[name] = (d["dtype"], d["shape"], raw.view(np_dt).reshape(d["shape"]))
    return out


def to_f32(dtype, arr):
    if dtype == "F32":
        return np.asarray(arr, dtype=np.float32)
    if dtype == "F16":
        return np.asarray(arr).view(np.float16).astype(np.float32)
    return (np.asarray(arr).astype(np.uint32) << 16).view(np.float32)


def permute_rope(w, n_head):
    """HF rotate-half row order -> llama.cpp interleaved pairs (per head)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def prompt_ids(n, vocab):
    """The prompt `cogvlm bench` uses: 3 + (i * 2654435761 mod 2^32) mod (vocab - 3)."""
    return [3 + ((i * 2654435761) % (1 << 32)) % (vocab - 3) for i in range(n)]


def sentencepiece_vocab(path):
    """(pieces, scores, GGUF token types, bos, eos, unk) of a SentencePiece model. Types as
    llama.cpp's converter assigns them: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    pieces, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else
                     6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1)
    return pieces, scores, types, sp.bos_id(), sp.eos_id(), sp.unk_id()


def write_gguf(ckpt, out_path, tokenizer=None):
    """Converts `ckpt` to a LLaMA GGUF at out_path; with `tokenizer` (a SentencePiece
    tokenizer.model of the checkpoint's vocabulary size) the GGUF carries that real
    vocabulary and adds BOS to text prompts, else a placeholder one. Returns (config,
    weight dtype)."""
    import gguf

    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    st = read_safetensors(os.path.join(ckpt, "model.safetensors"))
    D, H, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    V = cfg["vocab_size"]
    wdt = st["model.embed_tokens.weight"][0]
    if wdt not in ("BF16", "F16"):
        sys.exit("llama_compare: the checkpoint must be BF16 or F16 (got %s)" % wdt)
    qt = gguf.GGMLQuantizationType.BF16 if wdt == "BF16" else gguf.GGMLQuantizationType.F16

    w = gguf.GGUFWriter(out_path, "llama")
    w.add_name("cogvlm-bench-random")
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(H)
    w.add_rope_dimension_count(D // H)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if wdt == "BF16"
                    else gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(V)
    w.add_tokenizer_model("llama")
    if tokenizer:
        pieces, scores, types, bos, eos, unk = sentencepiece_vocab(tokenizer)
        if len(pieces) != V:
            sys.exit("llama_compare: %s has %d pieces, the checkpoint's vocabulary %d"
                     % (tokenizer, len(pieces), V))
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
        w.add_unk_token_id(unk)
        w.add_add_bos_token(True)  # a text prompt starts with BOS, as in our server
        w.add_add_eos_token(False)
    else:
        w.add_token_list([b"<unk>", b"<s>", b"</s>"] + [b"<t%d>" % i for i in range(3, V)])
        w.add_token_scores([0.0] * V)
        w.add_token_types([2, 3, 3] + [1] * (V - 3))  # unknown, control, control, normal
        w.add_bos_token_id(cfg.get("bos_token_id", 1))
        w.add_eos_token_id(cfg.get("eos_token_id", 2))
        w.add_add_bos_token(False)

    def mat(name, arr):
        arr = np.ascontiguousarray(arr)
        w.add_tensor(name, arr, raw_dtype=qt if arr.dtype == np.uint16 else None)

    def vec(name, key):
        dt, _, arr = st[key]
        w.add_tensor(name, np.ascontiguousarray(to_f32(dt, arr)))

    mat("token_embd.weight", st["model.embed_tokens.weight"][2])
    vec("output_norm.weight", "model.norm.weight")
    mat("output.weight", st["lm_head.weight"][2])
    for i in range(L):
        p = "model.layers.%d." % i
        qkv = np.asarray(st[p + "self_attn.language_expert_query_key_value.weight"][2])
        mat("blk.%d.attn_q.weight" % i, permute_rope(qkv[:D], H))
        mat("blk.%d.attn_k.weight" % i, permute_rope(qkv[D:2 * D], H))
        mat("blk.%d.attn_v.weight" % i, qkv[2 * D:])
        mat("blk.%d.attn_output.weight" % i, st[p + "self_attn.language_expert_dense.weight"][2])
        vec("blk.%d.attn_norm.weight" % i, p + "input_layernorm.weight")
        vec("blk.%d.ffn_norm.weight" % i, p + "post_attention_layernorm.weight")
        for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"),
                             ("down_proj", "ffn_down")):
            mat("blk.%d.%s.weight" % (i, theirs), st[p + "mlp.language_mlp.%s.weight" % ours][2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg, wdt


LLAMA_FTYPE = {"q8_0": 7, "q4_0": 2}  # llama.h's LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0


def quantize_gguf(src, dst, kind, threads):
    """llama.cpp's own quantizer (llama_model_quantize) from a 16-bit GGUF: `kind` q8_0 or
    q4_0, as llama.cpp users make them (token embeddings and output as its defaults)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[kind]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc:
        raise RuntimeError("llama_model_quantize(%s) failed: %d" % (kind, rc))


def last_logits(llm, vocab):
    """The logits of the last evaluated token (the only output row without logits_all)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))


def run_llama(path, threads, P, n_decode, vocab):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=P + n_decode + 64, n_batch=max(P, 64),
                n_ubatch=max(P, 64), n_threads=threads, n_threads_batch=threads,
                verbose=False)
    ids = prompt_ids(P + n_decode, vocab)
    llm.eval(ids[:min(64, P)])  # warm-up: graph allocation, page cache, thread spin-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids[:P])
    t_prefill = time.perf_counter() - t0
    logits = last_logits(llm, vocab).copy()
    t0 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([int(np.argmax(last_logits(llm, vocab)))])
    t_decode = time.perf_counter() - t0
    return {"prefill_s": t_prefill, "decode_s": t_decode, "logits": logits}


def table(ours, theirs, P, n_decode, dtype, threads):
    rows = []
    o_pf, t_pf = P / ours["prefill_s"], P / theirs["prefill_s"]
    rows.append(("prefill %d tokens (tokens/s)" % P, o_pf, t_pf))
    if n_decode:
        o_dc, t_dc = n_decode / ours["decode_s"], n_decode / theirs["decode_s"]
        rows.append(("decode %d tokens (tokens/s)" % n_decode, o_dc, t_dc))
        gb = ours["decode_weight_gb"]
        rows.append(("decode weight stream (GB/s)", gb * o_dc, gb * t_dc))
    lines = ["| %s weights, %d threads | cogvlm | llama.cpp | ours / llama.cpp |" % (dtype, threads),
             "|---|---:|---:|---:|"]
    for name, a, b in rows:
        lines.append("| %s | %.2f | %.2f | %.2f |" % (name, a, b, a / b))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="dir from cogvlm bench --write-checkpoint")
    ap.add_argument("--ours", help="JSON from cogvlm bench --json")
    ap.add_argument("--run-only", metavar="GGUF",
                    help="only time llama.cpp on this GGUF (--threads, --prompt, --decode, "
                    "--vocab) and write --out JSON (+ OUT.logits.npy): bench_all.py runs "
                    "each llama.cpp build this way, in its own process")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", help="with --run-only: the result JSON")
    ap.add_argument("--quantize", choices=sorted(LLAMA_FTYPE),
                    help="with --run-only: quantize the GGUF with llama.cpp first (its own "
                    "quantizer, same build) and time that")
    ap.add_argument("--ours-logits", help="raw float32 logits from cogvlm bench --logits-out")
    ap.add_argument("--gguf", help="where to write the GGUF (default CHECKPOINT/model.gguf)")
    ap.add_argument("--markdown", help="append the table (markdown) to this file")
    args = ap.parse_args()
    if args.run_only:
        import llama_cpp
        path = args.run_only
        if args.quantize:
            path = args.run_only + "." + args.quantize
            quantize_gguf(args.run_only, path, args.quantize, args.threads)
        r = run_llama(path, args.threads, args.prompt, args.decode, args.vocab)
        if args.quantize:
            os.remove(path)
        np.save(args.out + ".logits.npy", r.pop("logits"))
        r["version"] = llama_cpp.__version__
        r["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
        with open(args.out, "w") as f:
            json.dump(r, f)
        return
    if not (args.checkpoint and args.ours):
        ap.error("--checkpoint and --ours are required (or --run-only)")

    ours = json.load(open(args.ours))
    P, n_decode, threads = ours["prompt_tokens"], ours["decode_tokens"], ours["threads"]
    path = args.gguf or os.path.join(args.checkpoint, "model.gguf")
    t0 = time.perf_counter()
    cfg, dtype = write_gguf(args.checkpoint, path)
    print("llama_compare: wrote %s in %.1f s" % (path, time.perf_counter() - t0), flush=True)
    try:
        import llama_cpp
        info = llama_cpp.llama_print_system_info().decode().strip()
    except ImportError:
        sys.exit("llama_compare: llama-cpp-python is missing (pip install llama-cpp-python)")
    theirs = run_llama(path, threads, P, n_decode, cfg["vocab_size"])
    md = table(ours, theirs, P, n_decode, dtype, threads)
    if args.ours_logits:
        mine = np.fromfile(args.ours_logits, dtype=np.float32)
        ref = theirs["logits"]
        err = float(np.max(np.abs(mine - ref)) / max(1e-30, float(np.max(np.abs(ref)))))
        same = int(np.argmax(mine)) == int(np.argmax(ref))
        md += ("\n\nLast prompt token logits, cogvlm vs llama.cpp: max |diff| / max |logit| = "
               "%.2e, same argmax: %s." % (err, "yes" if same else "no"))
    md += "\n\nllama.cpp (llama-cpp-python %s) system info: `%s`\n" % (llama_cpp.__version__, info)
    print(md)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(md + "\n")
    os.remove(path)


if __name__ == "__main__":
    main()
