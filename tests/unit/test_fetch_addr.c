/* test_fetch_addr.c - what an image fetch may connect to (server/fetch_addr.c): every
 * forbidden IPv4 and IPv6 range at its edges (first and last address inside, the
 * neighbours outside), the IPv6 forms that carry an IPv4 address, socket addresses, and
 * the host allow-list (exact hosts, *.suffix, case, trailing dot, brackets). */
#include "server/fetch_addr.h"
#include "tests/unit/harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

/* The class of an address literal (IPv4 or IPv6); -1 if it does not parse. */
static int class_of(const char *lit)
{
    unsigned char a[16];
    if (inet_pton(AF_INET, lit, a) == 1)
        return (int)cvlm_addr_classify_v4(a);
    if (inet_pton(AF_INET6, lit, a) == 1)
        return (int)cvlm_addr_classify_v6(a);
    return -1;
}

struct expect {
    const char *addr;
    enum cvlm_addr_class cls;
};

static void check_all(const struct expect *e, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int got = class_of(e[i].addr);
        CHECKF(got == (int)e[i].cls, "%s: %s, expected %s", e[i].addr,
               got < 0 ? "does not parse" : cvlm_addr_class_name((enum cvlm_addr_class)got),
               cvlm_addr_class_name(e[i].cls));
    }
}

#define CHECK_ALL(table) check_all(table, sizeof(table) / sizeof(table[0]))

TEST(fetch_addr_ipv4_edges)
{
    static const struct expect t[] = {
        /* unspecified / "this network" 0.0.0.0/8 */
        {"0.0.0.0", CVLM_ADDR_UNSPECIFIED},
        {"0.255.255.255", CVLM_ADDR_UNSPECIFIED},
        {"1.0.0.0", CVLM_ADDR_PUBLIC},
        /* private 10/8 */
        {"9.255.255.255", CVLM_ADDR_PUBLIC},
        {"10.0.0.0", CVLM_ADDR_PRIVATE},
        {"10.0.0.1", CVLM_ADDR_PRIVATE},
        {"10.255.255.255", CVLM_ADDR_PRIVATE},
        {"11.0.0.0", CVLM_ADDR_PUBLIC},
        /* CGNAT 100.64/10 */
        {"100.63.255.255", CVLM_ADDR_PUBLIC},
        {"100.64.0.0", CVLM_ADDR_CGNAT},
        {"100.127.255.255", CVLM_ADDR_CGNAT},
        {"100.128.0.0", CVLM_ADDR_PUBLIC},
        /* loopback 127/8 */
        {"126.255.255.255", CVLM_ADDR_PUBLIC},
        {"127.0.0.0", CVLM_ADDR_LOOPBACK},
        {"127.0.0.1", CVLM_ADDR_LOOPBACK},
        {"127.255.255.255", CVLM_ADDR_LOOPBACK},
        {"128.0.0.0", CVLM_ADDR_PUBLIC},
        /* link-local 169.254/16, the metadata address inside it */
        {"169.253.255.255", CVLM_ADDR_PUBLIC},
        {"169.254.0.0", CVLM_ADDR_LINK_LOCAL},
        {"169.254.169.253", CVLM_ADDR_LINK_LOCAL},
        {"169.254.169.254", CVLM_ADDR_METADATA},
        {"169.254.169.255", CVLM_ADDR_LINK_LOCAL},
        {"169.254.255.255", CVLM_ADDR_LINK_LOCAL},
        {"169.255.0.0", CVLM_ADDR_PUBLIC},
        /* private 172.16/12 */
        {"172.15.255.255", CVLM_ADDR_PUBLIC},
        {"172.16.0.0", CVLM_ADDR_PRIVATE},
        {"172.31.255.255", CVLM_ADDR_PRIVATE},
        {"172.32.0.0", CVLM_ADDR_PUBLIC},
        /* 192.0.0/24, documentation, private 192.168/16 */
        {"192.0.0.0", CVLM_ADDR_RESERVED},
        {"192.0.0.255", CVLM_ADDR_RESERVED},
        {"192.0.1.0", CVLM_ADDR_PUBLIC},
        {"192.0.2.1", CVLM_ADDR_RESERVED},
        {"192.167.255.255", CVLM_ADDR_PUBLIC},
        {"192.168.0.0", CVLM_ADDR_PRIVATE},
        {"192.168.255.255", CVLM_ADDR_PRIVATE},
        {"192.169.0.0", CVLM_ADDR_PUBLIC},
        /* benchmarking 198.18/15 */
        {"198.17.255.255", CVLM_ADDR_PUBLIC},
        {"198.18.0.0", CVLM_ADDR_RESERVED},
        {"198.19.255.255", CVLM_ADDR_RESERVED},
        {"198.20.0.0", CVLM_ADDR_PUBLIC},
        /* multicast 224/4, reserved 240/4 and broadcast */
        {"223.255.255.255", CVLM_ADDR_PUBLIC},
        {"224.0.0.0", CVLM_ADDR_MULTICAST},
        {"239.255.255.255", CVLM_ADDR_MULTICAST},
        {"240.0.0.0", CVLM_ADDR_RESERVED},
        {"255.255.255.255", CVLM_ADDR_RESERVED},
        /* ordinary public addresses */
        {"8.8.8.8", CVLM_ADDR_PUBLIC},
        {"93.184.216.34", CVLM_ADDR_PUBLIC},
    };
    CHECK_ALL(t);
}

