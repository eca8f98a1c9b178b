#!/usr/bin/env python3
"""Locret retaining heads: labels, training and export, on the GPU machine (tools/train/README.md).

usage: locret.py --gguf MODEL.gguf --fingerprint 0x... --data prompts.jsonl --out DIR
                 [--hidden 64] [--steps 1200] [--budget-s 480] [--check-golden tests/golden]

What it does, in order (timings and figures go to stdout and DIR/report.json):
 1. loads the frozen model from the GGUF with transformers (float32; TF32 matmuls while training),
    and checks it against the golden references our C engine is tested against (tests/golden/):
    per-position argmax agreement and top-5 logits on the golden prompts, perplexity of the
    4096-token Austen window;
 2. has the model answer every prompt (greedy, batched, at most --answer-tokens tokens): its own
    answer is what the heads learn to keep the context for;
 3. for every prompt, one pass over [context][question][answer] gives each layer's q, k, v
    projections (bias added, before RoPE) at the context tokens (the heads' input) and the
    **question+answer labels**: per layer, KV head and context token, the largest pre-softmax
    attention logit (q.k/sqrt(d), after RoPE) that any question or answer token pays it, maximum
    over the query heads of the group (Locret, arXiv 2410.01805);
    a second pass over [context][repeat instruction][context again] gives the **repeat labels**:
    the same maximum over the tokens of the copy (KVzip's context-reconstruction signal, which
    needs no question);
 4. trains two sets of heads, one per label kind, on the same inputs: per layer
    fc2(SiLU(fc1(x))) with x standardised per channel (statistics of the first prompts, folded into
    fc1 at export), loss SmoothL1(pred, label) averaged + 0.0025 * sum over layers of the MSE
    between adjacent tokens' predictions (Locret's); AdamW lr 5e-4, betas (0.9, 0.95), linear
    warm-up over the first 2/3 of the steps then linear decay to 0, gradients clipped by value at
    0.5 (Locret's schedule, scaled to --steps);
 5. evaluates both on the held-out prompts: per (layer, KV head) the overlap of the predicted top
    10% with the top 10% of each label kind;
 6. exports both (KVSLRN01, tools/train/lrnfile.py) and, for the C test, the heads' scores on the
    first --ref-tokens tokens of the golden Austen window computed here from the exported fp16
    weights (DIR/<name>.ref.bin: int32 n_tok, n_layer, n_kv, then int32 ids[n_tok], then float32
    scores[n_tok][n_layer][n_kv]).
"""

import argparse
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


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ---- model ------------------------------------------------------------------------------------

