"""export.py - writes the trained model as a cogvlm-chat-hf style checkpoint.

    python3 tools/tiny/export.py --run tools/tiny/runs/main --out models/cogvlm-tiny-shapes

Writes OUT/config.json (HF CogVLM fields, vision_config nested, template "chat", bfloat16,
bos 1 / eos 2 / pad 0), OUT/model.safetensors (every tensor BF16, HF names, incl. the
per-layer rotary_emb.inv_freq buffers like the real checkpoint) and OUT/tokenizer.model.
The README.md of the model folder is written by hand (it holds the recipe log).
"""
import argparse
import json
import os
import shutil
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import CogVLM  # noqa: E402


def hf_config(cfg):
    vc = cfg["vision_config"]
    return {
        "_name_or_path": "cogvlm-tiny-shapes",
        "architectures": ["CogVLMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                     "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": 2048,
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "rms_norm_eps": cfg["rms_norm_eps"],
        "template_version": "chat",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.35.0",
        "use_cache": True,
        "vision_config": {
            "dropout_prob": 0.0, "hidden_act": "gelu",
            "hidden_size": vc["hidden_size"], "image_size": vc["image_size"],
            "in_channels": vc["in_channels"], "intermediate_size": vc["intermediate_size"],
            "layer_norm_eps": vc["layer_norm_eps"], "num_heads": vc["num_heads"],
            "num_hidden_layers": vc["num_hidden_layers"], "num_positions": vc["num_positions"],
            "patch_size": vc["patch_size"]},
        "vocab_size": cfg["vocab_size"],
    }


def state_tensors(net):
    """name -> float32 tensor, HF names, inv_freq buffers included."""
    out = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    for i, layer in enumerate(net.model.layers):
        out["model.layers.%d.self_attn.rotary_emb.inv_freq" % i] = layer.self_attn.rotary_emb.inv_freq.clone()
    return out


def write_safetensors_bf16(path, tensors):
    names = sorted(tensors)
    header, blobs, off = {}, [], 0
    for n in names:
        t = tensors[n].to(torch.bfloat16).contiguous()
        b = t.view(torch.int16).numpy().tobytes()
        header[n] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(path + ".tmp", path)


def read_safetensors(path):
    """name -> float32 tensor (BF16/F32 files)."""
    import numpy as np
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, d in hdr.items():
        if k == "__metadata__":
            continue
        a, b = d["data_offsets"]
        if d["dtype"] == "BF16":
            u = np.frombuffer(data[a:b], dtype=np.uint16).astype(np.uint32) << 16
            t = torch.from_numpy(u.view(np.float32).copy())
        else:
            t = torch.from_numpy(np.frombuffer(data[a:b], dtype=np.float32).copy())
        out[k] = t.reshape(d["shape"])
    return out


def load_exported(model_dir):
    """The exported model as a float32 CogVLM (BF16 values widened exactly)."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    net = CogVLM(cfg)
    t = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    inv = {k: v for k, v in t.items() if k.endswith("inv_freq")}
    sd = {k: v for k, v in t.items() if not k.endswith("inv_freq")}
    net.load_state_dict(sd)
    for i, layer in enumerate(net.model.layers):
        k = "model.layers.%d.self_attn.rotary_emb.inv_freq" % i
        if k in inv:
            layer.self_attn.rotary_emb.inv_freq.copy_(inv[k])
    net.eval()
    return net, cfg


def export(run, out, ckpt_name="ckpt.pt"):
    st = torch.load(os.path.join(run, ckpt_name))
    net = CogVLM(st["cfg"])
    net.load_state_dict(st["model"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(net.cfg), f, indent=2)
        f.write("\n")
    write_safetensors_bf16(os.path.join(out, "model.safetensors"), state_tensors(net))
    shutil.copyfile(st.get("tokenizer") or os.path.join(run, "tokenizer.model"),
                    os.path.join(out, "tokenizer.model"))
    return st


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", default="models/cogvlm-tiny-shapes")
    ap.add_argument("--ckpt", default="ckpt.pt")
    ap.add_argument("--eval", type=int, default=0, metavar="N",
                    help="then measure greedy accuracy of the exported BF16 model on N fresh images "
                         "(PyTorch; eval stream indices from 100000, unseen by training and its evals)")
    a = ap.parse_args()
    st = export(a.run, a.out, a.ckpt)
    print("exported step %d, vit stage %d (%.1f min of training) to %s" % (
        st["step"], st.get("vstep", 0), st["elapsed"] / 60, a.out))
    for f in sorted(os.listdir(a.out)):
        print("  %-20s %9d bytes" % (f, os.path.getsize(os.path.join(a.out, f))))
    if a.eval:
        import train
        torch.set_num_threads(1)
        net, _ = load_exported(a.out)
        targs = train.parse_args(["--run", a.run, "--seed", str(st["args"]["seed"])])
        tok = train.Tok(os.path.join(a.out, "tokenizer.model"))
        acc = train.evaluate(net, tok, targs, net.cfg, a.eval, first=100000)
        print(json.dumps({"images": a.eval, "step": st["step"], "accuracy": acc}))
