#!/usr/bin/env python3
"""fixture.py - golden fixtures small enough for a device call, and back (no numpy needed).

A device call sends at most 64 MiB; golden-tiny (38 MB) and golden-cogvlm2-tiny (79 MB: a
128k vocabulary) do not both fit as they are. What `cogvlm golden --backend cuda` needs
fits, because the CUDA backend rounds every weight to BF16 at upload:

  pack SRC DST [--cases a,b] [--no-prompt-logits]     (prepare.sh, here)
    - the float32 model is not carried: where every float32 tensor rounds (to nearest
      even, as the upload does) to the BF16 model's bytes, it is rebuilt there from the
      BF16 model; the tensors that do not, and RoPE's inv_freq (read on the host: kept
      exact), travel in float32-patch.safetensors. The rebuilt model gives the CUDA backend the
      device weights of the original bit for bit; a CPU run on it computes with
      BF16-rounded weights (so its figures are not the fixture's CPU figures).
    - --cases keeps only the named cases (the BF16 checks stay); --no-prompt-logits drops
      the cases' prompt logits [T, vocab] (golden skips an absent array; hidden states and
      the greedy steps' logits, whose first row is the prompt's last, are still compared).
    - files over 1 MB that xz shrinks by more than 10% travel as NAME.xz; the tokenizer the
      manifest names (beside the fixture) too.
  unpack CARRY_DATA OUT                               (run.sh, on the device machine)
    - every fixture under CARRY_DATA into OUT: .xz files decompressed, derived models
      rebuilt, everything else linked.
"""
import array
import json
import lzma
import os
import shutil
import struct
import sys

XZ_MIN = 1 << 20


def st_read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def st_write(path, tensors, meta=None):
    """tensors: [(name, dtype, shape, bytes)] in file order."""
    header, off = {}, 0
    for name, dt, shape, b in tensors:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b)
    if meta:
        header["__metadata__"] = meta
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, _, b in tensors:
            f.write(b)


def f32_to_bf16_bytes(b):
    """round to nearest even, as cvlm_f32_to_bf16 and the CUDA upload (NaN kept quiet)"""
    u = array.array("I", b)
    if sys.byteorder != "little":
        u.byteswap()
    h = array.array("H", [(x >> 16) | 0x40 if (x & 0x7FFFFFFF) > 0x7F800000
                          else ((x + 0x7FFF + ((x >> 16) & 1)) >> 16) & 0xFFFF for x in u])
    if sys.byteorder != "little":
        h.byteswap()
    return h.tobytes()


def tensor(header, data, name):
    d = header[name]
    b, e = d["data_offsets"]
    return d["dtype"], d["shape"], data[b:e]


def put(src, dst, xz=True):
    """copies src to dst, or to dst.xz where that saves more than 10%"""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if xz and os.path.getsize(src) > XZ_MIN:
        with open(src, "rb") as f:
            raw = f.read()
        packed = lzma.compress(raw, preset=6)
        if len(packed) < 0.9 * len(raw):
            with open(dst + ".xz", "wb") as f:
                f.write(packed)
            return
    shutil.copy(src, dst)
    os.chmod(dst, 0o644)


