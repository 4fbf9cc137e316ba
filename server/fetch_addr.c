/* fetch_addr.c - the address classifier and the host allow-list (see fetch_addr.h).
 *
 * Both tables list what is NOT public; the first matching range wins, so the metadata
 * address comes before the link-local range that holds it. Everything unknown to the
 * tables is public: this is a deny-list of address space, the allow-list of hosts is the
 * operator's (--allowed-media-domains) and is checked separately, on names.
 */
#include "server/fetch_addr.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

struct range {
    unsigned char net[16]; /* IPv4: the first 4 bytes */
    int bits;
    enum cvlm_addr_class cls;
};

static const struct range v4_ranges[] = {
    {{169, 254, 169, 254}, 32, CVLM_ADDR_METADATA},
    {{0}, 8, CVLM_ADDR_UNSPECIFIED},
    {{10}, 8, CVLM_ADDR_PRIVATE},
    {{100, 64}, 10, CVLM_ADDR_CGNAT},
    {{127}, 8, CVLM_ADDR_LOOPBACK},
    {{169, 254}, 16, CVLM_ADDR_LINK_LOCAL},
    {{172, 16}, 12, CVLM_ADDR_PRIVATE},
    {{192, 0, 0}, 24, CVLM_ADDR_RESERVED}, /* IETF protocol assignments */
    {{192, 0, 2}, 24, CVLM_ADDR_RESERVED}, /* documentation (TEST-NET-1) */
    {{192, 168}, 16, CVLM_ADDR_PRIVATE},
    {{198, 18}, 15, CVLM_ADDR_RESERVED},      /* benchmarking */
    {{198, 51, 100}, 24, CVLM_ADDR_RESERVED}, /* documentation (TEST-NET-2) */
    {{203, 0, 113}, 24, CVLM_ADDR_RESERVED},  /* documentation (TEST-NET-3) */
    {{224}, 4, CVLM_ADDR_MULTICAST},
    {{240}, 4, CVLM_ADDR_RESERVED}, /* future use, and 255.255.255.255 (broadcast) */
};

static const struct range v6_ranges[] = {
    {{0xfd, 0x00, 0x0e, 0xc2, [14] = 0x02, [15] = 0x54}, 128, CVLM_ADDR_METADATA},
    {{[15] = 1}, 128, CVLM_ADDR_LOOPBACK},
    {{0}, 128, CVLM_ADDR_UNSPECIFIED},
    {{0}, 96, CVLM_ADDR_RESERVED},                                  /* IPv4-compatible */
    {{0x01, 0x00}, 64, CVLM_ADDR_RESERVED},                         /* discard-only */
    {{0x00, 0x64, 0xff, 0x9b, 0x00, 0x01}, 48, CVLM_ADDR_RESERVED}, /* local-use NAT64 */
    {{0x20, 0x01, 0x00, 0x00}, 32, CVLM_ADDR_RESERVED},             /* Teredo */
    {{0x20, 0x01, 0x0d, 0xb8}, 32, CVLM_ADDR_RESERVED},             /* documentation */
    {{0xfc}, 7, CVLM_ADDR_UNIQUE_LOCAL},
    {{0xfe, 0x80}, 10, CVLM_ADDR_LINK_LOCAL},
    {{0xfe, 0xc0}, 10, CVLM_ADDR_PRIVATE}, /* site-local (deprecated) */
    {{0xff}, 8, CVLM_ADDR_MULTICAST},
};

/* Whether the first `bits` bits of a equal those of net. */
static int prefix_match(const unsigned char *a, const unsigned char *net, int bits)
{
    int whole = bits / 8, rest = bits % 8;
    if (memcmp(a, net, (size_t)whole))
        return 0;
    if (!rest)
        return 1;
    unsigned char mask = (unsigned char)(0xff << (8 - rest));
    return (a[whole] & mask) == (net[whole] & mask);
}

static enum cvlm_addr_class lookup(const unsigned char *a, const struct range *r, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (prefix_match(a, r[i].net, r[i].bits))
            return r[i].cls;
    return CVLM_ADDR_PUBLIC;
}

enum cvlm_addr_class cvlm_addr_classify_v4(const unsigned char a[4])
{
    return lookup(a, v4_ranges, sizeof(v4_ranges) / sizeof(v4_ranges[0]));
}

enum cvlm_addr_class cvlm_addr_classify_v6(const unsigned char a[16])
{
    static const unsigned char mapped[12] = {[10] = 0xff, [11] = 0xff};
    static const unsigned char translated[12] = {[8] = 0xff, [9] = 0xff};
    static const unsigned char nat64[12] = {0x00, 0x64, 0xff, 0x9b};
    /* forms that reach an IPv4 address: judged by that address */
    if (!memcmp(a, mapped, 12) || !memcmp(a, translated, 12) || !memcmp(a, nat64, 12))
        return cvlm_addr_classify_v4(a + 12);
    if (a[0] == 0x20 && a[1] == 0x02) /* 6to4: 2002:AABB:CCDD::/48 carries A.B.C.D */
        return cvlm_addr_classify_v4(a + 2);
    return lookup(a, v6_ranges, sizeof(v6_ranges) / sizeof(v6_ranges[0]));
}

