/* tokenizer.h — GPT-2 style byte-level BPE built from GGUF metadata, plus chat templates.
 *
 * Does: pre-tokenize text with the regex of the model's `tokenizer.ggml.pre` (smollm, qwen2,
 * llama3/gpt2 fallbacks), map bytes to the GPT-2 byte-to-unicode alphabet, apply BPE merges by
 * rank, recognise special/control tokens in the text when asked, and turn ids back into raw
 * bytes; a small streaming decoder emits only complete UTF-8 sequences.
 * Does not: read files or know about model weights — the model loader passes the vocabulary as
 * (pointer, length) arrays that stay valid (they point into the mmapped GGUF) for the
 * tokenizer's lifetime.
 */
#ifndef KVS_TOKENIZER_H
#define KVS_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "base.h"

/* ggml token types (tokenizer.ggml.token_type) */
enum tok_type { TOK_NORMAL = 1, TOK_UNKNOWN = 2, TOK_CONTROL = 3, TOK_USER_DEFINED = 4,
                TOK_UNUSED = 5, TOK_BYTE = 6 };

struct tok_str { const char *s; uint32_t len; }; /* not NUL-terminated */

struct tokenizer_desc {
    const char *model;            /* tokenizer.ggml.model, e.g. "gpt2" (NUL-terminated) */
    const char *pre;              /* tokenizer.ggml.pre, e.g. "smollm", "qwen2"; may be NULL */
    int n_vocab;
    const struct tok_str *tokens; /* n_vocab */
    const int32_t *token_types;   /* n_vocab, may be NULL (all normal) */
    int n_merges;
    const struct tok_str *merges; /* "left right" strings, rank = index */
    int bos_id, eos_id, eot_id, unk_id, pad_id; /* -1 if absent */
    bool add_bos;                 /* tokenizer.ggml.add_bos_token */
};

struct tokenizer;

enum kvs_status tokenizer_init(struct tokenizer **out, const struct tokenizer_desc *d);
void tokenizer_free(struct tokenizer *tk);

/* Encode text[0..len). add_bos: prepend BOS if the model has one. parse_special: text like
 * "<|im_start|>" becomes the special token instead of being split into bytes.
 * Returns the number of tokens written; if it exceeds max_out, returns -(needed) and writes
 * nothing useful. */
int tokenizer_encode(const struct tokenizer *tk, const char *text, size_t len, bool add_bos,
                     bool parse_special, int32_t *out, int max_out);

/* Raw bytes of one token (byte-level alphabet undone). Returns the byte count (may exceed size:
 * then only size bytes were written). Control tokens give their text only if `special`. */
size_t tokenizer_piece(const struct tokenizer *tk, int32_t id, bool special, char *buf,
                       size_t size);

bool tokenizer_is_control(const struct tokenizer *tk, int32_t id);
int tokenizer_n_vocab(const struct tokenizer *tk);
int32_t tokenizer_find(const struct tokenizer *tk, const char *text); /* exact token or -1 */

/* Streaming detokenizer: push a token's bytes, get back only complete UTF-8 sequences
 * (incomplete trailing bytes are held until the next push; invalid bytes become U+FFFD). */
struct tok_stream { unsigned char pend[8]; int n_pend; };
size_t tok_stream_push(struct tok_stream *st, const char *bytes, size_t n, char *out,
                       size_t out_size);
size_t tok_stream_flush(struct tok_stream *st, char *out, size_t out_size);

/* Chat (ChatML-style, as both SmolLM2 and Qwen2.5 use). Writes the prompt text for the messages
 * and, if add_assistant, the opening of the assistant turn. `flavor` picks the default system
 * prompt the model's own template inserts when none is given ("smollm", "qwen2", or NULL for
 * none). Returns bytes needed (excluding NUL); writes at most size-1 and NUL-terminates. */
struct chat_msg { const char *role, *content; };
size_t chat_format(const char *flavor, const struct chat_msg *msgs, int n, bool add_assistant,
                   char *buf, size_t size);

#endif
