#!/usr/bin/env python3
"""gen_batch.py — a batch workload for `kvsieve batch` (OpenAI Batch API input lines).

N requests over K shared documents: each document is a passage of about --doc-words words cut
from the Jane Austen novels (`make data`, data/austen/), and each request asks one of several
questions about one document, so requests share long prefixes (the document) and differ in the
question; max_tokens is drawn from --max-tokens (mixed decode lengths for decode-first ordering).
The same seed gives the same file. Half the requests use chat, half completions (--mode).

  tools/gen_batch.py -n 200 -k 10 -o batch.jsonl
  build/kvsieve batch -i batch.jsonl -o results.jsonl
"""
import argparse
import json
import os
import random
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = [
    "Who are the people named in this passage?",
    "Summarise the passage in one sentence.",
    "What is the mood of this passage?",
    "Which place is mentioned first?",
    "What does the first speaker want?",
    "List three words that describe the narrator's tone.",
    "What happens at the end of the passage?",
    "Give the passage a short title.",
]


def passages(n, words, rng):
    texts = []
    folder = os.path.join(ROOT, "data", "austen")
    if not os.path.isdir(folder):
        sys.exit("gen_batch: data/austen not found (make data)")
    for f in sorted(os.listdir(folder)):
        with open(os.path.join(folder, f), encoding="utf-8", errors="replace") as fh:
            texts.append(re.sub(r"\s+", " ", fh.read()).split(" "))
    out = []
    for i in range(n):
        t = texts[i % len(texts)]
        start = rng.randrange(1000, len(t) - words - 1)
        out.append(" ".join(t[start:start + words]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200, help="requests (default 200)")
    ap.add_argument("-k", type=int, default=10, help="shared documents (default 10)")
    ap.add_argument("--doc-words", type=int, default=1100, help="words per document (~1.5k tokens)")
    ap.add_argument("--max-tokens", default="8,16,32,64", help="max_tokens values drawn at random")
    ap.add_argument("--mode", choices=["chat", "completion", "mixed"], default="mixed")
    ap.add_argument("--kv", help="a `kv` field for every request (e.g. snapkv:ratio=0.25)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--output", default="-")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    docs = passages(a.k, a.doc_words, rng)
    mts = [int(x) for x in a.max_tokens.split(",")]
    out = sys.stdout if a.output == "-" else open(a.output, "w")
    for i in range(a.n):
        d = rng.randrange(a.k)
        q = rng.choice(QUESTIONS)
        chat = a.mode == "chat" or (a.mode == "mixed" and i % 2 == 0)
        body = {"max_tokens": rng.choice(mts), "temperature": 0}
        if chat:
            body["messages"] = [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "Passage: " + docs[d] + "\n\nQuestion: " + q}]
        else:
            body["prompt"] = "Passage: " + docs[d] + "\n\nQuestion: " + q + "\nAnswer:"
        if a.kv:
            body["kv"] = a.kv
        line = {"custom_id": "req-%d" % i, "method": "POST",
                "url": "/v1/chat/completions" if chat else "/v1/completions", "body": body}
        out.write(json.dumps(line) + "\n")
    if out is not sys.stdout:
        out.close()


if __name__ == "__main__":
    main()
