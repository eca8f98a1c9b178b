#!/usr/bin/env python3
"""Independent numpy reference forward pass over a GGUF model (llama / qwen2 architectures).

The weights are read with gguf.GGUFReader and dequantised with gguf.quants.dequantize (the llama.cpp
project's own Python code), so nothing here shares code with the C engine. Everything else — RMSNorm,
RoPE, grouped-query attention, SwiGLU, the tied/untied output head — is written out below in plain numpy.

Precision: --dtype float64 (default for `logits`/`generate`) computes every step in float64 on the
exactly dequantised weights; --dtype float32 (default for `ppl`, ~2x faster, half the memory) uses float32
everywhere (BLAS sgemm accumulation). No activation quantisation is done in either mode.

Validation: on an H100 machine, HF transformers 5.17 (its own GGUF loader and LlamaForCausalLM /
Qwen2ForCausalLM, float64, eager attention) reproduced this reference for both models: golden last-position
logits to max |diff| 6e-6 (SmolLM2, float64 reference stored as float32) and 1.6e-5 (Qwen2.5, float32
reference), identical argmax at every prompt position, identical 64-token greedy continuations, identical
Austen perplexities (18.5191 and 12.3282), and its GGUF-derived tokenizers gave the same ids.

Architecture notes:
  * llama (SmolLM2): llama.cpp's HF->GGUF conversion permutes the Q/K weight rows so that the GGUF uses
    the "normal" RoPE of llama.cpp: adjacent pairs (x[2i], x[2i+1]) rotate by pos * theta^(-2i/d).
  * qwen2: NEOX RoPE, pairs (x[i], x[i + d/2]), unpermuted weights; Q/K/V projections carry biases.
  * theta from <arch>.rope.freq_base, eps from <arch>.attention.layer_norm_rms_epsilon.
  * output.weight absent -> tied to token_embd.weight.
  * No BOS is prepended anywhere here: both models have tokenizer.ggml.add_bos_token = false; the ids
    you pass are exactly what is evaluated.

Token ids files: "*.txt" = whitespace/comma separated decimal ids; anything else = raw int32 little-endian.

Commands:
  logits   MODEL IDS [--all] [--out F]  print top-5 of the last (or every) position; --out writes float32 LE
  generate MODEL IDS -n N               greedy decoding with a KV cache (one token per step after prefill)
  ppl      MODEL IDS [--ctx N]          perplexity: one window of the first N ids (default 4096) fed at
                                        positions 0..N-1; every token 1..N-1 is scored given its full prefix
  tokenize MODEL (--text S | --file F) [--out F] [--limit N]
                                        text -> ids with a HF `tokenizers` BPE built from the GGUF vocab and
                                        merges (optional dependency, only for preparing inputs)
  detok    MODEL IDS                    ids -> text (GPT-2 byte-level decoding of the GGUF vocab)
"""
import argparse
import math
import os
import sys
import time

import numpy as np

try:
    from gguf import GGUFReader
    from gguf.quants import dequantize
except ImportError:  # pragma: no cover
    sys.exit("ref_forward.py needs the gguf package: pip install -r tools/requirements.txt")


def log(msg):
    sys.stderr.write("ref_forward: %s\n" % msg)
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------------
# model loading


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class _LazyLayer:
    """One layer's weights, dequantised on every lookup and never kept (Model(lazy=True)): the
    Qwen2.5-1.5B layers in float64 would need ~12 GB held at once, one layer needs ~0.4 GB."""

    def __init__(self, W, names):
        self._W, self._names = W, names

    def __contains__(self, key):
        return key in self._names

    def __getitem__(self, key):
        return self._W(self._names[key])


