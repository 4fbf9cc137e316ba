"""model.py - CogVLM (v1) in PyTorch with the exact tensor names of cogvlm-chat-hf.

Follows shared/spec/cogvlm-model.md: §3 vision tower (EVA2-CLIP, post-sub-layer LayerNorm,
exact GELU, no final LN, CLS dropped) + GLU adapter (LayerNorm eps 1e-5) + boi/eoi; §4 LLaMA
decoder with a visual expert (vision expert iff own type VIS and next type VIS), RMSNorm,
RoPE rotate-half with inv_freq, plain causal attention; §4.6 position ids (boi/eoi count as
language, the interior image tokens share one position).

Two ways to run it, which must agree (checked by `python3 model.py --selftest`):
  * `forward_full(ids, types, pixels)`: one sequence of any layout, written straight from the
    spec, the reference used for the C engine's golden fixture;
  * `vision_features` + `run_prefix` + `run_text`: the training/eval path. Every sequence
    starts with the same [BOS][image] prefix, whose keys/values do not depend on the text
    (causal attention), so the prefix runs once per image and any number of questions about
    that image attend to its cached keys/values.
All computation is float32.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LANG, VIS = 0, 1


def default_config():
    return {
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 688,
        "num_hidden_layers": 4, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
        "vision_config": {"image_size": 112, "patch_size": 14, "in_channels": 3,
                          "hidden_size": 128, "num_heads": 4, "num_hidden_layers": 4,
                          "intermediate_size": 512, "layer_norm_eps": 1e-6},
    }


def bf16_round(t):
    """Round-to-nearest-even to BF16, widened back to float32."""
    return t.to(torch.bfloat16).to(torch.float32)


def gelu_exact(x):
    # Exact (erf) GELU, written out: the fused op of Debian's torch 1.13 returned bad gradients
    # for non-contiguous incoming gradients (tiny-model.md); erf's own backward is fine.
    return 0.5 * x * (1.0 + torch.erf(x * 0.7071067811865476))


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, pos, inv_freq):
    """x [..., T, hd], pos [T] (or broadcastable [.., T]) -> rotate-half RoPE."""
    ang = pos.to(torch.float32)[..., None] * inv_freq  # [.., T, hd/2]
    cos, sin = torch.cos(ang), torch.sin(ang)
    cos = torch.cat([cos, cos], -1)
    sin = torch.cat([sin, sin], -1)
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


# ---- vision tower ------------------------------------------------------------------------

class PatchEmbedding(nn.Module):
    def __init__(self, vc):
        super().__init__()
        d = vc["hidden_size"]
        self.proj = nn.Conv2d(vc["in_channels"], d, vc["patch_size"], vc["patch_size"])
        self.cls_embedding = nn.Parameter(torch.zeros(1, d))
        self.position_embedding = nn.Embedding(vc["num_positions"], d)

    def forward(self, px):  # [B, 3, S, S] -> [B, 1 + P, d]
        x = self.proj(px).flatten(2).transpose(1, 2)
        cls = self.cls_embedding[None].expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], 1) + self.position_embedding.weight[None]


class VitAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(d, 3 * d)
        self.dense = nn.Linear(d, d)

    def forward(self, x):
        B, N, d = x.shape
        H, hd = self.heads, d // self.heads
        q, k, v = self.query_key_value(x).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q @ k.transpose(-1, -2)) * hd ** -0.5, -1) @ v
        return self.dense(a.transpose(1, 2).reshape(B, N, d))


class VitMLP(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.fc1 = nn.Linear(d, inter)
        self.fc2 = nn.Linear(inter, d)

    def forward(self, x):
        return self.fc2(gelu_exact(self.fc1(x)))


class VitLayer(nn.Module):
    def __init__(self, vc):
        super().__init__()
        d, eps = vc["hidden_size"], vc["layer_norm_eps"]
        self.input_layernorm = nn.LayerNorm(d, eps=eps)
        self.attention = VitAttention(d, vc["num_heads"])
        self.mlp = VitMLP(d, vc["intermediate_size"])
        self.post_attention_layernorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x):  # post-sub-layer norm: the residual stream is never normalized
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class VitTransformer(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.layers = nn.ModuleList([VitLayer(vc) for _ in range(vc["num_hidden_layers"])])

    def forward(self, x):
        for l in self.layers:
            x = l(x)
        return x


class GLU(nn.Module):
    def __init__(self, d, D, I):
        super().__init__()
        self.linear_proj = nn.Linear(d, D, bias=False)
        self.norm1 = nn.LayerNorm(D, eps=1e-5)
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.dense_h_to_4h = nn.Linear(D, I, bias=False)
        self.dense_4h_to_h = nn.Linear(I, D, bias=False)

    def forward(self, x):
        h = gelu_exact(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(h)) * self.dense_h_to_4h(h))


class EVA2CLIP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        vc = cfg["vision_config"]
        D = cfg["hidden_size"]
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = VitTransformer(vc)
        self.linear_proj = GLU(vc["hidden_size"], D, cfg["intermediate_size"])
        self.boi = nn.Parameter(torch.zeros(1, 1, D))
        self.eoi = nn.Parameter(torch.zeros(1, 1, D))

    def forward(self, px):
        """[B,3,S,S] -> (features [B, P+2, D] = boi, patches, eoi; vit output [B, 1+P, d])."""
        vit = self.transformer(self.patch_embedding(px))
        y = self.linear_proj(vit[:, 1:])
        B = y.shape[0]
        return torch.cat([self.boi.expand(B, -1, -1), y, self.eoi.expand(B, -1, -1)], 1), vit


# ---- language model ----------------------------------------------------------------------

class Rotary(nn.Module):
    def __init__(self, hd):
        super().__init__()
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        # The checkpoint stores inv_freq in BF16 and the C engine uses the stored values:
        # train with exactly those.
        self.register_buffer("inv_freq", bf16_round(inv), persistent=False)


class Attention(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.H, self.hd = H, D // H
        self.vision_expert_query_key_value = nn.Linear(D, 3 * D, bias=False)
        self.vision_expert_dense = nn.Linear(D, D, bias=False)
        self.language_expert_query_key_value = nn.Linear(D, 3 * D, bias=False)
        self.language_expert_dense = nn.Linear(D, D, bias=False)
        self.rotary_emb = Rotary(self.hd)


class ExpertMLP(nn.Module):
    def __init__(self, D, I):
        super().__init__()
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    def __init__(self, D, I):
        super().__init__()
        self.language_mlp = ExpertMLP(D, I)
        self.vision_mlp = ExpertMLP(D, I)


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = Attention(D, cfg["num_attention_heads"])
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.mlp = MLP(D, cfg["intermediate_size"])


class CogVLMModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.vision = EVA2CLIP(cfg)


def position_ids(types):
    """§4.6: boi/eoi (first/last of each VIS run) count as LANG; +1 at each LANG token and at
    the first token of each remaining VIS run; other VIS tokens repeat the position."""
    T = len(types)
    t = list(types)
    for i in range(T):
        if types[i] == VIS and (i == 0 or types[i - 1] != VIS or i == T - 1 or types[i + 1] != VIS):
            t[i] = LANG
    pos, p = [], -1
    for i in range(T):
        if t[i] == LANG or i == 0 or t[i - 1] != VIS:
            p += 1
        pos.append(p)
    return pos


def vision_expert_mask(types):
    """§4.2: vision expert iff own type VIS and next type VIS; the last token never."""
    T = len(types)
    return [int(types[i] == VIS and i + 1 < T and types[i + 1] == VIS) for i in range(T)]


class CogVLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        cfg = dict(cfg)
        vc = dict(cfg["vision_config"])
        vc["num_positions"] = (vc["image_size"] // vc["patch_size"]) ** 2 + 1
        cfg["vision_config"] = vc
        self.cfg = cfg
        self.model = CogVLMModel(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self.num_patches = vc["num_positions"] - 1

    # -- init ---------------------------------------------------------------------------
    def init_weights(self, seed, vit_norm_gain=0.1, std=0.02):
        g = torch.Generator().manual_seed(seed)
        L = self.cfg["num_hidden_layers"]
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") and ".vision." in name:
                    p.fill_(vit_norm_gain)  # post-sub-layer LN: blocks start near identity
                elif name.endswith("norm.weight") or name.endswith("norm1.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    s = std
                    if ("expert_dense" in name or "down_proj" in name) and ".vision." not in name:
                        s = std / math.sqrt(2 * L)
                    p.copy_(torch.randn(p.shape, generator=g) * s)

    def init_pos_sincos(self, scale=0.5):
        """2-D sin-cos init of the ViT position embedding (MAE style; still a learned
        parameter): gives the tower the grid structure from step 0 instead of learning it."""
        pe = self.model.vision.patch_embedding.position_embedding.weight
        d = pe.shape[1]
        g = int(round(math.sqrt(pe.shape[0] - 1)))
        q = d // 4
        omega = 1.0 / (10000.0 ** (torch.arange(q, dtype=torch.float32) / q))
        ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32),
                                torch.arange(g, dtype=torch.float32), indexing="ij")
        ay = ys.reshape(-1, 1) * omega
        ax = xs.reshape(-1, 1) * omega
        emb = torch.cat([torch.sin(ay), torch.cos(ay), torch.sin(ax), torch.cos(ax)], 1)
        with torch.no_grad():
            pe.zero_()
            pe[1:, :emb.shape[1]] = emb * scale

    # -- reference path (one sequence, any layout) ----------------------------------------
    def forward_full(self, input_ids, token_type_ids, pixel_values=None):
        """input_ids, token_type_ids: [T] int lists/tensors; pixel_values [3,S,S] or None.
        Returns logits [T, V]. Straight from the spec."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        types = [int(t) for t in token_type_ids]
        T = len(types)
        m = self.model
        x = m.embed_tokens(ids)
        if pixel_values is not None:
            feats, _ = m.vision(pixel_values[None])
            vis_rows = torch.tensor([i for i in range(T) if types[i] == VIS])
            assert len(vis_rows) == feats.shape[1]
            x = x.clone()
            x[vis_rows] = feats[0]
        pos = torch.tensor(position_ids(types))
        vmask = torch.tensor(vision_expert_mask(types), dtype=torch.bool)[:, None]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for layer in m.layers:
            at = layer.self_attn
            H, hd = at.H, at.hd
            h = layer.input_layernorm(x)
            qkv = torch.where(vmask, at.vision_expert_query_key_value(h),
                              at.language_expert_query_key_value(h))
            q, k, v = qkv.view(T, 3, H, hd).permute(1, 2, 0, 3)
            q = rope(q, pos, at.rotary_emb.inv_freq)
            k = rope(k, pos, at.rotary_emb.inv_freq)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v
            a = a.transpose(0, 1).reshape(T, H * hd)
            x = x + torch.where(vmask, at.vision_expert_dense(a), at.language_expert_dense(a))
            h = layer.post_attention_layernorm(x)
            x = x + torch.where(vmask, layer.mlp.vision_mlp(h), layer.mlp.language_mlp(h))
        return self.lm_head(m.norm(x))

    # -- shared-prefix path (training / batched evaluation) --------------------------------
    def vision_features(self, pixel_values):
        return self.model.vision(pixel_values)

    def _prefix_experts(self, x, lang, vis):
        """Slot 0 (BOS) and the last slot (eoi) -> language expert, the rest (boi, patches)
        -> vision expert."""
        l = lang(torch.stack([x[:, 0], x[:, -1]], 1))
        return torch.cat([l[:, :1], vis(x[:, 1:-1]), l[:, 1:]], 1)

    def run_prefix(self, feats, bos_id=1):
        """feats [B, P+2, D] -> per-layer (k, v) [B, H, P+3, hd] of the prefix [BOS][image]."""
        m = self.model
        B, n, D = feats.shape
        P = n - 2
        bos = m.embed_tokens.weight[bos_id][None, None].expand(B, 1, D)
        x = torch.cat([bos, feats], 1)
        T = n + 1
        pos = torch.tensor([0, 1] + [2] * P + [3])
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        kvs = []
        for li, layer in enumerate(m.layers):
            at = layer.self_attn
            H, hd = at.H, at.hd
            h = layer.input_layernorm(x)
            qkv = self._prefix_experts(h, at.language_expert_query_key_value,
                                       at.vision_expert_query_key_value)
            q, k, v = qkv.view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
            k = rope(k, pos, at.rotary_emb.inv_freq)
            kvs.append((k, v))
            if li == len(m.layers) - 1:
                break  # the prefix's own output is never needed
            q = rope(q, pos, at.rotary_emb.inv_freq)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v
            a = a.transpose(1, 2).reshape(B, T, D)
            x = x + self._prefix_experts(a, at.language_expert_dense, at.vision_expert_dense)
            h = layer.post_attention_layernorm(x)
            x = x + self._prefix_experts(h, layer.mlp.language_mlp, layer.mlp.vision_mlp)
        return kvs

    def run_text(self, kvs, img_idx, text_ids, start_pos=4, return_hidden=False):
        """Text tokens (all LANG, language expert) after a prefix: kvs from run_prefix,
        img_idx [N] (which prefix each row continues), text_ids [N, L] (right padding is
        harmless: causal). Returns logits [N, L, V]."""
        m = self.model
        N, L = text_ids.shape
        x = m.embed_tokens(text_ids)
        D = x.shape[-1]
        pos = torch.arange(start_pos, start_pos + L)
        Tp = kvs[0][0].shape[2]
        mask = torch.ones(L, Tp + L, dtype=torch.bool)
        mask[:, Tp:] = torch.ones(L, L, dtype=torch.bool).tril()
        for layer, (kp, vp) in zip(m.layers, kvs):
            at = layer.self_attn
            H, hd = at.H, at.hd
            h = layer.input_layernorm(x)
            q, k, v = at.language_expert_query_key_value(h).view(N, L, 3, H, hd).permute(
                2, 0, 3, 1, 4)
            q = rope(q, pos, at.rotary_emb.inv_freq)
            k = rope(k, pos, at.rotary_emb.inv_freq)
            K = torch.cat([kp.index_select(0, img_idx), k], 2)
            V = torch.cat([vp.index_select(0, img_idx), v], 2)
            s = (q @ K.transpose(-1, -2)) / math.sqrt(hd)
            a = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ V
            x = x + at.language_expert_dense(a.transpose(1, 2).reshape(N, L, D))
            x = x + layer.mlp.language_mlp(layer.post_attention_layernorm(x))
        h = m.norm(x)
        return h if return_hidden else self.lm_head(h)