enum cvlm_addr_class cvlm_addr_classify(const struct sockaddr *sa)
{
    if (sa && sa->sa_family == AF_INET)
        return cvlm_addr_classify_v4(
            (const unsigned char *)&((const struct sockaddr_in *)sa)->sin_addr);
    if (sa && sa->sa_family == AF_INET6)
        return cvlm_addr_classify_v6(
            (const unsigned char *)&((const struct sockaddr_in6 *)sa)->sin6_addr);
    return CVLM_ADDR_RESERVED;
}

const char *cvlm_addr_class_name(enum cvlm_addr_class c)
{
    switch (c) {
    case CVLM_ADDR_PUBLIC: return "public";
    case CVLM_ADDR_LOOPBACK: return "loopback";
    case CVLM_ADDR_PRIVATE: return "private";
    case CVLM_ADDR_UNIQUE_LOCAL: return "unique-local";
    case CVLM_ADDR_LINK_LOCAL: return "link-local";
    case CVLM_ADDR_METADATA: return "cloud metadata";
    case CVLM_ADDR_UNSPECIFIED: return "unspecified";
    case CVLM_ADDR_CGNAT: return "shared (CGNAT)";
    case CVLM_ADDR_MULTICAST: return "multicast";
    case CVLM_ADDR_RESERVED: return "reserved";
    }
    return "reserved";
}

/* ---- the host allow-list --------------------------------------------------------------- */

/* [p, p+n) without surrounding spaces, IPv6 brackets and (names) one trailing dot. */
static void strip(const char **p, size_t *n)
{
    while (*n && isspace((unsigned char)**p))
        (*p)++, (*n)--;
    while (*n && isspace((unsigned char)(*p)[*n - 1]))
        (*n)--;
    if (*n >= 2 && (*p)[0] == '[' && (*p)[*n - 1] == ']')
        (*p)++, *n -= 2;
    else if (*n > 1 && (*p)[*n - 1] == '.')
        (*n)--;
}

/* Whether one allow-list entry [e, e+en) admits the host [h, h+hn). */
static int entry_matches(const char *e, size_t en, const char *h, size_t hn)
{
    if (en >= 2 && e[0] == '*' && e[1] == '.') /* "*.example.com": strictly below it */
        return hn > en - 1 && !strncasecmp(h + hn - (en - 1), e + 1, en - 1);
    return en == hn && !strncasecmp(h, e, en);
}

int cvlm_host_allowed(const char *list, const char *host)
{
    size_t hn = host ? strlen(host) : 0;
    strip(&host, &hn);
    if (!list || !hn)
        return 0;
    for (const char *p = list; *p;) {
        size_t n = strcspn(p, ",");
        const char *e = p;
        size_t en = n;
        strip(&e, &en);
        if (en && entry_matches(e, en, host, hn))
            return 1;
        p += n + (p[n] == ',');
    }
    return 0;
}

/* A host name: letters, digits, '-', '_' and '.', no empty label. */
static int valid_name(const char *s, size_t n)
{
    if (!n || s[0] == '.' || n > 253)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(isalnum(c) || c == '-' || c == '_' || c == '.'))
            return 0;
        if (c == '.' && i + 1 < n && s[i + 1] == '.')
            return 0;
    }
    return 1;
}

static int valid_entry(const char *e, size_t n)
{
    char buf[64];
    unsigned char addr[16];
    if (n >= 2 && e[0] == '*' && e[1] == '.')
        return valid_name(e + 2, n - 2);
    if (memchr(e, ':', n)) { /* only an IPv6 literal has a colon (no ports in entries) */
        if (n >= sizeof(buf))
            return 0;
        memcpy(buf, e, n);
        buf[n] = 0;
        return inet_pton(AF_INET6, buf, addr) == 1;
    }
    return valid_name(e, n);
}

int cvlm_host_list_check(const char *list, char *err, size_t errlen)
{
    for (const char *p = list ? list : ""; *p;) {
        size_t n = strcspn(p, ",");
        const char *e = p;
        size_t en = n;
        strip(&e, &en);
        if (en && !valid_entry(e, en)) {
            snprintf(err, errlen,
                     "'%.*s' is not a host name, an IP address or *.suffix (no ports, "
                     "no schemes)",
                     (int)(en > 200 ? 200 : en), e);
            return -1;
        }
        p += n + (p[n] == ',');
    }
    return 0;
}
