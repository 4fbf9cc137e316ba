/* test_options.c - the option table: config/cogvlm.conf documents every key with its
 * default, precedence default < file < env < CLI, and bad input is refused. */
#include "server/options.h"
#include "tests/unit/harness.h"

#include <stdlib.h>
#include <string.h>

TEST(config_file_documents_every_option)
{
    size_t len;
    char *text = (char *)cvlm_test_read_file("config/cogvlm.conf", &len), line[256];
    REQUIRE(text);
    for (int i = 0; i < cvlm_n_options; i++) {
        const struct cvlm_option *o = &cvlm_options[i];
        snprintf(line, sizeof(line), "\n#%s = %s\n", o->key, *o->def ? o->def : "\"\"");
        CHECKF(strstr(text, line), "config/cogvlm.conf lacks '%s'", line + 1);
    }
    /* and every documented key is a real option */
    for (char *p = strstr(text, "\n#"); p; p = strstr(p + 1, "\n#")) {
        char key[64];
        if (sscanf(p + 2, "%63[a-z_] =", key) == 1 && strstr(p + 2, " = ") &&
            strchr(p + 2, '\n') > strstr(p + 2, " = ")) {
            int found = 0;
            for (int i = 0; i < cvlm_n_options; i++)
                found |= !strcmp(cvlm_options[i].key, key);
            CHECKF(found, "config/cogvlm.conf documents unknown key '%s'", key);
        }
    }
    free(text);
}

/* Writes a config file and parses argv with it. */
static int parse_with(const char *file_text, char **argv, int argc, struct cvlm_server_options *c,
                      char *err)
{
    char path[600], flag[700];
    snprintf(path, sizeof(path), "%s/test.conf", cvlm_test_tmpdir());
    cvlm_test_write_file(path, file_text, strlen(file_text));
    snprintf(flag, sizeof(flag), "--config=%s", path);
    char *args[8] = {"cogvlm-server", flag};
    for (int i = 0; i < argc && i < 6; i++)
        args[2 + i] = argv[i];
    return cvlm_options_parse(c, 2 + argc, args, err, 256);
}

TEST(config_precedence_and_errors)
{
    struct cvlm_server_options c;
    char err[256];
    char *cli[] = {"--port", "3333", "--kv-memory", "1G", "--prefix-cache", "false"};
    unsetenv("COGVLM_PORT");
    REQUIRE(parse_with("port = 1111\nthreads = 3 # comment\n", NULL, 0, &c, err) == 0);
    CHECK(c.port == 1111 && c.threads == 3 && c.max_seqs == 64 && c.kv_memory == 256ull << 20);
    CHECK(!strcmp(c.kv_cache_dtype, "auto"));
    cvlm_options_free(&c);
    char *kvd[] = {"--kv-cache-dtype", "f16"};
    REQUIRE(parse_with("kv_cache_dtype = bf16\n", kvd, 2, &c, err) == 0);
    CHECK(!strcmp(c.kv_cache_dtype, "f16"));
    cvlm_options_free(&c);
    setenv("COGVLM_PORT", "2222", 1);
    REQUIRE(parse_with("port = 1111\n", NULL, 0, &c, err) == 0);
    CHECK(c.port == 2222);
    cvlm_options_free(&c);
    REQUIRE(parse_with("port = 1111\n", cli, 6, &c, err) == 0);
    CHECK(c.port == 3333 && c.kv_memory == 1ull << 30 && c.prefix_cache == 0);
    cvlm_options_free(&c);
    unsetenv("COGVLM_PORT");
    CHECK(parse_with("bogus = 1\n", NULL, 0, &c, err) < 0 && strstr(err, "unknown"));
    cvlm_options_free(&c);
    CHECK(parse_with("port = ten\n", NULL, 0, &c, err) < 0 && strstr(err, "port"));
    cvlm_options_free(&c);
    char *bad[] = {"--no-such-flag", "1"};
    CHECK(parse_with("", bad, 2, &c, err) < 0 && strstr(err, "no-such-flag"));
    cvlm_options_free(&c);
    /* quantize_lm_head: on by default, off by flag; a non-boolean is refused by name */
    REQUIRE(parse_with("", NULL, 0, &c, err) == 0);
    CHECK(c.quantize_lm_head == 1);
    cvlm_options_free(&c);
    char *lmh[] = {"--quantize-lm-head", "off"};
    REQUIRE(parse_with("quantize_lm_head = true\n", lmh, 2, &c, err) == 0);
    CHECK(c.quantize_lm_head == 0);
    cvlm_options_free(&c);
    CHECK(parse_with("quantize_lm_head = maybe\n", NULL, 0, &c, err) < 0 &&
          strstr(err, "quantize_lm_head"));
    cvlm_options_free(&c);
    char *badsize[] = {"--kv-memory", "12Q"};
    CHECK(parse_with("", badsize, 2, &c, err) < 0 && strstr(err, "kv_memory"));
    cvlm_options_free(&c);
    /* the shipped file, uncommented, parses to the defaults */
    size_t len;
    char *text = (char *)cvlm_test_read_file("config/cogvlm.conf", &len);
    REQUIRE(text);
    for (char *p = strstr(text, "\n#"); p; p = strstr(p + 1, "\n#"))
        if (p[2] >= 'a' && p[2] <= 'z' && strchr(p + 2, '=') < strchr(p + 2, '\n'))
            p[1] = ' ';
    REQUIRE(parse_with(text, NULL, 0, &c, err) == 0 || (printf("  %s\n", err), 0));
    CHECK(c.port == 8000 && c.max_body_bytes == 20ull << 20 && c.prefix_cache == 1);
    cvlm_options_free(&c);
    free(text);
}

