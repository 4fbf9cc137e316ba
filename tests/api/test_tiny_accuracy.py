"""The embedded default model answers questions about images, end to end.

Fresh scenes are drawn by this test's own generator (following the task contract of
shared/spec/tiny-model.md; its seed stream is not the trainer's), every question kind is
asked through the HTTP API of the real daemon serving models/cogvlm-tiny-shapes, with
greedy decoding, several requests at a time (so the scheduler batches them), and the
accuracy per kind must reach the bar below.

The bar is the accuracy measured through this same API path on a large sample, minus a
binomial safety margin, and never below the spec's minimum (MINIMUM). Measured on 2026-12-07
(the step-6500 checkpoint of run v7, 140 px; models/cogvlm-tiny-shapes/README.md) on 900
scenes (5,811 questions) of three seeds that were not used to choose the checkpoint:

    for s in 9004 9005 9006; do COGVLM_TINY_SCENES=300 COGVLM_TINY_SEED=$s \
        COGVLM_TINY_REPORT=/tmp/r$s.json tests/api/run.sh -k tiny_model_accuracy -s; done

giving MEASURED below (right, asked). For each kind, with p the measured accuracy (capped at
1 - 3/n_meas, the rule-of-three bound on an error rate seen (nearly) zero times, so that a
near-perfect score still gets a margin where the normal approximation is poor), n_meas its
number of questions there and n_test the number asked here (SCENES = 150 scenes of this
test's own stream: 209 colour / shape / grounding questions, 150 count / description, 118
grounding questions on two-shape images), the threshold is

    p - 3 * sqrt(p (1 - p) (1 / n_meas + 1 / n_test)), rounded down to 0.01,

three standard deviations of the difference of two binomial proportions: a model as good as
the measured one falls below it about once in 700 runs per kind (one sided), while a clear
regression fails (e.g. grounding at the previous checkpoint's ~84 % against a bar of ~0.86,
two-shape grounding at its ~80 % against ~0.80). The thresholds are computed from the counts
actually asked, so a run with more scenes is held to a tighter bar. Re-measure and update
MEASURED after retraining the model (models/cogvlm-tiny-shapes/README.md).
"""
import base64
import io
import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import apiutil
from apiutil import Server

MODEL = apiutil.REPO / "models" / "cogvlm-tiny-shapes"
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
           "yellow": (235, 200, 20), "purple": (140, 50, 190), "orange": (245, 130, 20)}
KINDS = ("circle", "square", "triangle")
# The spec's minimum bar (shared/spec/tiny-model.md); the test fails below it.
MINIMUM = {"colour": 0.90, "shape": 0.90, "count": 0.95, "description": 0.75, "grounding": 0.50}
TARGET = {"colour": 0.98, "shape": 0.98, "count": 0.99, "description": 0.95, "grounding": 0.90}
# (right, asked) through the API, 900 scenes of seeds 9004-9006 (see the docstring).
MEASURED = {"colour": (1335, 1337), "shape": (1337, 1337), "count": (900, 900),
            "description": (872, 900), "grounding": (1234, 1337),
            "grounding_2shape": (780, 874)}
SCENES = int(os.environ.get("COGVLM_TINY_SCENES", "150"))
# A measurement run may draw other scenes (the default is the test's own fixed stream).
SEED = int(os.environ.get("COGVLM_TINY_SEED", "20261127"))


def scene(rng):
    """1 or 2 shapes: distinct kinds and colours, non-overlapping boxes inside 224x224."""
    n = rng.choice((1, 2))
    kinds = rng.sample(KINDS, n)
    colours = rng.sample(sorted(COLOURS), n)
    while True:
        shapes = []
        for k, c in zip(kinds, colours):
            s = rng.randint(40, 100)
            shapes.append((k, c, rng.randint(0, 224 - s), rng.randint(0, 224 - s), s))
        if n == 1 or not overlap(shapes[0], shapes[1]):
            return shapes


def overlap(a, b):
    return not (a[2] + a[4] <= b[2] or b[2] + b[4] <= a[2] or a[3] + a[4] <= b[3] or
                b[3] + b[4] <= a[3])


