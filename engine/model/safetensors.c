/* safetensors.c - validating reader of safetensors files and sharded checkpoints.
 *
 * File layout: u64 little-endian header length N, N bytes of JSON
 *   {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
 *    "__metadata__": {"k": "v"}}
 * then the data section; offsets are relative to its start (8 + N).
 * Invariants established before a tensor is returned: N <= file size - 8 and
 * N <= CVLM_ST_MAX_HEADER; dtype in {F32, F16, BF16, I32}; shape entries non-negative and
 * their product (times the element size) computed without overflow and equal to
 * end - begin; begin <= end <= data size; no two tensors overlap; names unique.
 */
#include "engine/model/safetensors.h"

#include "engine/error.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static int parse_dtype(const char *s, enum cvlm_dtype *dt)
{
    if (!strcmp(s, "F32"))
        *dt = CVLM_DTYPE_F32;
    else if (!strcmp(s, "F16"))
        *dt = CVLM_DTYPE_F16;
    else if (!strcmp(s, "BF16"))
        *dt = CVLM_DTYPE_BF16;
    else if (!strcmp(s, "I32")) /* GPTQ's packed codes and g_idx (engine/model/gptq.c) */
        *dt = CVLM_DTYPE_I32;
    else
        return -1;
    return 0;
}

static int read_u64_le(const unsigned char *p, uint64_t *v)
{
    *v = 0;
    for (int i = 7; i >= 0; i--)
        *v = (*v << 8) | p[i];
    return 0;
}

/* Fills one tensor from its JSON descriptor; checks everything but overlaps. */
static int parse_entry(const char *name, json_t *desc, uint64_t data_size, struct cvlm_st_tensor *t)
{
    json_t *jd = json_object_get(desc, "dtype"), *js = json_object_get(desc, "shape");
    json_t *jo = json_object_get(desc, "data_offsets");
    uint64_t numel = 1, begin, end;

    if (!json_is_object(desc) || !json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
        json_array_size(jo) != 2)
        return cvlm_errf(CVLM_EFORMAT, "tensor %s: needs dtype, shape and data_offsets", name);
    if (parse_dtype(json_string_value(jd), &t->t.dtype))
        return cvlm_errf(CVLM_EUNSUPPORTED, "tensor %s: unsupported dtype %s (F32/F16/BF16/I32)",
                         name, json_string_value(jd));
    if (json_array_size(js) > CVLM_MAX_DIMS)
        return cvlm_errf(CVLM_EUNSUPPORTED, "tensor %s: %zu dims (max %d)", name,
                         json_array_size(js), CVLM_MAX_DIMS);
    t->t.ndim = (int)json_array_size(js);
    for (int i = 0; i < t->t.ndim; i++) {
        json_t *d = json_array_get(js, (size_t)i);
        json_int_t v = json_is_integer(d) ? json_integer_value(d) : -1;
        if (v < 0 || (uint64_t)v > (1ull << 40))
            return cvlm_errf(CVLM_EFORMAT, "tensor %s: bad shape entry %d", name, i);
        if (v && numel > (1ull << 62) / (uint64_t)v)
            return cvlm_errf(CVLM_EFORMAT, "tensor %s: element count overflows", name);
        numel *= (uint64_t)v;
        t->t.shape[i] = v;
    }
    /* numel <= 2^62 here, so numel * 4 can still wrap (to 0 for exactly 2^62): bound
     * the byte count itself before comparing it with the stored range */
    if (numel > UINT64_MAX / cvlm_dtype_size(t->t.dtype))
        return cvlm_errf(CVLM_EFORMAT, "tensor %s: byte count overflows", name);
    json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
    if (!json_is_integer(jb) || !json_is_integer(je) || json_integer_value(jb) < 0 ||
        json_integer_value(je) < json_integer_value(jb))
        return cvlm_errf(CVLM_EFORMAT, "tensor %s: bad data_offsets", name);
    begin = (uint64_t)json_integer_value(jb);
    end = (uint64_t)json_integer_value(je);
    if (end > data_size)
        return cvlm_errf(CVLM_EFORMAT,
                         "tensor %s: data_offsets [%llu, %llu] beyond the data section "
                         "(%llu bytes)",
                         name, (unsigned long long)begin, (unsigned long long)end,
                         (unsigned long long)data_size);
    if (end - begin != numel * cvlm_dtype_size(t->t.dtype))
        return cvlm_errf(CVLM_ESHAPE, "tensor %s: %llu bytes stored, shape and dtype need %llu",
                         name, (unsigned long long)(end - begin),
                         (unsigned long long)(numel * cvlm_dtype_size(t->t.dtype)));
    t->nbytes = (size_t)(end - begin);
    t->t.data = (const void *)(uintptr_t)begin; /* offset for now; rebased by the caller */
    return 0;
}

