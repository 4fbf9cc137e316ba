/* st_writer.h - writes safetensors files for tests (valid ones, and hostile ones on purpose).
 *
 * st_write() lays tensors out contiguously in the given order, header padded with spaces
 * to 8 bytes, exactly like the reference writer. st_write_raw() writes an arbitrary header
 * text and data section, with an optional forged header length, for hostile-file tests.
 */
#ifndef CVLM_TEST_ST_WRITER_H
#define CVLM_TEST_ST_WRITER_H

#include <stddef.h>
#include <stdint.h>

struct st_entry {
    const char *name;
    const char *dtype; /* "F32", "F16", "BF16", or anything for hostile tests */
    int ndim;
    int64_t shape[4];
    const void *data;
    size_t nbytes;
};

/* `no_pad` 0 pads the header to 8 bytes (normal); 1 pads it so that the data section
 * starts at an odd offset (misaligned on purpose). Returns 0 on success. */
int st_write(const char *path, const struct st_entry *e, size_t n, int no_pad);

/* Header text as given; hlen < 0 means strlen(header). */
int st_write_raw(const char *path, const char *header, long long hlen, const void *data,
                 size_t data_len);

/* Copies a file, creating the destination. */
int st_copy_file(const char *from, const char *to);

#endif
