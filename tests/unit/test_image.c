/* test_image.c - image decoding, PIL-exact resizing and CLIP normalization (engine/image/).
 *
 * Every expected pixel comes from PIL, never from this code: the shared goldens
 * (../shared/data/images/golden/NAME-SIZE.rgb) and the fixtures in tests/unit/images/,
 * generated with their PIL references by tools/images/make_fixtures.py (see manifest.txt). Hostile
 * inputs (truncations, byte flips, bombs) are derived here from the fixtures; each copy is
 * malloc'd at its exact size so that AddressSanitizer catches any read past its end.
 */
#include "engine/error.h"
#include "engine/image/image.h"
#include "tests/unit/harness.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#define FIXDIR "tests/unit/images/"

static const char *fixture(const char *name)
{
    static char bufs[4][512];
    static int slot;
    char *b = bufs[slot++ % 4];
    snprintf(b, sizeof(bufs[0]), FIXDIR "%s", name);
    return b;
}

/* Largest |a - b| over n bytes; *exact gets the number of equal bytes. */
static int max_diff(const uint8_t *a, const uint8_t *b, size_t n, size_t *exact)
{
    int m = 0;
    size_t e = 0;
    for (size_t i = 0; i < n; i++) {
        int d = abs((int)a[i] - (int)b[i]);
        m = d > m ? d : m;
        e += d == 0;
    }
    if (exact)
        *exact = e;
    return m;
}

static int decode_file(const char *path, const struct cvlm_image_limits *lim,
                       struct cvlm_image *img)
{
    size_t len = 0;
    unsigned char *data = cvlm_test_read_file(path, &len);
    int rc;
    if (!data)
        return CVLM_ENOENT;
    rc = cvlm_image_decode(data, len, lim, img);
    free(data);
    return rc;
}

/* Compares `img` (w x h) with the raw RGB file `ref`; returns 0 if within `tol`. */
static int check_against(const struct cvlm_image *img, const char *ref, int tol, const char *what)
{
    size_t len = 0, exact;
    unsigned char *want = cvlm_test_read_file(ref, &len);
    int d;
    if (!want) {
        CHECKF(0, "%s: cannot read %s", what, ref);
        return -1;
    }
    if (len != (size_t)img->width * (size_t)img->height * 3) {
        CHECKF(0, "%s: %s has %zu bytes, image is %dx%d", what, ref, len, img->width, img->height);
        free(want);
        return -1;
    }
    d = max_diff(img->rgb, want, len, &exact);
    CHECKF(d <= tol, "%s: max diff %d > %d (%zu of %zu bytes exact)", what, d, tol, exact, len);
    free(want);
    return d <= tol ? 0 : -1;
}

/* ---------------------------------------------------------------------------------------- */
/* Shared goldens: PIL's Image.open(src).convert("RGB").resize((N, N), BICUBIC).             */

static void golden_case(const char *src, const char *name, int size, int is_jpeg)
{
    struct cvlm_image img = {0}, rs = {0};
    char ref[128];
    size_t len = 0, exact = 0;
    unsigned char *want;
    int rc, d;

    rc = decode_file(cvlm_test_data(src), NULL, &img);
    CHECKF(rc == 0, "%s: decode: %s", src, cvlm_last_error());
    if (rc)
        return;
    snprintf(ref, sizeof(ref), "images/golden/%s-%d.rgb", name, size);
    want = cvlm_test_read_file(cvlm_test_data(ref), &len);
    rc = cvlm_image_resize_bicubic(&img, size, size, &rs);
    CHECKF(rc == 0 && want && len == (size_t)size * size * 3, "%s: resize/golden", ref);
    if (rc == 0 && want && len == (size_t)size * size * 3) {
        d = max_diff(rs.rgb, want, len, &exact);
        printf("  golden %s-%d: max diff %d, %.3f%% bytes exact\n", name, size, d,
               100.0 * (double)exact / (double)len);
        if (is_jpeg) {
            CHECKF(d <= 1, "%s: max diff %d", ref, d);
            CHECKF(exact * 100 >= len * 99, "%s: only %zu of %zu exact", ref, exact, len);
        } else {
            CHECKF(d == 0, "%s: max diff %d (PNG must be exact)", ref, d);
        }
    }
    free(want);
    cvlm_image_free(&rs);
    cvlm_image_free(&img);
}

