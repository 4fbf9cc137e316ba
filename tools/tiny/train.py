"""train.py - trains cogvlm-tiny-shapes on the synthetic shapes task (tiny-model.md).

Deterministic from --seed: the weights are initialised from the seed and the images of step k
come from numpy's Generator seeded with (seed, k), so a run interrupted and resumed from its
checkpoint sees exactly the data and state it would have seen without the interruption.
Rerunning the same command on an existing run directory resumes it.

Recipe (the model README, models/cogvlm-tiny-shapes/README.md, logs what each change did):
  * stage 1 (--vit-steps): the vision tower alone with per-patch auxiliary heads (kind,
    colour, box, hundreds digit of each grounding coordinate of the shape covering the
    patch), 16 images/step: the tower learns the kinds here (99 % per patch after 3000 steps),
    which it never did when trained jointly with the decoder from the start;
  * stage 2 (--steps): the whole model; every image is asked ALL its questions (5 for one
    shape, 8 for two); the [BOS][image] prefix runs once per image and the questions attend to
    its cached keys/values (model.run_prefix / run_text), ~3x less compute per question;
    the auxiliary heads stay on (--aux-weight -> --aux-final), the tower learns at
    --vit-lr-mult x the LR (a high one wrecks it early on);
  * ViT post-sub-layer LayerNorm gains initialised small (--vit-norm-gain);
  * curriculum on the fraction of two-shape images (--p-two-start -> --p-two over --p-two-ramp);
  * loss on the answer tokens + EOS, each answer weighted 1/sqrt(len), grounding answers
    x --ground-weight, the units digit of each box coordinate x --units-weight.

  * stage 3 (how the committed model was continued): --init-from an exported checkpoint,
    grounding-heavy batches (--p-two 0.8, --other-frac 0.7), a low LR (2e-4); see the model
    README for the exact commands.

    nice -n 10 /usr/bin/python3 tools/tiny/train.py --run tools/tiny/runs/v3
"""
import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402
from model import CogVLM, default_config, preprocess, bf16_round  # noqa: E402

EVAL_STREAM = 1_000_003  # eval images: Generator((seed, EVAL_STREAM, i)), never used for training


