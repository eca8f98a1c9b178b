#!/usr/bin/env python3
"""Peer run: NVIDIA kvpress on the prompts of our evaluation harness.

Runs ON the GPU machine (see tools/kvpress_peer.md for how it gets there).  Reads a tasks file:
the JSONL that `kvsieve eval tasks` exports, or one a user wrote by hand, in the format
`kvsieve eval --help tasks-file` documents (context, question, outputs required; answer_prefix,
metric, max_new_tokens, stop_at_newline, id, task, family, length, seed, sample optional, with the
same defaults and the same checks as kvsieve's reader, src/eval/prompt_file.c: a malformed line
stops everything with PATH:LINE: problem and exit code 2).  For every prompt it runs kvpress's
text-generation pipeline once without a press ("full") and once per (press, kept ratio).  Writes
one JSON line per run in our results format and prints a summary table.

Token streams: kvpress's pipeline applies the chat template to the context and appends the
template's suffix plus the answer prefix to the question; the context is prefilled (and compressed
by the press), then the question is prefilled and the answer decoded greedily.  We feed the
pipeline's forward step (KVPressTextGenerationPipeline._forward, kvpress's own code) with the token
ids of our prompt_context and prompt_question, tokenized separately exactly like our engine does,
so both systems see the same two token streams.  For each prompt we also run kvpress's own
preprocess() on (context, question, answer_prefix) and record whether it would have produced the
same ids ("kvpress_preprocess_match").  A record without prompt_context/prompt_question (a
hand-written file), or one exported for another model (its model_sha256 is not the --gguf's), is
fed what preprocess() makes of the raw fields: the model's chat template applied by kvpress.

kvpress's compression_ratio is the fraction REMOVED; our "ratio" is the fraction KEPT:
compression_ratio = 1 - ratio.

Modes:
  --dry-run       parse the tasks, check the fields, test the scorer, print the plan (no torch).
  (default)       convert the GGUF once to a bf16 HF folder, start --workers processes that share
                  the GPU, merge their outputs, print the summary.
"""

import argparse
import json
import os
import subprocess
import sys
import time

KEPT_RATIOS = (0.5, 0.25, 0.1)

# method name in our results -> kvpress press (class name, wrapper)
METHODS = {
    "streaming": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "tova": "TOVAPress",
    "knorm": "KnormPress",
    "h2o": "ObservedAttentionPress",
    "expected_attention": "ExpectedAttentionPress",
    "snapkv+alloc=adakv": "AdaKVPress(SnapKVPress)",
    "random": "RandomPress",
}

# How each press treats grouped-query attention (Qwen2.5-1.5B: 12 query heads, 2 KV heads), read
# in kvpress's source.  ScorerPress.compress keeps, per layer and per KV head, the top
# int(n*(1-cr)) scores, so every press selects per KV head with the same budget per head.
GQA_NOTES = {
    "streaming": "position rule, same tokens in every KV head",
    "snapkv": "attention of the last 64 context queries (window) per query head, avg-pooled (k=5), "
              "averaged over the 6 query heads of each KV group; per-KV-head top-k; window always kept",
    "tova": "attention of the last context query averaged over ALL 12 query heads; same tokens in every "
            "KV head; last token always kept",
    "knorm": "-||k|| per KV head; per-KV-head top-k",
    "h2o": "ObservedAttentionPress: full prefill attention (eager) summed over queries / number of "
           "queries that see the key, averaged over the query heads of each KV group; per-KV-head top-k",
    "expected_attention": "expected attention of future queries (mean/cov of the context queries, "
                          "avg RoPE over 512 future positions) per query head, averaged within each KV "
                          "group, times ||v||; 4 sink tokens kept; per-KV-head top-k",
    "snapkv+alloc=adakv": "SnapKV scores per KV head, one top-k over all KV heads of a layer (20% "
                          "safeguard per head); evicted keys are masked with a fake key, not removed "
                          "(no memory saved)",
    "random": "uniform random score per (KV head, token), seeded",
}

# The tasks-file format (kvsieve eval --help tasks-file; src/eval/prompt_file.c reads it the same way)
TASK_FIELDS = ("context", "question", "outputs", "answer_prefix", "metric", "max_new_tokens",
               "stop_at_newline", "id", "task", "family", "length", "seed", "sample")
