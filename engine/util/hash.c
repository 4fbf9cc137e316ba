/* hash.c - SipHash-2-4 (Aumasson & Bernstein, "SipHash: a fast short-input PRF", 2012)
 * and the process key (see hash.h). Written from the paper's description: four 64-bit
 * lanes initialized from the key and "somepseudorandomlygeneratedbytes", two rounds per
 * 8-byte little-endian message word, the length in the last word's top byte, four
 * finalization rounds. */
#include "engine/util/hash.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))

static void sipround(uint64_t v[4])
{
    v[0] += v[1], v[1] = ROTL(v[1], 13), v[1] ^= v[0], v[0] = ROTL(v[0], 32);
    v[2] += v[3], v[3] = ROTL(v[3], 16), v[3] ^= v[2];
    v[0] += v[3], v[3] = ROTL(v[3], 21), v[3] ^= v[0];
    v[2] += v[1], v[1] = ROTL(v[1], 17), v[1] ^= v[2], v[2] = ROTL(v[2], 32);
}

static uint64_t le64(const unsigned char *p)
{
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--)
        x = x << 8 | p[i];
    return x;
}

uint64_t cvlm_siphash24(const uint64_t key[2], const void *data, size_t n)
{
    const unsigned char *p = data;
    uint64_t v[4] = {key[0] ^ 0x736f6d6570736575ull, key[1] ^ 0x646f72616e646f6dull,
                     key[0] ^ 0x6c7967656e657261ull, key[1] ^ 0x7465646279746573ull};
    size_t full = n / 8 * 8;
    for (size_t i = 0; i < full; i += 8) {
        uint64_t m = le64(p + i);
        v[3] ^= m;
        sipround(v), sipround(v);
        v[0] ^= m;
    }
    unsigned char last[8] = {0};
    memcpy(last, p + full, n - full);
    uint64_t m = le64(last) | (uint64_t)(n & 0xff) << 56;
    v[3] ^= m;
    sipround(v), sipround(v);
    v[0] ^= m;
    v[2] ^= 0xff;
    for (int r = 0; r < 4; r++)
        sipround(v);
    return v[0] ^ v[1] ^ v[2] ^ v[3];
}

static uint64_t process_key[2];
static pthread_once_t key_once = PTHREAD_ONCE_INIT;

static void init_key(void)
{
    if (getrandom(process_key, sizeof(process_key), 0) == (ssize_t)sizeof(process_key))
        return;
    /* no getrandom (very old kernel): a key nobody outside can observe either */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    process_key[0] = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull ^ (uint64_t)getpid();
    process_key[1] = (uint64_t)ts.tv_sec ^ (uint64_t)(uintptr_t)&ts;
}

uint64_t cvlm_hash64(const void *data, size_t n, uint64_t seed)
{
    pthread_once(&key_once, init_key);
    uint64_t k[2] = {process_key[0] ^ seed, process_key[1]};
    return cvlm_siphash24(k, data, n);
}