class Tok:
    """Caching SentencePiece wrapper (the task has few distinct strings)."""

    def __init__(self, path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.cache = {}

    def encode(self, s):
        r = self.cache.get(s)
        if r is None:
            r = self.cache[s] = self.sp.encode(s)
        return r

    def decode(self, ids):
        return self.sp.decode(ids)


class AuxHead(nn.Module):
    """Per-patch kind (none + 3), colour (none + 6) and box (4) from the ViT output."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, 4 + 7 + 4)
        # hundreds digit (0-9) of each grounding coordinate of the shape covering the patch:
        # makes the tower encode the answer's leading digits as directions the LM can copy
        self.digits = nn.Linear(d, 4 * 10)

    def forward(self, vit):
        o = self.proj(vit[:, 1:])
        return o[..., :4], o[..., 4:11], o[..., 11:]


def aux_targets(scene, grid):
    """Per patch: index of the shape covering most of it (>= 15 %), else -1."""
    m = shapes.masks(scene)  # [n, 224, 224]
    # canvas pixel p belongs to cell floor(p * grid / 224) (cells of 28 px for grid 8; for a
    # grid that does not divide 224, e.g. 10, the cells are 22 or 23 px wide)
    starts = np.searchsorted((np.arange(shapes.CANVAS) * grid) // shapes.CANVAS, np.arange(grid))
    sizes = np.diff(np.append(starts, shapes.CANVAS))
    cov = np.add.reduceat(np.add.reduceat(m, starts, axis=1), starts, axis=2)
    cov = (cov / (sizes[:, None] * sizes[None, :])).reshape(len(scene.shapes), -1)
    best = cov.argmax(0)
    return np.where(cov.max(0) >= 0.15, best, -1)


VIT_STREAM = 777_001  # stage-1 images: Generator((seed, VIT_STREAM, step))
OTHER_STREAM = 555_001  # which non-grounding questions a step keeps (--other-frac)


def make_batch(step, a, cfg, tok, eval_index=None, vit_stage=False):
    """The images and questions of one training step (or one eval image)."""
    S = cfg["vision_config"]["image_size"]
    grid = S // cfg["vision_config"]["patch_size"]
    if vit_stage:
        rng = np.random.default_rng([a.seed, VIT_STREAM, step])
        p_two, n = 0.5, a.vit_batch
    elif eval_index is None:
        rng = np.random.default_rng([a.seed, step])
        p_two = a.p_two_start + (a.p_two - a.p_two_start) * min(1.0, step / max(1, a.p_two_ramp))
        n = a.batch
    else:
        rng = np.random.default_rng([a.seed, EVAL_STREAM, eval_index])
        p_two, n = 0.5, 1
    # --other-frac < 1: each non-grounding question of a training image is kept with that
    # probability (own stream, so the scenes are the same whatever the fraction)
    sub = None
    if eval_index is None and not vit_stage and a.other_frac < 1.0:
        sub = np.random.default_rng([a.seed, OTHER_STREAM, step])
    px, kinds, cols, boxes, rows, digs = [], [], [], [], [], []
    for b in range(n):
        sc = shapes.random_scene(rng, p_two)
        px.append(preprocess(shapes.render(sc), S))
        if eval_index is None or vit_stage:
            t = aux_targets(sc, grid)
            kinds.append([0 if i < 0 else 1 + shapes.KINDS.index(sc.shapes[i].kind) for i in t])
            cols.append([0 if i < 0 else 1 + shapes.COLOUR_NAMES.index(sc.shapes[i].colour)
                         for i in t])
            boxes.append([[0.0] * 4 if i < 0 else [v / shapes.CANVAS for v in sc.shapes[i].box]
                          for i in t])
            digs.append([[-100] * 4 if i < 0 else [shapes.grounding_value(v) // 100 for v in sc.shapes[i].box]
                         for i in t])
        for qk, q, ans, sh in shapes.questions(sc):
            if sub is not None and qk != "grounding" and sub.random() >= a.other_frac:
                continue
            rows.append((b, qk, q, ans, sh, sc))
    boxes = (boxes, digs)
    return torch.stack(px), kinds, cols, boxes, rows


def pack_text(rows, tok, ground_weight=1.0, units_weight=1.0):
    """[N, L] ids (prompt + answer + EOS), per-token targets and weights for the loss.
    Each answer's tokens weigh 1/sqrt(len); grounding answers are multiplied by
    ground_weight, and the units digit of each coordinate (nearly irrelevant to IoU, and
    almost pure noise to learn) by units_weight."""
    seqs, tgts, gw = [], [], []
    for (_, qk, q, ans, _, _) in rows:
        p = tok.encode(shapes.chat_prompt(q))
        r = tok.encode(ans) + [2]
        seqs.append(p + r[:-1])
        tgts.append((len(p) - 1, r))
        w = [1.0] * len(r)
        if qk == "grounding":
            w = [ground_weight] * len(r)
            if len(r) == 18:  # [[ ddd , ddd , ddd , ddd ]] EOS: units digits at 3, 7, 11, 15
                for i in (3, 7, 11, 15):
                    w[i] *= units_weight
        gw.append(w)
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    tg = torch.full((len(seqs), L), -100, dtype=torch.long)
    w = torch.zeros(len(seqs), L)
    for i, (s, (st, r)) in enumerate(zip(seqs, tgts)):
        ids[i, :len(s)] = torch.tensor(s)
        tg[i, st:st + len(r)] = torch.tensor(r)
        w[i, st:st + len(r)] = torch.tensor(gw[i]) / math.sqrt(len(r))
    return ids, tg, w


@torch.no_grad()
def greedy(net, kvs, img_idx, prompts, max_new, eos=2):
    """Batched greedy decoding after cached prefixes. prompts: list of id lists."""
    N = len(prompts)
    seqs = [list(p) for p in prompts]
    out = [[] for _ in range(N)]
    done = [False] * N
    for _ in range(max_new):
        act = [i for i in range(N) if not done[i]]
        if not act:
            break
        L = max(len(seqs[i]) for i in act)
        ids = torch.zeros(len(act), L, dtype=torch.long)
        for j, i in enumerate(act):
            ids[j, :len(seqs[i])] = torch.tensor(seqs[i])
        h = net.run_text(kvs, img_idx[torch.tensor(act)], ids, return_hidden=True)
        last = torch.stack([h[j, len(seqs[i]) - 1] for j, i in enumerate(act)])
        nxt = net.lm_head(last).argmax(-1).tolist()
        for j, i in enumerate(act):
            if nxt[j] == eos:
                done[i] = True
            else:
                out[i].append(nxt[j])
                seqs[i].append(nxt[j])
    return out


MAX_NEW = {"colour": 4, "shape": 4, "count": 4, "description": 14, "grounding": 22}


@torch.no_grad()
def evaluate(net, tok, a, cfg, n_images, first=0, chunk=25, show=0):
    """Greedy accuracy per question kind on fresh eval images (grounding: IoU >= 0.5)."""
    net.eval()
    stats = {k: [0, 0] for k in shapes.QKINDS}
    subset = {"colour_two": [0, 0], "shape_two": [0, 0], "grounding_one": [0, 0], "grounding_two": [0, 0]}
    shown = 0
    for c0 in range(first, first + n_images, chunk):
        px, rows = [], []
        for i in range(c0, min(first + n_images, c0 + chunk)):
            p, _, _, _, r = make_batch(0, a, cfg, tok, eval_index=i)
            px.append(p[0])
            rows += [(len(px) - 1,) + x[1:] for x in r]
        feats, _ = net.vision_features(torch.stack(px))
        kvs = net.run_prefix(feats)
        for qk in shapes.QKINDS:
            sel = [r for r in rows if r[1] == qk]
            img_idx = torch.tensor([r[0] for r in sel])
            outs = greedy(net, kvs, img_idx, [tok.encode(shapes.chat_prompt(r[2])) for r in sel],
                          MAX_NEW[qk])
            for r, o in zip(sel, outs):
                ans = tok.decode(o)
                ok = shapes.is_correct(qk, ans, r[3], r[4])
                stats[qk][0] += ok
                stats[qk][1] += 1
                two = len(r[5].shapes) == 2
                if two and qk in ("colour", "shape"):
                    subset[qk + "_two"][0] += ok
                    subset[qk + "_two"][1] += 1
                if qk == "grounding":
                    subset["grounding_" + ("two" if two else "one")][0] += ok
                    subset["grounding_" + ("two" if two else "one")][1] += 1
                if show and shown < show and not ok:
                    print("  wrong:", qk, r[2], "->", repr(ans), "want", r[3])
                    shown += 1
    net.train()
    res = {k: v[0] / max(1, v[1]) for k, v in stats.items()}
    res.update({k: v[0] / max(1, v[1]) for k, v in subset.items()})
    return res


def aux_loss(aux, vit, kinds, cols, boxes, kind_w=1.0, box_w=5.0):
    """Per-patch auxiliary loss; also returns (kind acc, colour acc, box MAE px) on the
    patches a shape covers."""
    ok_, oc, ob = aux(vit)
    boxes, digs = boxes
    kt, ct, bt = torch.tensor(kinds), torch.tensor(cols), torch.tensor(boxes)
    od = aux.digits(vit[:, 1:])
    la = kind_w * F.cross_entropy(ok_.reshape(-1, 4), kt.reshape(-1)) + \
        F.cross_entropy(oc.reshape(-1, 7), ct.reshape(-1))
    has = kt > 0
    if has.any():
        pb = torch.sigmoid(ob[has])
        la = la + box_w * F.smooth_l1_loss(pb, bt[has], beta=0.05)
        la = la + F.cross_entropy(od.reshape(-1, 10), torch.tensor(digs).reshape(-1), ignore_index=-100)
        with torch.no_grad():
            m = ((ok_.argmax(-1)[has] == kt[has]).float().mean().item(),
                 (oc.argmax(-1)[has] == ct[has]).float().mean().item(),
                 (pb - bt[has]).abs().mean().item() * shapes.CANVAS)
    else:
        m = (0.0, 0.0, 0.0)
    return la, m


def vit_stage(net, aux, a, cfg, tok, state, log, save_fn):
    """Stage 1: the vision tower alone (patch embedding + transformer) with the per-patch
    auxiliary heads, on its own image stream; much cheaper per image than the full model, and
    it gets the tower to recognise the shapes' kinds before the LM leans on it."""
    v = net.model.vision
    ps = list(v.patch_embedding.parameters()) + list(v.transformer.parameters()) + list(aux.parameters())
    vopt = torch.optim.AdamW(ps, lr=a.vit_lr, betas=(0.9, 0.98), weight_decay=a.wd)
    vstep = 0
    if state is not None:
        vstep = state.get("vstep", a.vit_steps)
        if state.get("vopt") is not None and vstep < a.vit_steps:
            vopt.load_state_dict(state["vopt"])
    if vstep >= a.vit_steps:
        return
    t0, t_ck, hist = time.time(), time.time(), []
    while vstep < a.vit_steps:
        f = min(1.0, (vstep + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * vstep / a.vit_steps)))
        for g in vopt.param_groups:
            g["lr"] = a.vit_lr * f
        px, kinds, cols, boxes, _ = make_batch(vstep, a, cfg, tok, vit_stage=True)
        vit = v.transformer(v.patch_embedding(px))
        la, m = aux_loss(aux, vit, kinds, cols, boxes, kind_w=a.vit_kind_weight, box_w=a.vit_box_weight)
        vopt.zero_grad(set_to_none=True)
        la.backward()
        vopt.step()
        vstep += 1
        hist.append((la.item(),) + m)
        if vstep % 100 == 0:
            h = np.mean(hist, 0)
            hist = []
            log("vit step %d  %.1f min  loss %.3f  kind acc %.3f  colour acc %.3f  box mae %.1f px" % (
                vstep, (time.time() - t0) / 60, *h))
        if time.time() - t_ck > a.ckpt_seconds or vstep == a.vit_steps:
            save_fn(extra={"vstep": vstep, "vopt": vopt.state_dict() if vstep < a.vit_steps else None},
                    elapsed_add=time.time() - t0)
            t0, t_ck = time.time(), time.time()