INFO_FIELDS = ("model", "model_sha256", "prompt_context", "prompt_question", "n_tokens_context",
               "n_tokens_question", "meta")  # accepted, not used to run (the split: see above)
MAX_OUTPUTS = 16


class TasksFileError(ValueError):
    pass


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# tasks and scoring (no torch)

def _type_name(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return "an array of strings"
    return "an object or an array of non-strings"


def parse_task(r, ln):
    """One line's object -> the record with every default filled, or TasksFileError(problem).
    The same rules, defaults and limits as eval_prompt_parse (src/eval/prompt_file.c)."""
    if not isinstance(r, dict):
        raise TasksFileError("bad JSON: expected an object")
    for k in r:
        if k not in TASK_FIELDS and k not in INFO_FIELDS:
            raise TasksFileError(f"unknown field {k!r} (known: {', '.join(TASK_FIELDS)})")

    def string(key, default=None, nonempty=False, max_len=0):
        v = r.get(key)
        if v is None:
            if default is None:
                raise TasksFileError(f"field {key!r} must be a string, got null" if key in r
                                     else f"missing field {key!r} (a string)")
            return default
        if not isinstance(v, str):
            raise TasksFileError(f"field {key!r} must be a string, got {_type_name(v)}")
        if nonempty and not v:
            raise TasksFileError(f"field {key!r} is empty")
        if max_len and len(v.encode("utf-8", "surrogatepass")) > max_len:
            raise TasksFileError(f"field {key!r} is longer than {max_len} bytes")
        return v

    def integer(key, lo, hi, default):
        v = r.get(key)
        if v is None:
            return default
        ok = (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
        if not ok or not lo <= v <= hi:
            got = repr(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _type_name(v)
            raise TasksFileError(f"field {key!r} must be an integer from {lo} to {hi}, got {got}")
        return int(v)

    out = {"context": string("context", nonempty=True), "question": string("question"),
           "answer_prefix": string("answer_prefix", "")}
    o = r.get("outputs")
    if "outputs" not in r:
        raise TasksFileError("missing field 'outputs' (the expected answers: an array of strings)")
    if not isinstance(o, list) or not all(isinstance(x, str) for x in o):
        raise TasksFileError(f"field 'outputs' must be an array of strings, got {_type_name(o)}")
    if not 1 <= len(o) <= MAX_OUTPUTS:
        raise TasksFileError(f"field 'outputs' holds {len(o)} answers (1 to {MAX_OUTPUTS})")
    for i, x in enumerate(o):
        if not x:
            raise TasksFileError(f"field 'outputs': answer {i + 1} is empty")
    out["outputs"] = list(o)
    m = r.get("metric")
    if m is not None and not isinstance(m, str):
        raise TasksFileError(f"field 'metric' must be a string, got {_type_name(m)}")
    if m is not None and m not in ("all", "part"):
        raise TasksFileError(f"unknown metric {m!r} (all: fraction of the outputs found; part: 1 if any is found)")
    out["metric"] = m or "all"
    out["max_new_tokens"] = integer("max_new_tokens", 1, 4096, 32)
    length = integer("length", 1, 1 << 24, 0)
    out["length"] = length or None
    out["seed"] = integer("seed", 0, 2 ** 53 - 1, 0)
    out["sample"] = integer("sample", 0, 1 << 30, 0)
    integer("n_tokens_context", 0, 1 << 30, 0)
    integer("n_tokens_question", 0, 1 << 30, 0)
    st = r.get("stop_at_newline")
    if st is not None and not isinstance(st, bool):
        raise TasksFileError(f"field 'stop_at_newline' must be true or false, got {_type_name(st)}")
    out["stop_at_newline"] = bool(st)
    out["id"] = string("id", f"line{ln}", True, 127)
    out["task"] = string("task", "custom", True, 63)
    out["family"] = string("family", out["task"], True, 63)
    for k in ("model", "model_sha256", "prompt_context", "prompt_question"):
        if r.get(k) is not None and not isinstance(r[k], str):
            raise TasksFileError(f"field {k!r} must be a string, got {_type_name(r[k])}")
        out[k] = r.get(k)
    for k in ("n_tokens_context", "n_tokens_question"):
        out[k] = r.get(k)
    return out


def load_tasks(path):
    """Every record of a tasks file, checked and with its defaults; TasksFileError "PATH:LINE: ..."
    on the first malformed line (lines split at \\n only, as kvsieve's getline)."""
    recs, seen = [], {}
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TasksFileError(f"cannot read tasks file {path}: {e.strerror}") from None
    with f:
        for ln, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace")
            if ln == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip(" \t\r\n"):
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise TasksFileError(f"{path}:{ln}: bad JSON: {e}") from None
            try:
                r = parse_task(obj, ln)
            except TasksFileError as e:
                raise TasksFileError(f"{path}:{ln}: {e}") from None
            if r["id"] in seen:
                raise TasksFileError(f"{path}:{ln}: id {r['id']!r} already used on line {seen[r['id']]}")
            seen[r["id"]] = ln
            recs.append(r)
    if not recs:
        raise TasksFileError(f"{path}: no prompts (one JSON object per line)")
    return recs


def cut_answer(answer, stop_at_newline):
    """Our engine's rule (src/eval/tasks.c eval_score, sweep.c fork_accept): for one-line answers the
    answer ends at the first newline after its first ASCII letter or digit.  Greedy decoding is
    causal, so cutting kvpress's full answer gives exactly what a generator stopping there returns."""
    if not stop_at_newline:
        return answer
    i = 0
    while i < len(answer) and not (answer[i].isascii() and answer[i].isalnum()):
        i += 1
    j = answer.find("\n", i)
    return answer if j < 0 or i >= len(answer) else answer[:j]


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _fold(s):
    """ASCII case folding only, as our scorer's strncasecmp (Python's lower() folds more)."""
    return s.translate(_ASCII_LOWER)


def score(answer, expected, metric):
    """RULER string match: 'all' = fraction of expected strings found, 'part' = any found."""
    a = _fold(answer)
    hits = [1.0 if _fold(str(e)) in a else 0.0 for e in expected]
    if metric == "all":
        return sum(hits) / len(hits)
    return max(hits)


def _self_test():
    assert score("The number is 1234 and 5678", ["1234", "5678"], "all") == 1.0
    assert score("The number is 1234", ["1234", "5678"], "all") == 0.5
    assert score("nothing", ["1234", "5678"], "all") == 0.0
    assert score("ABC", ["abc"], "all") == 1.0
    assert score("x abc", ["zzz", "ABC"], "part") == 1.0
    assert score("x", ["zzz", "ABC"], "part") == 0.0
    assert cut_answer(" 123\n456", True) == " 123"
    assert cut_answer("\n\n 123\n456", True) == "\n\n 123"
    assert cut_answer(" 123\n456", False) == " 123\n456"
    assert cut_answer("\n\n", True) == "\n\n"
    assert score("\u00c9t\u00e9", ["\u00e9t\u00e9"], "all") == 0.0  # non-ASCII case is not folded
    assert parse_task({"context": "c", "question": "q", "outputs": ["x"]}, 3) == {
        "context": "c", "question": "q", "answer_prefix": "", "outputs": ["x"], "metric": "all",
        "max_new_tokens": 32, "length": None, "seed": 0, "sample": 0, "stop_at_newline": False,
        "id": "line3", "task": "custom", "family": "custom", "model": None, "model_sha256": None,
        "prompt_context": None, "prompt_question": None, "n_tokens_context": None,
        "n_tokens_question": None}


def plan_configs(methods, ratios):
    cfgs = [("full", 1.0)]
    for m in methods:
        for r in ratios:
            cfgs.append((m, r))
    return cfgs


def order_records(recs):
    """Interleave tasks (sample 0 of every task first) so a deadline cuts evenly."""
    tasks = sorted({r["task"] for r in recs})
    by_task = {t: [r for r in recs if r["task"] == t] for t in tasks}
    out = []
    i = 0
    while any(i < len(v) for v in by_task.values()):
        for t in tasks:
            if i < len(by_task[t]):
                out.append(by_task[t][i])
        i += 1
    return out


def summarize(rows, file=sys.stdout):
    """Mean score per task x method x ratio (plus 'ALL' over tasks)."""
    import collections
    acc = collections.defaultdict(list)
    for r in rows:
        if "score" not in r:
            continue
        acc[(r["task"], r["method"], r["ratio"])].append(r["score"])
        acc[("ALL", r["method"], r["ratio"])].append(r["score"])
    tasks = sorted({k[0] for k in acc if k[0] != "ALL"}) + ["ALL"]
    cols = sorted({(k[1], k[2]) for k in acc}, key=lambda c: (c[0] != "full", c[0], -c[1]))
    methods = []
    for m, _ in cols:
        if m not in methods:
            methods.append(m)
    ratios = sorted({c[1] for c in cols if c[0] != "full"}, reverse=True)
    print("\nmean score (n prompts) per task; columns: kept ratio", file=file)
    for t in tasks:
        print(f"\n## {t}", file=file)
        print(f"{'method':<22}" + "".join(f"{'r=' + str(x):>12}" for x in ratios) + f"{'full':>12}",
              file=file)
        for m in methods:
            if m == "full":
                continue
            cells = []
            for x in ratios:
                v = acc.get((t, m, x))
                cells.append(f"{sum(v) / len(v):8.3f}({len(v)})" if v else f"{'-':>12}")
            v = acc.get((t, "full", 1.0))
            cells.append(f"{sum(v) / len(v):8.3f}({len(v)})" if v else f"{'-':>12}")
            print(f"{m:<22}" + "".join(f"{c:>12}" for c in cells), file=file)
    file.flush()


# ----------------------------------------------------------------------------------------------
# model preparation (main process): GGUF -> HF folder in the chosen dtype, loaded once

def _quiet():
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as tl
        tl.disable_progress_bar()
        tl.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass


def prepare_model(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _quiet()
    done = os.path.join(args.hf_dir, ".done")
    if os.path.exists(done):
        log(f"[prep] reuse {args.hf_dir}")
        return
    t0 = time.time()
    d, f = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=DTYPES[args.dtype](torch))
    log(f"[prep] GGUF dequantized in {time.time() - t0:.1f}s: {type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params, dtype {model.dtype}")
    c = model.config
    log(f"[prep] config: layers={c.num_hidden_layers} hidden={c.hidden_size} heads={c.num_attention_heads} "
        f"kv_heads={c.num_key_value_heads} rope={getattr(c, 'rope_parameters', None) or getattr(c, 'rope_theta', None)} "
        f"tie={c.tie_word_embeddings} eos={c.eos_token_id} bos={c.bos_token_id} "
        f"sliding={getattr(c, 'use_sliding_window', None)}")
    os.makedirs(args.hf_dir, exist_ok=True)
    model.save_pretrained(args.hf_dir)
    tok.save_pretrained(args.hf_dir)
    open(done, "w").close()
    log(f"[prep] saved to {args.hf_dir} in {time.time() - t0:.1f}s total")
    del model


DTYPES = {"bf16": lambda t: t.bfloat16, "fp16": lambda t: t.float16, "fp32": lambda t: t.float32}


# ----------------------------------------------------------------------------------------------
# worker (one process; several share the GPU)

class _State:
    in_prefill = False
    prefill_peak = 0
    gen_calls = []


def cache_bytes(cache):
    n = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                n += t.numel() * t.element_size()
    return n


def make_press(method, ratio, seed):
    import kvpress
    cr = round(1.0 - ratio, 6)
    if method == "streaming":
        p = kvpress.StreamingLLMPress(compression_ratio=cr)
    elif method == "snapkv":
        p = kvpress.SnapKVPress(compression_ratio=cr)
    elif method == "tova":
        p = kvpress.TOVAPress(compression_ratio=cr)
    elif method == "knorm":
        p = kvpress.KnormPress(compression_ratio=cr)
    elif method == "h2o":
        p = kvpress.ObservedAttentionPress(compression_ratio=cr)
    elif method == "expected_attention":
        p = kvpress.ExpectedAttentionPress(compression_ratio=cr)
    elif method == "snapkv+alloc=adakv":
        p = kvpress.AdaKVPress(press=kvpress.SnapKVPress(compression_ratio=cr))
    elif method == "random":
        p = kvpress.RandomPress(compression_ratio=cr, seed=seed)
    else:
        raise ValueError(method)
    if method == "snapkv+alloc=adakv":
        kv = f"AdaKVPress(SnapKVPress(compression_ratio={cr}))"
    elif method == "random":
        kv = f"RandomPress(compression_ratio={cr},seed={seed})"
    else:
        kv = f"{type(p).__name__}(compression_ratio={cr})"
    return p, kv


def worker(args):
    import torch
    import transformers
    import kvpress
    from kvpress import KVPressTextGenerationPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    torch.set_num_threads(max(1, args.threads))
    wid = args.worker
    t_start = time.time()
    recs = order_records(load_tasks(args.tasks))
    if args.limit:
        recs = recs[: args.limit]
    recs = recs[wid:: args.workers]
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(x) for x in args.ratios.split(",") if x]
    cfgs = plan_configs(methods, ratios)

    tok = AutoTokenizer.from_pretrained(args.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=DTYPES[args.dtype](torch),
                                                 attn_implementation="sdpa").to("cuda").eval()
    # stop like our engine: eos (<|im_end|>) and <|endoftext|>
    stop = []
    for name in ("<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(name)
        if isinstance(i, int) and i >= 0:
            stop.append(i)
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    model.generation_config.eos_token_id = sorted(set(eos) | set(stop))

    class PeerPipeline(KVPressTextGenerationPipeline):
        """kvpress's pipeline, instrumented: times the context prefill (with compression), the
        question prefill and the decode; measures the KV cache bytes."""

        def _forward(self, input_tensors, max_new_tokens=50, press=None, cache=None):
            torch.cuda.synchronize()
            _State.t0 = time.perf_counter()
            _State.in_prefill = True
            _State.prefill_peak = 0
            _State.gen_calls = []
            return super()._forward(input_tensors, max_new_tokens=max_new_tokens, press=press,
                                    cache=cache)

        def generate_answer(self, question_ids, cache, context_length, max_new_tokens):
            torch.cuda.synchronize()
            _State.in_prefill = False
            _State.t1 = time.perf_counter()
            _State.kv_after_prefill = cache_bytes(cache)
            _State.len_after_prefill = [cache.get_seq_length(i) for i in range(len(cache))]
            _State.in_gen = True
            try:
                ans = super().generate_answer(question_ids, cache, context_length, max_new_tokens)
            finally:
                _State.in_gen = False
            torch.cuda.synchronize()
            _State.t2 = time.perf_counter()
            _State.kv_end = cache_bytes(cache)
            return ans

    pipe = PeerPipeline(model=model, tokenizer=tok)
    lm = model.model

    def prefill_hook(module, a, kw, out):
        if _State.in_prefill:
            c = kw.get("past_key_values")
            if c is not None:
                _State.prefill_peak = max(_State.prefill_peak, cache_bytes(c))

    for layer in lm.layers:  # registered before any press hook: sees layer i uncompressed
        layer.self_attn.register_forward_hook(prefill_hook, with_kwargs=True)

    _State.in_gen = False

    def gen_pre_hook(module, a, kw):
        if _State.in_gen:
            torch.cuda.synchronize()
            _State.gen_calls.append(time.perf_counter())

    model.register_forward_pre_hook(gen_pre_hook, with_kwargs=True)

    c = model.config
    kv_tok = c.num_hidden_layers * 2 * c.num_key_value_heads * (
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads) * model.dtype.itemsize
    attn_impl = "sdpa"

    def set_attn(impl):
        nonlocal attn_impl
        if impl != attn_impl:
            model.set_attn_implementation(impl)
            attn_impl = model.config._attn_implementation
            if attn_impl != impl:
                raise RuntimeError(f"could not switch attention to {impl} (now {attn_impl})")

    setting = (f"dtype={args.dtype} (weights dequantized from GGUF by transformers); attn=sdpa, eager for h2o; "
               f"kvpress={kvpress.__version__ if hasattr(kvpress, '__version__') else _dist_version('kvpress')}; "
               f"transformers={transformers.__version__}; torch={torch.__version__}; "
               f"greedy, batch 1, kvpress _forward on our token ids; {args.workers} processes share one GPU; "
               f"GQA: scores per KV head, query-head scores averaged within each group (tova: over all heads); "
               f"adakv masks keys (no memory saved)")
    log(f"[w{wid}] ready in {time.time() - t_start:.1f}s: {len(recs)} prompts x {len(cfgs)} runs; "
        f"stop ids {model.generation_config.eos_token_id}; kv bytes/token {kv_tok}")

    # warm-up (CUDA kernels, eager path) on a short prefix of the first prompt; not recorded
    if recs:
        tw = time.time()
        wc = tok.encode(recs[0]["prompt_context"] or recs[0]["context"], add_special_tokens=False,
                        return_tensors="pt")[:, :512]
        wq = tok.encode(recs[0]["prompt_question"] or recs[0]["question"], add_special_tokens=False,
                        return_tensors="pt")
        for m in ("full", "snapkv", "h2o"):
            try:
                set_attn("eager" if m == "h2o" else "sdpa")
                pr = None if m == "full" else make_press(m, 0.5, 0)[0]
                with torch.inference_mode():
                    pipe._forward({"context_ids": wc, "questions_ids": [wq]}, max_new_tokens=4, press=pr)
            except Exception as e:  # noqa: BLE001
                log(f"[w{wid}] warm-up {m} failed: {e!r}")
        set_attn("sdpa")
        log(f"[w{wid}] warm-up {time.time() - tw:.1f}s")

    out = open(args.out, "w", encoding="utf-8")
    n_diff_logged = 0
    n_done = 0
    prompt_times = []
    last_full = None
    for rec in recs:
        avg = sum(prompt_times) / len(prompt_times) if prompt_times else 0.0
        if args.deadline and time.time() + 1.2 * avg > args.deadline:
            log(f"[w{wid}] deadline: stop before {rec['id']} ({n_done} prompts done)")
            break
        tp = time.time()
        # what kvpress's own preprocess makes of the raw fields (the chat template applied by kvpress)
        pre, pre_err = None, None
        try:
            pre = pipe.preprocess(rec["context"], questions=[rec["question"]],
                                  answer_prefix=rec["answer_prefix"], max_context_length=int(1e10))
        except Exception as e:  # noqa: BLE001
            pre_err = e
        # our split when the record carries one made for this model; else kvpress's
        own_split = rec["prompt_context"] is not None and rec["prompt_question"] is not None and args.use_split
        if own_split:
            ids_c = tok.encode(rec["prompt_context"], add_special_tokens=False, return_tensors="pt")
            ids_q = tok.encode(rec["prompt_question"], add_special_tokens=False, return_tensors="pt")
        elif pre is not None:
            ids_c, ids_q = pre["context_ids"], pre["questions_ids"][0]
        else:
            log(f"[w{wid}] skip {rec['id']}: no prompt_context/prompt_question and preprocess failed: {pre_err!r}")
            continue
        n_c, n_q = ids_c.shape[1], ids_q.shape[1]
        match = None
        try:
            if pre is None:
                raise pre_err
            match = bool(torch.equal(pre["context_ids"], ids_c) and torch.equal(pre["questions_ids"][0], ids_q))
            pre_n = (pre["context_ids"].shape[1], pre["questions_ids"][0].shape[1])
            if not match and n_diff_logged < 2:
                n_diff_logged += 1
                for name, a, b in (("context", pre["context_ids"][0], ids_c[0]),
                                   ("question", pre["questions_ids"][0][0], ids_q[0])):
                    k = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
                    if k < max(len(a), len(b)):
                        log(f"[w{wid}] {rec['id']} {name}: kvpress preprocess {len(a)} tok vs ours {len(b)}, "
                            f"first diff at {k}: kvpress {tok.decode(a[max(0, k - 8):k + 8])!r} / "
                            f"ours {tok.decode(b[max(0, k - 8):k + 8])!r}")
        except Exception as e:  # noqa: BLE001
            pre_n = (None, None)
            log(f"[w{wid}] preprocess failed on {rec['id']}: {e!r}")
        exp_c, exp_q = rec.get("n_tokens_context"), rec.get("n_tokens_question")
        if not own_split:
            exp_c = exp_q = None  # counted for another split
        tok_note = {"n_tokens_context_hf": n_c, "n_tokens_question_hf": n_q,
                    "kvpress_split": not own_split, "kvpress_preprocess_match": match,
                    "kvpress_preprocess_tokens": list(pre_n)}
        if (exp_c is not None and exp_c != n_c) or (exp_q is not None and exp_q != n_q):
            log(f"[w{wid}] TOKEN MISMATCH {rec['id']}: ours {exp_c}+{exp_q}, HF {n_c}+{n_q}")
        for method, ratio in cfgs:
            row = {"system": "kvpress",
                   "run": f"kvpress:{rec['id']}:{method}:{ratio}:agnostic",
                   "kind": "task", "model": rec["model"] or args.model_name or None,
                   "model_sha256": rec["model_sha256"],
                   "method": method, "ratio": ratio, "mode": "agnostic", "task": rec["task"],
                   "family": rec["family"], "length": rec["length"], "seed": rec["seed"],
                   "sample": rec["sample"], "id": rec["id"], "metric": rec["metric"],
                   "expected": rec["outputs"], "max_new_tokens": rec["max_new_tokens"]}
            try:
                if method == "full":
                    press, kv = None, "none"
                else:
                    press, kv = make_press(method, ratio, rec["seed"] % (2 ** 31))
                row["kv"] = kv
                set_attn("eager" if method == "h2o" else "sdpa")
                t0 = time.time()
                with torch.inference_mode():
                    answers = pipe._forward({"context_ids": ids_c, "questions_ids": [ids_q]},
                                            max_new_tokens=int(rec["max_new_tokens"]), press=press)
                dt = time.time() - t0
                raw = answers[0]
                ans = cut_answer(raw, rec["stop_at_newline"])
                n_gen = len(_State.gen_calls)
                peak = max(_State.prefill_peak, _State.kv_after_prefill, _State.kv_end)
                lens = _State.len_after_prefill
                row.update({
                    "score": score(ans, rec["outputs"], rec["metric"]),
                    "answer": ans,
                    "answer_raw": raw,
                    "stop_at_newline": rec["stop_at_newline"],
                    "kv_bytes_peak": peak,
                    "kv_bytes_full": (n_c + n_q + max(n_gen - 1, 0)) * kv_tok,
                    "kv_bytes_after_prefill": _State.kv_after_prefill,
                    "kv_len_after_prefill": round(sum(lens) / len(lens), 2) if lens else None,
                    "n_gen": n_gen,
                    "prefill_tok_s": round(n_c / (_State.t1 - _State.t0), 1),
                    "time": round(dt, 4),
                })
                if n_gen >= 3:
                    row["decode_tok_s"] = round((n_gen - 1) / (_State.t2 - _State.gen_calls[1]), 2)
                row["attn"] = attn_impl
            except Exception as e:  # noqa: BLE001
                import traceback
                row["error"] = repr(e)[:500]
                log(f"[w{wid}] ERROR {rec['id']} {method} {ratio}: {e!r}")
                traceback.print_exc()
                torch.cuda.empty_cache()
            if method == "full":
                last_full = row.get("answer", row.get("error"))
            row.update(tok_note)
            row["peer_setting"] = setting
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
        n_done += 1
        prompt_times.append(time.time() - tp)
        log(f"[w{wid}] {n_done}/{len(recs)} {rec['id']} n_ctx={n_c} n_q={n_q} match={match} "
            f"{prompt_times[-1]:.1f}s full='{_short(last_full)}'")
    out.close()
    log(f"[w{wid}] max GPU memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    log(f"[w{wid}] finished {n_done} prompts in {time.time() - t_start:.1f}s")


def _short(s, n=60):
    s = (s or "").replace("\n", " ")
    return s if len(s) <= n else s[:n] + "..."


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


# ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--gguf", help="GGUF model file")
    ap.add_argument("--hf-dir", default="/tmp/peer/hf", help="where the dequantized model is saved once")
    ap.add_argument("--out", default="peer_kvpress.jsonl")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratios", default=",".join(str(r) for r in KEPT_RATIOS))
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per worker")
    ap.add_argument("--limit", type=int, default=0, help="first N prompts (after task interleaving)")
    ap.add_argument("--budget-s", type=float, default=540,
                    help="wall seconds from start: workers start no prompt they cannot finish by then")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--use-split", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--model-name", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    for m in args.methods.split(","):
        if m and m not in METHODS:
            ap.error(f"unknown method {m}; known: {', '.join(METHODS)}")

    if args.worker >= 0:
        worker(args)
        return

    t_start = time.time()
    _self_test()
    try:
        recs = order_records(load_tasks(args.tasks))
    except TasksFileError as e:
        print(f"kvpress_peer: {e}", file=sys.stderr)
        sys.exit(2)
    if args.limit:
        recs = recs[: args.limit]
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(x) for x in args.ratios.split(",") if x]
    cfgs = plan_configs(methods, ratios)
    tasks = sorted({r["task"] for r in recs})
    log(f"{len(recs)} prompts, {len(tasks)} tasks ({', '.join(tasks)}), {len(cfgs)} runs per prompt "
        f"= {len(recs) * len(cfgs)} runs")
    for m in methods:
        log(f"  {m:<20} {METHODS[m]:<26} GQA: {GQA_NOTES[m]}")
    log(f"  kept ratios {ratios} -> kvpress compression_ratio {[round(1 - r, 6) for r in ratios]}")
    if args.dry_run:
        n_split = sum(r["prompt_context"] is not None and r["prompt_question"] is not None for r in recs)
        log(f"  {n_split} of {len(recs)} records carry our template split (prompt_context/prompt_question); "
            f"the others get kvpress's preprocess of the raw fields")
        for r in recs[:3]:
            log(f"  {r['id']}: task {r['task']}, ctx {len(r['context'])} chars / {r['n_tokens_context']} tok, "
                f"q {len(r['question'])} chars / {r['n_tokens_question']} tok, "
                f"metric {r['metric']}, expected {r['outputs']}, max_new {r['max_new_tokens']}, "
                f"stop_at_newline {r['stop_at_newline']}")
        log("dry run: scorer self-test passed, tasks parse; nothing run")
        return

    if not args.gguf and not os.path.exists(os.path.join(args.hf_dir, ".done")):
        ap.error("--gguf is required unless --hf-dir already holds the converted model")
    if args.gguf:
        prepare_model(args)
    # records without a model (hand-written) get the GGUF's name, as our results do
    model_name = os.path.basename(args.gguf or "")
    model_name = model_name[:-5] if model_name.endswith(".gguf") else model_name
    # our template split is only valid for the model it was made with
    use_split = 1
    shas = {r["model_sha256"] for r in recs if r["prompt_context"] is not None and r["model_sha256"]}
    if args.gguf and shas:
        import hashlib
        h = hashlib.sha256()
        with open(args.gguf, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        if shas != {h.hexdigest()}:
            use_split = 0
            log(f"the tasks file's prompt_context was made for another model ({sorted(shas)[0][:12]}...): "
                f"kvpress's preprocess applies this model's template instead")
    deadline = t_start + args.budget_s
    base, ext = os.path.splitext(args.out)
    parts = [f"{base}.w{k}{ext}" for k in range(args.workers)]
    procs = []
    for k in range(args.workers):
        cmd = [sys.executable, os.path.abspath(__file__), "--tasks", args.tasks, "--hf-dir", args.hf_dir,
               "--out", parts[k], "--dtype", args.dtype, "--methods", args.methods, "--ratios", args.ratios,
               "--workers", str(args.workers), "--threads", str(args.threads), "--limit", str(args.limit),
               "--worker", str(k), "--deadline", str(deadline), "--use-split", str(use_split),
               "--model-name", model_name]
        env = dict(os.environ)
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        procs.append(subprocess.Popen(cmd, env=env))
    rcs = [p.wait() for p in procs]
    log(f"workers exited {rcs} after {time.time() - t_start:.1f}s")
    rows = []
    for p in parts:
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                rows += [json.loads(x) for x in f if x.strip()]
    order = {r["id"]: i for i, r in enumerate(recs)}
    rows.sort(key=lambda r: (order.get(r["id"], 1e9), r["run"]))
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    errs = [r for r in rows if "error" in r]
    done_ids = {r["id"] for r in rows}
    exp = {r["id"]: (r.get("n_tokens_context"), r.get("n_tokens_question")) for r in recs}
    mism = sorted({r["id"] for r in rows if not r.get("kvpress_split") and exp.get(r["id"], (None, None)) != (None, None)
                   and exp[r["id"]] != (r.get("n_tokens_context_hf"), r.get("n_tokens_question_hf"))})
    nomatch = sorted({r["id"] for r in rows if r.get("kvpress_preprocess_match") is False})
    log(f"{len(rows)} rows, {len(done_ids)}/{len(recs)} prompts, {len(errs)} errors -> {args.out}")
    log(f"token-count mismatches vs our engine: {len(mism)} {mism[:10]}")
    log(f"prompts where kvpress's own preprocess would differ: {len(nomatch)} {nomatch[:5]}")
    summarize(rows)


if __name__ == "__main__":
    main()
