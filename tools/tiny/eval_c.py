"""eval_c.py - accuracy per question kind of the embedded model through the C engine CLI.

    python3 tools/tiny/eval_c.py [--images 100] [--seed 7] [--torch]

Draws FRESH images with its own generator (seed stream (seed, 2000003, i): disjoint from the
training stream (seed, step) and from train.py's eval stream), writes each as PNG, asks every
question of the task with `build/cogvlm run --model M --image X.png --prompt Q` (greedy) and
scores the answers: exact match; grounding IoU >= 0.5. Needs only numpy + Pillow.

With --torch it also runs the PyTorch reference (tools/tiny/model.py on the exported BF16
weights widened to float32) on the same PNGs and reports every answer where the two disagree:
they compute the same thing, so any disagreement is a bug on one side (or a near-tie).
Exit status 1 if an accuracy is below the minimum of tiny-model.md (--no-fail to disable).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402

STREAM = 2_000_003
MINIMUM = {"colour": 0.90, "shape": 0.90, "count": 0.95, "description": 0.75, "grounding": 0.50}
TARGET = {"colour": 0.98, "shape": 0.98, "count": 0.99, "description": 0.95, "grounding": 0.90}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--model", default="models/cogvlm-tiny-shapes")
    ap.add_argument("--bin", default="build/cogvlm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--torch", action="store_true", help="also run the PyTorch reference and compare")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-fail", action="store_true")
    a = ap.parse_args()

    ref = None
    if a.torch:
        import torch
        import sentencepiece as spm
        from PIL import Image
        from export import load_exported
        from model import preprocess
        from train import greedy
        torch.set_num_threads(a.threads)
        net, _ = load_exported(a.model)
        sp = spm.SentencePieceProcessor(model_file=os.path.join(a.model, "tokenizer.model"))
        S = net.cfg["vision_config"]["image_size"]

        def ref(png, qs):
            with torch.no_grad():
                feats, _ = net.vision_features(preprocess(Image.open(png), S)[None])
                kvs = net.run_prefix(feats)
                outs = greedy(net, kvs, torch.zeros(len(qs), dtype=torch.long),
                              [sp.encode(shapes.chat_prompt(q)) for q in qs], 24)
            return [sp.decode(o) for o in outs]

    stats = {k: [0, 0] for k in shapes.QKINDS}
    tstats = {k: [0, 0] for k in shapes.QKINDS}
    by_n = {}
    disagree = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.images):
            rng = np.random.default_rng([a.seed, STREAM, i])
            sc = shapes.random_scene(rng, 0.5)
            png = os.path.join(tmp, "img%d.png" % i)
            shapes.render(sc).save(png)
            qs = shapes.questions(sc)
            tans = ref(png, [q[1] for q in qs]) if ref else None
            for j, (qk, q, want, sh) in enumerate(qs):
                r = subprocess.run([a.bin, "run", "--model", a.model, "--image", png, "--prompt", q,
                                    "--max-tokens", "24", "--threads", str(a.threads)],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit("cogvlm run failed (%d): %s" % (r.returncode, r.stderr.strip()))
                ans = r.stdout.strip()
                ok = shapes.is_correct(qk, ans, want, sh)
                stats[qk][0] += ok
                stats[qk][1] += 1
                key = "%s_%dshape" % (qk, len(sc.shapes))
                by_n.setdefault(key, [0, 0])
                by_n[key][0] += ok
                by_n[key][1] += 1
                if tans is not None:
                    tk = tans[j].strip()
                    tstats[qk][0] += shapes.is_correct(qk, tk, want, sh)
                    tstats[qk][1] += 1
                    if tk != ans:
                        disagree.append({"image": i, "question": q, "c": ans, "torch": tk, "want": want})
    res = {"images": a.images, "seed": a.seed, "seconds": round(time.time() - t0, 1),
           "c_engine": {k: v[0] / max(1, v[1]) for k, v in stats.items()},
           "c_engine_by_shapes": {k: v[0] / max(1, v[1]) for k, v in sorted(by_n.items())},
           "questions": {k: v[1] for k, v in stats.items()}}
    if ref:
        res["torch"] = {k: v[0] / max(1, v[1]) for k, v in tstats.items()}
        res["disagreements"] = disagree
    print("%-12s %8s %8s %8s %8s" % ("kind", "C", "torch" if ref else "", "minimum", "target"))
    fail = False
    for k in shapes.QKINDS:
        c = res["c_engine"][k]
        fail |= c < MINIMUM[k]
        print("%-12s %8.3f %8s %8.2f %8.2f%s" % (k, c, "%.3f" % res["torch"][k] if ref else "",
                                                   MINIMUM[k], TARGET[k], "  BELOW MINIMUM" if c < MINIMUM[k] else ""))
    for k, v in res["c_engine_by_shapes"].items():
        print("  %-24s %.3f" % (k, v))
    if ref:
        print("C vs torch: %d of %d answers differ" % (len(disagree), sum(v[1] for v in stats.values())))
        for d in disagree[:20]:
            print("  ", d)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    sys.exit(1 if fail and not a.no_fail else 0)


if __name__ == "__main__":
    main()