# ---- preprocessing (spec §6) -------------------------------------------------------------

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(img, size):
    """PIL image -> [3, size, size] float32: RGB, Pillow bicubic resize, /255, CLIP normalize."""
    import numpy as np
    from PIL import Image
    im = img.convert("RGB").resize((size, size), Image.BICUBIC)
    a = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    a = (a - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def build_prompt(sp, cfg, question, has_image):
    """(input_ids, token_type_ids) for the chat template, spec §5.1."""
    vc = cfg["vision_config"]
    n_img = (vc["image_size"] // vc["patch_size"]) ** 2 + 2 if has_image else 0
    text = sp.encode("Question: " + question + " Answer:")
    ids = [1] + [0] * n_img + text
    types = [LANG] + [VIS] * n_img + [LANG] * len(text)
    return ids, types


def selftest():
    torch.manual_seed(0)
    cfg = default_config()
    cfg["vocab_size"] = 100
    net = CogVLM(cfg)
    net.init_weights(1, vit_norm_gain=0.5, std=0.1)
    S = cfg["vision_config"]["image_size"]
    px = torch.randn(2, 3, S, S)
    P = net.num_patches
    text = torch.randint(3, 100, (3, 7))
    img_idx = torch.tensor([0, 1, 1])
    with torch.no_grad():
        feats, _ = net.vision_features(px)
        lg = net.run_text(net.run_prefix(feats), img_idx, text)
        err = 0.0
        for n in range(3):
            ids = [1] + [0] * (P + 2) + text[n].tolist()
            types = [LANG] + [VIS] * (P + 2) + [LANG] * 7
            full = net.forward_full(ids, types, px[img_idx[n]])
            err = max(err, (full[P + 3:] - lg[n]).abs().max().item())
        print("prefix path vs full path: max abs diff %.3g" % err)
        assert err < 1e-4
        print("positions", position_ids([0, 1, 1, 1, 1, 0, 0])[:7], vision_expert_mask([0, 1, 1, 1, 1, 0, 0]))
    # gradient check of the exact GELU against finite differences
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gelu_exact(t).t(), (x,))
    print("selftest ok")


if __name__ == "__main__":
    selftest()