class Model:
    def __init__(self, path, dtype=np.float64, lazy=False, kv_fp16=False):
        t0 = time.time()
        # kv_fp16: keys (after RoPE) and values rounded to fp16 before they are cached, as the
        # engine's KV cache stores them; everything else stays in `dtype`
        self.kv_fp16 = kv_fp16
        self.path = path
        self.dtype = np.dtype(dtype)
        r = GGUFReader(path)
        self.reader = r
        arch = field(r, "general.architecture")
        if arch not in ("llama", "qwen2"):
            raise SystemExit("unsupported architecture %r (llama and qwen2 only)" % arch)
        self.arch = arch
        self.n_layer = int(field(r, arch + ".block_count"))
        self.d = int(field(r, arch + ".embedding_length"))
        self.n_head = int(field(r, arch + ".attention.head_count"))
        self.n_kv = int(field(r, arch + ".attention.head_count_kv", self.n_head))
        self.head_dim = int(field(r, arch + ".attention.key_length", self.d // self.n_head))
        self.n_rot = int(field(r, arch + ".rope.dimension_count", self.head_dim))
        self.eps = float(field(r, arch + ".attention.layer_norm_rms_epsilon"))
        self.theta = float(field(r, arch + ".rope.freq_base", 10000.0))
        self.rope_neox = arch == "qwen2"
        self.tokens = field(r, "tokenizer.ggml.tokens")
        self.token_type = field(r, "tokenizer.ggml.token_type")
        self.eos = field(r, "tokenizer.ggml.eos_token_id")
        tensors = {t.name: t for t in r.tensors}
        self._tensors = tensors

        def W(name):
            t = tensors[name]
            w = np.asarray(dequantize(t.data, t.tensor_type))
            return np.ascontiguousarray(w, dtype=self.dtype)

        self.tok_embd = W("token_embd.weight")  # (n_vocab, d)
        self.n_vocab = self.tok_embd.shape[0]
        self.out_norm = W("output_norm.weight")
        self.output = W("output.weight") if "output.weight" in tensors else self.tok_embd
        self.tied = "output.weight" not in tensors
        self.layers = []
        for i in range(self.n_layer):
            p = "blk.%d." % i
            names = {k: p + k + ".weight" for k in
                     ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                      "ffn_down")}
            for b in ("attn_q", "attn_k", "attn_v"):
                if p + b + ".bias" in tensors:
                    names[b + ".bias"] = p + b + ".bias"
            self.layers.append(_LazyLayer(W, names) if lazy else {k: W(n) for k, n in names.items()})
        # RoPE frequencies: theta^(-2i/n_rot), i = 0..n_rot/2-1
        self.inv_freq = self.theta ** (-np.arange(0, self.n_rot, 2, dtype=np.float64) / self.n_rot)
        log("%s: %s, %d layers, d=%d, heads %d/%d x %d, eps %g, theta %g, rope %s, %s output, vocab %d, %s, "
            "loaded in %.1fs" % (os.path.basename(path), arch, self.n_layer, self.d, self.n_head, self.n_kv,
                                 self.head_dim, self.eps, self.theta, "neox" if self.rope_neox else "normal",
                                 "tied" if self.tied else "separate", self.n_vocab, self.dtype.name,
                                 time.time() - t0))

    # ---------------------------------------------------------------------------------------------
    def rmsnorm(self, x, w):
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(ms + self.eps) * w

    def rope(self, x, pos):
        """x: (heads, T, head_dim); pos: (T,) absolute positions."""
        ang = np.outer(pos.astype(np.float64), self.inv_freq)  # (T, n_rot/2)
        cos = np.cos(ang).astype(self.dtype)
        sin = np.sin(ang).astype(self.dtype)
        out = x.copy()
        r = self.n_rot
        if self.rope_neox:
            x0, x1 = x[..., : r // 2], x[..., r // 2: r]
            out[..., : r // 2] = x0 * cos - x1 * sin
            out[..., r // 2: r] = x0 * sin + x1 * cos
        else:
            x0, x1 = x[..., 0:r:2], x[..., 1:r:2]
            out[..., 0:r:2] = x0 * cos - x1 * sin
            out[..., 1:r:2] = x0 * sin + x1 * cos
        return out

    def new_cache(self):
        return {"pos": 0, "k": [None] * self.n_layer, "v": [None] * self.n_layer}

    def forward(self, ids, cache=None):
        """Run ids (list/array of T token ids) after what `cache` holds; returns the final-normed hidden
        states (T, d). Appends the new keys/values to cache (pass None for a throw-away cache)."""
        if cache is None:
            cache = self.new_cache()
        ids = np.asarray(ids, dtype=np.int64)
        T = len(ids)
        P = cache["pos"]
        pos = np.arange(P, P + T)
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv
        grp = nh // nkv
        scale = 1.0 / math.sqrt(hd)
        x = self.tok_embd[ids]  # (T, d)
        # causal mask over (T, P+T): key j visible to query t iff j <= P + t
        mask = np.arange(P + T)[None, :] > (P + np.arange(T))[:, None]
        for li, L in enumerate(self.layers):
            h = self.rmsnorm(x, L["attn_norm"])
            q = h @ L["attn_q"].T
            k = h @ L["attn_k"].T
            v = h @ L["attn_v"].T
            if "attn_q.bias" in L:
                q = q + L["attn_q.bias"]
                k = k + L["attn_k.bias"]
                v = v + L["attn_v.bias"]
            q = q.reshape(T, nh, hd).transpose(1, 0, 2)
            k = k.reshape(T, nkv, hd).transpose(1, 0, 2)
            v = v.reshape(T, nkv, hd).transpose(1, 0, 2)
            q = self.rope(q, pos)
            k = self.rope(k, pos)
            if self.kv_fp16:
                k = k.astype(np.float16).astype(self.dtype)
                v = v.astype(np.float16).astype(self.dtype)
            if cache["k"][li] is not None:
                k = np.concatenate([cache["k"][li], k], axis=1)
                v = np.concatenate([cache["v"][li], v], axis=1)
            cache["k"][li], cache["v"][li] = k, v
            att = np.empty((nh, T, hd), dtype=self.dtype)
            for g in range(nkv):  # q heads g*grp .. g*grp+grp-1 share kv head g
                qg = q[g * grp:(g + 1) * grp]  # (grp, T, hd)
                s = (qg @ k[g].T) * scale  # (grp, T, P+T)
                s[:, mask] = -np.inf
                s -= s.max(axis=-1, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(axis=-1, keepdims=True)
                att[g * grp:(g + 1) * grp] = s @ v[g]
                del s
            att = att.transpose(1, 0, 2).reshape(T, nh * hd)
            x = x + att @ L["attn_output"].T
            h = self.rmsnorm(x, L["ffn_norm"])
            gate = h @ L["ffn_gate"].T
            up = h @ L["ffn_up"].T
            act = gate / (1.0 + np.exp(-gate)) * up  # SiLU(gate) * up
            x = x + act @ L["ffn_down"].T
        cache["pos"] = P + T
        return self.rmsnorm(x, self.out_norm)

    def logits(self, hidden):
        return hidden @ self.output.T

    # ---------------------------------------------------------------------------------------------
    def generate(self, ids, n, stop_at_eos=False):
        cache = self.new_cache()
        h = self.forward(ids, cache)
        out = []
        nxt = int(np.argmax(self.logits(h[-1:])[0]))
        for i in range(n):
            out.append(nxt)
            if stop_at_eos and nxt == self.eos:
                break
            if i + 1 == n:
                break
            h = self.forward([nxt], cache)
            nxt = int(np.argmax(self.logits(h)[0]))
        return out

    def nll(self, ids, chunk=512):
        """Negative log-likelihoods (float64) of ids[1:] given their prefixes, one window."""
        h = self.forward(ids, None)
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty(len(ids) - 1, dtype=np.float64)
        for s in range(0, len(ids) - 1, chunk):
            e = min(s + chunk, len(ids) - 1)
            lg = self.logits(h[s:e]).astype(np.float64)
            m = lg.max(axis=1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(lg - m).sum(axis=1)))
            out[s:e] = lse - lg[np.arange(e - s), ids[s + 1:e + 1]]
        return out

    # ---------------------------------------------------------------------------------------------
    def detok(self, ids):
        return detokenize(self.tokens, self.token_type, ids)


# --------------------------------------------------------------------------------------------------
# tokenizer helpers (input preparation only)


def _byte_decoder():
    """GPT-2's bytes_to_unicode table, inverted: printable unicode char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DEC = None


def detokenize(tokens, token_type, ids):
    global _BYTE_DEC
    if _BYTE_DEC is None:
        _BYTE_DEC = _byte_decoder()
    out = bytearray()
    for i in ids:
        t = tokens[int(i)]
        if token_type is not None and token_type[int(i)] in (3, 4):  # control / user-defined: verbatim
            out += t.encode("utf-8")
        else:
            out += bytes(_BYTE_DEC[c] for c in t)
    return out.decode("utf-8", errors="replace")


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def hf_tokenizer(reader):
    """A HF `tokenizers` Tokenizer equivalent to the model's own tokenizer.json, rebuilt from the GGUF
    vocab/merges and the pre-tokenizer named by tokenizer.ggml.pre (smollm, qwen2)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if field(reader, "tokenizer.ggml.model") != "gpt2":
        raise SystemExit("only GPT-2 style BPE vocabularies are supported")
    toks = field(reader, "tokenizer.ggml.tokens")
    ttype = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(toks)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = field(reader, "tokenizer.ggml.pre")
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre == "qwen2":
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise SystemExit("unknown tokenizer.ggml.pre %r" % pre)
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(toks, ttype) if ty in (3, 4)]
    tk.add_special_tokens(special)
    for t in special:  # sanity: special ids must match the GGUF
        assert tk.token_to_id(t.content) == vocab[t.content]
    return tk


def encode(reader, text):
    tk = hf_tokenizer(reader)
    ids = tk.encode(text, add_special_tokens=False).ids
    back = detokenize(field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type"), ids)
    n_text = text
    if field(reader, "tokenizer.ggml.pre") == "qwen2":
        import unicodedata
        n_text = unicodedata.normalize("NFC", text)
    if back != n_text:
        raise SystemExit("tokenizer round trip failed: detokenized text differs from the input")
    return ids


# --------------------------------------------------------------------------------------------------
# ids files


def read_ids(path):
    if path.endswith(".txt"):
        with open(path) as f:
            return [int(x) for x in f.read().replace(",", " ").split()]
    return np.fromfile(path, dtype="<i4").astype(np.int64).tolist()


def write_ids(path, ids):
    if path.endswith(".txt"):
        with open(path, "w") as f:
            f.write(" ".join(str(int(i)) for i in ids) + "\n")
    else:
        np.asarray(ids, dtype="<i4").tofile(path)


def parse_ids_arg(s):
    if os.path.exists(s):
        return read_ids(s)
    return [int(x) for x in s.replace(",", " ").split()]


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, default_dtype):
        p.add_argument("model")
        p.add_argument("--dtype", choices=("float32", "float64"), default=default_dtype)

    p = sub.add_parser("logits")
    common(p, "float64")
    p.add_argument("ids", help="ids file or a comma/space separated list")
    p.add_argument("--all", action="store_true", help="every position, not only the last")
    p.add_argument("--out", help="write the logits as float32 LE (rows = positions)")
    p = sub.add_parser("generate")
    common(p, "float64")
    p.add_argument("ids")
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--stop-at-eos", action="store_true")
    p = sub.add_parser("ppl")
    common(p, "float32")
    p.add_argument("ids")
    p.add_argument("--ctx", type=int, default=4096)
    p = sub.add_parser("tokenize")
    p.add_argument("model")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text")
    g.add_argument("--file")
    p.add_argument("--out")
    p.add_argument("--limit", type=int, help="keep only the first N ids")
    p = sub.add_parser("detok")
    p.add_argument("model")
    p.add_argument("ids")
    a = ap.parse_args(argv)

    if a.cmd in ("tokenize", "detok"):
        r = GGUFReader(a.model)
        if a.cmd == "detok":
            sys.stdout.write(detokenize(field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type"),
                                        parse_ids_arg(a.ids)))
            return 0
        text = a.text if a.text is not None else open(a.file, encoding="utf-8").read()
        ids = encode(r, text)
        if a.limit:
            ids = ids[:a.limit]
        if a.out:
            write_ids(a.out, ids)
            log("%d ids -> %s" % (len(ids), a.out))
        else:
            print(" ".join(map(str, ids)))
        return 0

    m = Model(a.model, dtype=np.float64 if a.dtype == "float64" else np.float32)
    ids = parse_ids_arg(a.ids)
    if a.cmd == "logits":
        h = m.forward(ids)
        if not a.all:
            h = h[-1:]
        lg = m.logits(h)
        for row, l in zip(range(len(ids) - len(lg), len(ids)), lg):
            top = np.argsort(-l)[:5]
            print("pos %d: " % row + "  ".join("%d(%r)=%.4f" % (t, m.detok([t]), l[t]) for t in top))
        if a.out:
            lg.astype("<f4").tofile(a.out)
    elif a.cmd == "generate":
        t0 = time.time()
        out = m.generate(ids, a.n, a.stop_at_eos)
        print(" ".join(map(str, out)))
        print(repr(m.detok(out)))
        log("%d tokens in %.1fs" % (len(out), time.time() - t0))
    elif a.cmd == "ppl":
        ids = ids[:a.ctx]
        t0 = time.time()
        nll = m.nll(ids)
        half = len(ids) // 2
        print("tokens %d (scored %d: ids[1..%d] given their full prefix, no BOS), dtype %s" %
              (len(ids), len(nll), len(ids) - 1, a.dtype))
        print("ppl %.4f  (mean nll %.6f nats)" % (math.exp(nll.mean()), nll.mean()))
        print("ppl second half only (ids[%d..%d], llama-perplexity style) %.4f" %
              (half, len(ids) - 1, math.exp(nll[half - 1:].mean())))
        log("ppl in %.1fs" % (time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
