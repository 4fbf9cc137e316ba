/* cli_preprocess.c - `cogvlm preprocess`: the image half of the model's input, to a file.
 *
 *   cogvlm preprocess --image PATH --size N --out FILE [--max-pixels N] [--normalized]
 *
 * Decodes PATH (JPEG/PNG/WebP/GIF), resizes it to N x N with PIL's bicubic filter and writes
 * the raw uint8 RGB bytes, HWC (what PIL's convert("RGB").resize((N, N), BICUBIC).tobytes()
 * gives), or with --normalized the float32 CHW tensor after CLIP normalization (native byte
 * order). FILE "-" is stdout. Exit status: 0 ok, 1 bad image or I/O error, 2 usage error.
 */
#include "cli/cli.h"

#include "engine/error.h"
#include "engine/image/image.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PREPROCESS_MAX_FILE (1ull << 30) /* refuse to slurp more than 1 GiB */

struct pp_opts {
    const char *image, *out;
    long size;
    unsigned long long max_pixels;
    int normalized;
};

static void pp_usage(FILE *f)
{
    fprintf(f,
            "usage: cogvlm preprocess --image PATH --size N --out FILE [--max-pixels N]"
            " [--normalized]\n\n"
            "Decodes an image (JPEG, PNG, WebP, GIF first frame), converts it to RGB and resizes\n"
            "it to N x N with PIL's bicubic filter, as the model's preprocessing does.\n\n"
            "  --image PATH      input image\n"
            "  --size N          output side in pixels (490, or 224 for base-224 models)\n"
            "  --out FILE        output file, '-' for stdout: N*N*3 bytes of uint8 RGB, HWC\n"
            "  --max-pixels N    reject images with more pixels (default %llu)\n"
            "  --normalized      write float32 CHW, (v/255 - mean) / std with the CLIP\n"
            "                    constants, instead of uint8 RGB (3*N*N floats, native order)\n",
            (unsigned long long)CVLM_IMAGE_DEFAULT_MAX_PIXELS);
}

/* Returns 0, 1 for --help, or 2 after printing a usage error. */
static int pp_parse(int argc, char **argv, struct pp_opts *o)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h"))
            return 1;
        if (!strcmp(a, "--normalized")) {
            o->normalized = 1;
            continue;
        }
        if (strcmp(a, "--image") && strcmp(a, "--out") && strcmp(a, "--size") &&
            strcmp(a, "--max-pixels")) {
            fprintf(stderr, "cogvlm preprocess: unknown option '%s' (see --help)\n", a);
            return 2;
        }
        if (!v) {
            fprintf(stderr, "cogvlm preprocess: %s needs a value (see --help)\n", a);
            return 2;
        }
        i++;
        errno = 0;
        if (!strcmp(a, "--image")) {
            o->image = v;
        } else if (!strcmp(a, "--out")) {
            o->out = v;
        } else if (!strcmp(a, "--size")) {
            o->size = strtol(v, &end, 10);
            if (*end || errno || o->size <= 0 || o->size > 16384) {
                fprintf(stderr, "cogvlm preprocess: bad --size '%s' (1..16384)\n", v);
                return 2;
            }
        } else {
            o->max_pixels = strtoull(v, &end, 10);
            if (*end || errno || o->max_pixels == 0 || v[0] == '-') {
                fprintf(stderr, "cogvlm preprocess: bad --max-pixels '%s'\n", v);
                return 2;
            }
        }
    }
    if (!o->image || !o->out || !o->size) {
        fprintf(stderr, "cogvlm preprocess: --image, --size and --out are required\n");
        return 2;
    }
    return 0;
}

static unsigned char *pp_read(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    long n;

    if (!f) {
        fprintf(stderr, "cogvlm preprocess: %s: %s\n", path, strerror(errno));
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
        fprintf(stderr, "cogvlm preprocess: %s: cannot determine the size\n", path);
    } else if ((unsigned long long)n > PREPROCESS_MAX_FILE) {
        fprintf(stderr, "cogvlm preprocess: %s: %ld bytes is too large\n", path, n);
    } else if (!(buf = malloc(n ? (size_t)n : 1))) {
        fprintf(stderr, "cogvlm preprocess: %s: out of memory\n", path);
    } else if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "cogvlm preprocess: %s: read error\n", path);
        free(buf);
        buf = NULL;
    } else {
        *len = (size_t)n;
    }
    fclose(f);
    return buf;
}

static int pp_write(const char *path, const void *data, size_t len)
{
    int to_stdout = !strcmp(path, "-");
    FILE *f = to_stdout ? stdout : fopen(path, "wb");
    int ok;

    if (!f) {
        fprintf(stderr, "cogvlm preprocess: %s: %s\n", path, strerror(errno));
        return 1;
    }
    ok = fwrite(data, 1, len, f) == len;
    ok = (to_stdout ? fflush(f) : fclose(f)) == 0 && ok;
    if (!ok)
        fprintf(stderr, "cogvlm preprocess: %s: write error\n", path);
    return ok ? 0 : 1;
}

int cvlm_cli_preprocess(int argc, char **argv)
{
    struct pp_opts o = {0};
    struct cvlm_image img = {0}, rs = {0};
    struct cvlm_image_limits lim = {0};
    unsigned char *data;
    size_t len = 0;
    float *chw = NULL;
    int rc = pp_parse(argc, argv, &o);

    if (rc == 1) {
        pp_usage(stdout);
        return 0;
    }
    if (rc)
        return rc;
    if (!(data = pp_read(o.image, &len)))
        return 1;
    lim.max_pixels = o.max_pixels;
    cvlm_clear_error();
    rc = cvlm_image_decode(data, len, &lim, &img);
    free(data);
    if (rc == 0)
        rc = cvlm_image_resize_bicubic(&img, (int)o.size, (int)o.size, &rs);
    if (rc) {
        fprintf(stderr, "cogvlm preprocess: %s: %s\n", o.image, cvlm_last_error());
        cvlm_image_free(&img);
        return 1;
    }
    if (o.normalized) {
        size_t n = (size_t)3 * rs.width * rs.height;
        if (!(chw = malloc(n * sizeof(float)))) {
            fprintf(stderr, "cogvlm preprocess: out of memory\n");
            rc = 1;
        } else {
            cvlm_image_normalize(&rs, chw);
            rc = pp_write(o.out, chw, n * sizeof(float));
        }
    } else {
        rc = pp_write(o.out, rs.rgb, (size_t)rs.width * rs.height * 3);
    }
    if (rc == 0 && strcmp(o.out, "-"))
        printf("%s: %dx%d -> %s (%dx%d %s)\n", o.image, img.width, img.height, o.out, rs.width,
               rs.height, o.normalized ? "float32 CHW normalized" : "uint8 RGB HWC");
    free(chw);
    cvlm_image_free(&rs);
    cvlm_image_free(&img);
    return rc;
}