TEST(image_golden)
{
    golden_case("images/demo.jpg", "demo", 224, 1);
    golden_case("images/demo.jpg", "demo", 490, 1);
    golden_case("images/pear.png", "pear", 224, 0);
    golden_case("images/pear.png", "pear", 490, 0);
}

/* ---------------------------------------------------------------------------------------- */
/* Fixtures of every format and variant, against PIL (manifest.txt).                         */

struct manifest_entry {
    char kind[4], file[96], code[16];
    int w, h, tol, nsizes;
    int sizes[12][2];
};

static int read_manifest(struct manifest_entry *ents, int max)
{
    FILE *f = fopen(fixture("manifest.txt"), "r");
    char line[512];
    int n = 0;
    if (!f)
        return -1;
    while (n < max && fgets(line, sizeof(line), f)) {
        struct manifest_entry *e = &ents[n];
        char *tok, *save = NULL;
        int field = 0;
        if (line[0] == '#' || line[0] == '\n')
            continue;
        memset(e, 0, sizeof(*e));
        for (tok = strtok_r(line, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save)) {
            if (field == 0)
                snprintf(e->kind, sizeof(e->kind), "%s", tok);
            else if (field == 1)
                snprintf(e->file, sizeof(e->file), "%s", tok);
            else if (!strcmp(e->kind, "err") && field == 2)
                snprintf(e->code, sizeof(e->code), "%s", tok);
            else if (field == 2)
                e->w = atoi(tok);
            else if (field == 3)
                e->h = atoi(tok);
            else if (field == 4)
                e->tol = atoi(tok);
            else if (e->nsizes < 12 &&
                     sscanf(tok, "%dx%d", &e->sizes[e->nsizes][0], &e->sizes[e->nsizes][1]) == 2)
                e->nsizes++;
            field++;
        }
        n++;
    }
    fclose(f);
    return n;
}

static struct manifest_entry manifest[128];
static int manifest_n = -1;

static int load_manifest(void)
{
    if (manifest_n < 0)
        manifest_n = read_manifest(manifest, 128);
    return manifest_n;
}

static void stem_of(const char *file, char *stem, size_t n)
{
    const char *dot = strrchr(file, '.');
    snprintf(stem, n, "%.*s", (int)(dot ? dot - file : (long)strlen(file)), file);
}

static void fixture_ok(const struct manifest_entry *e)
{
    struct cvlm_image img = {0};
    char stem[96], ref[160];
    int rc = decode_file(fixture(e->file), NULL, &img);

    CHECKF(rc == 0, "%s: decode failed: %s", e->file, cvlm_last_error());
    if (rc)
        return;
    CHECKF(img.width == e->w && img.height == e->h, "%s: %dx%d, PIL says %dx%d", e->file, img.width,
           img.height, e->w, e->h);
    stem_of(e->file, stem, sizeof(stem));
    snprintf(ref, sizeof(ref), "%s.rgb", stem);
    if (img.width == e->w && img.height == e->h)
        check_against(&img, fixture(ref), e->tol, e->file);
    for (int i = 0; i < e->nsizes; i++) {
        struct cvlm_image rs = {0};
        char what[160];
        snprintf(ref, sizeof(ref), "%s.%dx%d.rgb", stem, e->sizes[i][0], e->sizes[i][1]);
        snprintf(what, sizeof(what), "%s -> %dx%d", e->file, e->sizes[i][0], e->sizes[i][1]);
        rc = cvlm_image_resize_bicubic(&img, e->sizes[i][0], e->sizes[i][1], &rs);
        CHECKF(rc == 0, "%s: %s", what, cvlm_last_error());
        if (rc == 0)
            check_against(&rs, fixture(ref), e->tol, what);
        cvlm_image_free(&rs);
    }
    cvlm_image_free(&img);
}

static int code_of(const char *name)
{
    if (!strcmp(name, "ETOOBIG"))
        return CVLM_ETOOBIG;
    if (!strcmp(name, "EFORMAT"))
        return CVLM_EFORMAT;
    if (!strcmp(name, "EUNSUPPORTED"))
        return CVLM_EUNSUPPORTED;
    return 1;
}

