/* cli_info.c - `cogvlm info --model DIR`: load and validate a checkpoint, describe it.
 *
 * Loads config.json and every safetensors file, binds all tensors to the weight table
 * (so a bad checkpoint fails here with the loader's message) and prints the shapes,
 * parameter counts and byte sizes per component.
 */
#include "cli/cli.h"
#include "engine/error.h"
#include "engine/model/weights.h"
#include "engine/text/tokenizer.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

struct tally {
    int64_t params[3]; /* LM, vision tower + adapter, other */
    size_t bytes;
    size_t by_dtype[CVLM_DTYPE_I32 + 1];
};

static int count_one(void *ctx, const char *name, struct cvlm_tensor *slot, int ndim,
                     const int64_t *shape, int optional)
{
    struct tally *t = ctx;
    int64_t n = cvlm_tensor_numel(slot);
    (void)ndim;
    (void)shape;
    if (optional && !slot->data)
        return 0;
    t->params[!strncmp(name, "model.vision.", 13) ? 1 : 0] += n;
    t->bytes += cvlm_dtype_is_quant(slot->dtype) /* a GPTQ checkpoint's Q4: codes + scales */
                    ? cvlm_tensor_bytes(slot) +
                          (size_t)(slot->shape[0] * cvlm_quant_groups(slot)) * (slot->mins ? 8 : 4)
                    : (size_t)n * cvlm_dtype_size(slot->dtype);
    t->by_dtype[(unsigned)slot->dtype <= CVLM_DTYPE_I32 ? slot->dtype : CVLM_DTYPE_I32]++;
    return 0;
}

static void describe(const char *dir, struct cvlm_weights *w)
{
    const struct cvlm_config *c = &w->cfg;
    static const char *const tmpl[] = {"base", "chat", "vqa"};
    struct tally t = {0};
    cvlm_weights_visit(w, count_one, &t);
    printf("model       %s (%d files, %zu tensors)\n", dir, w->st->n_files, w->st->n_tensors);
    printf("variant     %s\n", cvlm_variant_name(c->variant));
    printf("language    vocab %d, hidden %d, %d layers, %d heads (head_dim %d), %d KV heads, "
           "mlp %d, rms eps %g, rope theta %g, template %s\n",
           c->vocab_size, c->hidden_size, c->num_layers, c->num_heads, cvlm_config_head_dim(c),
           cvlm_config_kv_heads(c), c->intermediate_size, c->rms_norm_eps, c->rope_theta,
           tmpl[c->template_version]);
    if (c->has_vision)
        printf("vision      %dx%d image, patch %d (%d patches%s -> %d LM slots), hidden %d, "
               "%d layers, %d heads, mlp %d\n",
               c->vision.image_size, c->vision.image_size, c->vision.patch_size,
               cvlm_config_num_patches(c), cvlm_config_has_conv(c) ? ", 2x2 conv" : "",
               cvlm_config_image_tokens(c), c->vision.hidden_size, c->vision.num_layers,
               c->vision.num_heads, c->vision.intermediate_size);
    printf("parameters  %lld language model, %lld vision tower + adapter\n", (long long)t.params[0],
           (long long)t.params[1]);
    printf("weights     %.1f MiB (tensors: %zu F32, %zu F16, %zu BF16", (double)t.bytes / (1 << 20),
           t.by_dtype[CVLM_DTYPE_F32], t.by_dtype[CVLM_DTYPE_F16], t.by_dtype[CVLM_DTYPE_BF16]);
    if (c->gptq.enabled)
        printf(", %zu GPTQ int4 as Q4", t.by_dtype[CVLM_DTYPE_Q4]);
    printf(")\n");
}

int cvlm_cli_info(int argc, char **argv)
{
    const char *dir = NULL;
    struct cvlm_weights *w;
    struct cvlm_tokenizer *tok;
    char path[4096];

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) {
            dir = argv[++i];
        } else if (!strcmp(argv[i], "--help")) {
            printf("usage: cogvlm info --model DIR\n"
                   "Loads DIR/config.json and its safetensors and describes the model.\n");
            return 0;
        } else {
            fprintf(stderr, "cogvlm info: unknown argument '%s' (try --help)\n", argv[i]);
            return 2;
        }
    }
    if (!dir) {
        fprintf(stderr, "cogvlm info: --model DIR is required\n");
        return 2;
    }
    if (cvlm_weights_load(dir, &w)) {
        fprintf(stderr, "cogvlm info: %s\n", cvlm_last_error());
        return 1;
    }
    describe(dir, w);
    cvlm_weights_destroy(w);
    snprintf(path, sizeof(path), "%s/tokenizer.model", dir);
    if (access(path, F_OK) == 0) {
        if (cvlm_tokenizer_load(path, &tok)) {
            fprintf(stderr, "cogvlm info: %s\n", cvlm_last_error());
            return 1;
        }
        printf("tokenizer   %s (%d pieces)\n", path, cvlm_tokenizer_vocab_size(tok));
        cvlm_tokenizer_destroy(tok);
    }
    return 0;
}