static int cmp_offset(const void *a, const void *b)
{
    uintptr_t x = (uintptr_t)((const struct cvlm_st_tensor *)a)->t.data;
    uintptr_t y = (uintptr_t)((const struct cvlm_st_tensor *)b)->t.data;
    return x < y ? -1 : x > y;
}

static int check_metadata(json_t *md)
{
    const char *k;
    json_t *v;
    if (!json_is_object(md))
        return cvlm_errf(CVLM_EFORMAT, "__metadata__ must be an object");
    json_object_foreach (md, k, v)
        if (!json_is_string(v))
            return cvlm_errf(CVLM_EFORMAT, "__metadata__ value of %s is not a string", k);
    return 0;
}

/* Header fields -> fresh tensor array (offsets relative to the data section). */
static int parse_header(json_t *root, uint64_t data_size, struct cvlm_st_tensor **out,
                        size_t *n_out)
{
    size_t n = 0, cap = json_object_size(root);
    struct cvlm_st_tensor *ts = calloc(cap ? cap : 1, sizeof(*ts));
    const char *key;
    json_t *val;
    int rc = 0;

    if (!ts)
        return cvlm_errf(CVLM_ENOMEM, "out of memory for %zu tensors", cap);
    json_object_foreach (root, key, val) {
        if (!strcmp(key, "__metadata__")) {
            if ((rc = check_metadata(val)))
                goto fail;
            continue;
        }
        if ((rc = parse_entry(key, val, data_size, &ts[n])))
            goto fail;
        if (!(ts[n].name = strdup(key))) {
            rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
            goto fail;
        }
        n++;
    }
    /* Overlap check: sorted by begin, each tensor must start at or after the previous
     * one's end. Zero-byte tensors may share an offset with anything. */
    qsort(ts, n, sizeof(*ts), cmp_offset);
    for (size_t i = 1; i < n; i++) {
        uint64_t prev_end = (uintptr_t)ts[i - 1].t.data + ts[i - 1].nbytes;
        if (ts[i].nbytes && ts[i - 1].nbytes && (uintptr_t)ts[i].t.data < prev_end) {
            rc = cvlm_errf(CVLM_EFORMAT, "tensors %s and %s overlap in the data section",
                           ts[i - 1].name, ts[i].name);
            goto fail;
        }
    }
    *out = ts;
    *n_out = n;
    return 0;
fail:
    for (size_t i = 0; i < n; i++)
        free(ts[i].name);
    free(ts);
    return rc;
}

