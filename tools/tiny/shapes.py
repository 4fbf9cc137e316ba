"""shapes.py - the synthetic task of the embedded model `cogvlm-tiny-shapes`.

Follows the task contract of shared/spec/tiny-model.md exactly:
  * 224x224 RGB canvas, uniform background, each channel uniform in [200, 255];
  * 1 or 2 shapes; with 2 they differ in kind AND colour and their boxes do not overlap;
  * box side s uniform in [40, 100], box fully inside the canvas, integer top-left;
  * circle = ellipse inscribed in the box, square = the box filled, triangle =
    (x0 + s/2, y0), (x0, y0 + s), (x0 + s, y0 + s); filled, no outline, no anti-aliasing;
  * the five question kinds with their exact answers (see `questions`).

Box (x0, y0)-(x0+s, y0+s) is the closed box; PIL draws the square/ellipse over pixels
x0 .. x0+s-1 (inclusive), the triangle through its exact vertices.

Everything is driven by a numpy Generator, so a stream of scenes is reproducible from a seed.
"""
import math

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 224
KINDS = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}
COLOUR_NAMES = tuple(COLOURS)
QKINDS = ("colour", "shape", "count", "grounding", "description")
SMIN, SMAX = 40, 100


class Shape:
    __slots__ = ("kind", "colour", "x0", "y0", "s")

    def __init__(self, kind, colour, x0, y0, s):
        self.kind, self.colour, self.x0, self.y0, self.s = kind, colour, int(x0), int(y0), int(s)

    @property
    def box(self):
        return (self.x0, self.y0, self.x0 + self.s, self.y0 + self.s)

    @property
    def centre(self):
        return (self.x0 + self.s / 2.0, self.y0 + self.s / 2.0)

    def __repr__(self):
        return "Shape(%s %s box=%s)" % (self.colour, self.kind, self.box)


class Scene:
    __slots__ = ("background", "shapes")

    def __init__(self, background, shapes):
        self.background = tuple(int(c) for c in background)
        self.shapes = list(shapes)


def boxes_overlap(a, b):
    """True if the closed boxes share any point (touching counts as overlap: we keep a gap)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return not (ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0)


def random_shape(rng, kind, colour):
    s = int(rng.integers(SMIN, SMAX + 1))
    x0 = int(rng.integers(0, CANVAS - s + 1))
    y0 = int(rng.integers(0, CANVAS - s + 1))
    return Shape(kind, colour, x0, y0, s)


def random_scene(rng, p_two=0.5):
    """Draws one scene: background, then 1 shape or (with probability p_two) 2."""
    background = rng.integers(200, 256, size=3)
    n = 2 if rng.random() < p_two else 1
    kinds = rng.permutation(len(KINDS))[:n]
    colours = rng.permutation(len(COLOUR_NAMES))[:n]
    first = random_shape(rng, KINDS[kinds[0]], COLOUR_NAMES[colours[0]])
    shapes = [first]
    if n == 2:
        while True:  # rejection sampling of a non-overlapping second box
            second = random_shape(rng, KINDS[kinds[1]], COLOUR_NAMES[colours[1]])
            if not boxes_overlap(first, second):
                break
        shapes.append(second)
    return Scene(background, shapes)


def draw_shape(draw, sh, fill):
    x0, y0, s = sh.x0, sh.y0, sh.s
    if sh.kind == "circle":
        draw.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=fill)
    elif sh.kind == "square":
        draw.rectangle([x0, y0, x0 + s - 1, y0 + s - 1], fill=fill)
    else:
        draw.polygon([(x0 + s / 2.0, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=fill)


def render(scene):
    """The 224x224 RGB PIL image of a scene (plain ImageDraw: no anti-aliasing)."""
    img = Image.new("RGB", (CANVAS, CANVAS), scene.background)
    d = ImageDraw.Draw(img)
    for sh in scene.shapes:
        draw_shape(d, sh, COLOURS[sh.colour])
    return img


def masks(scene):
    """[n_shapes, 224, 224] float32 masks of the shapes (1 inside)."""
    out = np.zeros((len(scene.shapes), CANVAS, CANVAS), np.float32)
    for i, sh in enumerate(scene.shapes):
        m = Image.new("L", (CANVAS, CANVAS), 0)
        draw_shape(ImageDraw.Draw(m), sh, 255)
        out[i] = np.asarray(m, np.float32) / 255.0
    return out


def grounding_value(v):
    return min(999, (1000 * int(v)) // CANVAS)


def box_text(sh):
    x0, y0, x1, y1 = sh.box
    return "[[%03d,%03d,%03d,%03d]]" % tuple(grounding_value(v) for v in (x0, y0, x1, y1))


def parse_box(text):
    """Parses the first [[a,b,c,d]] of an answer into canvas pixels, or None."""
    import re
    m = re.search(r"\[\[(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})", text)
    if not m:
        return None
    return tuple(int(g) * CANVAS / 1000.0 for g in m.groups())


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0


def article(colour, capital):
    a = "an" if colour == "orange" else "a"
    return a.capitalize() if capital else a


def description(scene):
    """`A red circle.` / `A red circle and a blue square.`; left shape first by box centre x
    (ties, which the contract leaves open, are broken by centre y: upper first)."""
    shapes = sorted(scene.shapes, key=lambda sh: (sh.centre[0], sh.centre[1]))
    parts = ["%s %s %s" % (article(sh.colour, i == 0), sh.colour, sh.kind)
             for i, sh in enumerate(shapes)]
    return " and ".join(parts) + "."


def questions(scene):
    """Every question of the task about this scene: a list of (qkind, question, answer, shape)
    where shape is the shape asked about (or None)."""
    out = []
    for sh in scene.shapes:
        out.append(("colour", "What color is the %s?" % sh.kind, sh.colour, sh))
    for sh in scene.shapes:
        out.append(("shape", "What shape is the %s object?" % sh.colour, sh.kind, sh))
    out.append(("count", "How many shapes are there?", "one" if len(scene.shapes) == 1 else "two",
                None))
    for sh in scene.shapes:
        out.append(("grounding", "Where is the %s %s?" % (sh.colour, sh.kind), box_text(sh), sh))
    out.append(("description", "Describe the image.", description(scene), None))
    return out


def is_correct(qkind, answer, reference, shape=None):
    """Exact match, except grounding: IoU >= 0.5 with the true box."""
    answer = answer.strip()
    if qkind == "grounding":
        b = parse_box(answer)
        return b is not None and iou(b, shape.box) >= 0.5
    return answer == reference


def chat_prompt(question):
    """The `chat` template of cogvlm-chat-hf for a single turn (spec §5.2)."""
    return "Question: " + question + " Answer:"


if __name__ == "__main__":  # a quick look: writes a few examples to /tmp
    rng = np.random.default_rng(0)
    for i in range(4):
        sc = random_scene(rng)
        render(sc).save("/tmp/shapes_%d.png" % i)
        for q in questions(sc):
            print(i, q[:3])
