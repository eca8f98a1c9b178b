#!/usr/bin/env python3
"""tokenizer_golden.py — reference token ids for tests/test_tokenizer.c.

usage: python3 tools/tokenizer_golden.py [--model PATH --name NAME]...
       (default: both models under models/, writing tests/golden/tokenizer_<name>.txt)
       python3 tools/tokenizer_golden.py --stress 20000 --out-dir /tmp/tokstress
       (N random strings over a wide Unicode alphabet instead of the fixed cases; run them with
        KVS_TOK_GOLDEN=/tmp/tokstress/tokenizer_qwen2.txt build/test_tokenizer)
needs: pip install tokenizers transformers jinja2 ; numpy and gguf (gguf-py)

WHERE THE REFERENCE COMES FROM, AND WHY IT IS INDEPENDENT OF src/tokenizer.c
The vocabulary and merges are read from the GGUF with gguf-py (the same data the C code gets).
Everything that decides how text becomes ids is HF's: the Rust BPE model, pre-tokenizers and
added-token matching of the `tokenizers` library, configured as each model's original
tokenizer.json configures them:

  smollm2  SmolLM2's tokenizer.json (HuggingFaceTB/SmolLM2-*): no normalizer, pre-tokenizer
           Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
           use_regex=True)], BPE without unk/byte-fallback, the 17 <|...|>/<...> tokens added as
           special tokens. (This machine cannot reach huggingface.co, so the file itself is not
           read; the configuration is corroborated by the vocabulary: its only digit tokens are
           the ten single digits and no merge involves a digit, i.e. the BPE was trained on
           individually split digits; llama.cpp's "smollm" pre-type also splits \\p{N} first.)
  qwen2    transformers' own Qwen2Tokenizer class (models/qwen2/tokenization_qwen2.py), which
           builds the tokenizers pipeline in code: NFC normalizer, Split(Qwen2 regex,
           isolated), ByteLevel(use_regex=False); given the GGUF vocab and merges.

In both, GGUF tokens of type CONTROL (3) are added as special tokens (matched only when special
parsing is on; `encode_special_tokens = True` turns it off) and USER_DEFINED (4) tokens as plain
added tokens (always matched), as transformers' GGUF loader does.

transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)` needs torch (not installed
here). Its tokenizer construction (integrations/gguf/gguf_tokenizer_mapping.py) does not, so it
is run as a cross-check, and the cases where it disagrees with the reference are counted. It is
known to differ: for "smollm" it applies no Digits split (GPT-2 regex only), so whitespace before
a digit splits differently ("a   1"); for "qwen2" it has no NFC normalizer.

Chat templates: the expected prompt text is rendered by transformers' apply_chat_template with
the template string stored in the GGUF (tokenizer.chat_template).

OUTPUT FORMAT (tests/golden/tokenizer_<name>.txt), tab-separated, one record per line:
  # comment
  M  <model path>  <n_vocab>                        model the ids belong to
  T  <flags>  <hex input>  <ids>  <hex decoded>      flags: s = parse special tokens, - = not;
                                                     ids space-separated; decoded = HF decode of
                                                     the ids with special tokens shown
  F  <path>  <n bytes>  <fnv1a64 of bytes>  <n ids>  <fnv1a64 of ids as int32 LE bytes>
                                                     a whole file (Jane Austen's Emma, fetched
                                                     by scripts/fetch_data.sh), parse special off
  C  <flavor>  <add_assistant 0/1>  <messages>  <hex expected prompt>
                                                     messages: hex(role):hex(content) joined by ','
"""
import argparse
import os
import random
import sys
import unicodedata

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = [
    ("smollm2", "models/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm"),
    ("qwen2", "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "qwen2"),
    # the Qwen vocabulary run through the Llama-3 pipeline: exercises the "llama3" pre-type
    # (\p{N}{1,3}, BPE ignore_merges) for which no model is at hand
    ("qwen2_llama3", "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "llama3"),
]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BIG_FILE = "data/austen/emma.txt"


def read_gguf(path):
    r = gguf.GGUFReader(path)

    def field(k):
        return r.fields.get(k)

    def strs(k):
        f = field(k)
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data] if f else []

    def scalar(k):
        f = field(k)
        if not f:
            return None
        v = f.parts[f.data[0]]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(v).decode("utf-8")
        return v.tolist()[0]

    tt = field("tokenizer.ggml.token_type")
    return {
        "tokens": strs("tokenizer.ggml.tokens"),
        "types": [int(tt.parts[i][0]) for i in tt.data] if tt else None,
        "merges": strs("tokenizer.ggml.merges"),
        "model": scalar("tokenizer.ggml.model"),
        "pre": scalar("tokenizer.ggml.pre"),
        "arch": scalar("general.architecture"),
        "chat_template": scalar("tokenizer.chat_template"),
        "bos": scalar("tokenizer.ggml.bos_token_id"),
        "eos": scalar("tokenizer.ggml.eos_token_id"),
    }


def added_tokens(meta):
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(meta["tokens"], meta["types"]) if ty == 3]
    plain = [AddedToken(t, special=False, normalized=False)
             for t, ty in zip(meta["tokens"], meta["types"]) if ty == 4]
    return special, plain


