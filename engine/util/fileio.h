/* fileio.h - reading a whole (bounded) file into memory. */
#ifndef CVLM_FILEIO_H
#define CVLM_FILEIO_H

#include <stddef.h>

/* Reads `path` into a malloc'd buffer (NUL-terminated, *len excludes the NUL). Files
 * larger than `max` bytes are refused with CVLM_ETOOBIG; a missing one is CVLM_ENOENT. */
int cvlm_read_file(const char *path, size_t max, unsigned char **buf, size_t *len);

#endif
