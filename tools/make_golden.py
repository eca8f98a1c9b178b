#!/usr/bin/env python3
"""Write the golden reference files the C test-suite compares the engine against.

usage: tools/make_golden.py [smollm2|qwen2|all]      (default smollm2; needs numpy, gguf, tokenizers)
       tools/make_golden.py austen [smollm2|qwen2|all] (perplexity reference; needs data/austen, see below)
       tools/make_golden.py positions [smollm2|qwen2|all] (every-position reference; needs numpy, gguf)

Outputs (tests/golden/):
  smollm2_golden.bin / .json   from models/SmolLM2-135M-Instruct.Q4_1.gguf        (computed in float64)
  qwen2_golden.bin   / .json   from models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf (computed in float32:
                               float64 weights would need ~13 GB)
  austen_pp_4096.ids          first 4096 SmolLM2 token ids of data/austen/prideprejudice.txt (int32 LE)
  austen_pp_4096_qwen2.ids    the same text, first 4096 Qwen2.5 token ids
  austen_pp_4096.json         the reference perplexities on those ids (ref_forward.py ppl, float32)
  smollm2_positions.bin / .json  logits at EVERY position of several token sequences, on a fixed sample
  qwen2_positions.bin   / .json  of the vocabulary (both computed in float64; Qwen2.5's layers are
                               dequantised one at a time, see ref_forward.Model(lazy=True))
The .json is informative (prompt texts, decoded generations, top-5, per-position argmax, model sha256);
the C tests read the .bin.

Every-position format (*_positions.bin, little-endian, no padding). The sequences are the ids of the
golden prompts above (a prompt with a greedy continuation is followed by it, so decode positions are
covered too) and the first AUSTEN_N ids of the Austen perplexity text (austen_pp_4096*.ids); no
tokenizer is needed, so the ids are exactly those of the other golden files.
    char     magic[8]      "KVSPOS01"
    int32    n_vocab
    int32    n_seq
    int32    n_sample                  vocabulary entries kept per position
    int32    sample[n_sample]          their ids, ascending (a seeded random draw)
    then n_seq records:
        int32    n_tokens
        int32    ids[n_tokens]         fed at positions 0..n_tokens-1, no BOS added
        n_tokens rows of:
            int32    top1              reference argmax over the whole vocabulary at this position
            float32  margin            reference logit top1 - top2 (whole vocabulary)
            float32  logits[n_sample]  reference logits at the sampled ids

Binary format (all little-endian, no padding):
    char     magic[8]      "KVSGOLD1"
    int32    n_vocab
    int32    n_prompts
    then n_prompts records:
        int32    n_tokens              prompt length
        int32    n_gen                 number of greedy continuation tokens (0 when none)
        int32    ids[n_tokens]         prompt token ids, fed at positions 0..n_tokens-1, no BOS added
        float32  logits[n_vocab]       logits of the LAST prompt position (prediction for position n_tokens)
        int32    gen[n_gen]            greedy continuation (argmax each step, EOS NOT treated specially:
                                       exactly n_gen tokens, each fed back through the KV cache)
        float32  gen_gap[n_gen]        reference logit margin top1 - top2 at each generation step; where it is
                                       tiny an engine with different rounding may legitimately pick another
                                       token, so compare generations only up to the first small-gap step

Computation: tools/ref_forward.py (numpy, weights dequantised with gguf.quants.dequantize). Prompt ids
come from a HF `tokenizers` BPE rebuilt from the GGUF vocab/merges (ref_forward.hf_tokenizer), checked by a
detokenisation round trip; they are also stored, so the C engine can be compared on identical ids.
"""
import hashlib
import json
import os
import re
import struct
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_forward as rf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
N_GEN = 64

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def chat(system, user):
    return ("<|im_start|>system\n%s<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n"
            % (system, user))