TEST(fetch_addr_ipv6_edges)
{
    static const struct expect t[] = {
        {"::", CVLM_ADDR_UNSPECIFIED},
        {"::1", CVLM_ADDR_LOOPBACK},
        {"::2", CVLM_ADDR_RESERVED}, /* IPv4-compatible (deprecated) */
        {"::ffff:ffff", CVLM_ADDR_RESERVED},
        /* unique-local fc00::/7 and the metadata address inside it */
        {"fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", CVLM_ADDR_PUBLIC},
        {"fc00::", CVLM_ADDR_UNIQUE_LOCAL},
        {"fd00::1", CVLM_ADDR_UNIQUE_LOCAL},
        {"fd00:ec2::254", CVLM_ADDR_METADATA},
        {"fd00:ec2::253", CVLM_ADDR_UNIQUE_LOCAL},
        {"fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", CVLM_ADDR_UNIQUE_LOCAL},
        {"fe00::", CVLM_ADDR_PUBLIC},
        /* link-local fe80::/10, site-local fec0::/10 */
        {"fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", CVLM_ADDR_PUBLIC},
        {"fe80::", CVLM_ADDR_LINK_LOCAL},
        {"fe80::1", CVLM_ADDR_LINK_LOCAL},
        {"febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", CVLM_ADDR_LINK_LOCAL},
        {"fec0::", CVLM_ADDR_PRIVATE},
        {"feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", CVLM_ADDR_PRIVATE},
        /* multicast ff00::/8 */
        {"ff00::", CVLM_ADDR_MULTICAST},
        {"ff02::1", CVLM_ADDR_MULTICAST},
        {"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", CVLM_ADDR_MULTICAST},
        /* documentation, Teredo, discard, local-use NAT64 */
        {"2001:db8::1", CVLM_ADDR_RESERVED},
        {"2001::1", CVLM_ADDR_RESERVED},
        {"100::1", CVLM_ADDR_RESERVED},
        {"64:ff9b:1::1", CVLM_ADDR_RESERVED},
        /* public unicast */
        {"2001:4860:4860::8888", CVLM_ADDR_PUBLIC},
        {"2a00:1450:4001:80b::200e", CVLM_ADDR_PUBLIC},
        {"2606:4700::1111", CVLM_ADDR_PUBLIC},
    };
    CHECK_ALL(t);
}

/* Every IPv6 spelling of an IPv4 address takes the IPv4 address's class. */
TEST(fetch_addr_ipv4_in_ipv6)
{
    static const struct expect t[] = {
        /* mapped ::ffff:0:0/96 */
        {"::ffff:127.0.0.1", CVLM_ADDR_LOOPBACK},
        {"::ffff:7f00:1", CVLM_ADDR_LOOPBACK},
        {"::ffff:10.0.0.1", CVLM_ADDR_PRIVATE},
        {"::ffff:172.16.0.1", CVLM_ADDR_PRIVATE},
        {"::ffff:192.168.1.1", CVLM_ADDR_PRIVATE},
        {"::ffff:169.254.169.254", CVLM_ADDR_METADATA},
        {"::ffff:169.254.1.1", CVLM_ADDR_LINK_LOCAL},
        {"::ffff:100.64.0.1", CVLM_ADDR_CGNAT},
        {"::ffff:0.0.0.0", CVLM_ADDR_UNSPECIFIED},
        {"::ffff:224.0.0.1", CVLM_ADDR_MULTICAST},
        {"::ffff:255.255.255.255", CVLM_ADDR_RESERVED},
        {"::ffff:8.8.8.8", CVLM_ADDR_PUBLIC},
        /* translated ::ffff:0:0:0/96 */
        {"::ffff:0:127.0.0.1", CVLM_ADDR_LOOPBACK},
        {"::ffff:0:8.8.8.8", CVLM_ADDR_PUBLIC},
        /* NAT64 64:ff9b::/96 */
        {"64:ff9b::10.0.0.1", CVLM_ADDR_PRIVATE},
        {"64:ff9b::169.254.169.254", CVLM_ADDR_METADATA},
        {"64:ff9b::8.8.8.8", CVLM_ADDR_PUBLIC},
        /* 6to4 2002:AABB:CCDD::/48 */
        {"2002:7f00:1::", CVLM_ADDR_LOOPBACK},
        {"2002:a00:1::1", CVLM_ADDR_PRIVATE},
        {"2002:a9fe:a9fe::", CVLM_ADDR_METADATA},
        {"2002:808:808::1", CVLM_ADDR_PUBLIC},
    };
    CHECK_ALL(t);
}

