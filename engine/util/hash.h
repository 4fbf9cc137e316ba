/* hash.h - the keyed 64-bit hash of the caches (SipHash-2-4).
 *
 * The prefix cache and the vision cache find entries by a 64-bit hash of what a client
 * sent (token ids, image pixels). With a public hash (FNV) a client could construct two
 * prompts or images with the same hash and be served another request's KV blocks or image
 * features (a cross-request leak or poisoning). SipHash with a key drawn from the kernel
 * at first use makes such collisions as hard to find as guessing the key; the key never
 * leaves the process. Thread-safe.
 */
#ifndef CVLM_HASH_H
#define CVLM_HASH_H

#include <stddef.h>
#include <stdint.h>

/* SipHash-2-4 of data under the process key, tweaked by `seed` (domain separation). */
uint64_t cvlm_hash64(const void *data, size_t n, uint64_t seed);
/* The same function under an explicit 128-bit key (tests: the reference vectors). */
uint64_t cvlm_siphash24(const uint64_t key[2], const void *data, size_t n);

#endif
