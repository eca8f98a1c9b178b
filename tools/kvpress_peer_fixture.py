# Test fixtures for tools/kvpress_peer.py (see tools/kvpress_peer.md): a tiny random qwen2 GGUF with the
# real tokenizer and chat template copied from the real file, and a hand-made tasks JSONL.
# usage: PYTHONPATH=<gguf-py> python3 tools/kvpress_peer_fixture.py REAL.gguf OUT_tiny.gguf OUT_tasks.jsonl
import json, sys, random
import numpy as np
import gguf
src, dst_gguf, dst_jsonl = sys.argv[1:4]
r = gguf.GGUFReader(src)
F = {k: f for k, f in r.fields.items()}
def val(k): return F[k].contents()
H, NH, NKV, FF, L = 64, 4, 2, 128, 2
w = gguf.GGUFWriter(dst_gguf, "qwen2")
w.add_name("tiny-qwen2-test")
w.add_block_count(L); w.add_context_length(32768); w.add_embedding_length(H)
w.add_feed_forward_length(FF); w.add_head_count(NH); w.add_head_count_kv(NKV)
w.add_rope_freq_base(1e6); w.add_layer_norm_rms_eps(1e-6); w.add_file_type(7)
w.add_tokenizer_model(val("tokenizer.ggml.model")); w.add_tokenizer_pre(val("tokenizer.ggml.pre"))
toks = val("tokenizer.ggml.tokens"); V = len(toks)
w.add_token_list(toks); w.add_token_types(val("tokenizer.ggml.token_type"))
w.add_token_merges(val("tokenizer.ggml.merges"))
w.add_eos_token_id(val("tokenizer.ggml.eos_token_id")); w.add_pad_token_id(val("tokenizer.ggml.padding_token_id"))
w.add_bos_token_id(val("tokenizer.ggml.bos_token_id")); w.add_add_bos_token(False)
w.add_chat_template(val("tokenizer.chat_template"))
rng = np.random.default_rng(0)
def rnd(*s): return (rng.standard_normal(s) * 0.05).astype(np.float32)
Q8 = gguf.GGMLQuantizationType.Q8_0
w.add_tensor("token_embd.weight", gguf.quants.quantize(rnd(V, H), Q8), raw_dtype=Q8)
w.add_tensor("output.weight", gguf.quants.quantize(rnd(V, H), Q8), raw_dtype=Q8)
w.add_tensor("output_norm.weight", np.ones(H, np.float32))
hd = H // NH
for i in range(L):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", np.ones(H, np.float32))
    w.add_tensor(p + "ffn_norm.weight", np.ones(H, np.float32))
    w.add_tensor(p + "attn_q.weight", rnd(NH * hd, H)); w.add_tensor(p + "attn_q.bias", rnd(NH * hd))
    w.add_tensor(p + "attn_k.weight", rnd(NKV * hd, H)); w.add_tensor(p + "attn_k.bias", rnd(NKV * hd))
    w.add_tensor(p + "attn_v.weight", rnd(NKV * hd, H)); w.add_tensor(p + "attn_v.bias", rnd(NKV * hd))
    w.add_tensor(p + "attn_output.weight", rnd(H, NH * hd))
    w.add_tensor(p + "ffn_gate.weight", rnd(FF, H)); w.add_tensor(p + "ffn_up.weight", rnd(FF, H))
    w.add_tensor(p + "ffn_down.weight", rnd(H, FF))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

SYS = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
random.seed(1)
words = "the quick brown fox jumps over a lazy dog while grass grows in the meadow".split()
recs = []
for task, fam, metric in (("niah_single_1", "niah", "all"), ("vt", "vt", "all"), ("qa_1", "qa", "part")):
    for s in range(2):
        key = str(random.randint(1000000, 9999999))
        hay = " ".join(random.choice(words) for _ in range(250))
        ctx = f"Some special magic numbers are hidden in the text. {hay} One of the special magic numbers for apple is: {key}. {hay}\n"
        q = "What is the special magic number for apple mentioned in the provided text?"
        ap = " The special magic number for apple mentioned in the provided text is"
        recs.append({"id": f"{task}/4096/{s}", "task": task, "family": fam, "length": 4096, "seed": 100 + s,
                     "sample": s, "model": "tiny-test", "model_sha256": "0" * 64, "context": ctx,
                     "question": q, "answer_prefix": ap, "prompt_context": SYS + ctx,
                     "prompt_question": q + "<|im_end|>\n<|im_start|>assistant\n" + ap,
                     "outputs": [key] if metric == "all" else [key, "apple"], "metric": metric,
                     "max_new_tokens": 12, "n_tokens_context": None if s == 0 else 999, "n_tokens_question": None})
with open(dst_jsonl, "w") as f:
    for x in recs: f.write(json.dumps(x) + "\n")
print("wrote", dst_gguf, dst_jsonl, V)