static void fixture_err(const struct manifest_entry *e)
{
    struct cvlm_image img = {0};
    clock_t t0 = clock();
    int rc = decode_file(fixture(e->file), NULL, &img);
    double secs = (double)(clock() - t0) / CLOCKS_PER_SEC;

    CHECKF(rc == code_of(e->code), "%s: got %d (%s), want %s", e->file, rc,
           rc ? cvlm_last_error() : "success", e->code);
    CHECKF(img.rgb == NULL && img.width == 0, "%s: output not empty after an error", e->file);
    CHECKF(rc == 0 || strlen(cvlm_last_error()) > 8, "%s: no error detail", e->file);
    CHECKF(secs < 2.0, "%s: took %.2f s to fail", e->file, secs); /* bombs fail fast */
    cvlm_image_free(&img);
}

TEST(image_fixtures)
{
    int n = load_manifest(), nok = 0, nerr = 0;
    REQUIRE(n > 0);
    for (int i = 0; i < n; i++) {
        if (!strcmp(manifest[i].kind, "ok")) {
            fixture_ok(&manifest[i]);
            nok++;
        } else {
            fixture_err(&manifest[i]);
            nerr++;
        }
    }
    CHECK(nok >= 50 && nerr >= 15);
}

/* ---------------------------------------------------------------------------------------- */
/* Hostile inputs.                                                                           */

/* Decodes an exact-size heap copy of data[0..len); checks the result is sane. Returns rc. */
static int decode_copy(const unsigned char *data, size_t len, const struct cvlm_image *full,
                       const char *what, size_t at)
{
    unsigned char *copy = malloc(len ? len : 1);
    struct cvlm_image img = {0};
    int rc;
    memcpy(copy, data, len);
    rc = cvlm_image_decode(copy, len, NULL, &img);
    if (rc == 0) {
        CHECKF(img.width > 0 && img.height > 0 && img.rgb, "%s @%zu: empty success", what, at);
        /* A truncated file only decodes when every pixel was there: then it is identical. */
        if (full && img.rgb)
            CHECKF(img.width == full->width && img.height == full->height &&
                       !memcmp(img.rgb, full->rgb, (size_t)img.width * img.height * 3),
                   "%s cut at %zu: decoded to different pixels", what, at);
    } else {
        CHECKF(rc == CVLM_EFORMAT || rc == CVLM_EUNSUPPORTED || rc == CVLM_ETOOBIG,
               "%s @%zu: unexpected error %d (%s)", what, at, rc, cvlm_last_error());
        CHECKF(img.rgb == NULL, "%s @%zu: output left after an error", what, at);
    }
    cvlm_image_free(&img);
    free(copy);
    return rc;
}

TEST(image_truncated)
{
    int n = load_manifest();
    REQUIRE(n > 0);
    for (int i = 0; i < n; i++) {
        struct cvlm_image full = {0};
        size_t len = 0, step;
        unsigned char *data;
        if (strcmp(manifest[i].kind, "ok"))
            continue;
        data = cvlm_test_read_file(fixture(manifest[i].file), &len);
        REQUIRE(data);
        REQUIRE(cvlm_image_decode(data, len, NULL, &full) == 0);
        step = len / 400 + 1; /* every offset for small files, ~400 cuts for big ones */
        for (size_t cut = 0; cut < len; cut += step) {
            int rc = decode_copy(data, cut, &full, manifest[i].file, cut);
            /* The decoders never pad missing pixels (libjpeg would, with gray): success
             * needs all the pixel data, so a file cut in its first third always fails. */
            CHECKF(rc != 0 || cut >= len / 3, "%s: decoded though cut at %zu of %zu",
                   manifest[i].file, cut, len);
        }
        cvlm_image_free(&full);
        free(data);
    }
}