# Generation prompts, chosen for robust greedy margins (an engine that quantises activations moves
# logits by ~0.1-0.2, so a continuation is only reproducible where the reference's top1-top2 gap is
# clearly larger). SmolLM2: smallest gap over the 64 steps 0.445 (the factorial prompt had 0.144 and an
# 8-bit-activation engine diverged at a step with gap 0.22); Qwen2.5: smallest gap 0.646.
SMOL_CHAT_USER = "Count from 1 to 30, separated by commas."
QWEN_CHAT_USER = "Write a Python function that returns the factorial of n."

LONG_PLAIN = (
    "The lighthouse keeper kept a careful log. On 14 March 1887 he wrote: \"Wind from the north-east, "
    "force 7; three vessels sighted before noon, one of them a collier bound for Newcastle.\" The entries "
    "that follow are shorter, and the handwriting changes twice, which suggests that his assistants took "
    "over during the winter storms. A modern reader can reconstruct the weather of that year from the "
    "log alone: the barometer readings (in inches of mercury) fall from 30.12 to 28.95 in a single night, "
    "and the keeper notes that the lamp had to be trimmed every two hours instead of every four."
)

PROMPTS = {
    "smollm2": [
        # (name, text, n_gen)
        ("one_token", "The", 0),
        ("short_plain", "The capital of France is Paris, and the capital of Germany is", 0),
        ("chat_count", chat(SMOL_SYSTEM, SMOL_CHAT_USER), N_GEN),
        ("long_plain", LONG_PLAIN, 0),
    ],
    # two prompts only, to keep the file near 1.2 MB (151936-entry logits)
    "qwen2": [
        ("chat_code", chat(QWEN_SYSTEM, QWEN_CHAT_USER), N_GEN),
        ("long_plain", LONG_PLAIN, 0),
    ],
}

