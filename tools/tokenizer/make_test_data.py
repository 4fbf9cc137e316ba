#!/usr/bin/env python3
"""make_test_data.py - reference data for tests/unit/test_tokenizer.c, from SentencePiece.

Writes, under tests/unit/data/:
  tok-charsmap.model   a tiny BPE model trained here with SentencePiece defaults except a
                       small custom normalization rule table (so its precompiled_charsmap
                       stays a few KB; the stock nmt_nfkc one is ~240 KB), user-defined and
                       control symbols, no byte fallback, and some pieces re-typed UNUSED;
  tok-charsmap.jsonl   encode/decode cases for it;
  llama2-extra.jsonl   extra cases for the shared LLaMA-2 tokenizer: invalid UTF-8 input,
                       byte pieces cut by control ids, invalid byte runs, <unk>, ...
Every expected value comes from the python `sentencepiece` package, never from the C code.

Each JSONL line has "ids" and "decoded" (= sp.decode(ids)), plus the input text as
"text" (valid UTF-8) or "text_hex" (raw bytes, hex) when it is an encode case; a line
without text is a decode-only case.

Usage: pip install sentencepiece protobuf
       python3 tools/tokenizer/make_test_data.py [--shared ../shared/data]
"""
import argparse
import json
import os
import random
import tempfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "unit", "data")

WORDS = ("the quick brown fox jumps over lazy dog image cat sitting on mat question answer "
         "what color is circle point out children hello world cafe naive uber strasse box "
         "file full office 中文 测试 图片 日本語 テキスト café naïve über straße").split()

# Normalization rules, SentencePiece TSV syntax: source code points <TAB> target code
# points (hex); a missing target deletes. Chosen to exercise the charsmap: single and
# multi-code-point keys, keys sharing a prefix, deletions, expansions, mapping to space.
def rules():
    r = {}
    for cp in range(0xFF01, 0xFF5F):           # fullwidth ASCII -> ASCII
        r[(cp,)] = (cp - 0xFEE0,)
    r[(0xFB01,)] = (0x66, 0x69)                # ﬁ -> fi
    r[(0xFB03,)] = (0x66, 0x66, 0x69)          # ﬃ -> ffi
    for i in range(20):                        # ①..⑳ -> 1..20
        r[(0x2460 + i,)] = tuple(ord(c) for c in str(i + 1))
    r[(0xB2,)] = (0x32,)                       # ² -> 2
    r[(0x2103,)] = (0xB0, 0x43)                # ℃ -> °C
    r[(0x3000,)] = (0x20,)                     # ideographic space -> space
    r[(0xA0,)] = (0x20,)                       # no-break space -> space
    r[(0x09,)] = (0x20,)                       # tab -> space
    r[(0x200B,)] = ()                          # zero width space -> deleted
    r[(0xAD,)] = ()                            # soft hyphen -> deleted
    r[(0x65, 0x301)] = (0xE9,)                 # e + combining acute -> é
    r[(0x61, 0x308)] = (0xE4,)                 # a + combining diaeresis -> ä
    r[(0x41, 0x42, 0x43)] = (0x78, 0x79, 0x7A) # ABC -> xyz (prefix of the next)
    r[(0x41, 0x42, 0x43, 0x44)] = (0x51,)      # ABCD -> Q (longest match wins)
    return r


def write_rules(path):
    with open(path, "w", encoding="ascii") as f:
        for src, trg in sorted(rules().items()):
            f.write(" ".join("%X" % c for c in src))
            if trg:
                f.write("\t" + " ".join("%X" % c for c in trg))
            f.write("\n")


def train(tmp):
    rng = random.Random(20240611)
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(2000):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "\n")
    tsv = os.path.join(tmp, "rules.tsv")
    write_rules(tsv)
    prefix = os.path.join(tmp, "tok")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=200,
        normalization_rule_tsv=tsv, user_defined_symbols=["<img>", "[[", "[[x"],
        control_symbols=["<ctl>"], minloglevel=2)
    m = pb.ModelProto()
    with open(prefix + ".model", "rb") as f:
        m.ParseFromString(f.read())
    # Re-type every 5th multi-character normal piece as UNUSED (exercises re-segmentation).
    multi = [p for p in m.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL
             and len(p.piece) > 1]
    for p in multi[::5]:
        p.type = pb.ModelProto.SentencePiece.UNUSED
    # Drop the temporary paths so that the file is reproducible.
    m.trainer_spec.ClearField("input")
    m.trainer_spec.model_prefix = "tok-charsmap"
    m.normalizer_spec.ClearField("normalization_rule_tsv")
    return m.SerializeToString()


