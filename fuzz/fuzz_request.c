/* fuzz_request.c — libFuzzer target for the JSON-to-request path of `kvsieve serve`
 * (src/server/request.c): any body, parsed as a chat or a completions request (first byte picks),
 * must either give a request that respects every limit or fail with a 400/404 whose error object
 * is valid JSON; never crash or leak. KV specs are checked with the --kv parser, as the server
 * does, without a model. */
#include "kv/kv_spec.h"
#include "server/request.h"

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool check_kv(const char *spec, char *msg, size_t n) {
    struct kv_spec k;
    if (kv_spec_parse(spec, &k) == KVS_OK) return true;
    snprintf(msg, n, "bad spec");
    return false;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    enum srv_kind kind = data[0] & 1 ? SRV_CHAT : SRV_COMPLETION;
    struct srv_limits lim = {.model_id = "m", .max_tokens_default = 16, .n_vocab = 1000,
                             .check_kv = check_kv};
    struct srv_params p;
    struct srv_error e;
    if (!srv_parse_request((const char *)data + 1, size - 1, kind, &lim, &p, &e)) {
        if (e.status != 400 && e.status != 404) abort();
        if (!e.message[0] || !e.type) abort();
        char *j = srv_error_json(&e);
        json_error_t je;
        json_t *o = j ? json_loads(j, 0, &je) : NULL;
        if (!o || !json_is_string(json_object_get(json_object_get(o, "error"), "message")))
            abort();
        json_decref(o);
        free(j);
        return 0;
    }
    if (p.kind != kind || p.max_tokens < 0 || p.n_stops < 0 || p.n_stops > SRV_MAX_STOPS) abort();
    if (kind == SRV_CHAT && (p.n_msgs < 1 || p.n_msgs > SRV_MAX_MSGS || !p.msgs)) abort();
    for (int i = 0; i < p.n_msgs; i++)
        if (!p.msgs[i].role || !p.msgs[i].content) abort();
    if (kind == SRV_COMPLETION && !p.prompt && p.n_prompt_toks < 1) abort();
    for (int i = 0; i < p.n_prompt_toks; i++)
        if (p.prompt_toks[i] < 0 || p.prompt_toks[i] >= lim.n_vocab) abort();
    for (int i = 0; i < p.n_stops; i++)
        if (!p.stops[i] || !p.stops[i][0]) abort();
    if (!(p.temperature >= 0 && p.temperature <= 2) || !(p.top_p > 0 && p.top_p <= 1) ||
        p.top_k < 0 || !(p.repeat_penalty > 0) || p.top_logprobs < 0 ||
        p.top_logprobs > SRV_MAX_LOGPROBS)
        abort();
    if (p.kv && check_kv(p.kv, (char[8]){0}, 8) == false) abort();
    srv_params_free(&p);
    return 0;
}