MODELS = {
    "smollm2": ("models/SmolLM2-135M-Instruct.Q4_1.gguf", np.float64),
    "qwen2": ("models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", np.float32),
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def make(name):
    path, dtype = MODELS[name]
    path = os.path.join(ROOT, path)
    if not os.path.exists(path):
        raise SystemExit("make_golden: %s missing (make %s)" % (path, "models" if name == "smollm2" else "models-large"))
    m = rf.Model(path, dtype=dtype)
    records, meta = [], []
    for pname, text, n_gen in PROMPTS[name]:
        t0 = time.time()
        ids = rf.encode(m.reader, text)
        assert m.detok(ids) == text
        cache = m.new_cache()
        h = m.forward(ids, cache)
        lg_all = m.logits(h)  # (T, n_vocab)
        last = lg_all[-1].astype(np.float64)
        argmax_all = [int(i) for i in np.argmax(lg_all, axis=1)]
        gen, gaps = [], []
        lg = last
        for i in range(n_gen):
            top2 = np.argsort(-lg)[:2]
            gen.append(int(top2[0]))
            gaps.append(float(lg[top2[0]] - lg[top2[1]]))
            if i + 1 < n_gen:
                lg = m.logits(m.forward([gen[-1]], cache))[0].astype(np.float64)
        top5 = [int(i) for i in np.argsort(-last)[:5]]
        records.append((ids, last.astype("<f4"), gen, gaps))
        meta.append({
            "name": pname, "text": text, "n_tokens": len(ids), "ids": ids,
            "argmax_all_positions": argmax_all,
            "last_top5": [{"id": t, "piece": m.detok([t]), "logit": round(float(last[t]), 5)} for t in top5],
            "n_gen": n_gen, "gen": gen, "gen_text": m.detok(gen) if gen else "",
            "gen_min_gap": round(min(gaps), 5) if gaps else None,
        })
        rf.log("%s/%s: %d tokens, top1 %r, %s(%.1fs)" % (
            name, pname, len(ids), m.detok(top5[:1]),
            ("gen %r, min gap %.4f " % (m.detok(gen), min(gaps))) if gen else "", time.time() - t0))
        if gen and m.eos in gen:
            rf.log("warning: the greedy continuation of %s contains EOS (%d)" % (pname, m.eos))

    os.makedirs(GOLDEN, exist_ok=True)
    out = os.path.join(GOLDEN, name + "_golden.bin")
    with open(out + ".tmp", "wb") as f:
        f.write(b"KVSGOLD1")
        f.write(struct.pack("<ii", m.n_vocab, len(records)))
        for ids, last, gen, gaps in records:
            f.write(struct.pack("<ii", len(ids), len(gen)))
            f.write(np.asarray(ids, dtype="<i4").tobytes())
            assert last.shape == (m.n_vocab,)
            f.write(last.tobytes())
            f.write(np.asarray(gen, dtype="<i4").tobytes())
            f.write(np.asarray(gaps, dtype="<f4").tobytes())
    os.replace(out + ".tmp", out)
    js = {
        "model": os.path.relpath(path, ROOT), "model_sha256": sha256(path), "arch": m.arch,
        "compute_dtype": m.dtype.name, "n_vocab": m.n_vocab, "bos_added": False,
        "format": "see tools/make_golden.py header", "prompts": meta,
    }
    with open(os.path.join(GOLDEN, name + "_golden.json"), "w", encoding="utf-8") as f:
        txt = json.dumps(js, indent=1, ensure_ascii=False)
        # one line per list of numbers
        txt = re.sub(r"\[\s*(-?[0-9.e+-]+(?:,\s*-?[0-9.e+-]+)*)\s*\]",
                     lambda mo: "[" + re.sub(r"\s+", " ", mo.group(1)) + "]", txt)
        f.write(txt + "\n")
    rf.log("wrote %s (%d bytes) and %s_golden.json" % (out, os.path.getsize(out), name))


PPL_CTX = 4096
PPL_TEXT = "data/austen/prideprejudice.txt"
PPL_IDS = {"smollm2": "austen_pp_4096.ids", "qwen2": "austen_pp_4096_qwen2.ids"}
PPL_PROTOCOL = ("text: data/austen/prideprejudice.txt from its first byte (scripts/fetch_data.sh), tokenized "
                "without BOS; ids = the first 4096 tokens; one window: ids fed at positions 0..4095 with "
                "causal attention over the whole window; ppl = exp(mean over i=1..4095 of "
                "-log p(ids[i] | ids[0..i-1])), natural log, 4095 scored tokens; ppl_second_half = the same "
                "mean over i=2048..4095 only (llama.cpp perplexity style); reference computed in float32")


def make_austen(name):
    import math
    path, _ = MODELS[name]
    path = os.path.join(ROOT, path)
    text_path = os.path.join(ROOT, PPL_TEXT)
    if not os.path.exists(text_path):
        raise SystemExit("make_golden: %s missing (scripts/fetch_data.sh)" % text_path)
    m = rf.Model(path, dtype=np.float32)
    ids = rf.encode(m.reader, open(text_path, encoding="utf-8").read())[:PPL_CTX]
    rf.write_ids(os.path.join(GOLDEN, PPL_IDS[name]), ids)
    t0 = time.time()
    nll = m.nll(ids)
    half = PPL_CTX // 2
    res = {"ids_file": "tests/golden/" + PPL_IDS[name], "model": os.path.relpath(path, ROOT),
           "model_sha256": sha256(path), "n_tokens": len(ids), "n_scored": len(nll),
           "ppl": round(math.exp(nll.mean()), 4), "mean_nll": round(float(nll.mean()), 6),
           "ppl_second_half": round(math.exp(nll[half - 1:].mean()), 4)}
    rf.log("%s: ppl %.4f (second half %.4f) in %.0fs" % (name, res["ppl"], res["ppl_second_half"], time.time() - t0))
    jp = os.path.join(GOLDEN, "austen_pp_4096.json")
    js = json.load(open(jp)) if os.path.exists(jp) else {}
    js["protocol"] = PPL_PROTOCOL
    js[name] = res
    with open(jp, "w") as f:
        json.dump(js, f, indent=1)
        f.write("\n")


POS_SAMPLE = 384     # vocabulary entries per position: ~0.8 MB for ~500 positions
POS_SEED = 19
AUSTEN_N = {"smollm2": 256, "qwen2": 192}


def make_positions(name):
    path, _ = MODELS[name]
    path = os.path.join(ROOT, path)
    if not os.path.exists(path):
        raise SystemExit("make_golden: %s missing" % path)
    gj = json.load(open(os.path.join(GOLDEN, name + "_golden.json"), encoding="utf-8"))
    seqs = [(p["name"] + ("+gen" if p["gen"] else ""), p["ids"] + p["gen"]) for p in gj["prompts"]]
    austen = rf.read_ids(os.path.join(GOLDEN, PPL_IDS[name]))[:AUSTEN_N[name]]
    seqs.append(("austen_pp_%d" % len(austen), austen))
    m = rf.Model(path, dtype=np.float64, lazy=(name == "qwen2"), kv_fp16=True)
    sample = np.sort(np.random.default_rng(POS_SEED).choice(m.n_vocab, POS_SAMPLE, replace=False))
    out = os.path.join(GOLDEN, name + "_positions.bin")
    meta = []
    with open(out + ".tmp", "wb") as f:
        f.write(b"KVSPOS01")
        f.write(struct.pack("<iii", m.n_vocab, len(seqs), POS_SAMPLE))
        f.write(sample.astype("<i4").tobytes())
        for sname, ids in seqs:
            t0 = time.time()
            lg = m.logits(m.forward(ids))  # (T, n_vocab) float64
            top2 = np.argsort(-lg, axis=1)[:, :2]
            rows = np.arange(len(ids))
            margin = lg[rows, top2[:, 0]] - lg[rows, top2[:, 1]]
            f.write(struct.pack("<i", len(ids)))
            f.write(np.asarray(ids, dtype="<i4").tobytes())
            for t in rows:
                f.write(struct.pack("<if", int(top2[t, 0]), float(margin[t])))
                f.write(lg[t, sample].astype("<f4").tobytes())
            meta.append({"name": sname, "n_tokens": len(ids), "argmax": [int(i) for i in top2[:, 0]],
                         "min_margin": round(float(margin.min()), 5)})
            rf.log("%s/%s: %d positions, smallest top-2 margin %.4f (%.1fs)" % (
                name, sname, len(ids), margin.min(), time.time() - t0))
    os.replace(out + ".tmp", out)
    js = {"model": os.path.relpath(path, ROOT), "model_sha256": sha256(path), "compute_dtype": "float64",
          "n_vocab": m.n_vocab, "n_sample": POS_SAMPLE, "sample_seed": POS_SEED,
          "format": "see tools/make_golden.py header (every-position format)", "sequences": meta}
    with open(os.path.join(GOLDEN, name + "_positions.json"), "w", encoding="utf-8") as f:
        txt = json.dumps(js, indent=1)
        txt = re.sub(r"\[\s*(-?[0-9.e+-]+(?:,\s*-?[0-9.e+-]+)*)\s*\]",
                     lambda mo: "[" + re.sub(r"\s+", " ", mo.group(1)) + "]", txt)
        f.write(txt + "\n")
    rf.log("wrote %s (%d bytes) and %s_positions.json" % (out, os.path.getsize(out), name))


def main(argv):
    if len(argv) > 1 and argv[1] == "positions":
        which = argv[2] if len(argv) > 2 else "smollm2"
        for n in (["smollm2", "qwen2"] if which == "all" else [which]):
            if n not in MODELS:
                raise SystemExit("usage: make_golden.py positions [smollm2|qwen2|all]")
            make_positions(n)
        return 0
    if len(argv) > 1 and argv[1] == "austen":
        which = argv[2] if len(argv) > 2 else "smollm2"
        for n in (["smollm2", "qwen2"] if which == "all" else [which]):
            if n not in MODELS:
                raise SystemExit("usage: make_golden.py austen [smollm2|qwen2|all]")
            make_austen(n)
        return 0
    which = argv[1] if len(argv) > 1 else "smollm2"
    names = ["smollm2", "qwen2"] if which == "all" else [which]
    for n in names:
        if n not in MODELS:
            raise SystemExit("usage: make_golden.py [smollm2|qwen2|all]")
        make(n)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