/* Every numeric option is range-checked at parse time, with the option named (was:
 * --port 84245 listened on 84245 mod 65536 = 18709, silently). */
TEST(config_numeric_ranges)
{
    struct cvlm_server_options c;
    char err[256];
    static const char *const refused[][2] = {
        {"--port", "84245"},
        {"--port", "65536"},
        {"--tp", "0"},
        {"--tp", "9"},
        {"--block-size", "0"},
        {"--block-size", "1025"},
        {"--max-seqs", "0"},
        {"--max-n", "0"},
        {"--max-n", "129"},
        {"--queue-limit", "0"},
        {"--max-batched-tokens", "0"},
        {"--kv-memory", "20000G"},
        {"--max-body-bytes", "1"},
        {"--max-connections", "0"},
        {"--drain-timeout", "86401"},
        {"--max-image-pixels", "0"},
    };
    unsetenv("COGVLM_PORT");
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        char *argv[] = {(char *)refused[i][0], (char *)refused[i][1]};
        err[0] = 0;
        int rc = parse_with("", argv, 2, &c, err);
        CHECKF(rc < 0, "%s %s accepted", refused[i][0], refused[i][1]);
        CHECKF(strstr(err, refused[i][0]) && strstr(err, "out of range"),
               "%s %s: message '%s' does not name the option and the range", refused[i][0],
               refused[i][1], err);
        cvlm_options_free(&c);
    }
    /* the edges are accepted; file and environment are checked the same way */
    char *edges[] = {"--port", "65535", "--block-size", "1024"};
    REQUIRE(parse_with("", edges, 4, &c, err) == 0);
    CHECK(c.port == 65535 && c.block_size == 1024);
    cvlm_options_free(&c);
    CHECK(parse_with("port = 70000\n", NULL, 0, &c, err) < 0 && strstr(err, "--port"));
    cvlm_options_free(&c);
    setenv("COGVLM_PORT", "99999", 1);
    CHECK(parse_with("", NULL, 0, &c, err) < 0 && strstr(err, "--port"));
    cvlm_options_free(&c);
    unsetenv("COGVLM_PORT");
}

/* The documented file states each numeric option's range as the table has it. */
TEST(config_file_documents_ranges)
{
    size_t len;
    char *text = (char *)cvlm_test_read_file("config/cogvlm.conf", &len), want[256];
    REQUIRE(text);
    for (int i = 0; i < cvlm_n_options; i++) {
        const struct cvlm_option *o = &cvlm_options[i];
        if (o->type != OPT_INT && o->type != OPT_BYTES)
            continue;
        snprintf(want, sizeof(want), "# Range: %llu to %llu.\n#%s = ", (unsigned long long)o->lo,
                 (unsigned long long)o->hi, o->key);
        CHECKF(strstr(text, want), "config/cogvlm.conf lacks '%s'", want);
    }
    free(text);
}