def pack(src, dst, cases=None, no_prompt_logits=False):
    man = json.load(open(os.path.join(src, "manifest.json")))
    if cases:
        keep = set(cases.split(","))
        man["cases"] = [c for c in man.get("cases", []) if c.get("name") in keep]
    if no_prompt_logits:
        for c in man.get("cases", []):
            c.pop("logits", None)
    names = set()

    def walk(v, skip_weights=False):
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "weights" and not skip_weights:
                    continue  # handled below
                if k in ("file",) and isinstance(x, str) and ".." not in x.split("/"):
                    names.add(x)
                walk(x, True)
        elif isinstance(v, list):
            for x in v:
                walk(x, True)

    walk(man)
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    w = man.get("weights", {})
    f32, b16 = w.get("float32"), w.get("bfloat16")
    model_dirs = []
    if f32 and b16:
        h32, d32 = st_read(os.path.join(src, f32["file"]))
        h16, d16 = st_read(os.path.join(src, b16["file"]))
        patch = []
        for name in sorted(k for k in h32 if k != "__metadata__"):
            dt, shape, b = tensor(h32, d32, name)
            # inv_freq is read on the host (RoPE angles in F32): always exact
            same = (not name.endswith("inv_freq") and name in h16 and dt == "F32"
                    and h16[name]["dtype"] == "BF16"
                    and tensor(h16, d16, name)[2] == f32_to_bf16_bytes(b))
            if not same:
                patch.append((name, dt, shape, b))
        extra = [k for k in h16 if k != "__metadata__" and k not in h32]
        if extra:
            raise SystemExit("fixture.py: the BF16 model has tensors the float32 one lacks: %s"
                             % extra[:3])
        st_write(os.path.join(dst, "float32-patch.safetensors"), patch)
        f32["derived"] = {"from": b16["file"], "patch": "float32-patch.safetensors",
                          "note": "float32 tensors that round to the BF16 model's bytes are "
                                  "rebuilt as those BF16 bytes (fixture.py unpack)"}
        model_dirs.append((b16["dir"], True))
        model_dirs.append((f32["dir"], False))  # its small files (config.json) only
        print("fixture.py: %s: float32 model derived from %s (%d tensors patched: %s)"
              % (os.path.basename(src), b16["dir"], len(patch),
                 ", ".join(p[0].split(".")[-1] for p in patch[:4])))
    else:
        model_dirs += [(e["dir"], True) for e in w.values() if isinstance(e, dict) and "dir" in e]
    for d, whole in model_dirs:
        for fn in os.listdir(os.path.join(src, d)):
            s = os.path.join(src, d, fn)
            if whole or os.path.getsize(s) < XZ_MIN:
                put(s, os.path.join(dst, d, fn))
    for n in sorted(names):
        s = os.path.join(src, n)
        if os.path.isfile(s):
            put(s, os.path.join(dst, n))
        elif os.path.isfile(os.path.join(src, "..", n)):  # the tokenizer sits beside it
            put(os.path.join(src, "..", n), os.path.join(dst, "..", n))
            side = os.path.join(os.path.dirname(os.path.join(src, "..", n)),
                                "tokenizer_config.json")
            if os.path.isfile(side):
                put(side, os.path.join(dst, "..", os.path.dirname(n), "tokenizer_config.json"))
        else:
            print("fixture.py: %s names %s, which does not exist" % (src, n), file=sys.stderr)
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        json.dump(man, f, indent=1)


def derive(fixture, entry):
    d = entry["derived"]
    h16, d16 = st_read(os.path.join(fixture, d["from"]))
    hp, dp = st_read(os.path.join(fixture, d["patch"]))
    ts = [(n,) + tensor(hp, dp, n) for n in sorted(k for k in hp if k != "__metadata__")]
    ts += [(n,) + tensor(h16, d16, n) for n in sorted(k for k in h16 if k != "__metadata__")
           if n not in hp]
    # wider dtypes first: every tensor stays aligned to its element size
    ts.sort(key=lambda t: 0 if t[1] in ("F32", "I32") else 1)
    out = os.path.join(fixture, entry["file"])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    st_write(out, ts)


def unpack(carry, out):
    os.makedirs(out, exist_ok=True)
    for root, _, files in os.walk(carry):
        rel = os.path.relpath(root, carry)
        os.makedirs(os.path.join(out, rel), exist_ok=True)
        for fn in files:
            s, t = os.path.join(root, fn), os.path.join(out, rel, fn)
            if fn.endswith(".xz"):
                with lzma.open(s) as fi, open(t[:-3], "wb") as fo:
                    shutil.copyfileobj(fi, fo, 1 << 20)
            elif not os.path.exists(t):
                os.symlink(os.path.abspath(s), t)
    for root, _, files in os.walk(out):
        if "manifest.json" in files:
            man = json.load(open(os.path.join(root, "manifest.json")))
            for e in man.get("weights", {}).values():
                if isinstance(e, dict) and "derived" in e:
                    derive(root, e)
                    print("fixture.py: rebuilt %s/%s" % (os.path.basename(root), e["file"]))


def main(argv):
    if len(argv) >= 3 and argv[0] == "pack":
        cases = None
        if "--cases" in argv:
            cases = argv[argv.index("--cases") + 1]
        pack(argv[1], argv[2], cases, "--no-prompt-logits" in argv)
    elif len(argv) == 3 and argv[0] == "unpack":
        unpack(argv[1], argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
