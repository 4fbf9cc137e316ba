#!/usr/bin/python3
"""make_fixtures.py - generates tests/unit/images/: small images in every format and variant
that engine/image/*.c decodes, plus PIL's output for each (the reference the C tests compare to).

Run with Debian's Python, which has python3-pil 9.4 (the default python3 on PATH has no PIL):

    /usr/bin/python3 tools/images/make_fixtures.py [OUTDIR]

Everything is deterministic (fixed seeds; PIL's encoders are deterministic), so re-running
rewrites identical files. Files written to OUTDIR (default tests/unit/images):

    <name>.<ext>           the image (PNG/GIF files come from the tiny writers below, so that
                           every bit depth, palette size, filter and interlace case is covered;
                           JPEG/WebP come from PIL, or from a small libjpeg program for the JPEG
                           colour spaces PIL cannot write)
    <name>.rgb             Image.open(f).convert("RGB").tobytes()
    <name>.<W>x<H>.rgb     the same resized: .resize((W, H), Image.BICUBIC).tobytes()
    manifest.txt           one line per file:  ok <file> <w> <h> <tol> [<W>x<H> ...]
                                           or  err <file> <CODE>   (the decoder must fail so)

<tol> is the largest per-byte difference the C decoder may have from PIL (0 = bit exact).
The behaviours of PIL this relies on (palette lookups past the palette's end, 16-bit clamping,
GIF canvas fill, ...) are asserted below, so a different PIL fails here instead of silently
producing other references.
"""

import io
import os
import random
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../tests/unit/images")
MANIFEST = []


# --------------------------------------------------------------------------------------------
# Pixel content: a gradient with noise and hard edges, so that resizing overshoots and clips.

