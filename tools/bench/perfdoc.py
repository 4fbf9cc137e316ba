"""perfdoc.py - docs/PERFORMANCE.md as named sections, so that several generators can each
rewrite their own part of it without destroying the others'.

The document is a preamble (the title and what precedes the first "## " heading) and a
list of "## Title" sections. bench_all.py owns the preamble and the engine sections,
bench_serving.py the serving sections, bench_all.py --gpu-report the GPU section.
update() replaces the sections it is given, keeps every other one, and orders the
known titles as ORDER lists them (unknown ones follow, in their previous order).
"""
import os

# The order of the sections in the document (titles without the "## ").
ORDER = [
    "Machine",
    "Method",
    "Results",
    "Batched serving throughput (scheduler)",
    "CogVLM-17B shapes, quantized, through the daemon (this machine)",
    "CogVLM2-19B shapes, int4, cogvlm bench-vlm (this machine)",
    "Quantized weights: accuracy",
    "Quantized decode against BF16, short context",
    "Quantized prefill: the int4 integer GEMM",
    "AVX-512 VNNI: quantized decode and int8 prefill",
    "Weights in huge pages",
    "Tokenizer throughput",
    "Structured outputs: cost per decode step",
    "Serving benchmark (HTTP, tiny model)",
    "Serving: cogvlm-server vs llama.cpp server",
    "GPU",
    "How the CPU backend gets there",
    "Before / after",
    "The load generator (tools/bench_serve.py)",
]


def parse(text):
    """(preamble, [(title, body)]); a body keeps its text up to the next "## " line."""
    preamble, sections, cur = [], [], None
    for line in text.splitlines():
        if line.startswith("## "):
            cur = (line[3:].strip(), [])
            sections.append(cur)
        elif cur is None:
            preamble.append(line)
        else:
            cur[1].append(line)
    return "\n".join(preamble).strip("\n"), [(t, "\n".join(b).strip("\n")) for t, b in sections]


def render(preamble, sections):
    parts = [preamble.strip("\n")] if preamble else []
    for title, body in sections:
        parts.append("## %s\n\n%s" % (title, body.strip("\n")) if body.strip() else "## " + title)
    return "\n\n".join(parts) + "\n"


def update(path, sections, preamble=None):
    """Rewrites `path` with `sections` (title -> markdown body) replaced or added and the
    preamble replaced when given; all other sections are kept as they were."""
    old_pre, old = ("", [])
    if os.path.exists(path):
        with open(path) as f:
            old_pre, old = parse(f.read())
    merged = dict(old)
    merged.update(sections)
    known = [t for t in ORDER if t in merged]
    rest = [t for t, _ in old if t not in ORDER and t in merged]
    rest += [t for t in sections if t not in ORDER and t not in rest]
    out = render(preamble if preamble is not None else old_pre,
                 [(t, merged[t]) for t in known + rest])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(out)
    os.replace(tmp, path)
