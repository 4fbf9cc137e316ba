#!/usr/bin/env python3
"""check_layout.py - the layering rules of docs/ARCHITECTURE.md, checked on every #include.

Each C/CUDA source file may include project headers only from the places its layer may
depend on (the table RULES below, first matching prefix wins); some system headers are
forbidden per layer (the HTTP stack in the engine, CUDA in the daemon). Prints every
violation as `file:line: ...` and exits 1 if there is any.

  python3 tools/check_layout.py            # the repository
  python3 tools/check_layout.py --self-test  # shows that each rule catches a violation

Run by `make test` (target check-layout).
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# layer (path prefix) -> project headers it may include (prefixes). First match wins, so
# the engine's sub-systems come before the engine as a whole.
RULES = [
    # the base library (byte buffer, clock) sits under every layer and uses none
    ("base/", ["base/"]),
    ("engine/util/", ["engine/error.h", "engine/util/", "base/"]),
    ("engine/image/", ["engine/error.h", "engine/util/", "engine/image/", "base/"]),
    # the templates need the model config (image token count, template version)
    ("engine/text/", ["engine/error.h", "engine/util/", "engine/text/", "engine/model/weights.h",
                      "base/"]),
    # structured outputs: grammars, and token masks over the tokenizer's vocabulary
    ("engine/grammar/", ["engine/error.h", "engine/util/", "engine/grammar/",
                         "engine/text/tokenizer.h", "base/"]),
    ("engine/model/", ["engine/error.h", "engine/util/", "engine/model/", "engine/backend.h",
                       "engine/comm.h", "base/"]),
    ("engine/sched/", ["engine/", "base/"]),
    ("engine/", ["engine/", "base/"]),
    # kernels implement the op table and the collectives; nothing else of the engine
    ("kernels/", ["kernels/", "engine/backend.h", "engine/error.h", "engine/comm.h", "base/"]),
    # the daemon sees the engine through its one public header
    ("server/", ["server/", "engine/engine.h", "base/"]),
    # the developer CLI may use engine internals; nobody includes it
    ("cli/", ["cli/", "engine/", "base/"]),
    ("tests/", ["tests/", "engine/", "kernels/", "server/", "base/"]),
    ("tools/", ["tools/", "engine/", "kernels/", "base/"]),
]

# layer -> system headers it must not include (regular expressions on the name)
FORBIDDEN_SYSTEM = [
    ("engine/", r"^(microhttpd\.h|uv\.h|uv/.*|b64/.*)$"),
    ("kernels/", r"^(microhttpd\.h|uv\.h|jansson\.h)$"),
    ("server/", r"^(cuda.*|cublas.*|nccl\.h|curand.*)$"),
]

INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^">]+)[">]')
SOURCES = (".c", ".h", ".cu", ".cuh")


def layer_rule(path):
    for prefix, allowed in RULES:
        if path.startswith(prefix):
            return prefix, allowed
    return None, None


def check_file(rel, text):
    """Violations of one file (rel: its path from the repository root)."""
    out = []
    prefix, allowed = layer_rule(rel)
    for n, line in enumerate(text.splitlines(), 1):
        m = INCLUDE.match(line)
        if not m:
            continue
        kind, name = m.groups()
        if kind == '"':
            if name.startswith("cli/") and not rel.startswith("cli/"):
                out.append(f"{rel}:{n}: includes {name}: nothing outside cli/ includes cli/")
            elif prefix is not None and not any(name == a or (a.endswith("/") and
                                                              name.startswith(a))
                                                for a in allowed):
                out.append(f"{rel}:{n}: includes {name}: {prefix} may include only "
                           + ", ".join(allowed))
        else:
            for lp, rx in FORBIDDEN_SYSTEM:
                if rel.startswith(lp) and re.match(rx, name):
                    out.append(f"{rel}:{n}: includes <{name}>: not in {lp}")
    return out


def tracked_sources(root):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split()
    return [f for f in files if f.endswith(SOURCES) and (root / f).is_file()]


def check_tree(root):
    out = []
    for rel in tracked_sources(root):
        out += check_file(rel, (root / rel).read_text(errors="replace"))
    return out


def self_test():
    """Each rule must reject a file that breaks it and accept one that keeps it."""
    bad = {
        "server/x.c": '#include "engine/model/model.h"\n',
        "server/y.c": "#include <cuda_runtime.h>\n",
        "kernels/cpu/x.c": '#include "engine/model/weights.h"\n',
        "engine/image/x.c": '#include "engine/sched/request.h"\n',
        "engine/model/x.c": '#include "engine/sched/kvcache.h"\n',
        "engine/x.c": "#include <microhttpd.h>\n",
        "engine/sched/x.c": '#include "server/server.h"\n',
        "tests/unit/x.c": '#include "cli/cli.h"\n',
        "base/x.c": '#include "engine/error.h"\n',
    }
    good = {
        "server/x.c": '#include "engine/engine.h"\n#include "server/server.h"\n#include <uv.h>\n',
        "kernels/cpu/x.c": '#include "engine/backend.h"\n#include "kernels/cpu/cpu.h"\n',
        "engine/sched/x.c": '#include "engine/model/model.h"\n',
        "cli/x.c": '#include "cli/cli.h"\n#include "engine/model/model.h"\n',
    }
    failed = 0
    for rel, text in bad.items():
        if not check_file(rel, text):
            print(f"self-test: {rel} with {text.strip()!r} was not caught")
            failed += 1
    for rel, text in good.items():
        v = check_file(rel, text)
        if v:
            print(f"self-test: {rel} wrongly refused: {v}")
            failed += 1
    # and the whole-tree walk finds a planted violation
    with tempfile.TemporaryDirectory() as d:
        t = Path(d)
        subprocess.run(["git", "init", "-q"], cwd=t, check=True)
        (t / "server").mkdir()
        (t / "server" / "z.c").write_text('#include "engine/text/tokenizer.h"\n')
        if not check_tree(t):
            print("self-test: a planted violation in a tree was not found")
            failed += 1
    print(f"check_layout self-test: {len(bad) + len(good) + 1 - failed} passed, {failed} failed")
    return failed == 0


def main():
    if "--self-test" in sys.argv:
        return 0 if self_test() else 1
    v = check_tree(ROOT)
    for line in v:
        print(line)
    print(f"check_layout: {len(tracked_sources(ROOT))} files, {len(v)} violations")
    return 1 if v else 0


if __name__ == "__main__":
    sys.exit(main())
