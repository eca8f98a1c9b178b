#!/usr/bin/env python3
"""Attention-Gate: in-context eviction flags, trained through the frozen model (tools/train/README.md).

usage: agate.py --gguf MODEL.gguf --fingerprint 0x... --data prompts.jsonl --out DIR --name NAME
                [--heads 2] [--head-dim 16] [--window 32] [--keep 0.2] [--budget-s 400]

The gate (Zeng et al., "In-context KV-Cache Eviction for LLMs via Attention-Gate", arXiv
2410.12876; our choices are marked [D] in docs/METHODS.md): before each layer's attention, a small
causal multi-head attention over the layer's input x (the normed hidden state that feeds q, k, v):
    q' = x Wq' + bq', k' = x Wk' + bk', v' = x Wv' + bv'   (--heads heads of --head-dim, no RoPE)
    o' = softmax(q' k'^T / sqrt(head_dim) + causal) v'
    s  = sigmoid(o' Wg + bg)                               (one keep score per KV head)
    f  = s >= 0.5                                          (the flag; position 0 always kept)
The layer's attention then lets token i see token j < i only when f[j] = 1 or i - j < --window
[D: a recent window, so a token needed only locally need not be kept for ever]; a token always sees
itself. In the engine a flagged token is evicted as soon as no later query can see it; the gate's
own k', v' are kept for every token.

Training (distillation on the frozen model, no labels):
 1. the frozen model is loaded from the GGUF (float32), and checked against the golden references
    the C engine is tested against, through this script's own attention function (which the
    gated passes use);
 2. per prompt [context][question], the teacher is the full-attention model; the student is the
    same model with the gates' flags (straight-through: forward uses the hard flag, backward the
    sigmoid's gradient, multiplied into the attention probabilities and renormalised);
    loss = mean KL(teacher || student) over context positions + the same over question positions
           + the KL at the last position (the first answer token's distribution)
           + lambda * relu(mean keep score - --keep)   (Attention-Gate's eviction loss, a hinge on
                                                        the target keep rate, over all layers/heads)
    AdamW lr 2e-3 (gate only; its output bias 10x), cosine decay, the schedule fitted into --budget-s;
 3. held-out prompts: keep rate of the hard flags, KL at the last position and over the question,
    against random flags at the same keep rate and against keeping nothing but position 0 and the
    window (StreamingLLM with the same window);
 4. export (KVSLRN01, method 2) and, for the C test, DIR/agate-NAME.ref.bin:
    int32 n_tok, n_layer, n_kv, int32 ids[n_tok], float32 scores[n_tok][n_layer][n_kv] (the gates on
    the full-attention model: what the engine computes with tau=0), then float32 gated mean NLL,
    full mean NLL and the hard flags' keep rate on those tokens (the gated forward as the engine
    runs it, from the exported fp16 weights).
"""

import argparse
import gzip
import json
import math
import os
import random
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lrnfile  # noqa: E402

T0 = time.time()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ---- the gated attention ----------------------------------------------------------------------

class GateState:
    """What the patched attention reads: per layer, the flags of the current pass (None = full)."""
    flags = {}      # layer -> (B, KV, T) in [0, 1] (straight-through) or None
    window = 32
    scores = {}     # layer -> (B, T, KV) the gate's scores of the current pass (for the losses)


def gated_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Causal attention (batch of unpadded sequences) where token i sees j < i only if f[j] or
    i - j < window; replaces the model's eager attention. query (B, H, T, d), key/value (B, KV, T, d)."""
    B, H, T, d = query.shape
    KV = key.shape[1]
    g = H // KV
    sc = scaling if scaling is not None else d ** -0.5
    q = query.reshape(B, KV, g, T, d)
    s = torch.matmul(q, key[:, :, None].transpose(-1, -2)) * sc  # (B, KV, g, T, T)
    i = torch.arange(T, device=query.device)
    causal = i[None, :] <= i[:, None]
    s = s.masked_fill(~causal, float("-inf"))
    p = torch.softmax(s.float(), dim=-1)
    f = GateState.flags.get(module.layer_idx)
    if f is not None:
        near = (i[:, None] - i[None, :]) < GateState.window  # includes the diagonal
        vis = torch.where(near[None, None], torch.ones((), device=f.device), f[:, :, None, :])  # (B, KV, T, T)
        p = p * vis[:, :, None]
        p = p / p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p.to(value.dtype), value[:, :, None])  # (B, KV, g, T, d)
    return o.reshape(B, H, T, d).transpose(1, 2).contiguous(), None


