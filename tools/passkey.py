#!/usr/bin/env python3
"""Passkey retrieval (Mohtashami & Jaggi, "Landmark Attention", arXiv 2305.16300 style) through the
kvsieve CLI, for every KV method and ratio, question-aware and question-agnostic.

  question-aware:    the whole prompt (filler + passkey + filler + question) is prefilled and then
                     compressed (when=prefill), so the scores (SnapKV's window, TOVA's last query)
                     see the question;
  question-agnostic: the context alone is prefilled, compressed and saved (--save-cache, -n 0),
                     then the question is appended to the restored cache (--load-cache): the policy
                     chose what to keep without seeing the question (kvpress's default pipeline).
--when chunk instead compresses after every prefill chunk (bounded memory); then the context is
compressed before the question arrives in both modes.

A trial passes when the generated answer contains the passkey digits. Trials use fixed seeds
(passkey value and depth), so runs are reproducible. Prints a markdown table and writes JSON lines.

usage: tools/passkey.py [--tokens 4000] [--trials 5] [--methods full,h2o,...] [--ratios 0.5,0.25,0.1]
                        [--when prefill|chunk] [--bin build/kvsieve] [--model M] [--out results/passkey.jsonl]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTION = "What is the pass key? The pass key is"


def build(n_tokens, seed):
    rng = random.Random(seed)
    key = rng.randint(10000, 99999)
    # ~24 tokens per filler sentence group with the SmolLM2/Qwen vocabularies
    reps = max(4, int(n_tokens / 24))
    depth = rng.uniform(0.1, 0.9)
    at = int(reps * depth)
    intro = ("There is an important piece of information hidden inside a lot of irrelevant text. "
             "Find it and memorize it. I will quiz you about it.\n")
    needle = "The pass key is %d. Remember it. %d is the pass key. " % (key, key)
    context = intro + FILLER * at + needle + FILLER * (reps - at)
    return context, key, depth


def run(args, kv, prompt_file, extra):
    cmd = [args.bin, "run", "--json", "-q", "--temp", "0", "-m", args.model, "--kv", kv, "-c",
           str(args.tokens + 256)] + extra
    if prompt_file:
        cmd += ["-f", prompt_file]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(cmd), r.stderr.strip()[-500:]))
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--methods", default="full,streaming,h2o,tova,snapkv,knorm,random")
    ap.add_argument("--ratios", default="0.5,0.25,0.1")
    ap.add_argument("--bin", default="build/kvsieve")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default="results/passkey.jsonl")
    ap.add_argument("--modes", default="aware,agnostic")
    ap.add_argument("--when", default="prefill", choices=("prefill", "chunk"))
    args = ap.parse_args()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="kvs_passkey_")
    specs = []
    for m in args.methods.split(","):
        if m == "full":
            specs.append(("full", "full", 1.0))
        else:
            for r in args.ratios.split(","):
                specs.append((m, "%s:ratio=%s+when=%s" % (m, r, args.when), float(r)))
    results = {}
    with open(args.out, "w") as out:
        for trial in range(args.trials):
            context, key, depth = build(args.tokens, 1000 + trial)
            cfile = os.path.join(tmp, "context.txt")
            qfile = os.path.join(tmp, "question.txt")
            afile = os.path.join(tmp, "all.txt")
            with open(cfile, "w") as f:
                f.write(context)
            with open(qfile, "w") as f:
                f.write("\n" + QUESTION)
            with open(afile, "w") as f:
                f.write(context + "\n" + QUESTION)
            for method, kv, ratio in specs:
                for mode in args.modes.split(","):
                    if mode == "aware":
                        d = run(args, kv, afile, ["-n", "8"])
                    else:
                        cache = os.path.join(tmp, "ctx.kvc")
                        run(args, kv, cfile, ["-n", "0", "--save-cache", cache])
                        d = run(args, kv, qfile, ["-n", "8", "--load-cache", cache])
                    ok = str(key) in d["text"]
                    rec = {"task": "passkey", "tokens": args.tokens, "trial": trial, "depth": round(depth, 3),
                           "key": key, "method": method, "kv": kv, "ratio": ratio, "mode": mode,
                           "answer": d["text"], "pass": ok, "kv_bytes_peak": d["kv_bytes_peak"],
                           "prompt_tokens": d["prompt_tokens"]}
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    results.setdefault((method, ratio, mode), []).append(ok)
                    sys.stderr.write("trial %d %-28s %-8s %s %r\n" % (trial, kv, mode, "PASS" if ok else "fail", d["text"][:40]))
    modes = args.modes.split(",")
    print("| method | ratio | " + " | ".join("%s (pass/%d)" % (m, args.trials) for m in modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for method, kv, ratio in specs:
        row = ["%d" % sum(results[(method, ratio, m)]) for m in modes]
        print("| %s | %s | %s |" % (method, "-" if method == "full" else ratio, " | ".join(row)))


if __name__ == "__main__":
    main()