TEST(image_byteflips)
{
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    int n = load_manifest();
    REQUIRE(n > 0);
    for (int i = 0; i < n; i++) {
        size_t len = 0;
        unsigned char *data = cvlm_test_read_file(fixture(manifest[i].file), &len);
        REQUIRE(data);
        for (int t = 0; t < 60 && len > 0; t++) {
            unsigned char *m = malloc(len);
            int flips = 1 + t % 4;
            memcpy(m, data, len);
            for (int f = 0; f < flips; f++) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                /* Half of the flips hit the first 64 bytes, where the headers are. */
                size_t at = (size_t)(seed >> 33) % (t % 2 && len > 64 ? 64 : len);
                m[at] ^= (unsigned char)(1u << ((seed >> 20) & 7));
            }
            decode_copy(m, len, NULL, manifest[i].file, (size_t)t);
            free(m);
        }
        free(data);
    }
}

TEST(image_limits)
{
    struct cvlm_image img = {0};
    struct cvlm_image_limits lim = {91}; /* png_rgb8.png is 13x7 = 91 pixels */

    CHECK(decode_file(fixture("png_rgb8.png"), &lim, &img) == 0);
    cvlm_image_free(&img);
    lim.max_pixels = 90;
    CHECK(decode_file(fixture("png_rgb8.png"), &lim, &img) == CVLM_ETOOBIG);
    CHECK(strstr(cvlm_last_error(), "13x7") != NULL);
    lim.max_pixels = 1000;
    CHECK(decode_file(cvlm_test_data("images/demo.jpg"), &lim, &img) == CVLM_ETOOBIG);
    CHECK(decode_file(fixture("gif_offset.gif"), &lim, &img) == 0 && img.width == 17);
    cvlm_image_free(&img);
    lim.max_pixels = 100;
    CHECK(decode_file(fixture("gif_offset.gif"), &lim, &img) == CVLM_ETOOBIG);
    CHECK(decode_file(fixture("webp_lossy.webp"), &lim, &img) == CVLM_ETOOBIG);
    /* Default limit (50 MP) when the struct or the field is absent/zero. */
    lim.max_pixels = 0;
    CHECK(decode_file(fixture("bomb.png"), &lim, &img) == CVLM_ETOOBIG);
    CHECK(decode_file(fixture("bomb.png"), NULL, &img) == CVLM_ETOOBIG);
    CHECK(img.rgb == NULL);
    /* NULL data / output. */
    CHECK(cvlm_image_decode(NULL, 10, NULL, &img) == CVLM_EINVAL);
    CHECK(cvlm_image_decode("x", 1, NULL, NULL) == CVLM_EINVAL);
}

/* A progressive JPEG whose first scan is repeated `times` times (libjpeg only warns about
 * the bogus progression). Returns a malloc'd file of *len bytes. */
static unsigned char *jpeg_repeat_scan(const unsigned char *d, size_t n, int times, size_t *len)
{
    size_t sos = 0, end, pos = 0;
    unsigned char *out;

    for (size_t i = 2; i + 3 < n && !sos; i++)
        if (d[i] == 0xFF && d[i + 1] == 0xDA)
            sos = i;
    if (!sos)
        return NULL;
    /* The scan runs to the next marker that is not a stuffed 0xFF00 or a restart marker. */
    end = sos + 2 + ((size_t)d[sos + 2] << 8 | d[sos + 3]);
    while (end + 1 < n && !(d[end] == 0xFF && d[end + 1] != 0 && (d[end + 1] & 0xF8) != 0xD0))
        end++;
    out = malloc(n + (size_t)times * (end - sos));
    if (!out)
        return NULL;
    memcpy(out, d, sos);
    pos = sos;
    for (int t = 0; t < times; t++, pos += end - sos)
        memcpy(out + pos, d + sos, end - sos);
    memcpy(out + pos, d + end, n - end);
    *len = pos + n - end;
    return out;
}

/* More than 1000 scans is refused (a tiny file could otherwise cost seconds); fewer decode,
 * whatever libjpeg warns. */
