#!/usr/bin/env python3
"""Hostile and odd images through the HTTP API (images written here with zlib + struct, plus
the decoder fixtures of tests/unit/images).

- decompression bombs: tiny files declaring huge dimensions (PNG 60000x60000, a complete
  valid 16384x16384 PNG of ~270 KB, GIF 65535x65535, JPEG 65500x65500, WebP 16384x16384,
  PNG 1x(2^31-1)): 413 image_too_large (or 400), answered within BOMB_BOUND s, from the
  header, without the memory the dimensions would take;
- a valid bomb just under the default --max-image-pixels (7000x7000 grayscale, ~50 KB):
  decoded within the limit; the peak memory it costs is reported and bounded, and RSS
  comes back afterwards;
- 1x1 images and extreme aspect ratios (1x2000, 2000x1, 1x20000, 20000x1): 200;
- truncated files (every decodable fixture cut at 50 %, plus cuts at 25 % and 1 byte short):
  a clear 400 (invalid_image) at 50 % and 25 %, 200 or 400 one byte short (a missing
  trailer may be tolerated, as PIL does);
- every fixture of tests/unit/images: "ok" ones 200, "err" ones 400/413;
after every request the server is alive and /health is 200.
"""
import time
from pathlib import Path

import robustlib as rl

BOMB_BOUND = 2.0          # seconds to refuse a bomb
FIXTURES = rl.REPO / "tests" / "unit" / "images"
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp",
        ".bmp": "image/bmp", ".txt": "image/png", ".bin": "image/png"}
CONC_SIDE = 2000          # concurrent decodes: 8 requests of 4 M pixels each
CONC_N = 8
POOL = 4                  # libuv work-pool threads (UV_THREADPOOL_SIZE default) decoding at once
BIG_SIDE = 7000           # 49 M pixels: just under the default --max-image-pixels (50 M)


def ask(srv, img, mime):
    t = time.monotonic()
    r = srv.post(rl.chat(srv.model_id, "What is this?", img, mime, max_tokens=2), timeout=120)
    return r, time.monotonic() - t