int cvlm_st_parse(const void *buf, size_t size, int file, struct cvlm_st_tensor **tensors,
                  size_t *n)
{
    const unsigned char *p = buf;
    uint64_t hlen;
    json_error_t jerr;
    json_t *root;
    struct cvlm_st_tensor *ts = NULL, *all;
    size_t nt = 0;
    int rc;

    if (size < 8)
        return cvlm_errf(CVLM_EFORMAT, "file of %zu bytes is too short for a header", size);
    read_u64_le(p, &hlen);
    if (hlen > CVLM_ST_MAX_HEADER)
        return cvlm_errf(CVLM_ETOOBIG, "header of %llu bytes exceeds the %u-byte limit",
                         (unsigned long long)hlen, CVLM_ST_MAX_HEADER);
    if (hlen > size - 8)
        return cvlm_errf(CVLM_EFORMAT, "header length %llu beyond the end of the file (%zu bytes)",
                         (unsigned long long)hlen, size);
    if (hlen < 2 || p[8] != '{')
        return cvlm_errf(CVLM_EFORMAT, "header is not a JSON object");
    root = json_loadb((const char *)p + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return cvlm_errf(CVLM_EFORMAT, "header JSON: %s (byte %d)", jerr.text, jerr.position);
    if (!json_is_object(root)) {
        json_decref(root);
        return cvlm_errf(CVLM_EFORMAT, "header is not a JSON object");
    }
    rc = parse_header(root, size - 8 - hlen, &ts, &nt);
    json_decref(root);
    if (rc)
        return rc;
    all = realloc(*tensors, (*n + nt + 1) * sizeof(*all));
    if (!all) {
        for (size_t i = 0; i < nt; i++)
            free(ts[i].name);
        free(ts);
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < nt; i++) {
        ts[i].file = file;
        ts[i].t.data = p + 8 + hlen + (uintptr_t)ts[i].t.data;
        all[*n + i] = ts[i];
    }
    free(ts);
    *tensors = all;
    *n += nt;
    return 0;
}

/* ---- files, shards and the name index ------------------------------------------------ */

static int map_file(const char *path, struct cvlm_st_file *f)
{
    struct stat sb;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return cvlm_errf(errno == ENOENT ? CVLM_ENOENT : CVLM_EIO, "%s: %s", path, strerror(errno));
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return cvlm_errf(CVLM_EIO, "%s: not a regular file", path);
    }
    f->size = (size_t)sb.st_size;
    f->map = NULL;
    if (f->size) {
        f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (f->map == MAP_FAILED) {
            f->map = NULL;
            close(fd);
            return cvlm_errf(CVLM_EIO, "%s: mmap: %s", path, strerror(errno));
        }
    }
    close(fd);
    if (!(f->path = strdup(path)))
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    return 0;
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(((const struct cvlm_st_tensor *)a)->name,
                  ((const struct cvlm_st_tensor *)b)->name);
}

/* Tensors whose data is not aligned to the element size get an aligned private copy, so
 * kernels may always load elements directly. Real checkpoints pad headers to 8 bytes, so
 * this only triggers on unusual (but valid) files. */
static int align_tensors(struct cvlm_safetensors *st)
{
    for (size_t i = 0; i < st->n_tensors; i++) {
        struct cvlm_st_tensor *t = &st->tensors[i];
        size_t es = cvlm_dtype_size(t->t.dtype);
        void *copy, **list;
        if ((uintptr_t)t->t.data % es == 0)
            continue;
        copy = aligned_alloc(64, (t->nbytes + 63) / 64 * 64);
        list = realloc(st->copies, (st->n_copies + 1) * sizeof(*list));
        if (!copy || !list) {
            free(copy);
            if (list)
                st->copies = list;
            return cvlm_errf(CVLM_ENOMEM, "out of memory copying tensor %s", t->name);
        }
        memcpy(copy, t->t.data, t->nbytes);
        st->copies = list;
        st->copies[st->n_copies++] = copy;
        t->t.data = copy;
    }
    return 0;
}

static int add_file(struct cvlm_safetensors *st, const char *path)
{
    struct cvlm_st_file *files = realloc(st->files, (st->n_files + 1) * sizeof(*files));
    int rc;
    if (!files)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    st->files = files;
    memset(&files[st->n_files], 0, sizeof(files[0]));
    rc = map_file(path, &files[st->n_files]);
    st->n_files++; /* counted even on failure so close() unmaps what was mapped */
    if (rc)
        return rc;
    rc = cvlm_st_parse(files[st->n_files - 1].map, files[st->n_files - 1].size, st->n_files - 1,
                       &st->tensors, &st->n_tensors);
    if (rc) {
        char detail[512];
        snprintf(detail, sizeof(detail), "%s", cvlm_last_error());
        return cvlm_errf(rc, "%s: %s", path, detail);
    }
    return 0;
}

/* A shard name from the index must be a plain file name in the checkpoint directory. */
static int safe_shard_name(const char *s)
{
    return *s && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..") && strlen(s) < 256;
}

/* Opens every shard the index names, then checks that the index and the shard headers
 * agree exactly: each mapped tensor lives in the file the index says, and no shard holds
 * a tensor the index does not list. */
