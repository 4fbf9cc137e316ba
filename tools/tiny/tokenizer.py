"""tokenizer.py - trains the SentencePiece BPE tokenizer of cogvlm-tiny-shapes.

LLaMA-like conventions: ids 0/1/2 = <unk>/<s>/</s>, no pad piece (pad_id -1), byte fallback
(any text encodes), digits split one per piece (as LLaMA: the grounding boxes are digit
sequences), identity normalization. The corpus is every prompt (in the `chat` template) and
every answer of the task, plus a few generic words so other prompts get sensible pieces.

    python3 tools/tiny/tokenizer.py --out tools/tiny/runs/tokenizer.model
"""
import argparse
import io
import os
import sys

import numpy as np
import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402

EXTRA = """A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: What is in this image? ASSISTANT: Hello! Hi, how are you? What is this picture?
Can you describe the picture? Tell me what you see. Is there a circle in the image? yes no
"""


def corpus(n_scenes=3000, seed=12345):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_scenes):
        sc = shapes.random_scene(rng)
        for _, q, a, _ in shapes.questions(sc):
            lines.append(shapes.chat_prompt(q))
            lines.append(a)
    lines += EXTRA.strip().split("\n")
    return lines


def train(out_path, vocab_size=512):
    lines = corpus()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True,
        character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=True, num_threads=1, minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(model.getvalue())
    return out_path


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=512)
    a = ap.parse_args()
    train(a.out, a.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=a.out)
    print("vocab", sp.get_piece_size())
    for t in ["Question: What color is the circle? Answer:", "red", "[[089,134,312,357]]",
              "An orange square and a purple triangle.", "Question: Where is the orange triangle? Answer:"]:
        print(t, "->", sp.encode(t, out_type=str))