def render(rng, shapes):
    img = Image.new("RGB", (224, 224), tuple(rng.randint(200, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for k, c, x, y, s in shapes:
        fill = COLOURS[c]
        if k == "circle":
            d.ellipse([x, y, x + s - 1, y + s - 1], fill=fill)
        elif k == "square":
            d.rectangle([x, y, x + s - 1, y + s - 1], fill=fill)
        else:
            d.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def coord(v):
    return min(999, math.floor(1000 * v / 224))


def box(sh):
    _, _, x, y, s = sh
    return [coord(x), coord(y), coord(x + s), coord(y + s)]


def phrase(sh, first):
    art = "an" if sh[1] == "orange" else "a"
    art = art.capitalize() if first else art
    return f"{art} {sh[1]} {sh[0]}"


def questions(shapes):
    """(kind, question, expected) for every question kind of the contract."""
    qs = []
    for sh in shapes:
        qs.append(("colour", f"What color is the {sh[0]}?", sh[1]))
        qs.append(("shape", f"What shape is the {sh[1]} object?", sh[0]))
        qs.append(("grounding", f"Where is the {sh[1]} {sh[0]}?", box(sh)))
    qs.append(("count", "How many shapes are there?", "one" if len(shapes) == 1 else "two"))
    order = sorted(shapes, key=lambda sh: sh[2] + sh[4] / 2)
    desc = " and ".join(phrase(sh, i == 0) for i, sh in enumerate(order)) + "."
    qs.append(("description", "Describe the image.", desc))
    return qs


def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_box(text):
    t = text.strip()
    if not (t.startswith("[[") and t.endswith("]]")):
        return None
    try:
        v = [int(p) for p in t[2:-2].split(",")]
    except ValueError:
        return None
    return v if len(v) == 4 else None


def correct(kind, answer, expected):
    if kind == "grounding":
        b = parse_box(answer)
        return b is not None and iou(b, expected) >= 0.5
    return answer.strip() == expected


@pytest.fixture(scope="module")
def tiny_server(logs_dir):
    if not (MODEL / "config.json").exists():
        pytest.fail("models/cogvlm-tiny-shapes is missing")
    args = {"--model": str(MODEL), "--tokenizer": str(MODEL / "tokenizer.model")}
    if os.environ.get("COGVLM_TINY_QUANTIZE"):  # measuring a quantized model (none|int8|int4)
        args["--quantize"] = os.environ["COGVLM_TINY_QUANTIZE"]
    s = Server(logs_dir, "tiny", args=args, served_name="cogvlm-tiny-shapes").start()
    yield s
    assert s.stop() == 0


def ask(server, png, question):
    body = {"model": "cogvlm-tiny-shapes", "temperature": 0, "max_tokens": 32,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {
                    "url": "data:image/png;base64," + base64.b64encode(png).decode()}}]}]}
    r = apiutil.http_request(server.port, "POST", "/v1/chat/completions", json.dumps(body),
                             {"Content-Type": "application/json"}, timeout=120)
    assert r.status == 200, r.body[:300]
    return r.json()["choices"][0]["message"]["content"]


def test_tiny_model_accuracy_per_question_kind(tiny_server):
    rng = random.Random(SEED)  # this test's own stream, not the trainer's
    jobs = []
    for _ in range(SCENES):
        shapes = scene(rng)
        png = render(rng, shapes)
        jobs += [(kind, q, exp, png, len(shapes)) for kind, q, exp in questions(shapes)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda j: ask(tiny_server, j[3], j[1]), jobs))
    score = {k: [0, 0] for k in MINIMUM}
    by_n = {}
    misses = []
    for (kind, q, exp, _, n), ans in zip(jobs, answers):
        ok = correct(kind, ans, exp)
        score[kind][0] += ok
        score[kind][1] += 1
        key = f"{kind}_{n}shape"
        by_n.setdefault(key, [0, 0])
        by_n[key][0] += ok
        by_n[key][1] += 1
        if not ok and len(misses) < 12:
            misses.append(f"{kind}: {q!r} -> {ans!r} (want {exp!r})")
    report = {k: round(v[0] / v[1], 3) for k, v in score.items()}
    print("accuracy per kind:", report, {k: v[1] for k, v in score.items()})
    print("by number of shapes:", {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_n.items())})
    if os.environ.get("COGVLM_TINY_REPORT"):
        with open(os.environ["COGVLM_TINY_REPORT"], "w") as f:
            json.dump({"scenes": SCENES, "seed": SEED, "score": score, "by_shapes": by_n}, f,
                      indent=1)
    short = {k: a for k, a in report.items() if a < TARGET[k]}
    if short:
        print("below the spec's target:", short)
    g2 = by_n.get("grounding_2shape", [0, 0])
    if g2[1]:
        report["grounding_2shape"] = round(g2[0] / g2[1], 3)
    asked = {k: v[1] for k, v in score.items()}
    asked["grounding_2shape"] = g2[1]
    bar = {k: max(MINIMUM.get(k, 0.0), threshold(k, asked[k])) for k in MEASURED if asked[k]}
    low = {k: a for k, a in report.items() if k in bar and a < bar[k]}
    assert not low, f"below the thresholds {bar}: {report}\nexamples:\n" + "\n".join(misses)


def threshold(kind, n_test):
    """The measured accuracy of `kind` minus 3 sigma of the difference of two binomial
    proportions (module docstring), rounded down to 0.01."""
    right, n_meas = MEASURED[kind]
    p = min(right / n_meas, 1 - 3 / n_meas)
    margin = 3 * math.sqrt(p * (1 - p) * (1 / n_meas + 1 / n_test))
    return math.floor((p - margin) * 100) / 100


def test_thresholds_follow_the_measurement():
    """The bars the accuracy test applies at its default size, against hand-computed values,
    and a regression to the previous checkpoint's grounding (84 %) is below them."""
    assert threshold("grounding", 225) == 0.86
    assert threshold("grounding_2shape", 110) == 0.79
    assert threshold("count", 150) == 0.98
    assert threshold("colour", 225) == 0.98
    assert 0.843 < threshold("grounding", 225)
