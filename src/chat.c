/* chat.c — ChatML prompt formatting (see chat_format in tokenizer.h).
 *
 * Reproduces the Jinja chat templates stored in the models' GGUF (tokenizer.chat_template)
 * for plain text messages:
 *   every flavor: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, and
 *                 "<|im_start|>assistant\n" when add_assistant;
 *   "smollm":     when the first message is not a system one, a system message
 *                 "You are a helpful AI assistant named SmolLM, trained by Hugging Face" comes
 *                 first (no messages at all: nothing is added);
 *   "qwen2":      the system message is the first message if it is a system one, else
 *                 "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." (also
 *                 with no messages); later messages of role user, system or assistant are
 *                 written as above; consecutive "tool" messages are wrapped into one user turn
 *                 as "\n<tool_response>\n{content}\n</tool_response>" parts; other roles are
 *                 left out, as the template does.
 *   NULL or other: plain ChatML, no default system message.
 * Tool definitions and assistant tool calls of the Qwen template are not supported.
 */
#include <string.h>

#include "tokenizer.h"

struct cw { char *buf; size_t size, n; };

static void put(struct cw *w, const char *s) {
    if (!s) return;
    size_t len = strlen(s);
    if (w->n < w->size) {
        size_t room = w->size - 1 - w->n; /* keep one byte for the NUL */
        memcpy(w->buf + w->n, s, len < room ? len : room);
    }
    w->n += len;
}

static void turn(struct cw *w, const char *role, const char *content) {
    put(w, "<|im_start|>");
    put(w, role);
    put(w, "\n");
    put(w, content);
    put(w, "<|im_end|>\n");
}

static bool is_role(const struct chat_msg *m, const char *role) {
    return m->role && strcmp(m->role, role) == 0;
}

size_t chat_format(const char *flavor, const struct chat_msg *msgs, int n, bool add_assistant,
                   char *buf, size_t size) {
    struct cw w = {buf, buf ? size : 0, 0};
    if (n < 0 || !msgs) n = 0;
    bool smollm = flavor && strcmp(flavor, "smollm") == 0;
    bool qwen2 = flavor && strcmp(flavor, "qwen2") == 0;

    if (smollm) {
        if (n > 0 && !is_role(&msgs[0], "system"))
            turn(&w, "system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
        for (int i = 0; i < n; i++) turn(&w, msgs[i].role ? msgs[i].role : "", msgs[i].content);
    } else if (qwen2) {
        int first = 0;
        if (n > 0 && is_role(&msgs[0], "system")) {
            turn(&w, "system", msgs[0].content);
            first = 1;
        } else {
            turn(&w, "system", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
        }
        for (int i = first; i < n; i++) {
            const struct chat_msg *m = &msgs[i];
            if (is_role(m, "user") || is_role(m, "system") || is_role(m, "assistant")) {
                turn(&w, m->role, m->content);
            } else if (is_role(m, "tool")) {
                if (i == 0 || !is_role(&msgs[i - 1], "tool")) put(&w, "<|im_start|>user");
                put(&w, "\n<tool_response>\n");
                put(&w, m->content);
                put(&w, "\n</tool_response>");
                if (i == n - 1 || !is_role(&msgs[i + 1], "tool")) put(&w, "<|im_end|>\n");
            }
        }
    } else {
        for (int i = 0; i < n; i++) turn(&w, msgs[i].role ? msgs[i].role : "", msgs[i].content);
    }
    if (add_assistant) put(&w, "<|im_start|>assistant\n");
    if (w.size) w.buf[w.n < w.size ? w.n : w.size - 1] = '\0';
    return w.n;
}
