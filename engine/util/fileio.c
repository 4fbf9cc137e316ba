/* fileio.c - whole-file reads with a size bound (see fileio.h). */
#include "engine/util/fileio.h"

#include "engine/error.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int cvlm_read_file(const char *path, size_t max, unsigned char **buf, size_t *len)
{
    struct stat sb;
    FILE *f = fopen(path, "rb");
    *buf = NULL;
    *len = 0;
    if (!f)
        return cvlm_errf(errno == ENOENT ? CVLM_ENOENT : CVLM_EIO, "%s: %s", path, strerror(errno));
    if (fstat(fileno(f), &sb) || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return cvlm_errf(CVLM_EIO, "%s: not a regular file", path);
    }
    if ((unsigned long long)sb.st_size > max) {
        fclose(f);
        return cvlm_errf(CVLM_ETOOBIG, "%s: %lld bytes, more than the %zu allowed", path,
                         (long long)sb.st_size, max);
    }
    size_t n = (size_t)sb.st_size;
    unsigned char *b = malloc(n + 1);
    if (!b || fread(b, 1, n, f) != n) {
        free(b);
        fclose(f);
        return cvlm_errf(b ? CVLM_EIO : CVLM_ENOMEM, "%s: read failed", path);
    }
    fclose(f);
    b[n] = 0;
    *buf = b;
    *len = n;
    return 0;
}
