/* safetensors.h - read-only access to HF safetensors checkpoints (single or sharded).
 *
 * cvlm_st_open() maps every file of a checkpoint (model.safetensors, or the shards named
 * by model.safetensors.index.json), validates each header completely and exposes the
 * tensors sorted by name. Nothing in a file is trusted: lengths, offsets, shapes, dtypes
 * and the index are checked before any tensor byte is reachable, so a hostile file yields
 * an error code with a detail (cvlm_last_error), never an out-of-bounds read.
 *
 * Ownership: the struct owns the mappings; tensor data pointers stay valid until
 * cvlm_st_close(). The mapping is read-only and private.
 */
#ifndef CVLM_SAFETENSORS_H
#define CVLM_SAFETENSORS_H

#include "engine/backend.h"

#include <stddef.h>

/* The largest JSON header accepted (the 17B model's largest is ~60 KB). */
#define CVLM_ST_MAX_HEADER (64u << 20)

struct cvlm_st_tensor {
    char *name;
    struct cvlm_tensor t; /* dtype, shape, data (aligned to the element size) */
    size_t nbytes;
    int file; /* index into the checkpoint's file list */
};

struct cvlm_st_file {
    char *path;
    void *map; /* whole file, PROT_READ */
    size_t size;
    size_t data_off; /* 8 + header length */
};

struct cvlm_safetensors {
    struct cvlm_st_file *files;
    int n_files;
    struct cvlm_st_tensor *tensors; /* sorted by name, names unique */
    size_t n_tensors;
    void **copies; /* aligned copies of tensors whose file offset was misaligned */
    size_t n_copies;
};

/* `path` is a directory (model.safetensors, else model.safetensors.index.json + shards)
 * or a single .safetensors file. */
int cvlm_st_open(const char *path, struct cvlm_safetensors **out);
void cvlm_st_close(struct cvlm_safetensors *st);

/* Binary search by exact name; NULL if absent. */
const struct cvlm_st_tensor *cvlm_st_find(const struct cvlm_safetensors *st, const char *name);

/* Parses one in-memory file image (used by cvlm_st_open, exposed for tests and fuzzing).
 * Appends the tensors to *tensors / *n (realloc'd), tagging them with `file`. */
int cvlm_st_parse(const void *buf, size_t size, int file, struct cvlm_st_tensor **tensors,
                  size_t *n);

#endif
