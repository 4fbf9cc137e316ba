"""reference_logits.py - a golden fixture for the embedded model, from the PyTorch reference.

    python3 tools/tiny/reference_logits.py --model models/cogvlm-tiny-shapes --out tests/tiny

Writes OUT/manifest.json + OUT/image.png + raw little-endian float32 arrays in the format of
shared/data/golden-tiny/README.md, read by `build/cogvlm golden --fixture OUT`. The weights
are the exported BF16 checkpoint (referenced by relative path, not copied), widened exactly to
float32, and the computation is float32, RoPE inv_freq taken from the file: what the C
engine does. Cases: a colour question and a grounding question about one fixed image, and a
text-only prompt; logits of every prompt position, vision tower / adapter outputs, and a
greedy continuation (up to the answer's EOS).
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402
from export import load_exported  # noqa: E402
from model import (LANG, VIS, build_prompt, position_ids, preprocess,  # noqa: E402
                   vision_expert_mask)

CASES = [
    ("image_colour", "What color is the circle?", True, 6),
    ("image_grounding", "Where is the blue triangle?", True, 20),
    ("text_chat", "How many shapes are there?", False, 6),
]


def fixture_scene():
    return shapes.Scene((231, 214, 246), [
        shapes.Shape("circle", "orange", 24, 40, 72),
        shapes.Shape("triangle", "blue", 120, 110, 90)])


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/cogvlm-tiny-shapes")
    ap.add_argument("--out", default="tests/tiny")
    a = ap.parse_args()
    import sentencepiece as spm
    torch.set_num_threads(2)
    net, hf = load_exported(a.model)
    cfg = net.cfg
    sp = spm.SentencePieceProcessor(model_file=os.path.join(a.model, "tokenizer.model"))
    os.makedirs(a.out, exist_ok=True)
    rel_model = os.path.relpath(a.model, a.out)
    S = cfg["vision_config"]["image_size"]

    def dump(name, t):
        arr = np.ascontiguousarray(t.detach().numpy().astype("<f4"))
        arr.tofile(os.path.join(a.out, name))
        return {"file": name, "dtype": "float32", "shape": list(arr.shape)}

    img = shapes.render(fixture_scene())
    img.save(os.path.join(a.out, "image.png"))
    from PIL import Image
    px = preprocess(Image.open(os.path.join(a.out, "image.png")), S)
    man = {
        "format": "cogvlm-golden/1",
        "preset": "cogvlm-tiny-shapes",
        "reference": "tools/tiny/model.py forward_full, float32 on CPU, BF16 checkpoint widened "
                     "to float32, RoPE inv_freq from the file (torch %s)" % torch.__version__,
        "config": hf,
        "weights": {"float32": {"dir": rel_model, "file": rel_model + "/model.safetensors",
                                "sha256": sha256(os.path.join(a.model, "model.safetensors")),
                                "note": "the BF16 checkpoint; the reference widens it to float32"}},
        "tokenizer": {"file": rel_model + "/tokenizer.model",
                      "sha256": sha256(os.path.join(a.model, "tokenizer.model")),
                      "bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 0},
        "image": {"file": "image.png", "width": 224, "height": 224,
                  "mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711],
                  "pixel_values": dump("pixel_values.bin", px)},
        "cases": [],
    }
    with torch.no_grad():
        feats, vit = net.vision_features(px[None])
        for name, q, has_image, steps in CASES:
            ids, types = build_prompt(sp, cfg, q, has_image)
            logits = net.forward_full(ids, types, px if has_image else None)
            gen_tokens, gen_logits, margins, gpos = [], [logits[-1]], [], []
            cur_ids, cur_types = list(ids), list(types)
            pos = position_ids(types)
            for k in range(steps):
                row = gen_logits[-1]
                top2 = torch.topk(row, 2).values
                margins.append(float(top2[0] - top2[1]))
                t = int(row.argmax())
                if k > 0 and margins[-1] < 0.05:
                    margins.pop()  # an unsafe argmax: end the stored continuation before it
                    gen_logits.pop()
                    break
                gen_tokens.append(t)
                gpos.append(pos[-1] + k)
                if t == 2:
                    break  # the answer is complete
                if k + 1 < steps:
                    cur_ids.append(t)
                    cur_types.append(LANG)
                    gen_logits.append(net.forward_full(cur_ids, cur_types, px if has_image else None)[-1])
            case = {
                "name": name, "template_version": "chat", "query": q,
                "prompt_text": "Question: " + q + " Answer:", "has_image": has_image,
                "num_tokens": len(ids), "input_ids": ids, "token_type_ids": types,
                "attention_mask": [1] * len(ids), "position_ids": position_ids(types),
                "vision_expert_mask": vision_expert_mask(types),
                "logits": dump(name + ".logits.bin", logits),
                "argmax": logits.argmax(-1).tolist(),
            }
            if has_image:
                case["vit_output"] = dump(name + ".vit_output.bin", vit[0])
                case["vision_features"] = dump(name + ".vision_features.bin", feats[0])
            eos = gen_tokens.index(2) if 2 in gen_tokens else len(gen_tokens)
            steps = len(gen_tokens)
            case["generate"] = {
                "steps": steps, "tokens": gen_tokens, "text": sp.decode(gen_tokens[:eos]),
                "position_ids": gpos,
                "kv_len_before_step": [0] + [len(ids) + k for k in range(steps - 1)],
                "top2_margin": margins,
                "logits": dump(name + ".gen_logits.bin", torch.stack(gen_logits)),
            }
            man["cases"].append(case)
            print("%-16s T=%d  greedy %r  min top2 margin %.3f" % (
                name, len(ids), case["generate"]["text"], min(margins)))
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(man, f, indent=1)
        f.write("\n")
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write(README % {"model": rel_model})


README = """# tests/tiny — golden fixture of the embedded model

Reference outputs of `models/cogvlm-tiny-shapes` computed by the PyTorch implementation
`tools/tiny/model.py` (`forward_full`, written straight from the spec), in float32 on CPU, with
the checkpoint's BF16 weights widened exactly to float32 and the RoPE `inv_freq` taken from the
file — the same arithmetic the C engine does. Format: shared/data/golden-tiny/README.md
(`manifest.json` + raw little-endian float32 arrays). The weights and tokenizer are not copied:
the manifest points at `%(model)s`.

    build/cogvlm golden --fixture tests/tiny --tol 1e-3

Cases: `image_colour` (What color is the circle?), `image_grounding` (Where is the blue
triangle?) on `image.png`, and `text_chat` (no image). Each has the logits of every prompt
position, the vision tower output (incl. CLS) and the adapter output (incl. boi/eoi) for the
image cases, and a greedy continuation (up to the answer's EOS; it ends earlier where the top-2 logit
margin would fall under 0.05, so that the token comparison cannot flake). Regenerate after re-exporting the model:

    python3 tools/tiny/reference_logits.py --model models/cogvlm-tiny-shapes --out tests/tiny
"""

if __name__ == "__main__":
    main()
