#!/usr/bin/env python3
"""Training prompts for the learned-eviction heads (Locret), built here from Debian text.

usage: tools/train/make_data.py [--out .cache/train/prompts.jsonl] [--n 900] [--heldout 48] [--seed 7331]

Sources (fetched with `apt-get download`, unpacked with `dpkg-deb -x` into .cache/apt-data/train/;
nothing is installed):
  - debian-reference-en: the Debian Reference manual, plain-text edition (about 93k words);
  - fortunes: the fortune-mod quotation files (literature, songs and poems, people, science, ...).
Neither is used by the evaluation (`kvsieve eval` builds its haystacks from Jane Austen's novels and
synthetic noise), and the Python documentation, kept for independent checks, is not read.

Each line is one prompt: {"id", "split" ("train" or "heldout"), "source", "context", "question",
"kind", "target_tokens"}. The context is a window of one source (about `target_tokens` tokens,
drawn uniformly from [--min-tokens, --max-tokens], estimated at 1.35 tokens per word) with 0 to 4
inserted facts; the question asks about one fact, or about the text itself (summary, topic, a
quoted line). The answers are not written here: the training script has the model answer them
(its own greedy answer is what the retaining heads learn to keep the context for).

The templates, names and seeds are ours and differ from the evaluation's (RULER-style "special
magic number" needles, variable tracking, word frequencies and Austen passages): the sweep measures
generalisation, not memory of its prompts.
"""

import argparse
import glob
import gzip
import json
import os
import random
import re
import subprocess
import sys

CACHE = ".cache/apt-data/train"
PKGS = ("debian-reference-en", "fortunes")

FIRST = ["Harriet", "Ignatius", "Marisol", "Desmond", "Oksana", "Theodora", "Rupert", "Yusuf",
         "Priya", "Lennart", "Camille", "Bartholomew", "Ingrid", "Mateo", "Anouk", "Cornelius",
         "Svetlana", "Winifred", "Kwame", "Beatrix", "Dmitri", "Rosalind", "Tobias", "Ximena",
         "Alistair", "Femke", "Gideon", "Hyacinth", "Jovan", "Lucinda", "Nikolai", "Ottoline"]
LAST = ["Vance", "Okafor", "Lindqvist", "Moreau", "Takahashi", "Brennan", "Castellano", "Haddad",
        "Kowalczyk", "Pemberton-Ruiz", "Abernathy", "Nakamura", "Oyelaran", "Fairweather", "Quint",
        "Rasmussen", "Szabo", "Thorne", "Underhill", "Villanueva", "Whitcombe", "Yilmaz", "Zeller"]
COLORS = ["teal", "ochre", "magenta", "indigo", "olive", "maroon", "cyan", "lavender", "umber"]
ANIMALS = ["tortoise", "parrot", "ferret", "goldfish", "hedgehog", "iguana", "beagle", "canary"]
PETS = ["Biscuit", "Marzipan", "Pickle", "Tofu", "Noodle", "Waffles", "Pretzel", "Juniper", "Mochi"]
CITIES = ["Tromso", "Valparaiso", "Ljubljana", "Hobart", "Cusco", "Tbilisi", "Windhoek", "Halifax"]
WORDS = ["lantern", "quarry", "velvet", "thimble", "orchid", "walnut", "compass", "harbor", "saffron"]


def fetch():
    """Download and unpack the two packages into CACHE (idempotent)."""
    os.makedirs(CACHE, exist_ok=True)
    for p in PKGS:
        if not glob.glob(os.path.join(CACHE, p + "_*.deb")):
            r = subprocess.run(["apt-get", "download", "-q", p], cwd=CACHE, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"make_data: apt-get download {p} failed: {r.stderr.strip()}")
        deb = sorted(glob.glob(os.path.join(CACHE, p + "_*.deb")))[-1]
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(CACHE, "root")], check=True)
    root = os.path.join(CACHE, "root", "usr", "share")
    with gzip.open(os.path.join(root, "debian-reference", "debian-reference.en.txt.gz"), "rt",
                   encoding="utf-8", errors="replace") as f:
        debref = f.read()
    quotes = []
    fdir = os.path.join(root, "games", "fortunes")
    for name in sorted(os.listdir(fdir)):
        path = os.path.join(fdir, name)
        if "." in name or not os.path.isfile(path) or name in ("ascii-art", "art"):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            quotes += [q.strip("\n") for q in f.read().split("\n%\n") if 40 <= len(q.strip()) <= 1200]
    return debref, quotes