TEST(image_jpeg_scan_cap)
{
    size_t n = 0, len = 0;
    unsigned char *d = cvlm_test_read_file(fixture("jpg_progressive.jpg"), &n), *m;
    struct cvlm_image img = {0};

    REQUIRE(d);
    m = jpeg_repeat_scan(d, n, 20, &len);
    REQUIRE(m);
    CHECKF(cvlm_image_decode(m, len, NULL, &img) == 0, "20 scans: %s", cvlm_last_error());
    CHECK(img.width == 37 && img.height == 29);
    cvlm_image_free(&img);
    free(m);
    m = jpeg_repeat_scan(d, n, 1100, &len);
    REQUIRE(m);
    CHECK(cvlm_image_decode(m, len, NULL, &img) == CVLM_EFORMAT);
    CHECK(strstr(cvlm_last_error(), "scans") != NULL);
    free(m);
    free(d);
}

/* ---------------------------------------------------------------------------------------- */
/* Resize API edges and normalization.                                                        */

TEST(image_resize_edges)
{
    uint8_t px[3] = {200, 17, 255};
    struct cvlm_image one = {1, 1, px}, out = {0}, fake;
    uint8_t dummy[3] = {0};

    /* A constant image stays constant whatever the scale (weights sum to 1 in 22-bit). */
    REQUIRE(cvlm_image_resize_bicubic(&one, 490, 490, &out) == 0);
    CHECK(out.width == 490 && out.height == 490);
    for (int i = 0; i < 490 * 490; i++)
        if (memcmp(out.rgb + 3 * i, px, 3)) {
            CHECKF(0, "pixel %d differs", i);
            break;
        }
    cvlm_image_free(&out);
    /* Same size: a copy. */
    REQUIRE(cvlm_image_resize_bicubic(&one, 1, 1, &out) == 0);
    CHECK(!memcmp(out.rgb, px, 3));
    cvlm_image_free(&out);
    /* Bad arguments. */
    CHECK(cvlm_image_resize_bicubic(&one, 0, 5, &out) == CVLM_EINVAL && !out.rgb);
    CHECK(cvlm_image_resize_bicubic(&one, 5, -1, &out) == CVLM_EINVAL);
    CHECK(cvlm_image_resize_bicubic(NULL, 5, 5, &out) == CVLM_EINVAL);
    CHECK(cvlm_image_resize_bicubic(&one, 5, 5, &one) == CVLM_EINVAL);
    /* An absurd aspect ratio fails on the filter-table size, before any pixel is read: the
     * image claims 1 x 2^27 pixels but only its header is real. */
    fake = (struct cvlm_image){1, 1 << 27, dummy};
    CHECK(cvlm_image_resize_bicubic(&fake, 490, 490, &out) == CVLM_ETOOBIG && !out.rgb);
}

TEST(image_normalize)
{
    /* Expected float32 bits computed independently (Python, rounding to float32 after every
     * operation as torch does): ((v / 255) - mean[c]) / std[c] for v = 0,1,127,128,254,255. */
    static const uint32_t want[3][6] = {
        {0xbfe568dc, 0xbfe38a7f, 0x3d7ce092, 0x3d9c5620, 0x3ff536e5, 0x3ff71541},
        {0xbfe044b8, 0xbfde58f1, 0x3e1d9531, 0x3e2cf36b, 0x4003d502, 0x4004cae5},
        {0xbfbd77d8, 0xbfbba5e1, 0x3ea6c5e6, 0x3eae0dc4, 0x40086d66, 0x40095660},
    };
    static const uint8_t vals[6] = {0, 1, 127, 128, 254, 255};
    uint8_t rgb[6 * 3];
    float chw[3 * 6];
    struct cvlm_image img = {6, 1, rgb};

    /* Pixel i has the value vals[(i + c) % 6] in channel c: checks the CHW layout too. */
    for (int i = 0; i < 6; i++)
        for (int c = 0; c < 3; c++)
            rgb[i * 3 + c] = vals[(i + c) % 6];
    cvlm_image_normalize(&img, chw);
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < 6; i++) {
            uint32_t bits;
            memcpy(&bits, &chw[c * 6 + i], 4);
            CHECKF(bits == want[c][(i + c) % 6], "c%d px%d: %08x want %08x", c, i, bits,
                   want[c][(i + c) % 6]);
        }
}
/* ---------------------------------------------------------------------------------------- */
/* The CLI: build/cogvlm preprocess (COGVLM_BIN, set by `make unit-test`).                   */