def warm_start(net, model_dir, log):
    """Loads an exported checkpoint (BF16 widened to float32) into net. If the patch size
    differs (e.g. 112 px / patch 14 -> 224 px / patch 28: same 8x8 grid), the patch conv is
    resampled so that it sees the same image content: a kernel r times larger, each weight
    spread over an r x r block and divided by r^2 (a box-filter view of the downsampled image).
    If the patch grid differs, the ViT position embeddings are resampled to the new grid."""
    from export import read_safetensors
    t = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    sd = {k: v for k, v in t.items() if not k.endswith("inv_freq")}
    own = net.state_dict()
    for k, v in list(sd.items()):
        if own[k].shape != v.shape:
            if k.endswith("patch_embedding.proj.weight") and own[k].shape[:2] == v.shape[:2]:
                r = own[k].shape[-1] // v.shape[-1]
                assert r * v.shape[-1] == own[k].shape[-1], (k, v.shape, own[k].shape)
                sd[k] = v.repeat_interleave(r, 2).repeat_interleave(r, 3) / (r * r)
                log("warm start: %s %s -> %s (x%d)" % (k, list(v.shape), list(own[k].shape), r))
            elif k.endswith("patch_embedding.position_embedding.weight") and own[k].shape[1] == v.shape[1]:
                # another grid (e.g. 140 px / patch 14 = 10x10): CLS row kept, the grid
                # rows resampled bilinearly (align_corners, so the corner patches keep theirs)
                g0, g1 = int(round((v.shape[0] - 1) ** 0.5)), int(round((own[k].shape[0] - 1) ** 0.5))
                grid = v[1:].t().reshape(1, -1, g0, g0)
                grid = F.interpolate(grid, size=(g1, g1), mode="bilinear", align_corners=True)
                sd[k] = torch.cat([v[:1], grid.reshape(-1, g1 * g1).t()], 0)
                log("warm start: %s %s -> %s (grid %d -> %d)" % (k, list(v.shape), list(own[k].shape), g0, g1))
            else:
                raise SystemExit("warm start: %s has shape %s in %s, %s here" % (k, list(v.shape), model_dir, list(own[k].shape)))
    net.load_state_dict(sd)
    log("warm start from %s (%d tensors)" % (model_dir, len(sd)))


