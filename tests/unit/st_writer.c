/* st_writer.c - safetensors writer for tests (see st_writer.h). */
#include "tests/unit/st_writer.h"

#include "tests/unit/harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void put_u64(unsigned char *p, unsigned long long v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

int st_write_raw(const char *path, const char *header, long long hlen, const void *data,
                 size_t data_len)
{
    FILE *f = fopen(path, "wb");
    unsigned char len[8];
    int rc = 0;
    if (!f)
        return -1;
    put_u64(len, hlen < 0 ? strlen(header) : (unsigned long long)hlen);
    if (fwrite(len, 1, 8, f) != 8 || fwrite(header, 1, strlen(header), f) != strlen(header) ||
        (data_len && fwrite(data, 1, data_len, f) != data_len))
        rc = -1;
    if (fclose(f))
        rc = -1;
    return rc;
}

int st_write(const char *path, const struct st_entry *e, size_t n, int no_pad)
{
    size_t cap = 256 + n * 256, off = 0, total = 0;
    char *h = malloc(cap + 8);
    unsigned char *data;
    int rc;
    if (!h)
        return -1;
    off += (size_t)snprintf(h + off, cap - off, "{");
    for (size_t i = 0; i < n; i++) {
        off += (size_t)snprintf(h + off, cap - off, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[",
                                i ? "," : "", e[i].name, e[i].dtype);
        for (int d = 0; d < e[i].ndim; d++)
            off += (size_t)snprintf(h + off, cap - off, "%s%lld", d ? "," : "",
                                    (long long)e[i].shape[d]);
        off += (size_t)snprintf(h + off, cap - off, "],\"data_offsets\":[%zu,%zu]}", total,
                                total + e[i].nbytes);
        total += e[i].nbytes;
    }
    off += (size_t)snprintf(h + off, cap - off, ",\"__metadata__\":{\"format\":\"pt\"}}");
    /* normal: pad so the data section starts 8-aligned; no_pad: make it start at an odd
     * offset on purpose */
    while (no_pad ? (off + 8) % 2 == 0 : (off + 8) % 8 != 0)
        h[off++] = ' ';
    h[off] = 0;
    data = malloc(total + 1);
    if (!data) {
        free(h);
        return -1;
    }
    for (size_t i = 0, p = 0; i < n; p += e[i].nbytes, i++)
        memcpy(data + p, e[i].data, e[i].nbytes);
    rc = st_write_raw(path, h, -1, data, total);
    free(data);
    free(h);
    return rc;
}

int st_copy_file(const char *from, const char *to)
{
    size_t len;
    unsigned char *buf = cvlm_test_read_file(from, &len);
    int rc;
    if (!buf)
        return -1;
    rc = cvlm_test_write_file(to, buf, len);
    free(buf);
    return rc;
}