def content(w, h, seed, channels=3, noise=20):
    rnd = random.Random(seed)
    rows = []
    for y in range(h):
        row = []
        for x in range(w):
            for c in range(channels):
                v = (x * 255 // max(1, w - 1) + y * 97 // max(1, h - 1) + c * 60) % 256
                if (x // 3 + y // 4 + c) % 5 == 0:
                    v = 255 if (x + c) % 2 else 0  # hard edges
                v = (v + rnd.randint(-noise, noise)) % 256
                row.append(v)
        rows.append(row)
    return rows


def pil_from_rows(rows, w, h, mode):
    flat = bytes(v for row in rows for v in row)
    return Image.frombytes(mode, (w, h), flat)


# --------------------------------------------------------------------------------------------
# PNG writer: any colour type / bit depth, all five filters, Adam7, PLTE, tRNS.

def png_chunk(ctype, data):
    crc = zlib.crc32(ctype + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", crc)


def _pack(samples, depth):
    if depth == 16:
        return b"".join(struct.pack(">H", v) for v in samples)
    if depth == 8:
        return bytes(samples)
    out, acc, n = bytearray(), 0, 0
    for v in samples:
        acc, n = (acc << depth) | v, n + depth
        if n == 8:
            out.append(acc)
            acc, n = 0, 0
    if n:
        out.append(acc << (8 - n))
    return bytes(out)


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _filter(ft, line, prev, bpp):
    out = bytearray(len(line))
    for i, v in enumerate(line):
        a = line[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        pred = [0, a, b, (a + b) // 2, _paeth(a, b, c)][ft]
        out[i] = (v - pred) & 0xFF
    return bytes([ft]) + bytes(out)


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2)]


def png_file(w, h, ctype, depth, rows, plte=None, trns=None, interlace=False, extra=b""):
    """rows: h lists of w*channels samples. Returns the PNG bytes."""
    ch = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    bpp = max(1, ch * depth // 8)
    raw = bytearray()
    for (x0, y0, dx, dy) in (ADAM7 if interlace else [(0, 0, 1, 1)]):
        xs, ys = range(x0, w, dx), range(y0, h, dy)
        if not xs or not ys:
            continue
        prev = None
        for n, y in enumerate(ys):
            line = _pack([s for x in xs for s in rows[y][x * ch:(x + 1) * ch]], depth)
            if prev is None:
                prev = bytes(len(line))
            raw += _filter((n + x0 + y0) % 5, line, prev, bpp)
            prev = line
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 1 if interlace else 0)
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra
    if plte is not None:
        out += png_chunk(b"PLTE", bytes(v for rgb in plte for v in rgb))
    if trns is not None:
        out += png_chunk(b"tRNS", trns)
    out += png_chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + png_chunk(b"IEND", b"")
    return out


# --------------------------------------------------------------------------------------------
# GIF writer: real LZW (dictionary codes, code-size growth, clear on a full table).

def lzw_encode(indices, min_size):
    clear, eoi = 1 << min_size, (1 << min_size) + 1
    codes = []  # (code, bit width)
    size, nxt, table = min_size + 1, eoi + 1, {}
    codes.append((clear, size))
    prefix = None
    for k in indices:
        if prefix is None:
            prefix = k
            continue
        if (prefix, k) in table:
            prefix = table[(prefix, k)]
            continue
        codes.append((prefix, size))
        if nxt < 4095:
            table[(prefix, k)] = nxt
            nxt += 1
            if nxt > (1 << size) and size < 12:
                size += 1
        else:
            codes.append((clear, size))
            size, nxt, table = min_size + 1, eoi + 1, {}
        prefix = k
    if prefix is not None:
        codes.append((prefix, size))
    codes.append((eoi, size))
    out, acc, n = bytearray(), 0, 0
    for code, width in codes:
        acc |= code << n
        n += width
        while n >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            n -= 8
    if n:
        out.append(acc)
    return bytes(out)


def gif_subblocks(data):
    out = bytearray()
    for i in range(0, len(data), 255):
        out += bytes([len(data[i:i + 255])]) + data[i:i + 255]
    return bytes(out) + b"\x00"


def _gif_pal(pal):
    bits = 1
    while (1 << bits) < len(pal):
        bits += 1
    pal = list(pal) + [(0, 0, 0)] * ((1 << bits) - len(pal))
    return bits, bytes(v for rgb in pal for v in rgb)


def _gif_order(f):
    w, h, idx = f["w"], f["h"], f["idx"]
    order = list(range(h))
    if f.get("interlace"):
        order = [y for (s, d) in ((0, 8), (4, 8), (2, 4), (1, 2)) for y in range(s, h, d)]
    return [idx[y * w + x] for y in order for x in range(w)]


def gif_file(sw, sh, gpal, frames, bg=0):
    """frames: dicts with x, y, w, h, idx (w*h indices) and optional lpal, trns, interlace,
    code_size, lzw (raw LZW bytes replacing the encoding of idx)."""
    out = bytearray(b"GIF89a" + struct.pack("<HH", sw, sh))
    if gpal:
        bits, p = _gif_pal(gpal)
        out += bytes([0x80 | (7 << 4) | (bits - 1), bg, 0]) + p
    else:
        out += bytes([0, 0, 0])
    for f in frames:
        if f.get("trns") is not None:
            out += b"\x21\xf9\x04" + bytes([1]) + b"\x00\x00" + bytes([f["trns"]]) + b"\x00"
        flags = 0x40 if f.get("interlace") else 0
        lp = b""
        if f.get("lpal"):
            bits, lp = _gif_pal(f["lpal"])
            flags |= 0x80 | (bits - 1)
        out += b"\x2c" + struct.pack("<HHHH", f["x"], f["y"], f["w"], f["h"]) + bytes([flags])
        out += lp
        cs = f.get("code_size", 8)
        data = f["lzw"] if "lzw" in f else lzw_encode(_gif_order(f), cs)
        out += bytes([cs]) + gif_subblocks(data)
    return bytes(out + b"\x3b")


# --------------------------------------------------------------------------------------------
# WebP container helpers (to build an animation whose first frame sits at an offset).

def riff_chunks(data):
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    pos, out = 12, []
    while pos + 8 <= len(data):
        cid, n = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        out.append((cid, data[pos + 8:pos + 8 + n]))
        pos += 8 + n + (n & 1)
    return out


def riff_chunk(cid, payload):
    return cid + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) & 1 else b"")


def u24(v):
    return struct.pack("<I", v)[:3]


def webp_anim_offset(cw, ch, fx, fy, frame_webp, fw, fh):
    frame_data = b"".join(riff_chunk(c, d) for c, d in riff_chunks(frame_webp) if c != b"VP8X")
    vp8x = bytes([0x10 | 0x02, 0, 0, 0]) + u24(cw - 1) + u24(ch - 1)
    anim = struct.pack("<IH", 0xFF2040C0, 0)
    anmf = u24(fx // 2) + u24(fy // 2) + u24(fw - 1) + u24(fh - 1) + u24(100) + b"\x00"
    body = b"WEBP" + riff_chunk(b"VP8X", vp8x) + riff_chunk(b"ANIM", anim)
    body += riff_chunk(b"ANMF", anmf + frame_data)
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --------------------------------------------------------------------------------------------
# JPEG colour spaces PIL cannot write (YCCK, CMYK without an Adobe marker, RGB, arithmetic
# coding, restart markers): a tiny libjpeg program, compiled on the fly.

JPEG_HELPER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>
int main(int argc, char **argv) {
    int w = atoi(argv[2]), h = atoi(argv[3]), nc;
    const char *mode = argv[4];
    struct jpeg_compress_struct c; struct jpeg_error_mgr e;
    FILE *f = fopen(argv[1], "wb");
    c.err = jpeg_std_error(&e); jpeg_create_compress(&c); jpeg_stdio_dest(&c, f);
    c.image_width = w; c.image_height = h;
    nc = (!strcmp(mode, "ycck") || !strcmp(mode, "cmyk_noadobe")) ? 4 : 3;
    c.input_components = nc; c.in_color_space = nc == 4 ? JCS_CMYK : JCS_RGB;
    jpeg_set_defaults(&c); jpeg_set_quality(&c, 85, TRUE);
    if (!strcmp(mode, "ycck")) jpeg_set_colorspace(&c, JCS_YCCK);
    if (!strcmp(mode, "cmyk_noadobe")) { jpeg_set_colorspace(&c, JCS_CMYK);
                                         c.write_Adobe_marker = FALSE; }
    if (!strcmp(mode, "rgb")) jpeg_set_colorspace(&c, JCS_RGB);
    if (!strcmp(mode, "arith")) c.arith_code = TRUE;
    if (!strcmp(mode, "restart")) c.restart_in_rows = 1;
    jpeg_start_compress(&c, TRUE);
    unsigned char *row = malloc((size_t)w * nc);
    while (c.next_scanline < c.image_height) {
        if (fread(row, 1, (size_t)w * nc, stdin) != (size_t)w * nc) return 1;
        JSAMPROW r = row; jpeg_write_scanlines(&c, &r, 1);
    }
    jpeg_finish_compress(&c); fclose(f); return 0;
}
"""


def jpeg_helper():
    d = tempfile.mkdtemp()
    src, exe = os.path.join(d, "w.c"), os.path.join(d, "w")
    with open(src, "w") as f:
        f.write(JPEG_HELPER)
    subprocess.check_call(["gcc", "-O1", src, "-o", exe, "-ljpeg"])
    return exe


def helper_jpeg(exe, w, h, mode, raw):
    with tempfile.NamedTemporaryFile(suffix=".jpg") as t:
        subprocess.run([exe, t.name, str(w), str(h), mode], input=raw, check=True)
        return open(t.name, "rb").read()


# --------------------------------------------------------------------------------------------
# Emitting fixtures and PIL references.

def write(name, data):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def ok(name, data, tol=0, sizes=(), expect=None):
    """Writes image `name`, its PIL RGB conversion and resized versions, and a manifest line.
    `expect` (bytes) is asserted equal to PIL's RGB output: the intended pixels."""
    write(name, data)
    im = Image.open(io.BytesIO(data))
    rgb = im.convert("RGB")
    if expect is not None:
        assert rgb.tobytes() == expect, name
    stem = name.rsplit(".", 1)[0]
    write(stem + ".rgb", rgb.tobytes())
    for (w, h) in sizes:
        write("%s.%dx%d.rgb" % (stem, w, h), rgb.resize((w, h), Image.BICUBIC).tobytes())
    line = "ok %s %d %d %d" % (name, rgb.size[0], rgb.size[1], tol)
    MANIFEST.append(line + "".join(" %dx%d" % s for s in sizes))
    return rgb


def err(name, data, code):
    write(name, data)
    MANIFEST.append("err %s %s" % (name, code))


def rgb_bytes(rows):
    return bytes(v for row in rows for v in row)


def gray_to_rgb(vals):
    return bytes(v for g in vals for v in (g, g, g))


def make_png():
    w, h = 13, 7
    rnd = random.Random(7)
    # Grayscale 1/2/4/8 bit: PIL scales 1 -> 255, 2-bit by 85, 4-bit by 17.
    for depth in (1, 2, 4, 8):
        vals = [rnd.randrange(1 << depth) for _ in range(w * h)]
        rows = [vals[y * w:(y + 1) * w] for y in range(h)]
        scale = 255 // ((1 << depth) - 1)
        ok("png_gray%d.png" % depth, png_file(w, h, 0, depth, rows),
           expect=gray_to_rgb(v * scale for v in vals))
    # 16-bit gray opens as mode I and convert("RGB") CLAMPS to 255 (it does not scale).
    vals = [0, 1, 100, 255, 256, 300, 1000, 65535] + [rnd.randrange(65536) for _ in range(w * h)]
    vals = vals[:w * h]
    rows = [vals[y * w:(y + 1) * w] for y in range(h)]
    ok("png_gray16.png", png_file(w, h, 0, 16, rows), sizes=[(5, 4)],
       expect=gray_to_rgb(min(v, 255) for v in vals))
    ok("png_gray16_adam7.png", png_file(w, h, 0, 16, rows, interlace=True),
       expect=gray_to_rgb(min(v, 255) for v in vals))
    # Gray + alpha: alpha dropped; 16-bit takes the high byte.
    ga = content(w, h, 11, 2)
    ok("png_ga8.png", png_file(w, h, 4, 8, ga),
       expect=gray_to_rgb(v for row in ga for v in row[0::2]))
    ga16 = [[v * 256 + (x % 7) * 30 for x, v in enumerate(row)] for row in ga]
    ok("png_ga16.png", png_file(w, h, 4, 16, ga16),
       expect=gray_to_rgb(v >> 8 for row in ga16 for v in row[0::2]))
    # Truecolour 8/16 bit, with and without alpha, plain and interlaced.
    rgb = content(w, h, 12, 3)
    ok("png_rgb8.png", png_file(w, h, 2, 8, rgb), expect=rgb_bytes(rgb), sizes=[(6, 3)])
    rgb16 = [[v * 256 + (255 - v) for v in row] for row in rgb]
    ok("png_rgb16.png", png_file(w, h, 2, 16, rgb16), expect=rgb_bytes(rgb))
    ok("png_rgb16_adam7.png", png_file(w, h, 2, 16, rgb16, interlace=True),
       expect=rgb_bytes(rgb))
    rgba = content(w, h, 13, 4)
    drop = bytes(v for row in rgba for i, v in enumerate(row) if i % 4 != 3)
    ok("png_rgba8.png", png_file(w, h, 6, 8, rgba), expect=drop)
    ok("png_rgba8_adam7.png", png_file(w, h, 6, 8, rgba, interlace=True), expect=drop)
    rgba16 = [[v * 257 for v in row] for row in rgba]
    ok("png_rgba16.png", png_file(w, h, 6, 16, rgba16), expect=drop)
    # tRNS on gray / RGB: no effect on convert("RGB").
    ok("png_rgb8_trns.png", png_file(w, h, 2, 8, rgb, trns=struct.pack(">HHH", *rgb[0][:3])),
       expect=rgb_bytes(rgb))
    g8 = [row[0::3] for row in rgb]
    ok("png_gray8_trns.png", png_file(w, h, 0, 8, g8, trns=struct.pack(">H", g8[0][0])),
       expect=gray_to_rgb(v for row in g8 for v in row))
    g2 = [[v >> 6 for v in row] for row in g8]
    ok("png_gray2_trns.png", png_file(w, h, 0, 2, g2, trns=struct.pack(">H", 1)),
       expect=gray_to_rgb(v * 85 for row in g2 for v in row))
    ok("png_gray16_trns.png", png_file(w, h, 0, 16, rows, trns=struct.pack(">H", 300)),
       expect=gray_to_rgb(min(v, 255) for v in vals))
    # Pixel data split over many IDAT chunks, one of them empty.
    data = png_file(w, h, 2, 8, rgb)
    i = data.index(b"IDAT") - 4
    n = struct.unpack(">I", data[i:i + 4])[0]
    z = data[i + 8:i + 8 + n]
    parts = [z[:5], b"", z[5:9], z[9:40], z[40:]]
    split = data[:i] + b"".join(png_chunk(b"IDAT", p) for p in parts) + data[i + 12 + n:]
    ok("png_multi_idat.png", split, expect=rgb_bytes(rgb))
    make_png_palette(w, h, rnd)
    make_png_misc(rnd)


def make_png_palette(w, h, rnd):
    # Palettes of every bit depth; full palettes.
    for depth in (1, 2, 4, 8):
        n = 1 << depth
        pal = [(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)) for _ in range(n)]
        vals = [rnd.randrange(n) for _ in range(w * h)]
        rows = [vals[y * w:(y + 1) * w] for y in range(h)]
        exp = bytes(c for v in vals for c in pal[v])
        ok("png_pal%d.png" % depth, png_file(w, h, 3, depth, rows, plte=pal), expect=exp)
        if depth == 2:
            ok("png_pal2_adam7.png", png_file(w, h, 3, depth, rows, plte=pal, interlace=True),
               expect=exp)
        if depth == 8:
            alphas = bytes(rnd.randrange(256) for _ in range(n))
            ok("png_pal8_trns.png", png_file(w, h, 3, 8, rows, plte=pal, trns=alphas),
               expect=exp, sizes=[(4, 9)])
    # A short palette (5 entries) with indices past its end: PIL looks those up in its
    # default palette, the gray ramp (i, i, i).
    pal = [(200, 10, 30), (0, 255, 0), (1, 2, 3), (90, 80, 70), (255, 255, 255)]
    vals = [rnd.choice([0, 1, 2, 3, 4, 5, 9, 100, 255]) for _ in range(w * h)]
    rows = [vals[y * w:(y + 1) * w] for y in range(h)]
    exp = bytes(c for v in vals for c in (pal[v] if v < len(pal) else (v, v, v)))
    ok("png_pal8_short.png", png_file(w, h, 3, 8, rows, plte=pal), expect=exp)


def make_png_misc(rnd):
    # Tiny images, and every Adam7 pass being empty for some of them.
    for (w, h) in ((1, 1), (2, 1), (1, 3), (3, 2)):
        rows = content(w, h, w * 10 + h, 3)
        ok("png_rgb8_%dx%d_adam7.png" % (w, h), png_file(w, h, 2, 8, rows, interlace=True),
           expect=rgb_bytes(rows), sizes=[(1, 1), (5, 4)])
    # Ancillary chunks libpng would otherwise act on or complain about (gAMA, sBIT, a bad
    # iCCP, text): PIL ignores them for pixels, so must we.
    w, h = 9, 5
    rows = content(w, h, 99, 3)
    extra = png_chunk(b"gAMA", struct.pack(">I", 22727)) + png_chunk(b"sBIT", b"\x05\x06\x05")
    extra += png_chunk(b"iCCP", b"bogus\x00\x00" + zlib.compress(b"not a profile"))
    extra += png_chunk(b"tEXt", b"Comment\x00hello")
    ok("png_ancillary.png", png_file(w, h, 2, 8, rows, extra=extra), expect=rgb_bytes(rows))
    # A larger RGB image written by PIL (real zlib stream with PIL's filter choice); used for
    # the resize tests: downscale, upscale, one axis only, to 1x1.
    w, h = 61, 47
    rows = content(w, h, 5, 3)
    buf = io.BytesIO()
    pil_from_rows(rows, w, h, "RGB").save(buf, "PNG")
    ok("png_pil_rgb.png", buf.getvalue(), expect=rgb_bytes(rows),
       sizes=[(23, 19), (67, 53), (61, 19), (23, 47), (1, 1), (7, 2), (2, 60), (60, 40)])
    # Extreme aspect ratios.
    for (w, h, sizes) in ((3000, 1, [(17, 3), (224, 2), (500, 3)]),
                          (1, 3000, [(3, 17), (2, 224), (1, 7)])):
        rows = content(w, h, w + h, 3, noise=3)
        ok("png_%dx%d.png" % (w, h), png_file(w, h, 2, 8, rows), expect=rgb_bytes(rows),
           sizes=sizes)


def make_jpeg():
    w, h = 37, 29  # not a multiple of the MCU size: partial blocks at the edges
    rows = content(w, h, 21, 3)
    im = pil_from_rows(rows, w, h, "RGB")

    def save(img, **kw):
        b = io.BytesIO()
        img.save(b, "JPEG", **kw)
        return b.getvalue()

    ok("jpg_420.jpg", save(im, quality=90), sizes=[(11, 9), (50, 40)])
    ok("jpg_444.jpg", save(im, quality=95, subsampling=0))
    ok("jpg_422.jpg", save(im, quality=80, subsampling=1))
    ok("jpg_progressive.jpg", save(im, quality=85, progressive=True), sizes=[(19, 30)])
    ok("jpg_gray.jpg", save(im.convert("L"), quality=90))
    ok("jpg_cmyk_adobe.jpg", save(im.convert("CMYK"), quality=90))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation "rotate 90": PIL does not apply it, neither must we
    ok("jpg_exif_rot6.jpg", save(im, quality=90, exif=exif.tobytes()))
    exe = jpeg_helper()
    cm = bytes(v for row in content(w, h, 22, 4) for v in row)
    ok("jpg_ycck.jpg", helper_jpeg(exe, w, h, "ycck", cm))
    ok("jpg_cmyk_noadobe.jpg", helper_jpeg(exe, w, h, "cmyk_noadobe", cm))
    for mode in ("rgb", "arith", "restart"):
        ok("jpg_%s.jpg" % mode, helper_jpeg(exe, w, h, mode, rgb_bytes(rows)))
    # 1x1 and a thin strip.
    ok("jpg_1x1.jpg", save(pil_from_rows([[200, 30, 90]], 1, 1, "RGB"), quality=90),
       sizes=[(3, 3)])
    strip = content(300, 2, 23, 3)
    ok("jpg_300x2.jpg", save(pil_from_rows(strip, 300, 2, "RGB"), quality=90), sizes=[(7, 5)])


def make_webp():
    w, h = 23, 17
    rgb = pil_from_rows(content(w, h, 31, 3), w, h, "RGB")
    rgba = pil_from_rows(content(w, h, 32, 4), w, h, "RGBA")

    def save(img, **kw):
        b = io.BytesIO()
        img.save(b, "WEBP", **kw)
        return b.getvalue()

    ok("webp_lossy.webp", save(rgb, quality=80), sizes=[(9, 30)])
    ok("webp_lossless.webp", save(rgb, lossless=True), expect=rgb.tobytes())
    ok("webp_lossy_alpha.webp", save(rgba, quality=80))
    ok("webp_lossless_alpha.webp", save(rgba, lossless=True, exact=True),
       expect=rgba.convert("RGB").tobytes())
    frames = [rgb, rgb.transpose(Image.FLIP_LEFT_RIGHT)]
    b = io.BytesIO()
    frames[0].save(b, "WEBP", save_all=True, append_images=frames[1:], lossless=True,
                   duration=100)
    ok("webp_anim.webp", b.getvalue(), expect=rgb.tobytes())
    # First frame 9x7 at (2, 4) of a 20x16 canvas: the rest of the canvas is transparent
    # black (libwebp's anim decoder ignores the ANIM background colour).
    small = pil_from_rows(content(9, 7, 33, 4), 9, 7, "RGBA")
    anim = webp_anim_offset(20, 16, 2, 4, save(small, lossless=True, exact=True), 9, 7)
    ok("webp_anim_offset.webp", anim)
    ok("webp_1x1.webp", save(pil_from_rows([[10, 200, 30]], 1, 1, "RGB"), lossless=True),
       expect=bytes([10, 200, 30]))


def make_gif():
    rnd = random.Random(41)
    pal = [(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)) for _ in range(256)]
    w, h = 19, 13
    idx = [rnd.randrange(256) for _ in range(w * h)]
    exp = bytes(c for v in idx for c in pal[v])
    f0 = dict(x=0, y=0, w=w, h=h, idx=idx)
    ok("gif_global.gif", gif_file(w, h, pal, [f0]), expect=exp, sizes=[(7, 20)])
    ok("gif_interlaced.gif", gif_file(w, h, pal, [dict(f0, interlace=True)]), expect=exp)
    # A local palette overrides the global one.
    lpal = [(v, 255 - v, v // 2) for v in range(256)]
    ok("gif_local.gif", gif_file(w, h, pal, [dict(f0, lpal=lpal)]),
       expect=bytes(c for v in idx for c in lpal[v]))
    # A local palette that is the identity gray ramp: PIL drops it as "not needed" (mode L)
    # but still attaches the GLOBAL palette, which convert("RGB") then applies (a PIL quirk).
    ramp = [(v, v, v) for v in range(256)]
    ok("gif_local_ramp.gif", gif_file(w, h, pal, [dict(f0, lpal=ramp)]), expect=exp)
    ok("gif_local_ramp_noglobal.gif", gif_file(w, h, None, [dict(f0, lpal=ramp[:128])]),
       expect=gray_to_rgb(idx))
    g87 = bytearray(gif_file(w, h, pal, [f0]))
    g87[:6] = b"GIF87a"
    ok("gif87a.gif", bytes(g87), expect=exp)
    # No palette at all: PIL opens mode L, the index is the gray level.
    ok("gif_nopal.gif", gif_file(w, h, None, [f0]), expect=gray_to_rgb(idx))
    # Animated: the first frame only.
    f1 = dict(f0, idx=[255 - v for v in idx])
    ok("gif_anim.gif", gif_file(w, h, pal, [f0, f1]), expect=exp)
    # A 4-colour palette with a larger code size and indices past its end: looked up in
    # the gray ramp like PNG.
    small = [(10, 20, 30), (40, 50, 60), (70, 80, 90), (250, 0, 5)]
    idx2 = [rnd.choice([0, 1, 2, 3, 4, 7, 200]) for _ in range(w * h)]
    ok("gif_pal_short.gif", gif_file(w, h, small, [dict(f0, idx=idx2)]),
       expect=bytes(c for v in idx2 for c in (small[v] if v < 4 else (v, v, v))))
    ok("gif_1x1.gif", gif_file(1, 1, small, [dict(x=0, y=0, w=1, h=1, idx=[3])]),
       expect=bytes(small[3]), sizes=[(4, 4)])
    make_gif_offsets(pal, rnd)


def make_gif_offsets(pal, rnd):
    # A frame smaller than the logical screen, at an offset. PIL fills the canvas with index 0
    # (no transparency) or with the transparency index, then looks up the palette.
    sw, sh, fw, fh, fx, fy = 17, 12, 7, 5, 6, 4
    idx = [rnd.randrange(1, 256) for _ in range(fw * fh)]

    def canvas(fill, cw=sw, ch=sh):
        c = [fill] * (cw * ch)
        for y in range(fh):
            for x in range(fw):
                c[(y + fy) * cw + x + fx] = idx[y * fw + x]
        return bytes(v for i in c for v in pal[i])

    f = dict(x=fx, y=fy, w=fw, h=fh, idx=idx)
    ok("gif_offset.gif", gif_file(sw, sh, pal, [f], bg=77), expect=canvas(0), sizes=[(5, 5)])
    ok("gif_offset_trns.gif", gif_file(sw, sh, pal, [dict(f, trns=42)], bg=77),
       expect=canvas(42))
    # Frame reaching past the logical screen: PIL grows the canvas to hold it.
    ok("gif_beyond.gif", gif_file(10, 6, pal, [f]), expect=canvas(0, 13, 9))
    # PIL-written GIF (its own LZW encoder; interlaced by default for images >= 16 px).
    w, h = 33, 21
    rows = content(w, h, 44, 3)
    im = pil_from_rows(rows, w, h, "RGB").quantize(64)
    b = io.BytesIO()
    im.save(b, "GIF")
    ok("gif_pil.gif", b.getvalue(), expect=im.convert("RGB").tobytes(), sizes=[(12, 10)])
    # A big LZW stream that fills the 4096-entry table several times.
    w, h = 96, 60
    idx = [(x * 7 + y * 3 + rnd.randrange(3)) % 256 if x < 40 else rnd.randrange(256)
           for y in range(h) for x in range(w)]
    ok("gif_bigtable.gif", gif_file(w, h, pal, [dict(x=0, y=0, w=w, h=h, idx=idx)]),
       expect=bytes(c for v in idx for c in pal[v]))


def make_errors():
    """Malformed or hostile files, and the error the decoder must return."""
    # Bombs: tiny files whose headers claim huge dimensions.
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    png += png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")
    err("bomb.png", png, "ETOOBIG")
    b = io.BytesIO()
    Image.new("RGB", (16, 16)).save(b, "JPEG")
    jpg = bytearray(b.getvalue())
    sof = jpg.find(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)
    err("bomb.jpg", bytes(jpg), "ETOOBIG")
    err("bomb.gif", gif_file(65535, 65535, [(0, 0, 0), (9, 9, 9)],
                             [dict(x=0, y=0, w=2, h=2, idx=[0, 1, 1, 0])]), "ETOOBIG")
    # GIF whose frame (not screen) is huge, at an offset far outside a tiny screen.
    err("bomb_frame.gif", gif_file(4, 4, [(0, 0, 0), (9, 9, 9)],
                                   [dict(x=60000, y=60000, w=5000, h=5000, idx=[0] * 4,
                                         lzw=lzw_encode([0] * 4, 8))]), "ETOOBIG")
    vp8l = bytearray(riff_chunks(_webp_lossless_1x1())[0][1])
    bits = (16383) | (16383 << 14)  # 14-bit width-1, 14-bit height-1
    vp8l[1:5] = struct.pack("<I", bits | (vp8l[4] >> 4 & 1) << 28)
    err("bomb.webp", b"RIFF" + struct.pack("<I", 4 + 8 + len(vp8l)) + b"WEBP" +
        riff_chunk(b"VP8L", bytes(vp8l)), "ETOOBIG")
    vp8x = bytes([0x02, 0, 0, 0]) + u24(16383) + u24(16383)
    body = b"WEBP" + riff_chunk(b"VP8X", vp8x) + riff_chunk(b"ANIM", b"\0" * 6)
    err("bomb_anim.webp", b"RIFF" + struct.pack("<I", len(body)) + body, "ETOOBIG")
    # Zero dimensions.
    ihdr = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)
    err("zero.png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) +
        png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""), "EFORMAT")
    err("zero.gif", gif_file(0, 0, None, [dict(x=0, y=0, w=0, h=0, idx=[], lzw=b"")]),
        "EFORMAT")
    # Unknown formats.
    b = io.BytesIO()
    Image.new("RGB", (4, 4)).save(b, "BMP")
    err("unknown.bmp", b.getvalue(), "EUNSUPPORTED")
    err("unknown.txt", b"hello, world\n", "EUNSUPPORTED")
    err("empty.bin", b"", "EUNSUPPORTED")
    # Header only.
    err("header_only.png", b"\x89PNG\r\n\x1a\n", "EFORMAT")
    err("header_only.gif", b"GIF89a", "EFORMAT")
    err("header_only.jpg", b"\xff\xd8\xff", "EFORMAT")
    err("header_only.webp", b"RIFF\x04\x00\x00\x00WEBP", "EFORMAT")
    # A GIF with no image at all.
    err("empty_frame.gif", gif_file(5, 4, [(1, 2, 3)], [dict(x=1, y=1, w=0, h=2, idx=[],
                                                              lzw=lzw_encode([], 8))]),
        "EFORMAT")
    err("noimage.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00\x3b", "EFORMAT")
    err("bad_png_crc.png", _bad_crc_png(), "EFORMAT")


def _webp_lossless_1x1():
    b = io.BytesIO()
    Image.new("RGB", (1, 1), (1, 2, 3)).save(b, "WEBP", lossless=True)
    return b.getvalue()


def _bad_crc_png():
    rows = content(4, 4, 1, 3)
    data = bytearray(png_file(4, 4, 2, 8, rows))
    data[29] ^= 0xFF  # inside the IHDR CRC
    return bytes(data)


def main():
    warnings.simplefilter("ignore")  # PIL warns about palette tRNS on convert("RGB")
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f != "README":
            os.unlink(os.path.join(OUT, f))
    make_png()
    make_jpeg()
    make_webp()
    make_gif()
    make_errors()
    with open(os.path.join(OUT, "manifest.txt"), "w") as f:
        f.write("# Generated by tools/images/make_fixtures.py with PIL %s; do not edit.\n"
                % Image.__version__)
        f.write("# ok <file> <w> <h> <tol> [<W>x<H> ...]  |  err <file> <CODE>\n")
        f.write("\n".join(MANIFEST) + "\n")
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print("%d fixtures, %d bytes in %s" % (len(MANIFEST), total, OUT))


if __name__ == "__main__":
    main()