def fit_aux(net, aux, a, cfg, tok, log):
    """Warm start: the aux heads are new; fit them on the frozen tower first (stage-1 image
    stream), so that their large initial gradients do not hit the trained tower (and the
    global gradient clipping) when stage 2 starts."""
    v = net.model.vision
    opt = torch.optim.AdamW(aux.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0)
    hist = []
    for k in range(a.aux_fit_steps):
        px, kinds, cols, boxes, _ = make_batch(k, a, cfg, tok, vit_stage=True)
        with torch.no_grad():
            vit = v.transformer(v.patch_embedding(px))
        la, m = aux_loss(aux, vit, kinds, cols, boxes, kind_w=a.vit_kind_weight, box_w=a.vit_box_weight)
        opt.zero_grad(set_to_none=True)
        la.backward()
        opt.step()
        hist.append((la.item(),) + m)
        if (k + 1) % 50 == 0:
            log("aux fit %d  loss %.3f  kind acc %.3f  colour acc %.3f  box mae %.1f px" % ((k + 1,) + tuple(np.mean(hist, 0))))
            hist = []


def lr_at(step, a):
    if step < a.warmup:
        return (step + 1) / a.warmup
    t = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory (checkpoints, logs); resumes if it has one")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12000, help="length of the stage-2 LR schedule")
    ap.add_argument("--minutes", type=float, default=0, help="stop (after a checkpoint) after this much wall time in this process")
    ap.add_argument("--batch", type=int, default=8, help="images per step (all their questions)")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--vit-lr-mult", type=float, default=0.5, help="stage-2 LR multiplier of the vision tower + adapter + aux heads")
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--vit-norm-gain", type=float, default=0.1)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--aux-steps", type=int, default=2000, help="aux weight decays linearly to --aux-final over these steps")
    ap.add_argument("--aux-final", type=float, default=1.0)
    ap.add_argument("--p-two-start", type=float, default=0.25)
    ap.add_argument("--p-two", type=float, default=0.6)
    ap.add_argument("--p-two-ramp", type=int, default=1000)
    ap.add_argument("--vit-steps", type=int, default=3000, help="stage 1: vision tower + aux heads alone")
    ap.add_argument("--vit-batch", type=int, default=16)
    ap.add_argument("--vit-lr", type=float, default=1e-3)
    ap.add_argument("--vit-kind-weight", type=float, default=3.0)
    ap.add_argument("--vit-box-weight", type=float, default=1.0)
    ap.add_argument("--other-frac", type=float, default=1.0,
                    help="keep each non-grounding training question with this probability (grounding: all)")
    ap.add_argument("--aux-fit-steps", type=int, default=200,
                    help="warm start: fit the fresh aux heads alone (tower frozen) for this many steps first")
    ap.add_argument("--ground-weight", type=float, default=8.0, help="loss multiplier of grounding answers")
    ap.add_argument("--units-weight", type=float, default=0.1, help="loss multiplier of the units digit of box coordinates")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--keep-eval-ckpts", action="store_true", help="also keep a copy RUN/ckpt_stepN.pt at every evaluation")
    ap.add_argument("--eval-images", type=int, default=100)
    ap.add_argument("--ckpt-seconds", type=float, default=300)
    ap.add_argument("--threads", type=int, default=1, help="2 = probe 1 and 2 threads every 100 steps, keep the faster")
    ap.add_argument("--tokenizer", default=None, help="default: RUN/tokenizer.model (trained if missing)")
    ap.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                    help="new run only: start from an exported checkpoint (config.json + model.safetensors "
                         "+ tokenizer.model, e.g. models/cogvlm-tiny-shapes) instead of random weights; "
                         "stage 1 is skipped, the aux heads and the optimizer start fresh. --config may "
                         "change the patch size / image size (the patch conv is resampled, see warm_start)")
    ap.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "config-small.json"),
                    help="JSON file with the model shape (default: config-small.json, the shipped one)")
    return ap.parse_args(argv)