static int open_index(struct cvlm_safetensors *st, const char *dir, const char *index_path)
{
    json_error_t jerr;
    json_t *root = json_load_file(index_path, JSON_REJECT_DUPLICATES, &jerr), *map, *v;
    const char *key;
    char path[4096];
    int rc = 0;

    if (!root)
        return cvlm_errf(CVLM_EFORMAT, "%s: %s (line %d)", index_path, jerr.text, jerr.line);
    map = json_object_get(root, "weight_map");
    if (!json_is_object(map) || !json_object_size(map)) {
        rc = cvlm_errf(CVLM_EFORMAT, "%s: no weight_map object", index_path);
        goto out;
    }
    json_object_foreach (map, key, v) {
        const char *fn = json_is_string(v) ? json_string_value(v) : "";
        int seen = 0;
        if (!safe_shard_name(fn)) {
            rc = cvlm_errf(CVLM_EFORMAT, "%s: tensor %s: bad shard file name", index_path, key);
            goto out;
        }
        snprintf(path, sizeof(path), "%s/%s", dir, fn);
        for (int i = 0; i < st->n_files && !seen; i++)
            seen = !strcmp(st->files[i].path, path);
        if (!seen && (rc = add_file(st, path)))
            goto out;
    }
    for (size_t i = 0; i < st->n_tensors; i++) {
        const struct cvlm_st_tensor *t = &st->tensors[i];
        json_t *fv = json_object_get(map, t->name);
        const char *base = strrchr(st->files[t->file].path, '/') + 1;
        if (!fv || strcmp(json_string_value(fv), base)) {
            rc = cvlm_errf(CVLM_EFORMAT, "%s: tensor %s is in %s but the index %s", index_path,
                           t->name, base, fv ? "names another shard" : "does not list it");
            goto out;
        }
    }
    if (st->n_tensors != json_object_size(map))
        rc = cvlm_errf(CVLM_EFORMAT, "%s: lists %zu tensors, the shards hold %zu", index_path,
                       json_object_size(map), st->n_tensors);
out:
    json_decref(root);
    return rc;
}

static int is_dir(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

int cvlm_st_open(const char *path, struct cvlm_safetensors **out)
{
    struct cvlm_safetensors *st = calloc(1, sizeof(*st));
    char buf[4096];
    int rc;

    *out = NULL;
    if (!st)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    if (!is_dir(path)) {
        rc = add_file(st, path);
    } else {
        snprintf(buf, sizeof(buf), "%s/model.safetensors", path);
        if (access(buf, F_OK) == 0) {
            rc = add_file(st, buf);
        } else {
            snprintf(buf, sizeof(buf), "%s/model.safetensors.index.json", path);
            if (access(buf, F_OK) != 0)
                rc = cvlm_errf(CVLM_ENOENT,
                               "%s: neither model.safetensors nor model.safetensors.index.json",
                               path);
            else
                rc = open_index(st, path, buf);
        }
    }
    if (rc)
        goto fail;
    qsort(st->tensors, st->n_tensors, sizeof(st->tensors[0]), cmp_name);
    for (size_t i = 1; i < st->n_tensors; i++)
        if (!strcmp(st->tensors[i - 1].name, st->tensors[i].name)) {
            rc = cvlm_errf(CVLM_EFORMAT, "tensor %s appears in more than one shard",
                           st->tensors[i].name);
            goto fail;
        }
    if ((rc = align_tensors(st)))
        goto fail;
    *out = st;
    return 0;
fail:
    cvlm_st_close(st);
    return rc;
}

const struct cvlm_st_tensor *cvlm_st_find(const struct cvlm_safetensors *st, const char *name)
{
    struct cvlm_st_tensor key = {.name = (char *)name};
    if (!st->n_tensors)
        return NULL;
    return bsearch(&key, st->tensors, st->n_tensors, sizeof(key), cmp_name);
}

void cvlm_st_close(struct cvlm_safetensors *st)
{
    if (!st)
        return;
    for (size_t i = 0; i < st->n_tensors; i++)
        free(st->tensors[i].name);
    free(st->tensors);
    for (size_t i = 0; i < st->n_copies; i++)
        free(st->copies[i]);
    free(st->copies);
    for (int i = 0; i < st->n_files; i++) {
        if (st->files[i].map)
            munmap(st->files[i].map, st->files[i].size);
        free(st->files[i].path);
    }
    free(st->files);
    free(st);
}