def paragraphs_debref(text):
    paras = [re.sub(r"[ \t]+", " ", p.strip()) for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if len(p.split()) >= 4]


def window(paras, words, rng):
    """Consecutive paragraphs from a random start, about `words` words."""
    i = rng.randrange(len(paras))
    out, n = [], 0
    while n < words:
        p = paras[i % len(paras)]
        out.append(p)
        n += len(p.split())
        i += 1
    return out


def make_fact(rng):
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    k = rng.randrange(5)
    if k == 0:
        code = f"{rng.randrange(1000, 10000)}-{rng.randrange(10, 100)}"
        return (f"(Side note: the locker of {name} opens with the code {code}.)",
                f"Which code opens the locker of {name}?", code)
    if k == 1:
        plat, hh, mm = rng.randrange(1, 19), rng.randrange(5, 23), rng.choice([5, 10, 20, 35, 45, 50])
        return (f"(Reminder: the train of {name} leaves from platform {plat} at {hh:02d}:{mm:02d}.)",
                f"From which platform and at what time does the train of {name} leave?",
                f"{plat} {hh:02d}:{mm:02d}")
    if k == 2:
        col, pw = rng.choice(COLORS), f"{rng.choice(WORDS)}{rng.randrange(10, 1000)}"
        return (f"(By the way, the password of the {col} server is {pw}.)",
                f"What is the password of the {col} server?", pw)
    if k == 3:
        an, pet = rng.choice(ANIMALS), rng.choice(PETS)
        return (f"({name} owns a {an} named {pet}.)", f"What is the name of the {an} that {name} owns?", pet)
    city, year = rng.choice(CITIES), rng.randrange(1950, 2021)
    return (f"({name} moved to {city} in {year}.)", f"In which year did {name} move to {city}, and where?",
            f"{year} {city}")


TEXT_QUESTIONS = [
    "Summarize the text above in two sentences.",
    "What is the main subject of the text above? Answer briefly.",
    "Quote the first sentence of the text above.",
    "Name three topics that the text above mentions.",
    "What does the last paragraph of the text above say? Answer in one sentence.",
    "Which command or name is mentioned most often in the text above?",
]


def build(debref, quotes, n, heldout, seed, lo, hi):
    paras = paragraphs_debref(debref)
    rows = []
    for i in range(n + heldout):
        rng = random.Random(seed * 1000003 + i)
        target = rng.randrange(lo, hi + 1)
        words = int(target / 1.35)
        if rng.random() < 0.55:
            src, parts = "debian-reference", window(paras, words, rng)
        else:
            src, parts, m = "fortunes", [], 0
            while m < words:
                q = rng.choice(quotes)
                parts.append(q)
                m += len(q.split())
        facts = [make_fact(rng) for _ in range(rng.randrange(5))]
        for f in facts:
            parts.insert(rng.randrange(len(parts) + 1), f[0])
        if facts and rng.random() < 0.7:
            f = rng.choice(facts)
            kind, question = "fact", f[1] + " Answer briefly."
        else:
            kind, question = "text", rng.choice(TEXT_QUESTIONS)
        rows.append({"id": f"train-{seed}-{i}", "split": "train" if i < n else "heldout", "source": src,
                     "kind": kind, "target_tokens": target, "context": "\n\n".join(parts), "question": question})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".cache/train/prompts.jsonl")
    ap.add_argument("--n", type=int, default=900, help="training prompts")
    ap.add_argument("--heldout", type=int, default=48, help="held-out prompts (not trained on)")
    ap.add_argument("--seed", type=int, default=7331)
    ap.add_argument("--min-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=4096)
    a = ap.parse_args()
    debref, quotes = fetch()
    rows = build(debref, quotes, a.n, a.heldout, a.seed, a.min_tokens, a.max_tokens)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, a.out)
    nb = os.path.getsize(a.out)
    print(f"make_data: {len(rows)} prompts ({a.n} train, {a.heldout} held out) -> {a.out} "
          f"({nb / 1e6:.1f} MB); {len(quotes)} quotes, {len(debref.split())} words of Debian Reference")


if __name__ == "__main__":
    main()