TEST(fetch_addr_sockaddr)
{
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons(80)};
    struct sockaddr_in6 in6 = {.sin6_family = AF_INET6, .sin6_port = htons(443)};
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    inet_pton(AF_INET, "169.254.169.254", &in.sin_addr);
    CHECK(cvlm_addr_classify((struct sockaddr *)&in) == CVLM_ADDR_METADATA);
    inet_pton(AF_INET, "1.1.1.1", &in.sin_addr);
    CHECK(cvlm_addr_classify((struct sockaddr *)&in) == CVLM_ADDR_PUBLIC);
    inet_pton(AF_INET6, "::ffff:127.0.0.1", &in6.sin6_addr);
    CHECK(cvlm_addr_classify((struct sockaddr *)&in6) == CVLM_ADDR_LOOPBACK);
    inet_pton(AF_INET6, "2606:4700::1111", &in6.sin6_addr);
    CHECK(cvlm_addr_classify((struct sockaddr *)&in6) == CVLM_ADDR_PUBLIC);
    /* any other family is refused */
    CHECK(cvlm_addr_classify((struct sockaddr *)&un) == CVLM_ADDR_RESERVED);
    CHECK(cvlm_addr_classify(NULL) == CVLM_ADDR_RESERVED);
    CHECK(!strcmp(cvlm_addr_class_name(CVLM_ADDR_METADATA), "cloud metadata"));
}

TEST(fetch_host_allow_list)
{
    const char *list = " images.example.com, *.cdn.example.net ,10.1.2.3,[2001:db8::1], ::2 ";
    /* exact hosts: case-insensitive, one trailing dot ignored */
    CHECK(cvlm_host_allowed(list, "images.example.com"));
    CHECK(cvlm_host_allowed(list, "IMAGES.Example.COM"));
    CHECK(cvlm_host_allowed(list, "images.example.com."));
    CHECK(!cvlm_host_allowed(list, "example.com"));
    CHECK(!cvlm_host_allowed(list, "a.images.example.com"));
    CHECK(!cvlm_host_allowed(list, "images.example.com.evil.org"));
    CHECK(!cvlm_host_allowed(list, "imagesXexample.com"));
    /* *.suffix: strictly below the suffix, on a label boundary */
    CHECK(cvlm_host_allowed(list, "a.cdn.example.net"));
    CHECK(cvlm_host_allowed(list, "a.b.cdn.example.net"));
    CHECK(!cvlm_host_allowed(list, "cdn.example.net"));
    CHECK(!cvlm_host_allowed(list, "evilcdn.example.net"));
    CHECK(!cvlm_host_allowed(list, ".cdn.example.net"));
    /* address literals, IPv6 with or without brackets on either side */
    CHECK(cvlm_host_allowed(list, "10.1.2.3"));
    CHECK(!cvlm_host_allowed(list, "10.1.2.30"));
    CHECK(cvlm_host_allowed(list, "[2001:db8::1]"));
    CHECK(cvlm_host_allowed(list, "[::2]"));
    /* nothing is allowed by an empty list */
    CHECK(!cvlm_host_allowed(NULL, "images.example.com"));
    CHECK(!cvlm_host_allowed("", "images.example.com"));
    CHECK(!cvlm_host_allowed(" , ,", "images.example.com"));
    CHECK(!cvlm_host_allowed(list, ""));
    CHECK(!cvlm_host_allowed(list, NULL));
}

TEST(fetch_host_list_check)
{
    char err[300];
    CHECK(cvlm_host_list_check(NULL, err, sizeof(err)) == 0);
    CHECK(cvlm_host_list_check("", err, sizeof(err)) == 0);
    CHECK(cvlm_host_list_check("a.example.com,*.example.org, 1.2.3.4,[::1],fe80::1", err,
                               sizeof(err)) == 0);
    static const char *const refused[] = {
        "http://a.example.com", "a.example.com:8080", "*",   "*.",
        "a*.example.com",       "a..example.com",     "a/b", "[::1",
    };
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        err[0] = 0;
        CHECKF(cvlm_host_list_check(refused[i], err, sizeof(err)) < 0, "'%s' accepted", refused[i]);
        CHECKF(strstr(err, "is not a host name"), "'%s': message '%s'", refused[i], err);
    }
}