def save(path, obj):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.run, exist_ok=True)
    ck_path = os.path.join(a.run, "ckpt.pt")
    log_path = os.path.join(a.run, "train.log")
    logf = open(log_path, "a")

    def log(*s):
        line = " ".join(str(x) for x in s)
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    tok_path = a.tokenizer or os.path.join(a.run, "tokenizer.model")
    if not os.path.exists(tok_path) and a.init_from:
        import shutil
        shutil.copyfile(os.path.join(a.init_from, "tokenizer.model"), tok_path)
    if not os.path.exists(tok_path):
        import tokenizer as tk
        tk.train(tok_path)
    tok = Tok(tok_path)
    if a.config:
        cfg = json.load(open(a.config))
    else:
        cfg = default_config()
    cfg["vocab_size"] = tok.sp.get_piece_size()
    net = CogVLM(cfg)
    cfg = net.cfg
    aux = AuxHead(cfg["vision_config"]["hidden_size"])
    step, elapsed = 0, 0.0
    state = None
    if os.path.exists(ck_path):
        state = torch.load(ck_path)
        net.load_state_dict(state["model"])
        missing = aux.load_state_dict(state["aux"], strict=False).missing_keys
        if missing:  # a checkpoint from before the digit head
            torch.manual_seed(a.seed + 1)
            nn.init.normal_(aux.digits.weight, std=0.02)
            nn.init.zeros_(aux.digits.bias)
        step, elapsed = state["step"], state["elapsed"]
        log("resumed %s at step %d (%.1f min trained so far)" % (ck_path, step, elapsed / 60))
    else:  # a new run: warm-started from an exported checkpoint, or from the seed
        if a.init_from:
            warm_start(net, a.init_from, log)
        else:
            net.init_weights(a.seed, vit_norm_gain=a.vit_norm_gain)
        torch.manual_seed(a.seed)
        nn.init.normal_(aux.proj.weight, std=0.02)
        nn.init.zeros_(aux.proj.bias)
        nn.init.normal_(aux.digits.weight, std=0.02)
        nn.init.zeros_(aux.digits.bias)
        log("new run", json.dumps(vars(a)))
        log("machine:", platform.node(), platform.processor() or platform.machine(),
            "torch", torch.__version__, "threads", a.threads, "cpus", os.cpu_count())
        log("config", json.dumps(cfg))
    nparam = sum(p.numel() for p in net.parameters())
    log("parameters: %d (%.1f MB in bf16)" % (nparam, nparam * 2 / 1e6))

    vis_params = [p for n, p in net.named_parameters() if n.startswith("model.vision.")] + list(aux.proj.parameters())
    lm_params = [p for n, p in net.named_parameters() if not n.startswith("model.vision.")]

    def groups(ps, mult):
        dec = [p for p in ps if p.dim() >= 2]
        nod = [p for p in ps if p.dim() < 2]
        return [{"params": dec, "weight_decay": a.wd, "mult": mult},
                {"params": nod, "weight_decay": 0.0, "mult": mult}]

    opt = torch.optim.AdamW(groups(lm_params, 1.0) + groups(vis_params, a.vit_lr_mult),
                            lr=a.lr, betas=(0.9, 0.98), eps=1e-8)
    # the digit head has its own group (appended last: checkpoints from before it have 4 groups)
    dig_group = {"params": list(aux.digits.parameters()), "weight_decay": 0.0, "mult": a.vit_lr_mult}
    if state is not None and len(state["opt"]["param_groups"]) == 4:
        opt.load_state_dict(state["opt"])
        opt.add_param_group(dig_group)
    else:
        opt.add_param_group(dig_group)
        if state is not None:
            opt.load_state_dict(state["opt"])
    if state is not None:
        for g, m in zip(opt.param_groups, [1.0, 1.0] + [a.vit_lr_mult] * 3):
            g["mult"] = m  # the command line rules (load_state_dict restores the saved ones)
    t_start = time.time()
    t_ck = time.time()
    acc = {}
    meter = {"n": 0}

    vstate = {"vstep": state.get("vstep", a.vit_steps) if state else 0, "vopt": None}
    if state is None and a.init_from:
        vstate["vstep"] = a.vit_steps  # warm start: no stage 1

    def checkpoint(tag="", extra=None, **_):
        nonlocal t_ck
        if extra:
            vstate.update(extra)
        save(ck_path, {"model": net.state_dict(), "aux": aux.state_dict(), "opt": opt.state_dict(),
                       "step": step, "elapsed": elapsed + time.time() - t_start, "cfg": cfg,
                       "args": vars(a), "tokenizer": tok_path, **vstate})
        t_ck = time.time()
        log("checkpoint step %d (vit stage %d) %s" % (step, vstate["vstep"], tag))

    torch.set_num_threads(1)  # stage 1 is small: one thread
    if not (state is None and a.init_from):
        vit_stage(net, aux, a, cfg, tok, state, log, checkpoint)
    else:
        fit_aux(net, aux, a, cfg, tok, log)
    vstate["vopt"] = None
    t_start2, step0 = time.time(), step

    # Adaptive thread count: the 2 cores are shared with other jobs, and 2 OpenMP threads on
    # one free core are slower than 1 thread. Every 100 steps the other count is tried for 10
    # steps and the faster one (mean step time) is kept. (The thread count changes only the
    # order of float reductions, not the data or the recipe.)
    if state is None and a.init_from:  # where the warm start begins, on the same eval images
        t0 = time.time()
        acc = evaluate(net, tok, a, cfg, a.eval_images)
        log("eval step 0 (warm start): %s  (%.0f s)" % (" ".join("%s %.3f" % kv for kv in acc.items()), time.time() - t0))
    cand = sorted({1, a.threads})
    best, timing = a.threads, {}
    net.train()
    while step < a.steps:
        if a.minutes and time.time() - t_start > a.minutes * 60:
            break
        if len(cand) > 1:
            ph = step % 100
            if ph == 0:
                timing = {}
            use = [c for c in cand if c != best][0] if ph < 10 else best
            if ph == 99 and len(timing) == 2:
                best = min(timing, key=lambda c: np.mean(timing[c]))
            torch.set_num_threads(use)
            t_step = time.time()
        f = lr_at(step, a)
        for g in opt.param_groups:
            g["lr"] = a.lr * f * g["mult"]
        px, kinds, cols, boxes, rows = make_batch(step, a, cfg, tok)
        feats, vit = net.vision_features(px)
        kvs = net.run_prefix(feats)
        # two length buckets (grounding answers are long) to waste less on padding
        loss, qlog = 0.0, []
        for bucket in ([r for r in rows if r[1] == "grounding"], [r for r in rows if r[1] != "grounding"]):
            ids, tg, w = pack_text(bucket, tok, a.ground_weight, a.units_weight)
            logits = net.run_text(kvs, torch.tensor([r[0] for r in bucket]), ids)
            tl = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tg.reshape(-1),
                                 ignore_index=-100, reduction="none").view(tg.shape)
            loss = loss + (tl * w).sum() / len(rows)
            with torch.no_grad():
                qlog += list(zip([r[1] for r in bucket], (tl.sum(1) / (tg >= 0).sum(1).clamp(min=1)).tolist()))
        aw = a.aux_weight * max(a.aux_final / max(a.aux_weight, 1e-9),
                                1 - step / max(1, a.aux_steps)) if a.aux_weight > 0 else 0.0
        if aw > 0:
            la, am = aux_loss(aux, vit, kinds, cols, boxes, kind_w=a.vit_kind_weight, box_w=a.vit_box_weight)
            loss = loss + aw * la
        else:
            la, am = torch.zeros(()), (0.0, 0.0, 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(list(net.parameters()) + list(aux.parameters()), 1.0)
        opt.step()
        step += 1
        if len(cand) > 1 and 2 <= (step - 1) % 100:  # skip the first steps after a switch
            timing.setdefault(use, []).append(time.time() - t_step)
        # per-kind token losses for the log
        with torch.no_grad():
            for k, v in qlog:
                meter.setdefault(k, []).append(v)
            meter.setdefault("aux", []).append(float(la))
            meter.setdefault("aux_kind_acc", []).append(am[0])
            meter.setdefault("gn", []).append(float(gn))
            meter["n"] += 1
        if step % 20 == 0:
            el = elapsed + time.time() - t_start
            parts = " ".join("%s %.3f" % (k, np.mean(meter[k])) for k in list(shapes.QKINDS) + ["aux", "aux_kind_acc", "gn"] if k in meter)
            log("step %d  %.1f min  lr %.2e  aux_w %.2f  %s  (%.2f s/step, %d thr)" % (
                step, el / 60, a.lr * f, aw, parts,
                (time.time() - t_start2) / max(1, step - step0), torch.get_num_threads()))
            if timing:
                log("  step time by threads: %s" % {c: round(float(np.mean(v)), 2) for c, v in timing.items()})
            meter = {"n": 0}
        if step % a.eval_every == 0 or step == a.steps:
            t0 = time.time()
            acc = evaluate(net, tok, a, cfg, a.eval_images)
            log("eval step %d  %.1f min: %s  (%.0f s)" % (step, (elapsed + time.time() - t_start) / 60,
                " ".join("%s %.3f" % kv for kv in acc.items()), time.time() - t0))
            checkpoint("(after eval)")
            if a.keep_eval_ckpts:
                import shutil
                shutil.copyfile(ck_path, os.path.join(a.run, "ckpt_step%d.pt" % step))
        elif time.time() - t_ck > a.ckpt_seconds:
            checkpoint()
    checkpoint("(end of this process)")
    log("stopped at step %d, %.1f min trained in total" % (step, (elapsed + time.time() - t_start) / 60))


if __name__ == "__main__":
    main()
