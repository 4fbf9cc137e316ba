/* utf8.h - well-formed UTF-8, as both tokenizers (SentencePiece's DecodeUTF8 and the
 * byte-level BPE's U+FFFD rule) define it: no overlong form, surrogate, or code point
 * above U+10FFFF. */
#ifndef CVLM_UTF8_H
#define CVLM_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* The sequence at s (n >= 1 bytes available): its length (1..4) when complete and
 * well-formed; 0 when s[0..n) is a proper prefix of a well-formed one (more bytes could
 * complete it); -k when it is invalid, k (1..3) being the length of its maximal
 * well-formed prefix (the bytes one U+FFFD replaces under the "maximal subpart" rule). */
static inline int cvlm_utf8_scan(const uint8_t *s, size_t n)
{
    uint8_t b0 = s[0], lo = 0x80, hi = 0xbf;
    int need;
    if (b0 < 0x80)
        return 1;
    if (b0 < 0xc2 || b0 > 0xf4)
        return -1;
    if (b0 < 0xe0) {
        need = 2;
    } else if (b0 < 0xf0) {
        need = 3;
        lo = b0 == 0xe0 ? 0xa0 : 0x80;
        hi = b0 == 0xed ? 0x9f : 0xbf;
    } else {
        need = 4;
        lo = b0 == 0xf0 ? 0x90 : 0x80;
        hi = b0 == 0xf4 ? 0x8f : 0xbf;
    }
    for (int i = 1; i < need; i++) {
        if ((size_t)i >= n)
            return 0;
        if (s[i] < lo || s[i] > hi)
            return -i;
        lo = 0x80;
        hi = 0xbf;
    }
    return need;
}

#endif
