/* fetch_addr.h - what an image fetch may connect to: the address classifier and the
 * host allow-list.
 *
 * Pure functions, no I/O, no allocation: server/fetch.c asks them about every address
 * libcurl is about to connect to (each hop of a redirect chain, each address of a name)
 * and about the host of every URL before its transfer starts. Only CVLM_ADDR_PUBLIC may
 * ever be connected to; the test-only loopback switch (docs/SECURITY.md) lets
 * CVLM_ADDR_LOOPBACK through and nothing else.
 */
#ifndef CVLM_SERVER_FETCH_ADDR_H
#define CVLM_SERVER_FETCH_ADDR_H

#include <stddef.h>

struct sockaddr;

enum cvlm_addr_class {
    CVLM_ADDR_PUBLIC = 0,   /* routable unicast: the only class fetched from */
    CVLM_ADDR_LOOPBACK,     /* 127.0.0.0/8, ::1 */
    CVLM_ADDR_PRIVATE,      /* 10/8, 172.16/12, 192.168/16, fec0::/10 (site-local) */
    CVLM_ADDR_UNIQUE_LOCAL, /* fc00::/7 */
    CVLM_ADDR_LINK_LOCAL,   /* 169.254/16, fe80::/10 */
    CVLM_ADDR_METADATA,     /* 169.254.169.254, fd00:ec2::254 (cloud instance metadata) */
    CVLM_ADDR_UNSPECIFIED,  /* 0.0.0.0/8 ("this network"), :: */
    CVLM_ADDR_CGNAT,        /* 100.64/10 (shared address space) */
    CVLM_ADDR_MULTICAST,    /* 224/4, ff00::/8 */
    CVLM_ADDR_RESERVED,     /* 240/4 and broadcast, 192.0.0/24, 198.18/15, documentation,
                              * discard, Teredo, local-use NAT64, IPv4-compatible ::/96,
                              * and any address family but IPv4 and IPv6 */
};

/* The class of an IPv4 address (4 bytes, network order). */
enum cvlm_addr_class cvlm_addr_classify_v4(const unsigned char a[4]);
/* The class of an IPv6 address (16 bytes). Forms that carry an IPv4 address (mapped
 * ::ffff:0:0/96, translated ::ffff:0:0:0/96, NAT64 64:ff9b::/96, 6to4 2002::/16) take the
 * class of that IPv4 address, so no spelling of 127.0.0.1 or 10.0.0.1 passes. */
enum cvlm_addr_class cvlm_addr_classify_v6(const unsigned char a[16]);
/* A socket address: AF_INET, AF_INET6, anything else is CVLM_ADDR_RESERVED. */
enum cvlm_addr_class cvlm_addr_classify(const struct sockaddr *sa);
/* "loopback", "private", "cloud metadata", ... for messages. */
const char *cvlm_addr_class_name(enum cvlm_addr_class c);

/* Whether host (as in a URL: a name, an IPv4 literal or a bracketed IPv6 literal) is on
 * the comma-separated allow-list: entries are exact hosts or `*.suffix` (any name ending
 * in `.suffix`, not `suffix` itself). Case-insensitive; one trailing dot of the host is
 * ignored; spaces around entries are ignored; brackets of IPv6 literals are optional on
 * both sides. NULL or "" allows nothing. */
int cvlm_host_allowed(const char *list, const char *host);
/* Checks an allow-list at start-up: every entry a host name, an IP literal or
 * `*.suffix`. Returns 0, or -1 with the offending entry in err. */
int cvlm_host_list_check(const char *list, char *err, size_t errlen);

#endif