def random_texts(rng, atoms, n, max_atoms):
    return [b"".join(rng.choice(atoms) for _ in range(rng.randint(0, max_atoms)))
            for _ in range(n)]


def random_ids(rng, sp, n):
    special = [i for i in range(sp.vocab_size())
               if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)]
    out = []
    for _ in range(n):
        out.append([rng.choice(special) if rng.random() < 0.5 else rng.randrange(sp.vocab_size())
                    for _ in range(rng.randint(1, 8))])
    return out


def case(sp, text=None, ids=None):
    line = {}
    if text is not None:
        try:
            line["text"] = text.decode("utf-8")
        except UnicodeDecodeError:
            line["text_hex"] = text.hex()
        ids = sp.encode(text)
    line["ids"] = ids
    line["decoded"] = sp.decode(ids)
    return json.dumps(line, ensure_ascii=False)


def write_cases(path, sp, texts, idseqs):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(case(sp, text=t) + "\n")
        for ids in idseqs:
            f.write(case(sp, ids=ids) + "\n")


ATOMS = [b"a", b"b", b"x", b"the", b"cat", b"hello", b"world", b" ", b"  ", b"\t", b"\n",
         b"\x00", "ｆｕｌｌ".encode(), "ﬁ".encode(), "ﬃ".encode(), "①".encode(), "⑫".encode(),
         "²".encode(), "℃".encode(), "\u3000".encode(), "\u00a0".encode(), "\u200b".encode(),
         "\u00ad".encode(), "e\u0301".encode(), "a\u0308".encode(), b"ABC", b"ABCD", b"AB",
         "▁".encode(), b"<img>", b"[[", b"[[x", b"[[xx", b"<ctl>", b"<s>", b"<unk>", b"\xff",
         b"\xc3", b"\xed\xa0\x80", b"\xe4\xb8", "中文".encode(), "日本語".encode(), "😀".encode(),
         "Ω".encode(), "\ufffd".encode(), "é".encode(), b"Z", b"q", b"7"]

LLAMA_ATOMS = [b"Hello", b" world", b" ", b"  ", b"\n", b"\t", b"a", b"\x00", b"\xff", b"\xc3",
               b"\xe4\xb8", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe0\x80\x80", b"\x80",
               b"\xf0\x9f\x98", "中".encode(), "😀".encode(), "\ufffd".encode(), "▁".encode(),
               b"<s>", b"</s>", b"<unk>", b"<0x41>", "ß".encode()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "data"))
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        blob = train(tmp)
    model_path = os.path.join(OUT, "tok-charsmap.model")
    with open(model_path, "wb") as f:
        f.write(blob)
    sp = spm.SentencePieceProcessor(model_proto=blob)
    rng = random.Random(7)
    fixed = [b"", b" ", b"   ", b"hello world", b"  hello   world  ", "ｈｅｌｌｏ　ｗｏｒｌｄ".encode(),
             "oﬃce ﬁle ①② ℃".encode(), "cafe\u0301 na\u0308ive".encode(), b"ABCD ABC AB",
             "zero\u200bwidth soft\u00adhyphen".encode(), b"<img>[[x]] [[xx <ctl>",
             b"\t\ttabs\tand  spaces \n", b"bad \xff bytes \xc3", b"QQQ ZZZ 777"]
    write_cases(os.path.join(OUT, "tok-charsmap.jsonl"), sp,
                fixed + random_texts(rng, ATOMS, 200, 16), random_ids(rng, sp, 120))

    llama = spm.SentencePieceProcessor(
        model_file=os.path.join(args.shared, "llama2-tokenizer.model"))
    fixed_ids = [[1, 29871, 15043], [29871, 29871, 15043], [259, 15043], [1, 1, 259],
                 [243, 162, 1, 155, 131], [0, 15043], [3], [1, 243, 15043], [2, 29871],
                 [228, 187, 140], [237, 160, 128, 29916], [244, 144, 128, 128],
                 [195, 2, 172], [131, 131], [29871, 243, 162, 155, 131, 1, 243, 162, 155]]
    write_cases(os.path.join(OUT, "llama2-extra.jsonl"), llama,
                random_texts(rng, LLAMA_ATOMS, 150, 10), fixed_ids + random_ids(rng, llama, 150))
    print("wrote", model_path, os.path.getsize(model_path), "bytes")


if __name__ == "__main__":
    main()
