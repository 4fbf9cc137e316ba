/* fuzz_request.c - libFuzzer target: an HTTP request body to validated engine requests
 * (JSON parsing, field validation, data URLs and base64, http(s) image URLs kept for
 * the fetch, conversation building, image decoding, tokenization), as the server's work
 * pool runs it. The first byte picks the route. Every outcome must be either prepared
 * requests, an image URL to fetch, or one error with a status. */
#include "server/server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct cvlm_srv srv;
static struct cvlm_server_options cfg;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *root = getenv("COGVLM_SHARED_DATA");
    char model[1024], tok[1024];
    (void)argc;
    (void)argv;
    snprintf(model, sizeof(model), "%s/golden-tiny/model-bf16", root ? root : "../shared/data");
    snprintf(tok, sizeof(tok), "%s/llama2-tokenizer.model", root ? root : "../shared/data");
    struct cvlm_engine_opts o = {.model_dir = model,
                                 .tokenizer = tok,
                                 .threads = 1,
                                 .kv_bytes = 8 << 20,
                                 .max_image_pixels = 1 << 22};
    if (cvlm_engine_create(&o, &srv.engine)) {
        fprintf(stderr, "fuzz_request: %s\n", cvlm_last_error());
        abort();
    }
    cfg.max_n = 4;
    cfg.max_body_bytes = 1 << 20;
    cfg.allow_any_media_domain = 1; /* http(s) image URLs parsed and kept for a fetch */
    srv.cfg = &cfg;
    snprintf(srv.model_id, sizeof(srv.model_id), "model-bf16");
    cvlm_metrics_init(&srv.metrics);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct conn c;
    if (size < 1)
        return 0;
    memset(&c, 0, sizeof(c));
    c.s = &srv;
    c.route = data[0] & 1 ? "/v1/completions" : "/v1/chat/completions";
    if (cvlm_buf_append(&c.body, data + 1, size - 1))
        return 0;
    cvlm_api_prepare(&c);
    if (c.status && (c.status < 400 || c.status > 599 || !c.err_msg[0]))
        abort(); /* an error must be a 4xx/5xx with a message */
    if ((c.pending != NULL) != (c.image_url != NULL) || (c.pending && (c.status || c.n_ch)))
        abort(); /* an image URL to fetch: nothing else prepared, no error */
    cvlm_api_pending_free(&c);
    for (int i = 0; i < c.n_ch; i++)
        cvlm_request_unref(c.ch[i].r);
    if (c.status) {
        size_t len;
        free(cvlm_api_error_body(&c, &len));
    }
    free(c.ch);
    cvlm_buf_free(&c.body);
    return 0;
}