def load_model(gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model = model.cuda().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


class Capture:
    """Forward hooks on every layer's q/k/v projections: their outputs (bias added, before RoPE)."""

    def __init__(self, model):
        self.out = {}
        self.on = True
        self.hooks = []
        for il, layer in enumerate(model.model.layers):
            at = layer.self_attn
            for nm in ("q", "k", "v"):
                mod = getattr(at, nm + "_proj")
                self.hooks.append(mod.register_forward_hook(self._hook(il, nm)))

    def _hook(self, il, nm):
        def f(_m, _i, o):
            if self.on:
                self.out[(il, nm)] = o[0].detach()
        return f


def rope_tables(model, T):
    pos = torch.arange(T, device="cuda")[None]
    dummy = torch.zeros(1, T, 1, device="cuda", dtype=torch.float32)
    cos, sin = model.model.rotary_emb(dummy, pos)
    return cos[0], sin[0]  # (T, d)


def rope(x, cos, sin):
    """x (heads, T, d) in HF order (rotate-half)."""
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


def max_logits(q, k, n_kv):
    """q (H, F, d) post-RoPE future queries, k (n_kv, N, d) post-RoPE keys -> (n_kv, N):
    max over the F queries and the H/n_kv query heads of each group of q.k/sqrt(d)."""
    H, Fq, d = q.shape
    g = H // n_kv
    out = torch.empty(n_kv, k.shape[1], device=q.device)
    for j in range(n_kv):
        qq = q[j * g:(j + 1) * g].reshape(g * Fq, d)
        best = None
        for r0 in range(0, qq.shape[0], 2048):
            s = (qq[r0:r0 + 2048] @ k[j].T).amax(dim=0)
            best = s if best is None else torch.maximum(best, s)
        out[j] = best / math.sqrt(d)
    return out


class Shapes:
    def __init__(self, cfg):
        self.L = cfg.num_hidden_layers
        self.H = cfg.num_attention_heads
        self.KV = cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.d_in = (self.H + 2 * self.KV) * self.d


def features_and_labels(model, cap, sh, ids_ctx, ids_future, ids_rep):
    """One or two passes; returns X (L, N, d_in) float32, S_qa (L, N, KV), S_rep (L, N, KV) or None."""
    N = len(ids_ctx)
    full = torch.tensor([ids_ctx + ids_future], device="cuda")
    cap.out.clear()
    with torch.no_grad():
        model.model(input_ids=full)
    T = full.shape[1]
    cos, sin = rope_tables(model, T + (len(ids_rep) if ids_rep else 0))
    X = torch.empty(sh.L, N, sh.d_in, device="cuda")
    S_qa = torch.empty(sh.L, N, sh.KV, device="cuda") if ids_future else None
    for il in range(sh.L):
        q, k, v = cap.out[(il, "q")], cap.out[(il, "k")], cap.out[(il, "v")]
        X[il] = torch.cat((q[:N], k[:N], v[:N]), dim=1)
        if not ids_future:
            continue
        qh = rope(q.view(T, sh.H, sh.d).transpose(0, 1), cos[:T], sin[:T])
        kh = rope(k.view(T, sh.KV, sh.d).transpose(0, 1), cos[:T], sin[:T])
        S_qa[il] = max_logits(qh[:, N:], kh[:, :N], sh.KV).T
    S_rep = None
    if ids_rep:
        full = torch.tensor([ids_ctx + ids_rep], device="cuda")
        T2 = full.shape[1]
        cap.out.clear()
        with torch.no_grad():
            model.model(input_ids=full)
        S_rep = torch.empty(sh.L, N, sh.KV, device="cuda")
        for il in range(sh.L):
            q, k = cap.out[(il, "q")], cap.out[(il, "k")]
            qh = rope(q.view(T2, sh.H, sh.d).transpose(0, 1), cos[:T2], sin[:T2])
            kh = rope(k.view(T2, sh.KV, sh.d).transpose(0, 1), cos[:T2], sin[:T2])
            S_rep[il] = max_logits(qh[:, N:], kh[:, :N], sh.KV).T
    cap.out.clear()
    return X, S_qa, S_rep


# ---- golden check -----------------------------------------------------------------------------

def golden_check(model, golden, arch):
    """Compare the PyTorch model with the references our C engine is tested against."""
    rep = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = "qwen2" if arch == "qwen2" else "smollm2"
    gj = os.path.join(golden, f"{name}_golden.json")
    if os.path.exists(gj):
        g = json.load(open(gj))
        for p in g["prompts"]:
            ids = torch.tensor([p["ids"]], device="cuda")
            with torch.no_grad():
                lg = model(input_ids=ids).logits[0].float()
            am = lg.argmax(-1).tolist()
            ref = p["argmax_all_positions"]
            agree = sum(int(a == b) for a, b in zip(am, ref)) / len(ref)
            top5 = p["last_top5"]
            diffs = []
            for e in top5:
                tid, val = (e["id"], e["logit"]) if isinstance(e, dict) else (e[0], e[1])
                diffs.append(abs(float(lg[-1, tid]) - float(val)))
            rep[p["name"]] = {"argmax_agree": agree, "last_top5_max_abs_diff": max(diffs) if diffs else None}
            log(f"golden {p['name']}: argmax agreement {agree:.3f} over {len(ref)} positions, "
                f"last top-5 logits max |diff| {rep[p['name']]['last_top5_max_abs_diff']}")
    aj = os.path.join(golden, "austen_pp_4096.json")
    if os.path.exists(aj):
        a = json.load(open(aj))[name]
        ids = np.fromfile(os.path.join(golden, os.path.basename(a["ids_file"])), dtype="<i4")
        x = torch.tensor(ids[None].astype(np.int64), device="cuda")
        with torch.no_grad():
            lg = model(input_ids=x).logits[0].float()
        nll = F.cross_entropy(lg[:-1], x[0, 1:], reduction="mean").item()
        rep["austen_ppl"] = {"torch": math.exp(nll), "reference": a["ppl"]}
        log(f"golden perplexity (Austen 4096): torch {math.exp(nll):.4f}, reference (C-checked) {a['ppl']:.4f}")
    torch.backends.cuda.matmul.allow_tf32 = True
    return rep


# ---- prompts ----------------------------------------------------------------------------------

def split_template(tok):
    """The chat template around one user message: (before the context, after the question)."""
    s = "\x00SENTINEL\x00"
    text = tok.apply_chat_template([{"role": "user", "content": s}], tokenize=False, add_generation_prompt=True)
    pre, post = text.split(s)
    return pre, post


def tokenize_prompts(tok, rows, max_ctx):
    pre, post = split_template(tok)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids_pre = enc(pre)
    out = []
    for r in rows:
        ctx = ids_pre + enc(r["context"])
        ctx = ctx[:max_ctx]
        q = enc("\n\n" + r["question"] + post)
        rep = enc("\n\nRepeat the text above word for word." + post) + ctx[len(ids_pre):]
        out.append({"row": r, "ctx": ctx, "q": q, "rep": rep})
    return out


def answer_all(model, tok, items, max_new, bs=16):
    eos = {tok.eos_token_id} | {i for i in (tok.convert_tokens_to_ids("<|im_end|>"),) if isinstance(i, int)}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(items)), key=lambda i: len(items[i]["ctx"]) + len(items[i]["q"]))
    t0 = time.time()
    for b0 in range(0, len(order), bs):
        batch = [items[i] for i in order[b0:b0 + bs]]
        seqs = [it["ctx"] + it["q"] for it in batch]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        am = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, T - len(s):] = torch.tensor(s)
            am[i, T - len(s):] = 1
        with torch.no_grad():
            g = model.generate(input_ids=ids.cuda(), attention_mask=am.cuda(), max_new_tokens=max_new,
                               do_sample=False, pad_token_id=pad)
        for i, it in enumerate(batch):
            a = g[i, T:].tolist()
            cut = [j for j, t in enumerate(a) if t in eos]
            it["ans"] = a[:cut[0]] if cut else a
        done = b0 + len(batch)
        el = time.time() - t0
        if (b0 // bs) % 10 == 0 or done == len(order):
            log(f"answers {done}/{len(order)} ({el:.0f}s, ETA {el / done * (len(order) - done):.0f}s)")


# ---- heads ------------------------------------------------------------------------------------

class Heads(torch.nn.Module):
    def __init__(self, sh, hidden):
        super().__init__()
        L = sh.L
        self.w1 = torch.nn.Parameter(torch.randn(L, hidden, sh.d_in) / math.sqrt(sh.d_in))
        self.b1 = torch.nn.Parameter(torch.zeros(L, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(L, sh.KV, hidden) / math.sqrt(hidden))

    def forward(self, Xn):  # (L, N, d_in) standardised -> (L, N, KV)
        h = F.silu(torch.baddbmm(self.b1[:, None, :], Xn, self.w1.transpose(1, 2)))
        return torch.bmm(h, self.w2.transpose(1, 2))


def locret_loss(pred, S, alpha=0.0025):
    reg = F.smooth_l1_loss(pred, S)
    smooth = ((pred[:, 1:] - pred[:, :-1]) ** 2).mean(dim=(1, 2)).sum()
    return reg + alpha * smooth


def topk_overlap(pred, S, frac=0.1):
    """mean over (layer, head) of |top(pred) & top(S)| / k."""
    L, N, KV = S.shape
    k = max(1, int(N * frac))
    tp = pred.topk(k, dim=1).indices
    ts = S.topk(k, dim=1).indices
    tot = 0.0
    for il in range(L):
        for h in range(KV):
            a = torch.zeros(N, dtype=torch.bool, device=S.device)
            a[tp[il, :, h]] = True
            tot += a[ts[il, :, h]].float().mean().item()
    return tot / (L * KV)


def gguf_perm(sh, arch):
    """Index map: column j of the GGUF-order input takes HF column perm[j]. For llama the GGUF
    converter interleaves the two halves of each q/k head (rope NORM vs rotate-half)."""
    perm = np.arange(sh.d_in)
    if arch != "llama":
        return perm
    d = sh.d
    within = np.empty(d, dtype=np.int64)
    for i in range(d // 2):
        within[2 * i] = i
        within[2 * i + 1] = d // 2 + i
    for h in range(sh.H + sh.KV):  # q heads then k heads; v is not permuted
        perm[h * d:(h + 1) * d] = h * d + within
    return perm


def export(heads, mu, sd, sh, arch, path, fp, labels, n_train, name):
    """Fold the standardisation into fc1, reorder its columns to the GGUF's channel order, write."""
    perm = gguf_perm(sh, arch)
    layers = []
    with torch.no_grad():
        for il in range(sh.L):
            w1 = heads.w1[il] / sd[il][None, :]
            b1 = heads.b1[il] - (w1 * mu[il][None, :]).sum(dim=1)
            w1 = w1.cpu().numpy()[:, perm]
            layers.append((w1.astype(np.float16), b1.cpu().numpy().astype(np.float16),
                           heads.w2[il].cpu().numpy().astype(np.float16)))
    nb = lrnfile.write(path, fp, sh.L, sh.H, sh.KV, sh.d, heads.w1.shape[1], labels, n_train, name, layers)
    return nb, layers


def exported_scores(layers, X_hf, sh, arch):
    """Scores from the exported fp16 weights on GGUF-order inputs (what the C scorer computes)."""
    perm = gguf_perm(sh, arch)
    out = []
    for il, (w1, b1, w2) in enumerate(layers):
        x = X_hf[il][:, perm].double()
        h = x @ torch.tensor(w1, dtype=torch.float64, device=x.device).T + torch.tensor(b1, dtype=torch.float64, device=x.device)
        h = h * torch.sigmoid(h)
        out.append(h @ torch.tensor(w2, dtype=torch.float64, device=x.device).T)
    return torch.stack(out, dim=1)  # (N, L, KV)


# ---- main -------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description="Train Locret retaining heads (see the module docstring).")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--fingerprint", required=True, help="kvs_model_fingerprint, from `kvsieve info`")
    ap.add_argument("--data", required=True, help="tools/train/make_data.py output")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True, help="file stem, e.g. qwen2.5-1.5b")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--n-train", type=int, default=900, help="training prompts used (at most)")
    ap.add_argument("--max-ctx", type=int, default=4096)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--budget-s", type=float, default=500, help="stop training early to finish in time")
    ap.add_argument("--golden", default="tests/golden")
    ap.add_argument("--ref-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="16 prompts, 20 steps, 4 held out: checks every stage")
    a = ap.parse_args()
    if a.smoke:
        a.n_train, a.steps, a.name = 16, 20, a.name + "-smoke"
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(a.out, exist_ok=True)
    report = {"args": vars(a)}

    tok, model = load_model(a.gguf)
    arch = model.config.model_type
    arch = "llama" if arch == "llama" else arch
    sh = Shapes(model.config)
    log(f"model {arch}: {sh.L} layers, {sh.H}/{sh.KV} heads, d {sh.d}; head input {sh.d_in}, hidden {a.hidden}")
    report["golden"] = golden_check(model, a.golden, arch) if not a.smoke else {}

    import gzip
    with (gzip.open(a.data, "rt") if a.data.endswith(".gz") else open(a.data)) as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if r["split"] == "train"][:a.n_train]
    held_rows = [r for r in rows if r["split"] == "heldout"][:4 if a.smoke else None]
    items = tokenize_prompts(tok, train_rows + held_rows, a.max_ctx)
    log(f"{len(train_rows)} training prompts, {len(held_rows)} held out; context tokens "
        f"mean {np.mean([len(i['ctx']) for i in items]):.0f}, max {max(len(i['ctx']) for i in items)}")
    answer_all(model, tok, items, a.answer_tokens)
    ex = items[len(train_rows)]
    log("example held-out answer: " + repr(tok.decode(ex["ans"]))[:200] + " | expected kind " + ex["row"]["kind"])
    train, held = items[:len(train_rows)], items[len(train_rows):]

    cap = Capture(model)
    # standardisation statistics from the first 16 prompts
    s1 = torch.zeros(sh.L, sh.d_in, device="cuda", dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    cnt = 0
    for it in train[:16]:
        X, _, _ = features_and_labels(model, cap, sh, it["ctx"], it["q"] + it["ans"], None)
        s1 += X.double().sum(dim=1)
        s2 += (X.double() ** 2).sum(dim=1)
        cnt += X.shape[1]
    mu = (s1 / cnt).float()
    sd = ((s2 / cnt - (s1 / cnt) ** 2).clamp_min(0).sqrt().float()).clamp_min(1e-2)

    heads = {"qa": Heads(sh, a.hidden).cuda(), "rep": Heads(sh, a.hidden).cuda()}
    params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sch = {"steps": a.steps, "warm": max(1, int(a.steps * 2 / 3))}

    def lr_at(s):
        w, n = sch["warm"], sch["steps"]
        return (s + 1) / w if s < w else max(0.0, (n - s) / max(1, n - w))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t_train = time.time()
    step, hist = 0, []
    order = list(range(len(train)))
    while step < a.steps:
        random.shuffle(order)
        for i in order:
            if step >= a.steps:
                break
            if step == 20:  # fit the whole schedule (warm-up 2/3, decay) into the time budget
                per = (time.time() - t_train) / 20
                fit = 20 + int((a.budget_s - (time.time() - T0)) / per * 0.97)
                if fit < a.steps:
                    log(f"{per:.2f}s a step: {fit} steps fit in --budget-s (asked {a.steps})")
                    a.steps = fit
                    sch["steps"], sch["warm"] = fit, max(21, int(fit * 2 / 3))
            if time.time() - T0 > a.budget_s + 30:
                log(f"time budget passed at step {step}: stopping training early")
                a.steps = step
                break
            it = train[i]
            X, S_qa, S_rep = features_and_labels(model, cap, sh, it["ctx"], it["q"] + it["ans"], it["rep"])
            Xn = (X - mu[:, None, :]) / sd[:, None, :]
            loss_qa = locret_loss(heads["qa"](Xn), S_qa)
            loss_rep = locret_loss(heads["rep"](Xn), S_rep)
            opt.zero_grad(set_to_none=True)
            (loss_qa + loss_rep).backward()
            torch.nn.utils.clip_grad_value_(params, 0.5)
            opt.step()
            sched.step()
            step += 1
            hist.append((loss_qa.item(), loss_rep.item()))
            if step % 50 == 0 or step == a.steps:
                el = time.time() - t_train
                lq = np.mean([h[0] for h in hist[-50:]])
                lr_ = np.mean([h[1] for h in hist[-50:]])
                log(f"step {step}/{a.steps} loss qa {lq:.3f} rep {lr_:.3f} "
                    f"({el:.0f}s, ETA {el / step * (a.steps - step):.0f}s)")
    report["train"] = {"steps": step, "seconds": time.time() - t_train,
                       "loss_first50": np.mean(hist[:50], axis=0).tolist() if hist else None,
                       "loss_last50": np.mean(hist[-50:], axis=0).tolist() if hist else None}

    # held-out evaluation
    ev = {k: {"vs_qa": [], "vs_rep": []} for k in ("qa", "rep", "rep_label")}
    with torch.no_grad():
        for it in held:
            X, S_qa, S_rep = features_and_labels(model, cap, sh, it["ctx"], it["q"] + it["ans"], it["rep"])
            Xn = (X - mu[:, None, :]) / sd[:, None, :]
            for k in ("qa", "rep"):
                p = heads[k](Xn)
                ev[k]["vs_qa"].append(topk_overlap(p, S_qa))
                ev[k]["vs_rep"].append(topk_overlap(p, S_rep))
            ev["rep_label"]["vs_qa"].append(topk_overlap(S_rep, S_qa))
    report["heldout_top10_overlap"] = {k: {m: float(np.mean(v)) if v else None for m, v in d.items()}
                                       for k, d in ev.items()}
    log("held-out top-10% overlap: " + json.dumps(report["heldout_top10_overlap"]))

    # export both, plus the C test's reference scores
    ids = np.fromfile(os.path.join(a.golden, "austen_pp_4096_qwen2.ids" if arch == "qwen2" else "austen_pp_4096.ids"),
                      dtype="<i4")[:a.ref_tokens]
    Xr, _, _ = features_and_labels(model, cap, sh, ids.tolist(), [], None)
    fp = int(a.fingerprint, 0)
    report["files"] = {}
    for k, lab in (("qa", 1), ("rep", 2)):
        path = os.path.join(a.out, f"locret-{k}-{a.name}.lrn")
        nb, layers = export(heads[k], mu, sd, sh, arch, path, fp, lab, step, a.name)
        sc = exported_scores(layers, Xr, sh, arch).float().cpu().numpy()
        direct = heads[k]((Xr - mu[:, None, :]) / sd[:, None, :]).transpose(0, 1).detach().float().cpu().numpy()
        with open(path[:-4] + ".ref.bin", "wb") as f:
            f.write(struct.pack("<iii", len(ids), sh.L, sh.KV))
            f.write(ids.astype("<i4").tobytes())
            f.write(sc.astype("<f4").tobytes())
        report["files"][k] = {"path": os.path.basename(path), "bytes": nb,
                              "fp16_export_max_abs_diff": float(np.abs(sc - direct).max())}
        log(f"exported {path} ({nb} bytes); fp16 export vs training weights max |diff| "
            f"{report['files'][k]['fp16_export_max_abs_diff']:.4f}")
    report["seconds_total"] = time.time() - T0
    json.dump(report, open(os.path.join(a.out, f"report-{a.name}.json"), "w"), indent=1)
    log("done")


if __name__ == "__main__":
    main()