static int run_cli(const char *bin, const char *args, const char *errfile)
{
    char cmd[2048];
    int st;
    snprintf(cmd, sizeof(cmd), "'%s' preprocess %s 2>'%s' >/dev/null", bin, args, errfile);
    st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void cli_golden(const char *bin, const char *src, const char *name, int size)
{
    char out[512], err[512], args[1400], ref[128];
    struct cvlm_image got = {0};
    size_t len = 0;
    int rc;

    snprintf(out, sizeof(out), "%s/%s-%d.rgb", cvlm_test_tmpdir(), name, size);
    snprintf(err, sizeof(err), "%s/err.txt", cvlm_test_tmpdir());
    snprintf(args, sizeof(args), "--image '%s' --size %d --out '%s'", cvlm_test_data(src), size,
             out);
    rc = run_cli(bin, args, err);
    CHECKF(rc == 0, "preprocess %s: exit %d", src, rc);
    got.rgb = cvlm_test_read_file(out, &len);
    got.width = got.height = size;
    CHECKF(got.rgb && len == (size_t)size * size * 3, "%s: wrote %zu bytes", out, len);
    snprintf(ref, sizeof(ref), "images/golden/%s-%d.rgb", name, size);
    if (got.rgb && len == (size_t)size * size * 3)
        check_against(&got, cvlm_test_data(ref), strstr(src, ".jpg") ? 1 : 0, out);
    free(got.rgb);
}

TEST(image_cli)
{
    const char *bin = getenv("COGVLM_BIN");
    char out[512], err[512], args[1400], bad[512];
    size_t len = 0, elen = 0;
    unsigned char *msg;
    float *chw;

    if (!bin || !*bin) {
        printf("  image_cli: COGVLM_BIN not set, skipped\n");
        return;
    }
    cli_golden(bin, "images/demo.jpg", "demo", 224);
    cli_golden(bin, "images/pear.png", "pear", 490);

    /* --normalized: float32 CHW of the resized image. */
    snprintf(out, sizeof(out), "%s/pear.f32", cvlm_test_tmpdir());
    snprintf(err, sizeof(err), "%s/err.txt", cvlm_test_tmpdir());
    snprintf(args, sizeof(args), "--image '%s' --size 224 --out '%s' --normalized",
             cvlm_test_data("images/pear.png"), out);
    CHECK(run_cli(bin, args, err) == 0);
    chw = (float *)cvlm_test_read_file(out, &len);
    CHECKF(chw && len == sizeof(float) * 3 * 224 * 224, "normalized: %zu bytes", len);
    if (chw && len == sizeof(float) * 3 * 224 * 224) {
        size_t glen = 0;
        uint8_t *g = cvlm_test_read_file(cvlm_test_data("images/golden/pear-224.rgb"), &glen);
        float *want = malloc(len);
        struct cvlm_image gi = {224, 224, g};
        REQUIRE(g && want && glen == 224 * 224 * 3);
        cvlm_image_normalize(&gi, want);
        CHECK(!memcmp(want, chw, len));
        free(want);
        free(g);
    }
    free(chw);

    /* A corrupt file: exit status 1 and a message on stderr. */
    snprintf(bad, sizeof(bad), "%s/bad.png", cvlm_test_tmpdir());
    CHECK(cvlm_test_write_file(bad, "\x89PNG\r\n\x1a\n\0\0\0\rIHDR", 16) == 0);
    snprintf(args, sizeof(args), "--image '%s' --size 224 --out '%s'", bad, out);
    CHECK(run_cli(bin, args, err) == 1);
    msg = cvlm_test_read_file(err, &elen);
    CHECKF(msg && elen > 10 && strstr((char *)msg, "PNG"), "stderr: %s", msg ? (char *)msg : "");
    free(msg);
    /* Missing file -> 1; usage errors -> 2; --help -> 0. */
    snprintf(args, sizeof(args), "--image '%s/nope.jpg' --size 224 --out '%s'", cvlm_test_tmpdir(),
             out);
    CHECK(run_cli(bin, args, err) == 1);
    CHECK(run_cli(bin, "--size 224", err) == 2);
    CHECK(run_cli(bin, "--image x --size 0 --out y", err) == 2);
    CHECK(run_cli(bin, "--help", err) == 0);
}