def test(chk):
    srv = rl.Server("images", {"--kv-memory": "16M", "--max-body-bytes": "8M",
                               "--vision-cache-memory": "4M"}).start()
    counts = {"requests": 0}
    failures = []

    def expect(name, img, mime, allowed, bound=None, code=None):
        r, dt = ask(srv, img, mime)
        counts["requests"] += 1
        ok, why = srv.healthy()
        if not ok:
            failures.append(f"{name}: server unhealthy after it: {why}")
            raise AssertionError(f"server down after {name}: {why}")
        if r.status not in allowed:
            failures.append(f"{name}: {r.status} not in {allowed}: {r.body[:160]!r}")
        elif r.status != 200:
            why = rl.check_error_body(r)
            if why:
                failures.append(f"{name}: {why}")
            elif code and r.json()["error"]["code"] not in code:
                failures.append(f"{name}: error code {r.json()['error']['code']!r}, expected {code}")
        if bound is not None and dt > bound:
            failures.append(f"{name}: took {dt:.2f} s > {bound} s")
        return r, dt

    # ---- bombs over the limit
    bombs = [
        ("PNG 60000x60000 (claimed)", rl.png_claiming(60000, 60000), "image/png"),
        ("PNG 1x(2^31-1) (claimed)", rl.png_claiming(1, 2**31 - 1), "image/png"),
        ("PNG 16384x16384 (valid)", rl.png_bomb(16384), "image/png"),
        ("GIF 65535x65535", rl.gif_claiming(65535, 65535), "image/gif"),
        ("JPEG 65500x65500", rl.jpeg_claiming(65500, 65500), "image/jpeg"),
        ("WebP 16384x16384", rl.webp_claiming(16384, 16384), "image/webp"),
    ]
    rss0 = srv.status()["VmRSS"]
    bomb_times = []
    for name, img, mime in bombs:
        r, dt = expect(name, img, mime, (413, 400), BOMB_BOUND, code=("image_too_large", "invalid_image"))
        bomb_times.append(dt)
    hwm_bombs = srv.status()["VmHWM"]
    asan = rl.sanitized_build()  # ASan: shadow memory and quarantine; memory reported only
    chk.ok(asan or hwm_bombs - rss0 < 64 * 1024, f"refusing the bombs cost {(hwm_bombs - rss0) // 1024} MiB")
    valid_bomb = len(rl.png_bomb(16384))

    # ---- a valid bomb under the limit: decoded, memory bounded and returned
    big = rl.png_bomb(BIG_SIDE)
    before = srv.status()
    r, t_big = expect(f"PNG {BIG_SIDE}x{BIG_SIDE} (valid, under the limit)", big, "image/png", (200,), 60)
    after = srv.status()
    time.sleep(0.2)
    settled = srv.status()["VmRSS"]
    pixels = BIG_SIDE * BIG_SIDE
    peak_delta = after["VmHWM"] - before["VmRSS"]  # KiB
    # decoded RGB (3 B/pixel) + one grayscale row buffer or image (1 B/pixel) + resize temporaries
    chk.ok(asan or peak_delta * 1024 <= 6 * pixels, f"decoding {BIG_SIDE}^2 pixels took {peak_delta // 1024} MiB "
                                            f"(> 6 B/pixel)")
    chk.ok(asan or settled - before["VmRSS"] < 32 * 1024,
           f"RSS did not come back after the big image: {before['VmRSS'] // 1024} -> {settled // 1024} MiB")

    # ---- tiny and extreme aspect ratios
    odd = [(1, 1), (1, 2000), (2000, 1), (1, 20000), (20000, 1), (2, 3), (27, 29)]
    for w, h in odd:
        expect(f"PNG {w}x{h}", rl.png(w, h, lambda x, y: ((x * 7) & 255, (y * 3) & 255, 99)), "image/png", (200,))

    # ---- truncated: our own PNG and the fixtures
    base_png = rl.png(40, 30, lambda x, y: (x * 6, y * 8, 128))
    trunc = 0
    for cut in (8, 20, 33, len(base_png) // 2, len(base_png) - 20):
        expect(f"PNG 40x30 cut to {cut} of {len(base_png)} bytes", base_png[:cut], "image/png", (400,),
               code=("invalid_image",))
        trunc += 1
    manifest = []
    if FIXTURES.is_dir():
        for ln in (FIXTURES / "manifest.txt").read_text().splitlines():
            if ln and not ln.startswith("#"):
                manifest.append(ln.split())
    n_fix = 0
    for parts in manifest:
        kind, name = parts[0], parts[1]
        data = (FIXTURES / name).read_bytes()
        mime = MIME.get(Path(name).suffix, "image/png")
        n_fix += 1
        if kind == "ok":
            expect(f"fixture {name}", data, mime, (200,))
            if len(data) >= 40:
                for frac in (0.25, 0.5):
                    cut = int(len(data) * frac)
                    expect(f"fixture {name} cut to {cut}/{len(data)}", data[:cut], mime, (400,),
                           code=("invalid_image",))
                    trunc += 1
                expect(f"fixture {name} one byte short", data[:-1], mime, (200, 400))
                trunc += 1
        else:
            expect(f"fixture {name} ({parts[2]})", data, mime, (400, 413))

    # ---- not an image / not allowed
    expect("random bytes as image/png", bytes(range(256)) * 64, "image/png", (400,))
    expect("remote URL", "http://127.0.0.1:9/x.png", None, (400,))
    expect("https URL", "https://127.0.0.1:9/x.png", None, (400,))
    expect("file URL", "file:///etc/passwd", None, (400,))
    expect("data URL, text/html", "data:text/html;base64,PGh0bWw+", None, (400,))

    for f in failures:
        chk.ok(False, f)
    failures.clear()
    m = srv.wait_idle(10)
    chk.ok(rl.metric(m, "cogvlm_kv_blocks_used") == 0, "KV blocks held after the image tests")
    ok, why = srv.healthy()
    chk.ok(ok, why)
    rc = srv.stop()
    chk.ok(rc == 0, f"exit status after SIGTERM: {rc}")
    chk.note(("ASan build, memory not checked; " if asan else "") + f"{counts['requests']} image requests, {len(failures)} wrong answers, server healthy after each")
    chk.note(f"{len(bombs)} bombs refused in max {max(bomb_times) * 1000:.0f} ms <= {BOMB_BOUND:.0f} s "
             f"(valid 16384^2 PNG: {valid_bomb // 1024} KiB), RSS +{(hwm_bombs - rss0) // 1024} MiB")
    chk.note(f"valid {BIG_SIDE}^2 PNG ({len(big) // 1024} KiB, {pixels / 1e6:.0f} M pixels) decoded in "
             f"{t_big:.2f} s, peak +{peak_delta // 1024} MiB (<= 6 B/pixel = {6 * pixels // rl.MiB} MiB), "
             f"RSS {before['VmRSS'] // 1024} -> {settled // 1024} MiB after")
    chk.note(f"{len(odd)} tiny/extreme-aspect PNGs 200; {trunc} truncated files; {n_fix} fixtures")

    # ---- concurrent decodes: memory bounded by the work pool x the pixel limit
    limit = CONC_SIDE * CONC_SIDE
    srv2 = rl.Server("images-concurrent", {"--kv-memory": "16M", "--max-image-pixels": limit,
                                           "--vision-cache-memory": "4M"}).start()
    imgs = [rl.png_bomb(CONC_SIDE, value=10 * i) for i in range(CONC_N)]
    base = srv2.status()["VmRSS"]
    t = time.monotonic()
    res = rl.in_threads([lambda im=im: ask(srv2, im, "image/png") for im in imgs], 120)
    wall = time.monotonic() - t
    bad = [f"{v[0]!r}" if v else repr(e) for v, e in res if e or v[0].status != 200]
    chk.ok(not bad, f"concurrent {CONC_SIDE}^2 images: {bad[:3]}")
    peak = srv2.status()["VmHWM"] - base
    bound = POOL * 6 * limit // 1024 + 16 * 1024  # KiB: 4 decodes at 6 B/pixel + 16 MiB
    chk.ok(asan or peak <= bound, f"{CONC_N} concurrent {CONC_SIDE}^2 decodes: peak +{peak // 1024} MiB > "
                          f"{bound // 1024} MiB")
    ok, why = srv2.healthy()
    chk.ok(ok, why)
    rc = srv2.stop()
    chk.ok(rc == 0, f"exit status after SIGTERM: {rc}")
    chk.note(f"{CONC_N} concurrent valid {CONC_SIDE}^2 PNGs (--max-image-pixels {limit}) in {wall:.2f} s: "
             f"peak +{peak // 1024} MiB <= {bound // 1024} MiB ({POOL} work-pool threads x 6 B/pixel + 16 MiB)")


if __name__ == "__main__":
    rl.main("images", test)