def reference_tokenizer(meta):
    """(backend Tokenizer, transformers tokenizer object or None) per the original HF config."""
    vocab = {t: i for i, t in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    special, plain = added_tokens(meta)
    if meta["pre"] == "smollm":
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                   fuse_unk=False, byte_fallback=False))
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(special)
        tok.add_tokens(plain)
        from transformers import PreTrainedTokenizerFast
        hf = PreTrainedTokenizerFast(tokenizer_object=tok)
        return tok, hf
    if meta["pre"] == "qwen2":
        from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
        hf = Qwen2Tokenizer(vocab=vocab, merges=merges)
        tok = hf.backend_tokenizer
        tok.add_special_tokens(special)
        tok.add_tokens(plain)
        return tok, hf
    if meta["pre"] == "llama3":
        # Llama-3's tokenizer.json: no normalizer, Split(regex, isolated) + ByteLevel without
        # regex, BPE with ignore_merges
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                   fuse_unk=False, byte_fallback=False, ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(special)
        tok.add_tokens(plain)
        return tok, None
    raise SystemExit("no reference configuration for pre-tokenizer %r" % meta["pre"])


def transformers_gguf_tokenizer(meta):
    """transformers' own GGUF tokenizer construction (cross-check only)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except Exception as e:  # pragma: no cover
        print("  (transformers GGUF converter unavailable: %s)" % e, file=sys.stderr)
        return None
    d = {"tokenizer_type": meta["model"], "pre_tokenizer_type": meta["pre"],
         "tokens": meta["tokens"], "token_type": meta["types"], "merges": meta["merges"]}
    tok, _ = convert_gguf_tokenizer(meta["arch"], d)
    return tok


def encode(tok, text, parse_special):
    tok.encode_special_tokens = not parse_special
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False


# ---- prompts ------------------------------------------------------------------------------

FIXED = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\t\n", "\r\n", " \n ", "a\r\n\r\nb",
    "Hello world", " Hello world", "Hello World", " Hello World!", "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Hello", " Hello", "  Hello", "   Hello", "    Hello", "    Hello\n    Hello", " (", "\n =",
    "' era", "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
    # contractions
    "I'm", "they'll", "DON'T", "We've", "you'd", "it's", "She'S", "WE'RE", "I'Ll", "'s", "'",
    "''", "' s", "x'y", "o'clock", "rock 'n' roll", "'ſ", "it'ſ", "'LL'RE'VE", "don't stop",
    "'re'd'm", "'ſa", "it'ſok", "'Sa", "'RE'S", "'tis", "'llama", "'reading", "X'ſ'S'ſ",
    "'\u017f\u017f", "'\u212a", "'ll've", "''s",
    # accents, NFC
    "café", "naïve", "Zürich", "Ångström", "crème brûlée", "Tiếng Việt có dấu",
    "cafe\u0301", "A\u030a", "\u212b", "\u2126hm", "\uf900\uf901", "e\u0327\u0301",
    "\u0301abc", "q\u0307\u0323", "a\u0323\u0307\u0301", "\u1100\u1161\u11a8", "한국어 텍스트",
    "\u1112\u1161\u11ab\u1100\u116e\u11a8", "\u0958\u0959", "x\u0344y", "\u0f73", "\u1e9b\u0323",
    "Ελληνικά κείμενο", "нещо на Български", "Привет, мир!", "שלום עולם", "مرحبا بالعالم",
    "कान्तैपिसेसाच", "កាន់តែពិសេសអាច", "ไทย ภาษา",
    # CJK
    "我想在apple工作1314151天～", "日本語のテキストです。", "中文，标点。", "漢字かなカナ",
    # emoji
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333",
    "👨\u200d👩\u200d👧\u200d👦 family", "🇺🇸🇫🇷🇯🇵 flags", "👍🏽 ok", "❤️ love", " this is 🦙.cpp",
    # whitespace
    "\t\tfoo", "a  b", "a   b", "  leading", "trailing  ", "trailing \n", "a\n\nb", "   \n  x",
    "\u00a0nbsp\u00a0", "\u3000ideographic\u3000space", "line\u2028sep\u2029para",
    "\x0b\x0c", "a\x1c\x1d\x1e\x1fb", "\u200bzero\u200bwidth", "mongol\u180evowel", "nel\u0085x",
    "\u2003em\u2009thin", "tab\tsep\tvalues\t\n", " \t \n \t ", "x \n\n y", "\r\r\n\n\r",
    "end with spaces   ", "    ", "\n\n\n\n\n\n\n\n\n\n",
    # digits
    "1234567", "3.14159", "2026-11-26", "a   1", "x 1", " 42", "a1b2c3", "$1,000.00",
    "１２３", "Ⅻ century", "½ cup", "x² + y²", "٣٤٥", "३४५", "3", "33", "333", "3333", "33333",
    "333333", "3333333", "33333333", "3.3", "3..3", "3...3", "w048 7tuijk dsdfhu",
    "phone: +1 (555) 123-4567", "\t12\n34 \n 56", "a  1", "x\t1", "\n\n1", "  1  2",
    "a \n 1", "a\u3000\u30001", "b \t 9z", "1 ", "1  ", "1   a", "x   \n1", "12345678901",
    "\u00a0\u00a01", "v1.2.3  (4)", "  \u0661\u0662",
    # code
    "def foo(x):\n    return x * 2\n",
    "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "<div class=\"x\">&nbsp;</div>", "if (a != b && c <= d) { x += 1; }",
    "for i in range(10):\n\tprint(i)\n\n\n# done", "ls -la | grep '.txt' > out.log 2>&1",
    "------======= ......!!!!!!??????", "''''''```````\"\"\"\"......!!!!!!??????",
    "x = y //comment\n/* block */", "@decorator\nclass A(B):\n    pass",
    "SELECT * FROM t WHERE id = 5;", "https://example.com/path?q=1&r=2#frag",
    # special-token-like text
    "<|im_start", "< |im_start|>", "<|im_start|", "<<|im_start|>>", "<|endoftext|",
]

SPECIAL = [
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|><|im_end|>",
    "text<|endoftext|>more",
    "<|im_end|><|im_end|>\n",
    "a <|im_start|> b",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "  <|im_start|>  ",
    "x<tool_call>{\"name\": \"f\"}</tool_call>y",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<jupyter_code>print(1)<jupyter_output>1<empty_output>",
]

RANDOM_ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") * 3 + list("0123456789") * 2 +
    list("      ") + list("\n\n\t\r") + list(".,;:!?-_()[]{}<>|/\\\"'`~@#$%^&*+=") +
    ["'s", "'t", "'re", "'LL", "'D", "'M", "'ve"] +
    list("éèàüöçñßøåÆŒ") + ["e\u0301", "a\u0308", "\u0323", "\u0307", "\u0301"] +
    list("中文日本語한국어") + ["😀", "🦙", "👍🏽", "🇫🇷", "\u200d", "\ufe0f"] +
    list("\u00a0\u3000\u2028\u0085\u000b\u000c") + list("１２½²٣Ⅻ") +
    ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|", "|>"]
)


def random_prompts(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 40)
        out.append("".join(rng.choice(RANDOM_ALPHABET) for _ in range(k)))
    return out


def wide_alphabet():
    """Assigned code points from many scripts and the tricky classes (spaces, marks, digits)."""
    blocks = [(0x20, 0x7E, 30), (0xA0, 0x24F, 4), (0x300, 0x36F, 4), (0x370, 0x3FF, 1),
              (0x400, 0x4FF, 1), (0x590, 0x5FF, 1), (0x600, 0x6FF, 1), (0x900, 0x97F, 2),
              (0xE00, 0xE7F, 1), (0x1100, 0x11FF, 2), (0x1E00, 0x1FFF, 2), (0x2000, 0x206F, 3),
              (0x2100, 0x218F, 2), (0x3000, 0x30FF, 2), (0x4E00, 0x4EFF, 2), (0xAC00, 0xACFF, 2),
              (0xF900, 0xFAFF, 1), (0xFB00, 0xFB4F, 1), (0xFF00, 0xFFEF, 2),
              (0x1F300, 0x1F6FF, 2), (0x1D400, 0x1D7FF, 1), (0x1F1E6, 0x1F1FF, 1)]
    pool = []
    for lo, hi, w in blocks:
        cps = [chr(c) for c in range(lo, hi + 1)
               if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
        pool.extend(cps * w if hi - lo < 200 else cps)
    pool += list("\n\r\t'") * 300 + ["'s", "'LL", "'ſ"] * 50
    return pool


def stress_prompts(n, seed):
    rng = random.Random(seed)
    pool = wide_alphabet()
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def real_text_prompts():
    """Lines of real English (Austen); a few hundred lines, grouped into chunks."""
    out = []
    for name in ("prideprejudice", "persuasion"):
        p = os.path.join(ROOT, "data/austen/%s.txt" % name)
        if not os.path.exists(p):
            print("  (no %s: run scripts/fetch_data.sh for real-text cases)" % p, file=sys.stderr)
            continue
        lines = open(p, encoding="utf-8").read().split("\n")
        body = lines[200:400]
        for i in range(0, len(body), 10):
            out.append("\n".join(body[i:i + 10]))
    return out


CHATS = [
    [("user", "Hello!")],
    [("system", "You are terse."), ("user", "What is 2+2?")],
    [("user", "hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
    [("system", "S"), ("user", "u1"), ("assistant", "a1"), ("system", "late system"),
     ("user", "u2")],
    [("user", "multi\nline\n\ncontent with <|im_end|> text")],
    [("user", "café 🦙"), ("assistant", "")],
    [("user", "call it"), ("assistant", "ok"), ("tool", "{\"r\": 1}"), ("tool", "second"),
     ("user", "thanks")],
]


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append")
    ap.add_argument("--name", action="append")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "tests/golden"))
    ap.add_argument("--stress", type=int, default=0)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    todo = MODELS if not a.model else [(n, m, None) for n, m in zip(a.name, a.model)]
    metas = {}
    os.makedirs(a.out_dir, exist_ok=True)
    for name, path, pre in todo:
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            print("skip %s: %s missing" % (name, path), file=sys.stderr)
            continue
        print("%s: reading %s" % (name, path), file=sys.stderr)
        if full not in metas:
            metas[full] = read_gguf(full)
        meta = dict(metas[full])
        pre_override = pre if pre and pre != meta["pre"] else None
        if pre_override:
            meta["pre"] = pre_override
        tok, hf = reference_tokenizer(meta)
        xcheck = transformers_gguf_tokenizer(meta)
        flavor = None if pre_override else {"smollm": "smollm", "qwen2": "qwen2"}.get(meta["pre"])
        lines = ["# generated by tools/tokenizer_golden.py - do not edit",
                 "# reference: HF tokenizers pipeline of the original model (see the script)",
                 "M\t%s\t%d" % (path, len(meta["tokens"])) +
                 ("\t" + pre_override if pre_override else "")]
        cases = [(p, True) for p in FIXED] + [(p, True) for p in SPECIAL] + \
                [(p, False) for p in SPECIAL] + [(p, True) for p in random_prompts(300, 1234)] + \
                [(p, False) for p in random_prompts(100, 99)] + \
                [(p, True) for p in real_text_prompts()]
        if a.stress:
            cases = [(p, i % 4 != 0) for i, p in enumerate(stress_prompts(a.stress, a.seed))]
        n_diff_x = 0
        diff_examples = []
        for text, ps in cases:
            ids = encode(tok, text, ps)
            dec = tok.decode(ids, skip_special_tokens=False)
            expect = unicodedata.normalize("NFC", text) if meta["pre"] == "qwen2" else text
            if ps and dec != expect and not any(s in text for s in ("<|", "<tool", "<jupyter")):
                print("  warning: reference decode differs for %r: %r" % (text, dec),
                      file=sys.stderr)
            if xcheck is not None:
                xcheck.encode_special_tokens = not ps
                xids = xcheck.encode(text, add_special_tokens=False).ids
                xcheck.encode_special_tokens = False
                if xids != ids:
                    n_diff_x += 1
                    if len(diff_examples) < 6:
                        diff_examples.append(text)
            lines.append("T\t%s\t%s\t%s\t%s" % ("s" if ps else "-", text.encode().hex(),
                                                " ".join(map(str, ids)), dec.encode().hex()))
        big = os.path.join(ROOT, BIG_FILE)
        if os.path.exists(big) and not a.stress:
            data = open(big, "rb").read()
            ids = encode(tok, data.decode("utf-8"), False)
            ib = b"".join(int(i).to_bytes(4, "little") for i in ids)
            lines.append("F\t%s\t%d\t%016x\t%d\t%016x" % (BIG_FILE, len(data), fnv1a64(data),
                                                         len(ids), fnv1a64(ib)))
            print("  %s: %d bytes -> %d ids" % (BIG_FILE, len(data), len(ids)), file=sys.stderr)
        if flavor and meta["chat_template"] and not a.stress:
            for msgs in CHATS:
                for add in (False, True):
                    conv = [{"role": r, "content": c} for r, c in msgs]
                    try:
                        text = hf.apply_chat_template(conv, chat_template=meta["chat_template"],
                                                      tokenize=False,
                                                      add_generation_prompt=add)
                    except Exception as e:
                        print("  chat template failed for %r: %s" % (msgs, e), file=sys.stderr)
                        continue
                    enc = ",".join("%s:%s" % (r.encode().hex(), c.encode().hex()) for r, c in msgs)
                    lines.append("C\t%s\t%d\t%s\t%s" % (flavor, int(add), enc,
                                                        text.encode().hex()))
        out = os.path.join(a.out_dir, "tokenizer_%s.txt" % name)
        with open(out + ".tmp", "w", encoding="ascii") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(out + ".tmp", out)
        print("  wrote %s: %d cases; transformers GGUF converter disagrees on %d" %
              (out, len(cases), n_diff_x), file=sys.stderr)
        for t in diff_examples:
            print("    e.g. %r" % t, file=sys.stderr)


if __name__ == "__main__":
    main()