def patch_attention():
    import transformers.models.llama.modeling_llama as ml
    import transformers.models.qwen2.modeling_qwen2 as mq
    ml.eager_attention_forward = gated_attention
    mq.eager_attention_forward = gated_attention


def load_model(gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    model.config._attn_implementation = "eager"
    model = model.to(DEV).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


class Gate(torch.nn.Module):
    def __init__(self, L, D, KV, nh, dh):
        super().__init__()
        self.nh, self.dh = nh, dh
        w = nh * dh
        self.wq = torch.nn.Parameter(torch.randn(L, w, D) / math.sqrt(D))
        self.wk = torch.nn.Parameter(torch.randn(L, w, D) / math.sqrt(D))
        self.wv = torch.nn.Parameter(torch.randn(L, w, D) / math.sqrt(D))
        self.bq = torch.nn.Parameter(torch.zeros(L, w))
        self.bk = torch.nn.Parameter(torch.zeros(L, w))
        self.bv = torch.nn.Parameter(torch.zeros(L, w))
        self.wg = torch.nn.Parameter(torch.randn(L, KV, w) * 0.01)
        self.bg = torch.nn.Parameter(torch.full((L, KV), 1.0))  # start by keeping everything
        self.register_buffer("mu", torch.zeros(L, D))
        self.register_buffer("sd", torch.ones(L, D))

    def forward(self, il, x):
        """x (B, T, D) -> keep scores (B, T, KV)."""
        B, T, _ = x.shape
        xn = (x - self.mu[il]) / self.sd[il]
        q = (xn @ self.wq[il].T + self.bq[il]).view(B, T, self.nh, self.dh).transpose(1, 2)
        k = (xn @ self.wk[il].T + self.bk[il]).view(B, T, self.nh, self.dh).transpose(1, 2)
        v = (xn @ self.wv[il].T + self.bv[il]).view(B, T, self.nh, self.dh).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(B, T, self.nh * self.dh)
        return torch.sigmoid(o @ self.wg[il].T + self.bg[il])


class Hooks:
    """Pre-hooks on every layer's attention: the gate's scores and straight-through flags."""

    def __init__(self, model, gate):
        self.gate, self.mode, self.keep_rand, self.cap = gate, "full", 0.0, None
        for il, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_pre_hook(self._hook(il), with_kwargs=True)

    def _hook(self, il):
        def f(mod, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if self.cap is not None:
                self.cap[il] = x.detach()
            if self.mode == "full":
                GateState.flags[il] = None
                return None
            B, T, _ = x.shape
            KV = mod.config.num_key_value_heads
            if self.mode == "gate":
                s = self.gate(il, x)                                       # (B, T, KV)
                hard = (s >= 0.5).float()
                f_ = s + (hard - s).detach()
                GateState.scores[il] = s
            elif self.mode == "random":
                f_ = (torch.rand(B, T, KV, device=x.device) < self.keep_rand).float()
            else:  # "none": only position 0 and the window
                f_ = torch.zeros(B, T, KV, device=x.device)
            f_ = torch.cat((torch.ones_like(f_[:, :1]), f_[:, 1:]), dim=1)  # position 0 always kept
            GateState.flags[il] = f_.transpose(1, 2)
            return None
        return f


# ---- data -------------------------------------------------------------------------------------

def split_template(tok):
    s = "\x00SENTINEL\x00"
    text = tok.apply_chat_template([{"role": "user", "content": s}], tokenize=False, add_generation_prompt=True)
    return text.split(s)


def tokenize_prompts(tok, rows, max_len):
    pre, post = split_template(tok)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids_pre = enc(pre)
    out = []
    for r in rows:
        q = enc("\n\n" + r["question"] + post)
        ctx = (ids_pre + enc(r["context"]))[:max_len - len(q)]
        out.append({"row": r, "ids": ctx + q, "n_ctx": len(ctx)})
    return out


def kl_rows(t_logp, s_logp):
    """KL(teacher || student) per row."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def pass_losses(model, hooks, it, mode, keep_rand=0.0):
    ids = torch.tensor([it["ids"]], device=DEV)
    n_ctx = it["n_ctx"]
    with torch.no_grad():
        hooks.mode = "full"
        t_logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    hooks.mode, hooks.keep_rand = mode, keep_rand
    GateState.scores.clear()
    s_logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    hooks.mode = "full"
    kl = kl_rows(t_logp, s_logp)
    return {"ctx": kl[:n_ctx].mean(), "q": kl[n_ctx:].mean(), "last": kl[-1]}


def keep_rate(win):
    """Mean hard-flag keep rate over layers and heads, tokens outside position 0."""
    tot, n = 0.0, 0
    for s in GateState.scores.values():
        tot += (s[:, 1:] >= 0.5).float().sum().item()
        n += s[:, 1:].numel()
    return tot / max(1, n)


# ---- export -------------------------------------------------------------------------------------

def fold(gate, il):
    """The standardisation folded into the projections: x W^T/sd - (mu/sd) W^T + b."""
    out = []
    for w, b in ((gate.wq, gate.bq), (gate.wk, gate.bk), (gate.wv, gate.bv)):
        wf = w[il] / gate.sd[il][None, :]
        bf = b[il] - (wf * gate.mu[il][None, :]).sum(dim=1)
        out += [wf, bf]
    out += [gate.wg[il], gate.bg[il]]
    return [t.detach().cpu().numpy().astype(np.float16) for t in out]


class Exported(torch.nn.Module):
    """The gate as the engine computes it: the exported fp16 weights, float64 arithmetic."""

    def __init__(self, layers, nh, dh):
        super().__init__()
        self.layers = [[torch.tensor(a.astype(np.float64), device=DEV) for a in ly] for ly in layers]
        self.nh, self.dh = nh, dh

    def __call__(self, il, x):
        wq, bq, wk, bk, wv, bv, wg, bg = self.layers[il]
        x = x.double()
        B, T, _ = x.shape
        q = (x @ wq.T + bq).view(B, T, self.nh, self.dh).transpose(1, 2)
        k = (x @ wk.T + bk).view(B, T, self.nh, self.dh).transpose(1, 2)
        v = (x @ wv.T + bv).view(B, T, self.nh, self.dh).transpose(1, 2)
        a = (q @ k.transpose(-1, -2)) / math.sqrt(self.dh)
        i = torch.arange(T, device=x.device)
        a = a.masked_fill(~(i[None, :] <= i[:, None]), float("-inf"))
        o = (torch.softmax(a, dim=-1) @ v).transpose(1, 2).reshape(B, T, self.nh * self.dh)
        return torch.sigmoid(o @ wg.T + bg).float()


def write_lrn(path, fp, sh, nh, dh, window, n_train, name, layers):
    """KVSLRN01 method 2 (src/kv/learned.h): header fields hidden = gate heads, act = 2 (sigmoid
    gate), labels = 3 (distillation), reserved = (gate head dim, window); per layer Wq' bq' Wk' bk'
    Wv' bv' (rows of the model's width) and Wg (n_kv, heads * head dim), bg, all fp16."""
    hdr = bytearray(lrnfile.HEADER)
    struct.pack_into("<8sIIQIIIIIIII", hdr, 0, lrnfile.MAGIC, 1, 2, fp, sh["L"], sh["H"], sh["KV"], sh["d"],
                     nh, 2, 3, n_train)
    nb = name.encode()[:63]
    hdr[56:56 + len(nb)] = nb
    struct.pack_into("<II", hdr, 120, dh, window)
    body = bytearray(hdr)
    for ly in layers:
        for a in ly:
            a = np.ascontiguousarray(a, dtype="<f2")
            if not np.isfinite(a).all():
                raise ValueError("weights overflow float16")
            body += a.tobytes()
    body += struct.pack("<Q", lrnfile.xxh64(bytes(body)))
    with open(path + ".tmp", "wb") as f:
        f.write(body)
    os.replace(path + ".tmp", path)
    return len(body)


# ---- main -------------------------------------------------------------------------------------

def golden_check(model, golden, arch, n=None):
    name = "qwen2" if arch == "qwen2" else "smollm2"
    a = json.load(open(os.path.join(golden, "austen_pp_4096.json")))[name]
    ids = np.fromfile(os.path.join(golden, os.path.basename(a["ids_file"])), dtype="<i4")
    if n:
        ids = ids[:n]
    x = torch.tensor(ids[None].astype(np.int64), device=DEV)
    with torch.no_grad():
        lg = model(input_ids=x).logits[0].float()
    nll = F.cross_entropy(lg[:-1], x[0, 1:]).item()
    return math.exp(nll), a["ppl"], ids


def main():
    ap = argparse.ArgumentParser(description="Train Attention-Gate flags (see the module docstring).")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--fingerprint", required=True, help="kvs_model_fingerprint, from `kvsieve info`")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--keep", type=float, default=0.2, help="target keep rate of the hard flags")
    ap.add_argument("--lam", type=float, default=20.0, help="weight of the eviction hinge")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--n-train", type=int, default=900)
    ap.add_argument("--n-held", type=int, default=24)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--golden", default="tests/golden")
    ap.add_argument("--ref-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="8 prompts of 256 tokens, 6 steps")
    a = ap.parse_args()
    if a.smoke:
        a.n_train, a.n_held, a.steps, a.max_len, a.ref_tokens, a.name = 8, 2, 6, 256, 64, a.name + "-smoke"
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(a.out, exist_ok=True)
    GateState.window = a.window
    report = {"args": vars(a)}

    patch_attention()
    tok, model = load_model(a.gguf)
    arch = model.config.model_type
    cfg = model.config
    sh = {"L": cfg.num_hidden_layers, "H": cfg.num_attention_heads, "KV": cfg.num_key_value_heads,
          "D": cfg.hidden_size}
    sh["d"] = getattr(cfg, "head_dim", None) or sh["D"] // sh["H"]
    log(f"model {arch}: {sh}; gate {a.heads} heads x {a.head_dim}, window {a.window}, target keep {a.keep}")
    gate = Gate(sh["L"], sh["D"], sh["KV"], a.heads, a.head_dim).to(DEV)
    hooks = Hooks(model, gate)
    ppl, ref, gids = golden_check(model, a.golden, arch, 512 if a.smoke else None)
    report["golden_ppl"] = {"torch_full_through_this_attention": ppl, "reference": ref}
    log(f"golden perplexity through the gated attention's full mode: {ppl:.4f} (reference {ref:.4f}"
        f"{' on 4096 tokens; smoke runs 512' if a.smoke else ''})")
    torch.backends.cuda.matmul.allow_tf32 = True

    with (gzip.open(a.data, "rt") if a.data.endswith(".gz") else open(a.data)) as f:
        rows = [json.loads(line) for line in f]
    train = tokenize_prompts(tok, [r for r in rows if r["split"] == "train"][:a.n_train], a.max_len)
    held = tokenize_prompts(tok, [r for r in rows if r["split"] == "heldout"][:a.n_held], a.max_len)
    log(f"{len(train)} training prompts, {len(held)} held out, tokens mean {np.mean([len(i['ids']) for i in train]):.0f}")

    # standardisation of the gate's input from the first 8 prompts
    hooks.cap = {}
    s1 = torch.zeros(sh["L"], sh["D"], device=DEV, dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    cnt = 0
    for it in train[:8]:
        with torch.no_grad():
            model(input_ids=torch.tensor([it["ids"]], device=DEV))
        for il in range(sh["L"]):
            x = hooks.cap[il][0].double()
            s1[il] += x.sum(0)
            s2[il] += (x * x).sum(0)
        cnt += len(it["ids"])
    hooks.cap = None
    gate.mu.copy_((s1 / cnt).float())
    gate.sd.copy_(((s2 / cnt - (s1 / cnt) ** 2).clamp_min(0).sqrt().float()).clamp_min(1e-3))

    params = [p for p in gate.parameters() if p.requires_grad]
    # the gate's output bias moves 10x faster: the eviction hinge has to bring every score down first
    opt = torch.optim.AdamW([{"params": [p for n, p in gate.named_parameters() if n != "bg"], "mul": 1.0},
                             {"params": [gate.bg], "mul": 10.0}], lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    n_steps = a.steps
    t_train = time.time()
    hist = []
    step = 0
    order = list(range(len(train)))
    while step < n_steps:
        random.shuffle(order)
        for i in order:
            if step >= n_steps:
                break
            if step == 10 and not a.smoke:
                per = (time.time() - t_train) / 10
                fit = 10 + int((a.budget_s - (time.time() - T0) - 60) / per)
                n_steps = max(11, min(n_steps, fit))
                log(f"{per:.2f}s a step: {n_steps} steps fit in --budget-s")
            lr = a.lr * (0.5 * (1 + math.cos(math.pi * step / max(1, n_steps)))) if step >= 10 else a.lr * (step + 1) / 10
            for gparam in opt.param_groups:
                gparam["lr"] = lr * gparam["mul"]
            l = pass_losses(model, hooks, train[i], "gate")
            keep_soft = torch.stack([s[:, 1:].mean() for s in GateState.scores.values()]).mean()
            task = l["ctx"] + l["q"] + l["last"]
            loss = task + a.lam * F.relu(keep_soft - a.keep)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            hist.append((task.item(), l["last"].item(), keep_soft.item(), keep_rate(a.window)))
            if step % 25 == 0 or step == n_steps:
                el = time.time() - t_train
                h = np.mean(hist[-25:], axis=0)
                log(f"step {step}/{n_steps} KL {h[0]:.4f} (last {h[1]:.4f}) keep soft {h[2]:.3f} hard {h[3]:.3f} "
                    f"({el:.0f}s, ETA {el / step * (n_steps - step):.0f}s)")
    report["train"] = {"steps": step, "seconds": time.time() - t_train,
                       "first25": np.mean(hist[:25], axis=0).tolist(), "last25": np.mean(hist[-25:], axis=0).tolist()}

    # held-out: gate vs random flags at its keep rate vs window only
    ev = {m: {"ctx": [], "q": [], "last": []} for m in ("gate", "random", "window")}
    kr = []
    with torch.no_grad():
        for it in held:
            l = pass_losses(model, hooks, it, "gate")
            k = keep_rate(a.window)
            kr.append(k)
            for m, lm in (("gate", l), ("random", pass_losses(model, hooks, it, "random", k)),
                          ("window", pass_losses(model, hooks, it, "none"))):
                for key in ev[m]:
                    ev[m][key].append(lm[key].item())
    report["heldout"] = {"keep_rate": float(np.mean(kr)),
                         "kl": {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in ev.items()}}
    log("held-out: " + json.dumps(report["heldout"]))

    # export, then the reference for the C test from the exported weights
    layers = [fold(gate, il) for il in range(sh["L"])]
    path = os.path.join(a.out, f"agate-{a.name}.lrn")
    nb = write_lrn(path, int(a.fingerprint, 0), sh, a.heads, a.head_dim, a.window, step, a.name, layers)
    exp = Exported(layers, a.heads, a.head_dim)
    saved_gate = hooks.gate
    hooks.gate = exp
    ids = gids[:a.ref_tokens]
    x = torch.tensor(ids[None].astype(np.int64), device=DEV)
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        hooks.cap = {}
        hooks.mode = "full"
        lg_full = model(input_ids=x).logits[0].float()
        sc = torch.stack([exp(il, hooks.cap[il]) for il in range(sh["L"])], dim=2)[0]  # (T, L, KV)
        hooks.cap = None
        hooks.mode = "gate"
        GateState.scores.clear()
        lg_gate = model(input_ids=x).logits[0].float()
        k = keep_rate(a.window)
        hooks.mode = "full"
    nll_full = F.cross_entropy(lg_full[:-1], x[0, 1:]).item()
    nll_gate = F.cross_entropy(lg_gate[:-1], x[0, 1:]).item()
    hooks.gate = saved_gate
    with open(path[:-4] + ".ref.bin", "wb") as f:
        f.write(struct.pack("<iii", len(ids), sh["L"], sh["KV"]))
        f.write(ids.astype("<i4").tobytes())
        f.write(sc.cpu().numpy().astype("<f4").tobytes())
        f.write(struct.pack("<fff", nll_gate, nll_full, k))
    report["file"] = {"path": os.path.basename(path), "bytes": nb}
    report["ref"] = {"tokens": len(ids), "nll_gate": nll_gate, "nll_full": nll_full, "keep_rate": k}
    log(f"exported {path} ({nb} bytes); reference on {len(ids)} Austen tokens: gated NLL {nll_gate:.4f}, "
        f"full {nll_full:.4f}, keep rate {k:.3f}")
    report["seconds_total"] = time.time() - T0
    json.dump(report, open(os.path.join(a.out, f"report-agate-{a.name}.json"), "w"), indent=1)
    log("done")


if __name__ == "__main__":
    main()
