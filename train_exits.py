"""Train ADEPT's exit router with the preference reward R = λ·T − β·C, and evaluate it;
or tune the model itself for early exit (joint optimisation).

    python train_exits.py                 # default model: data, targets, training, evaluation
    python train_exits.py --eval          # evaluate the shipped router only
    python train_exits.py --tune          # exit tuning: write a low-rank delta for the model
    python train_exits.py --tuning D --out R.safetensors   # a router for the tuned model

Targets (ADEPT.md §3). One full-depth pass gives, for token j and layer i, the state
(h, q, k, v) and T(i,j) = 1 if the shared head at layer i predicts the full model's
argmax (what greedy generation needs), else 0; C(i) = i/L. With R(i) = λ·T(i) − β·C(i)
the soft label of Exit over Continue at layer i is σ(R(i) − max_{i'>i} R(i')): the
Bradley–Terry preference of exiting now over the best later exit. The router is
trained on it with binary cross-entropy, the base model frozen.

Data, without downloads: text the model generates itself from built-in prompts, and
English docstrings of the Python standard library ("human text"), or your own files
with --data. Whole documents are held out, never seen in training.

Exit tuning (paper 2's joint optimisation): low-rank deltas on every layer's projections,
self-distilled from the frozen base model at full depth, with the ADEPT path in the loop:
tokens exit at sampled layers, later tokens are trained through their filled K/V, and
the exited tokens' own loss is taken through the shared head at their exit layer.
"""
import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from adept import (DEFAULT_EXITS, Confidence, FullDepth, Router, RouterPolicy, Static, Stats, check_output, check_range,
                   forward_tokens, model_id, router_features, sample)
from model import DTYPES, UserError, add_deltas, default_checkpoint, load

CHAT_PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in simple terms.", "Give me three tips for better sleep.",
    "How does a refrigerator work?", "Write a short poem about the sea.", "What causes the seasons on Earth?",
    "Summarise the plot of Romeo and Juliet.", "How do I make a cup of tea?", "What is a prime number? Give examples.",
    "Why is the sky blue?", "Describe the water cycle.", "What are the benefits of regular exercise?",
    "Write a haiku about autumn leaves.", "How do vaccines work?", "Explain what a computer program is to a child.",
    "List five fruits and one fact about each.", "What is the difference between weather and climate?",
    "How do airplanes stay in the air?", "Write a short story about a lost dog finding its way home.",
    "What is gravity?", "Give advice to someone starting their first job.", "How do bees make honey?",
    "Explain how to add two fractions.", "What were the main causes of the First World War?",
    "Describe a healthy breakfast.", "What is machine learning?", "How can I save money each month?",
    "Write a thank-you note to a teacher.", "Why do we need sleep?", "What is the tallest mountain in the world?",
    "Explain the rules of chess briefly.", "How does the internet work?", "What is democracy?",
    "Write a recipe for pancakes.", "How do plants grow from seeds?", "What is the speed of light?",
    "Explain what DNA is.", "Describe the planet Mars.", "What should I pack for a beach holiday?",
    "Write a Python function that reverses a string.", "What is inflation in economics?", "How do earthquakes happen?",
]
PLAIN_PROMPTS = [
    "Once upon a time, in a small village by the sea,", "The history of the bicycle begins", "In this tutorial, we will learn",
    "The city council met on Tuesday to discuss", "Scientists have discovered a new species of", "My favourite season is",
    "The recipe calls for two cups of flour,", "def fibonacci(n):\n    \"\"\"Return", "Dear Sir or Madam,\nI am writing to",
    "The most important lesson I learned at school was", "Chapter 1\n\nThe rain had not stopped for three days", "Water boils at",
]
STDLIB = ["argparse", "collections", "json", "csv", "functools", "itertools", "pathlib", "subprocess", "threading",
          "unittest", "logging", "datetime", "decimal", "fractions", "statistics", "random", "textwrap", "difflib",
          "heapq", "bisect", "shutil", "tempfile", "zipfile", "email.message", "http.client", "urllib.request",
          "sqlite3", "asyncio", "typing", "dataclasses", "enum", "contextlib", "inspect", "pickle", "socket", "re",
          "string", "calendar", "glob", "os", "io", "abc", "copy", "queue", "sched", "uuid", "zlib", "hashlib"]


# Exit tuning's own prompts: topics and phrasings that neither the router's data nor bench.py uses.
TOPICS = ["volcanoes", "the moon", "bread baking", "rivers", "the piano", "chess openings", "recycling", "penguins",
          "electric cars", "the Roman empire", "coffee", "clouds", "bridges", "the human heart", "solar panels", "libraries",
          "football", "tigers", "maps", "glass", "the printing press", "deserts", "batteries", "kites", "whales",
          "gardening", "the telephone", "music festivals", "mushrooms", "lighthouses"]
TUNE_PROMPTS = ([t.format(x) for t in ("Write a short paragraph about {}.", "Explain {} to a beginner.",
                                        "Tell me three interesting facts about {}.") for x in TOPICS],
                [f"Here is a short essay about {x}.\n\n" for x in TOPICS])  # (chat, plain)
# Modules never imported here: they open windows or browsers, print on import, or are the IDE.
NOT_IMPORTED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "__phello__"}


# ----------------------------------------------------------------------------- data


def docstrings(modules=STDLIB):
    """Long docstrings of standard-library modules, classes and functions: English prose on every machine."""
    out = []
    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated modules warn on import
                mod = importlib.import_module(name)
        except Exception:  # a module this platform lacks (e.g. a Windows one)
            continue
        for obj in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]:
            if (inspect.ismodule(obj) and obj is not mod) or not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 300 and (obj is mod or getattr(obj, "__module__", None) == name):
                out.append(doc)
    return list(dict.fromkeys(out))


def read_text(path):
    """A --data file as text, or one clear error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--data file {path} not found") from None
    except IsADirectoryError:
        raise UserError(f"--data {path} is a directory; give text files") from None
    except UnicodeDecodeError:
        raise UserError(f"--data file {path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read --data file {path}: {e.strerror}") from None


def chunks(ids, size):
    return [ids[i:i + size] for i in range(0, len(ids) - size // 4, size)]


@torch.no_grad()
def sample_batch(model, prompts, max_new_tokens, eos_ids, seed, temperature=0.7, top_p=0.9):
    """Full-depth sampling of many prompts at once, for training data only.

    Prompts are left-padded to one length. RoPE depends only on relative position, so a
    row shifted right by its padding computes what it would alone; padded keys are
    masked out, and each pad position attends to itself only (a row with nothing to
    attend to would make NaNs).
    """
    B, P, T = len(prompts), max(map(len, prompts)), max(map(len, prompts)) + max_new_tokens
    dev = model.tok_emb.device
    pad = torch.tensor([P - len(p) for p in prompts], device=dev)
    real = torch.arange(T, device=dev)[None] >= pad[:, None]         # [B, T]: this position holds a real token
    cache = model.new_cache(B, T)
    g = torch.Generator(device=dev).manual_seed(seed)
    x, start = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=dev), 0
    out, done = [[] for _ in prompts], [False] * B
    for _ in range(max_new_tokens):
        pos, keys = torch.arange(start, start + x.shape[1], device=dev), torch.arange(start + x.shape[1], device=dev)
        mask = ((pos[:, None] >= keys)[None] & real[:, None, :len(keys)]) | (pos[:, None] == keys)[None]  # [B, n, end]
        h = model.tok_emb[x]
        for i in range(model.config.n_layers):
            h, _ = model.layer(i, h, pos, cache, mask[:, None])      # mask [B, 1, n, end] broadcasts over heads
        logits = model.head(h[:, -1])
        nxt = [sample(logits[b], temperature, None, top_p, g) for b in range(B)]
        for b, t in enumerate(nxt):
            done[b] = done[b] or t in eos_ids
            if not done[b]:
                out[b].append(t)
        if all(done):
            break
        x, start = torch.tensor(nxt, device=dev)[:, None], start + x.shape[1]
    return out


def generated_text(model, tok, seed, max_new_tokens, runs=Path("runs"), prompts=(CHAT_PROMPTS, PLAIN_PROMPTS)):
    """(ids, prompt length) of text the model writes itself from (chat, plain) prompts, cached in `runs/`
    under a key of everything that determines it (minutes of sampling on a CPU)."""
    prompts = [tok.encode(tok.chat(p) if tok.has_chat else p) for p in prompts[0]] + [tok.encode(p) for p in prompts[1]]
    key = hashlib.sha1(json.dumps([model_id(model), seed, max_new_tokens, prompts]).encode()).hexdigest()[:12]
    path = runs / f"generated-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    gen = []
    for b in range(0, len(prompts), 16):
        batch = prompts[b:b + 16]
        for ids, toks in zip(batch, sample_batch(model, batch, max_new_tokens, tok.eos_ids, seed + b)):
            if len(toks) >= 8:
                gen.append([ids + toks, len(ids)])  # as JSON gives it back
        print(f"\rgenerating text: {min(b + 16, len(prompts))}/{len(prompts)} prompts", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    runs.mkdir(exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(gen))
    os.replace(path.with_suffix(".tmp"), path)
    return gen


def build_data(model, tok, args):
    """Sequences (ids, score_from): the tokens from score_from on are the text that is trained and scored.
    `model` writes the generated text: the base model, also for a tuned one, so that both are scored on one text."""
    rng = random.Random(args.seed)
    gen = generated_text(model, tok, args.seed, args.max_new_tokens)
    docs = list(args.data_texts) if args.data else docstrings()
    rng.shuffle(docs)
    human = [(c, 0) for d in docs for c in chunks(tok.encode(d), 128)]
    rng.shuffle(gen)
    k_gen, k_hum = max(1, len(gen) // 5), max(1, len(human) // 10)  # held out by whole document
    human_heldout, human_train = human[:k_hum], human[k_hum:][:args.human_chunks]
    return {"train": gen[k_gen:] + human_train, "heldout_generated": gen[:k_gen], "heldout_human": human_heldout[:args.eval_chunks]}


# ----------------------------------------------------------------------------- targets


def preference_labels(T, lam, beta):
    """Soft labels σ(R(i) − max_{i'>i} R(i')) for layers i = 1..L-1, from T [L, N] (layer L last)."""
    L = T.shape[0]
    C = torch.arange(1, L + 1, dtype=T.dtype)[:, None] / L
    R = lam * T - beta * C
    best_from = R.flip(0).cummax(0).values.flip(0)  # best_from[i] = max over layers >= i
    return torch.sigmoid(R[:-1] - best_from[1:])


@torch.no_grad()
def targets(model, seqs):
    """Router features [L-1, N, F] and T [L, N] for the scored tokens of every sequence."""
    feats, agree = [], []
    for ids, start in seqs:
        hs = []
        final = model(torch.tensor([ids], device=model.tok_emb.device), hidden_states=hs)[0, start:].argmax(-1)
        feats.append(torch.stack([router_features(model, h[0, start:], q[0, start:], k[0, start:], v[0, start:])
                                  for h, q, k, v in hs[:-1]]))
        agree.append(torch.stack([model.head(h[0, start:]).argmax(-1) == final for h, *_ in hs]))
    return torch.cat(feats, 1).float().cpu(), torch.cat(agree, 1).float().cpu()  # the router trains on the CPU


# ----------------------------------------------------------------------------- training


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: an interrupted run never leaves a half-written file."""
    tmp = Path(f"{path}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(router, feats, labels, epochs, lr=3e-3, batch=512, seed=0, ckpt=None, stop_after=None, progress=True):
    """BCE on the soft labels, all layers' routers at once. Resumes from `ckpt` if it exists; returns epoch losses."""
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    start, losses = 0, []
    if ckpt and Path(ckpt).is_file():
        state = torch.load(ckpt, weights_only=True)
        router.load_state_dict(state["router"])
        opt.load_state_dict(state["opt"])
        start, losses = state["epoch"], state["losses"]
    N = feats.shape[1]
    from tqdm import tqdm
    for epoch in range(start, epochs):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1000 + epoch))  # same order on resume
        total = 0.0
        bar = tqdm(range(0, N, batch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for b in bar:
            idx = order[b:b + batch]
            logits = torch.stack([router(i + 1, feats[i, idx]) for i in range(feats.shape[0])])  # [L-1, n]
            loss = F.binary_cross_entropy_with_logits(logits, labels[:, idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        losses.append(total / N)
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", file=sys.stderr)
        if ckpt:
            save_atomic({"router": router.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "losses": losses}, ckpt)
        if stop_after is not None and epoch + 1 >= stop_after:
            break
    return losses


# ----------------------------------------------------------------------------- exit tuning (joint optimisation, paper 2)
#
# The router above learns where a frozen model may exit. Exit tuning changes the model instead:
# low-rank deltas (model.LowRank) trained by self-distillation from the frozen base, through the
# ADEPT path itself (model.forward with a sampled exit pattern: exited tokens keep h_e, later
# tokens read their filled K/V), so that exit states predict what the base's final layer does.


def tuning_data(model, tok, args):
    """Windows [N, tune_len] of token ids to tune on, and held-out windows. Text the model generates from
    TUNE_PROMPTS (gen_seeds samples of each) and docstrings of every importable standard-library module
    outside STDLIB (the router's human text, whose held-out part its evaluation scores), or --data.
    Split by whole document, then each side joined into one stream and cut into windows."""
    docs = [ids for k in range(args.gen_seeds)
            for ids, _ in generated_text(model, tok, args.seed + 1 + k, args.gen_tokens, prompts=TUNE_PROMPTS)]
    modules = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in {*STDLIB, *NOT_IMPORTED})
    docs += [tok.encode(d) for d in (args.data_texts or docstrings(modules))]
    random.Random(args.seed).shuffle(docs)
    n_val, sep = max(1, len(docs) // 20), min(tok.eos_ids or {0})
    stream = lambda ds: [t for d in ds for t in d + [sep]]
    windows = lambda ids: torch.tensor(chunks(ids, args.tune_len)[:len(ids) // args.tune_len]).view(-1, args.tune_len)
    return windows(stream(docs[n_val:])), windows(stream(docs[:n_val]))


def sample_exits(shape, layers, rate, n_layers, g):
    """The exit layer of each token: with probability `rate` a layer drawn uniformly from `layers` (lo, hi), else the last."""
    e = torch.randint(layers[0], layers[1] + 1, shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < rate, e, n_layers)


def switch(deltas, on):
    for d in deltas.values():
        d.on = on


def tuning_loss(model, deltas, ids, exit_layer, final_weight, fill=True):
    """Per token KL(base at full depth ‖ tuned model), the tuned model's logits taken through the ADEPT path:
    at its exit layer for a token that exits (weight 1), at the last layer for the others (weight final_weight).
    fill=False is the ablation without the ADEPT path: exits judged on full-depth states, no filled K/V."""
    with torch.no_grad():
        switch(deltas, False)
        teacher = model(ids).float().log_softmax(-1)  # [B, T, vocab]
        switch(deltas, True)
    with parametrize.cached():  # W + A·B once per step, not at every read of W
        if fill:
            logits = model(ids, exit_layer)
        else:
            hs = []
            model(ids, hidden_states=hs)
            h = torch.stack([h for h, *_ in hs])                                  # [L, B, T, D]
            logits = model.head(h.gather(0, (exit_layer - 1)[None, ..., None].expand(1, *h.shape[1:]))[0])
    kl = (teacher.exp() * (teacher - logits.float().log_softmax(-1))).sum(-1)  # [B, T]
    w = torch.where(exit_layer == model.config.n_layers, final_weight, 1.0)
    return (w * kl).sum() / w.sum(), kl


@torch.no_grad()
def tuning_estimate(model, deltas, val, exit_layers):
    """Held-out agreement with the base model's full-depth argmax on the first 8 windows of `val` (1,024 tokens at
    the default --tune-len): the tuned model at full depth, and its shared head at the first, middle and last of
    the tuned exit layers; with the KL at full depth."""
    L, (lo, hi) = model.config.n_layers, exit_layers
    layers, val = sorted({lo, (lo + L) // 2, hi}), val[:8].to(model.tok_emb.device)
    switch(deltas, False)
    base = model(val).float().log_softmax(-1)
    switch(deltas, True)
    hs = []
    with parametrize.cached():
        tuned = model(val, hidden_states=hs).float().log_softmax(-1)
    target = base.argmax(-1)
    out = {"final": (tuned.argmax(-1) == target).float().mean().item(),
           "final_kl": (base.exp() * (base - tuned)).sum(-1).mean().item()}
    return out | {f"layer {i}": (model.head(hs[i - 1][0]).argmax(-1) == target).float().mean().item() for i in layers}


# What a resumed run must share with the checkpoint it resumes (the data too: --data, --gen-seeds, --tune-len)
RECIPE = ("seed", "rank", "alpha", "tune_lr", "tune_steps", "tune_batch", "exit_layers", "exit_rate", "final_weight", "no_fill",
          "data", "gen_seeds", "tune_len")


def tune(model, train, val, args, ckpt=None, stop_after=None, progress=True):
    """Train low-rank deltas on `model` (added here) by self-distillation through the ADEPT path.
    Resumes from `ckpt` if it exists (a run with the same settings), and equals an uninterrupted run.
    Returns (deltas, log)."""
    from tqdm import tqdm
    torch.manual_seed(args.seed)
    deltas = add_deltas(model, args.rank, args.alpha)
    params = [p for d in deltas.values() for p in (d.A, d.B)]
    opt = torch.optim.Adam(params, lr=args.tune_lr)
    step, log = 0, []
    recipe = {k: getattr(args, k, None) for k in RECIPE}
    if ckpt and Path(ckpt).is_file():
        state = torch.load(ckpt, weights_only=True)
        if state.get("recipe") != recipe:
            other = {k: v for k, v in (state.get("recipe") or {}).items() if recipe.get(k) != v}
            raise UserError(f"{ckpt} is the checkpoint of a run with other settings ({other}); rerun with those to "
                            "resume it, or delete it to start afresh")
        for name, d in deltas.items():
            d.load_state_dict(state["deltas"][name])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
    L, dev = model.config.n_layers, model.tok_emb.device
    if not log:
        log.append({"step": 0, "tokens": 0, **tuning_estimate(model, deltas, val, args.exit_layers)})
    bar = tqdm(total=args.tune_steps, initial=step, desc="exit tuning", disable=not progress)
    while step < args.tune_steps:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # drawn per step: a resumed run draws the same
        ids = train[torch.randint(len(train), (args.tune_batch,), generator=g)]
        exit_layer = sample_exits(ids.shape, args.exit_layers, args.exit_rate, L, g).to(dev)
        ids = ids.to(dev)
        for group in opt.param_groups:  # linear warm-up, then cosine decay to a tenth
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = args.tune_lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / args.tune_steps))
        loss, kl = tuning_loss(model, deltas, ids, exit_layer, args.final_weight, fill=not args.no_fill)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        full = exit_layer == L
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", final_kl=f"{kl[full].mean().item():.3f}",
                        exit_kl=f"{kl[~full].mean().item():.3f}")
        if step % args.eval_every == 0 or step == args.tune_steps:
            log.append({"step": step, "tokens": step * ids.numel(), **tuning_estimate(model, deltas, val, args.exit_layers)})
            bar.write("  held-out agreement with base: " + ", ".join(
                f"{k} {v:.3f}" for k, v in log[-1].items() if k not in ("step", "tokens")) + f" ({log[-1]['tokens']} tokens)")
        if ckpt and (step % args.eval_every == 0 or step == args.tune_steps or step == stop_after):
            save_atomic({"deltas": {n: d.state_dict() for n, d in deltas.items()}, "opt": opt.state_dict(),
                         "step": step, "log": log, "recipe": recipe}, ckpt)
        if stop_after is not None and step >= stop_after:
            break
    bar.close()
    return deltas, log


def save_tuning(deltas, path, meta):
    """The delta file: only the low-rank tensors (bfloat16), with what they belong to and how they were made."""
    from safetensors.torch import save_file
    tensors = {f"{n}.{k}": getattr(d, k).detach().to("cpu", torch.bfloat16).contiguous() for n, d in deltas.items() for k in "AB"}
    save_file(tensors, f"{path}.tmp", metadata={k: str(v) for k, v in meta.items()})
    os.replace(f"{path}.tmp", path)


# ----------------------------------------------------------------------------- evaluation
#
# Every figure is a record of one schema, shared with bench.py and documented in the README:
# policy, setting, scenario, model, reference, n, mean_exit_layer, compute_saved, agreement with
# its 95% interval, and what else the scenario measured (kl, ppl, full_ppl, tokens_per_s, ...).


def wilson(k, n, z=1.96):
    """95% Wilson score interval of the rate k/n (stays inside [0, 1] and is honest near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    mid = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return min(p, max(0.0, mid - half)), max(p, min(1.0, mid + half))  # p itself stays inside despite rounding


def record(policy, setting, scenario, n, n_agree, stats, model="base", reference="base", **measured):
    """One measured figure: `n_agree` of `n` scored tokens (or documents) agree with the reference's argmax."""
    lo, hi = wilson(n_agree, n)
    return {"policy": policy, "setting": setting, "scenario": scenario, "model": model, "reference": reference, "n": n,
            "mean_exit_layer": stats.mean_exit_layer, "compute_saved": stats.saved, "ideal_speedup": stats.ideal_speedup,
            "agreement": n_agree / max(n, 1), "agreement_lo": lo, "agreement_hi": hi, **measured}


@torch.no_grad()
def full_reference(model, seqs):
    """Full depth's log-probabilities [n_scored, vocab] for the scored tokens of each sequence."""
    return [model(torch.tensor([ids], device=model.tok_emb.device))[0, start:].float().log_softmax(-1) for ids, start in seqs]


@torch.no_grad()
def evaluate(model, seqs, policy, ref):
    """Teacher-forced through the real ADEPT path, prompt included (as in generation).

    Returns (n, n_agree, stats, measured): n scored tokens, how many have the reference's argmax,
    the cost counters, and the mean KL(reference ‖ policy) and the policy's perplexity of the text.
    """
    stats, n, n_agree, kl, nll = Stats(), 0, 0, 0.0, 0.0
    for (ids, start), r in zip(seqs, ref):
        cache = model.new_cache(1, len(ids))
        t = torch.tensor(ids, device=model.tok_emb.device)
        if start:
            forward_tokens(model, t[:start], 0, cache, policy, Stats())  # the prompt: exits here change the cache
        logits, _ = forward_tokens(model, t[start:], start, cache, policy, stats, all_logits=True)
        logp = logits.float().log_softmax(-1)
        n, n_agree = n + len(r), n_agree + int((logp.argmax(-1) == r.argmax(-1)).sum())
        kl += float((r.exp() * (r - logp)).sum())
        nll -= float(logp[:-1].gather(1, t[start + 1:, None]).sum())
    return n, n_agree, stats, {"kl": kl / n, "ppl": math.exp(nll / (n - len(seqs)))}


def pick_threshold(model, router, min_layer, seqs, target, base=None):
    """The threshold with the lowest mean exit layer whose agreement (with base's full depth, if given) reaches
    `target` on validation sequences, measured through the real ADEPT path (exits change later tokens through the KV fill)."""
    ref = full_reference(base or model, seqs)
    best = (THRESHOLDS[-1], float(model.config.n_layers))
    for tau in THRESHOLDS:
        n, k, stats, _ = evaluate(model, seqs, RouterPolicy(router, tau, min_layer), ref)
        if k / n >= target and stats.mean_exit_layer < best[1]:
            best = (tau, stats.mean_exit_layer)
    return best[0]


THRESHOLDS = [0.3, 0.35, 0.4, 0.43, 0.45, 0.47, 0.49, 0.5]  # labels top out near σ(β/L) ≈ 0.51
# The gates run the LM head at every layer (~8 layers' work each time): two settings each by default.
GATES = {"confidence": [0.9, 0.9999], "entropy": [0.5, 0.001]}
ALL_GATES = {"confidence": [0.5, 0.9, 0.99, 0.999, 0.9999], "entropy": [2.0, 0.5, 0.05, 0.01, 0.001]}


def sweep(model, router, seqs, scenario, gates=GATES, base=None):
    """Records for full depth, static depths, the gates and the router's thresholds on one held-out set.
    With `base` (the untuned model when `model` carries a delta), agreement is with base's full depth, and
    base's own full-depth record comes first."""
    L = model.config.n_layers
    settings = {"full": [None], "static": sorted({min(s, L) for s in (12, 16, 20, 24, 26, 28, 29)}), **gates}
    if router is not None:
        settings["router"] = sorted(set(THRESHOLDS) | {float(router.meta["threshold"])})  # always its own threshold
    make = {"full": lambda s: FullDepth(), "static": lambda s: Static(s, L), "confidence": lambda s: Confidence(s),
            "entropy": lambda s: Confidence(s, entropy=True, vocab_size=model.config.vocab_size),
            "router": lambda s: RouterPolicy(router, s)}  # with the router file's minimum exit layer
    ref, rows, which = full_reference(base or model, seqs), [], "tuned" if base else "base"
    if base:
        n, k, stats, m = evaluate(base, seqs, FullDepth(), ref)
        rows.append(record("full", None, scenario, n, k, stats, **m, full_ppl=m["ppl"]))
    for name, values in settings.items():
        for s in values:
            n, k, stats, m = evaluate(model, seqs, make[name](s), ref)
            rows.append(record(name, s, scenario, n, k, stats, which, "base", **m, full_ppl=rows[0]["ppl"] if rows else m["ppl"]))
            print(f"\r  {scenario} {name} {s}: agreement {k / n:.1%}, saved {stats.saved:.1%}   ",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows


def report(records, plot_path=None):
    """A markdown table per scenario, and agreement against compute per policy as a PNG."""
    lines, scenarios = [], list(dict.fromkeys(r["scenario"] for r in records))
    for sc in scenarios:
        rows = [r for r in records if r["scenario"] == sc]
        lines += [f"\n### {sc} (n = {rows[0]['n']} tokens)\n",
                  f"| policy | setting | mean exit layer | compute saved | argmax agreement [95% CI] | KL | ppl (full: {rows[0]['full_ppl']:.1f}) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['policy']} | {'' if r['setting'] is None else r['setting']} | {r['mean_exit_layer']:.1f} | "
                  f"{r['compute_saved']:.1%} | {r['agreement']:.1%} [{r['agreement_lo']:.1%}, {r['agreement_hi']:.1%}] | "
                  f"{r['kl']:.3f} | {r['ppl']:.1f} |" for r in rows]
    if plot_path:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.5), squeeze=False)
        for ax, sc in zip(axes[0], scenarios):
            rows = [r for r in records if r["scenario"] == sc]
            for pol in dict.fromkeys(r["policy"] for r in rows):
                pts = sorted((1 - r["compute_saved"], r["agreement"]) for r in rows if r["policy"] == pol)
                ax.plot(*zip(*pts), "o-" if pol != "full" else "k*", label=pol, markersize=4)
            ax.set(title=f"{sc} (n = {rows[0]['n']} tokens)", xlabel="compute relative to full depth (MAC counters, log scale)",
                   ylabel="argmax agreement with full model", ylim=(0, 1.02), xscale="log")
            ax.grid(alpha=0.3, which="both")
            ax.legend()
        fig.tight_layout()
        fig.savefig(plot_path, dpi=110)
        plt.close(fig)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def tune_main(model, tok, args, tuning_out, runs):
    """--tune: data, the tuning loop (resumable), the delta file, and the learning curve."""
    t0 = time.time()
    base_id = model_id(model)
    train_w, val_w = tuning_data(model, tok, args)
    if len(train_w) == 0 or len(val_w) == 0:
        raise UserError(f"too little text to tune on: {len(train_w)} training and {len(val_w)} held-out windows of "
                        f"{args.tune_len} tokens; give more with --data or a shorter --tune-len")
    print(f"tuning data: {train_w.numel()} training tokens, {val_w.numel()} held-out ({time.time() - t0:.0f}s)", file=sys.stderr)
    ckpt = runs / f"{tuning_out.stem}.resume.pt"
    deltas, log = tune(model, train_w, val_w, args, ckpt=ckpt)
    meta = {"base_model": base_id, "rank": args.rank, "alpha": args.alpha, "targets": ",".join(deltas),
            "final_weight": args.final_weight, "exit_rate": args.exit_rate, "exit_layers": "%d-%d" % tuple(args.exit_layers),
            "fill_in_loop": not args.no_fill, "data": "--data" if args.data else f"generated x{args.gen_seeds} + stdlib docstrings",
            "tokens_trained": args.tune_steps * args.tune_batch * args.tune_len, "lr": args.tune_lr, "seed": args.seed}
    save_tuning(deltas, tuning_out, meta)
    ckpt.unlink(missing_ok=True)
    # what bfloat16 storage costs: the last held-out estimate again, with the deltas rounded as stored
    with torch.no_grad():
        for p in (p for d in deltas.values() for p in (d.A, d.B)):
            p.copy_(p.to(torch.bfloat16))
    stored = tuning_estimate(model, deltas, val_w, args.exit_layers)
    print("stored in bfloat16: " + ", ".join(f"{k} {log[-1][k]:.4f} -> {v:.4f}" for k, v in stored.items()), file=sys.stderr)
    print(f"wrote {tuning_out} after {time.time() - t0:.0f}s\n\nlearning curve (held-out, agreement with the base model's argmax):")
    keys = [k for k in log[0] if k not in ("step", "tokens")]
    print("| tokens | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in log:
        print(f"| {r['tokens']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": {**meta, "command": "python train_exits.py " + " ".join(sys.argv[1:])},
                                               "learning_curve": log, "stored_bf16": stored}, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="base model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", default=None, help=f"router file to write (default: {DEFAULT_EXITS.relative_to(DEFAULT_EXITS.parent.parent)} for the default model)")
    p.add_argument("--data", nargs="+", help="your own text files as the human text (default: stdlib docstrings)")
    p.add_argument("--lam", type=float, default=4.0, help="λ, weight of task performance T")
    p.add_argument("--beta", type=float, default=1.0, help="β, weight of compute cost C = i/L")
    p.add_argument("--min-layer", type=int, default=None,
                   help="no exit before this layer (default 12, at most half the layers): a shallow exit fills every "
                        "deeper layer's K/V from a shallow state, which misleads all later tokens")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--hidden", type=int, default=16, help="router hidden units per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128, help="length of each generated text")
    p.add_argument("--human-chunks", type=int, default=40, help="128-token chunks of human text to train on")
    p.add_argument("--eval-chunks", type=int, default=8, help="held-out chunks of human text to evaluate on")
    p.add_argument("--target-agreement", type=float, default=0.9, help="default threshold: lowest depth reaching this on validation text")
    p.add_argument("--eval", action="store_true", help="only evaluate the router at --out (or the default one)")
    p.add_argument("--no-router", action="store_true", help="with --eval: full depth, static depths and the gates only")
    p.add_argument("--tuning", help="merge this delta file (from --tune) into the model first: train or evaluate a router for it")
    t = p.add_argument_group("exit tuning (--tune): low-rank deltas distilled from the frozen model through the ADEPT path")
    t.add_argument("--tune", action="store_true", help="train a delta and write it to --tuning-out, instead of a router")
    t.add_argument("--tuning-out", help="delta file to write (default: exits/<model>.tuning.safetensors for the default model)")
    t.add_argument("--rank", type=int, default=8, help="rank of every delta")
    t.add_argument("--alpha", type=float, default=16.0, help="deltas are scaled by alpha / rank")
    t.add_argument("--tune-steps", type=int, default=200, help="optimizer steps (about 6.6 s each on 2 CPU cores)")
    t.add_argument("--tune-lr", type=float, default=3e-4)
    t.add_argument("--tune-batch", type=int, default=4, help="sequences per step")
    t.add_argument("--tune-len", type=int, default=128, help="tokens per sequence")
    t.add_argument("--exit-rate", type=float, default=0.25, help="share of tokens that exit in the ADEPT path while tuning")
    t.add_argument("--exit-layers", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="tokens exit at a layer drawn from LO..HI (default: the deepest 8 exits, L-8 .. L-1, where "
                        "the router exits on the default model; shallower exits' large losses pulled the deep layers away)")
    t.add_argument("--final-weight", type=float, default=16.0, help="weight of the full-depth tokens' loss (exits: 1)")
    t.add_argument("--no-fill", action="store_true", help="ablation: exits judged on full-depth states, no filled K/V in the loop")
    t.add_argument("--gen-seeds", type=int, default=2, help="generated samples of each tuning prompt")
    t.add_argument("--gen-tokens", type=int, default=224, help="length of each generated tuning text")
    t.add_argument("--eval-every", type=int, default=25, help="steps between held-out estimates and checkpoints")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="router runs only: exit tuning trains in float32")
    p.add_argument("--all-gates", action="store_true",
                   help="sweep 5 settings of the confidence and entropy gates instead of 2 (they run the head at every layer: slow)")
    p.add_argument("--json", help="write the evaluation here (records in the schema of bench.py --json)")
    p.add_argument("--plot", default="runs/exits.png", help="PNG of quality against compute")
    p.add_argument("--force", action="store_true", help="overwrite an existing router file")
    args = p.parse_args(argv)

    # everything the user gave is checked before the minutes of work start
    if args.checkpoint and not args.out and not args.tune:
        raise UserError("with --checkpoint, name the router file to write with --out")
    out = Path(args.out) if args.out else DEFAULT_EXITS
    for what, ok, need in [("--lam", 0 < args.lam < math.inf, "> 0"), ("--beta", 0 < args.beta < math.inf, "> 0"),
                           ("--epochs", args.epochs >= 1, ">= 1"), ("--hidden", args.hidden >= 1, ">= 1"),
                           ("--seed", 0 <= args.seed < 2 ** 32, "in [0, 2**32)"),
                           ("--max-new-tokens", args.max_new_tokens >= 8, ">= 8"), ("--human-chunks", args.human_chunks >= 0, ">= 0"),
                           ("--eval-chunks", args.eval_chunks >= 1, ">= 1"),
                           ("--target-agreement", 0 < args.target_agreement <= 1, "in (0, 1]"),
                           ("--rank", args.rank >= 1, ">= 1"), ("--alpha", 0 < args.alpha < math.inf, "> 0"),
                           ("--tune-steps", args.tune_steps >= 1, ">= 1"), ("--tune-lr", 0 < args.tune_lr < math.inf, "> 0"),
                           ("--tune-batch", args.tune_batch >= 1, ">= 1"), ("--tune-len", args.tune_len >= 2, ">= 2"),
                           ("--exit-rate", 0 <= args.exit_rate <= 1, "in [0, 1]"), ("--gen-seeds", args.gen_seeds >= 1, ">= 1"),
                           ("--final-weight", 0 < args.final_weight < math.inf, "> 0"), ("--eval-every", args.eval_every >= 1, ">= 1")]:
        if not ok:
            raise UserError(f"{what} must be {need}, got {getattr(args, what[2:].replace('-', '_'))}")
    if args.tune and args.dtype != "float32":
        raise UserError("exit tuning trains in float32 (Adam on bfloat16 deltas loses the small updates); drop --dtype")
    if args.no_router and not args.eval:
        raise UserError("--no-router belongs to --eval (a router run trains a router)")
    if args.tune and (args.eval or args.tuning):
        raise UserError("--tune trains a delta on the base model; --eval and --tuning belong to router runs")
    if args.tune and args.checkpoint and not args.tuning_out:
        raise UserError("with --checkpoint, name the delta file to write with --tuning-out")
    if args.tuning and not args.out and not args.eval:
        raise UserError("a router for a tuned model is another router: name it with --out")
    tuning_out = Path(args.tuning_out) if args.tuning_out else DEFAULT_EXITS.with_suffix(".tuning.safetensors")
    args.data_texts = [read_text(f) for f in args.data or []]
    runs = Path("runs")
    runs.mkdir(exist_ok=True)
    if args.tune:
        check_output(tuning_out, "--tuning-out")
        if tuning_out.exists() and not args.force:
            raise UserError(f"{tuning_out} exists; pass --force to overwrite it or --tuning-out to write elsewhere")
    elif not args.eval:
        check_output(out, "--out")
    if args.json:
        check_output(args.json, "--json")
    if args.plot:
        check_output(args.plot, "--plot")
    torch.manual_seed(args.seed)
    model, tok = load(args.checkpoint or default_checkpoint(), args.device, DTYPES[args.dtype], tuning=args.tuning)
    L = model.config.n_layers
    if args.min_layer is None:
        args.min_layer = min(12, L // 2)
    check_range("--min-layer", args.min_layer, 1, L)
    args.exit_layers = args.exit_layers or [max(1, L - 8), L - 1]
    if not 1 <= args.exit_layers[0] <= args.exit_layers[1] <= L:
        raise UserError(f"--exit-layers {args.exit_layers[0]} {args.exit_layers[1]} must satisfy 1 <= LO <= HI <= {L}")
    if args.tune:
        return tune_main(model, tok, args, tuning_out, runs)
    base = load(args.checkpoint or default_checkpoint(), args.device, DTYPES[args.dtype])[0] if args.tuning else None  # what agreement is measured against
    router = Router.load(out, model) if args.eval and not args.no_router else None
    if not args.eval and out.exists() and not args.force:
        raise UserError(f"{out} exists; pass --force to overwrite it or --out to write elsewhere")
    t0 = time.time()
    data = build_data(base or model, tok, args)
    for k, what in (("heldout_generated", "generated text"), ("heldout_human", "human text")):
        if not data[k]:
            raise UserError(f"no held-out {what} to evaluate on: {'give more text with --data' if args.data else 'generate longer texts'}")
    print(f"data: {sum(len(i) - s for i, s in data['train'])} training (and validation) tokens, "
          f"{sum(len(i) - s for i, s in data['heldout_generated'])} held-out generated, "
          f"{sum(len(i) - s for i, s in data['heldout_human'])} held-out human ({time.time() - t0:.0f}s)", file=sys.stderr)

    if not args.eval:
        n_val = max(1, len(data["train"]) // 10)  # validation sequences (for the threshold), not trained on
        val, train_seqs = data["train"][:n_val], data["train"][n_val:]
        # Prompts are trained on too: in prefill the router decides for every prompt token (chat
        # template included), and a router that never saw them exits some of them at random.
        feats, T = targets(model, [(ids, 0) for ids, _ in train_seqs])
        labels = preference_labels(T, args.lam, args.beta)
        print(f"targets: {feats.shape[1]} tokens x {feats.shape[0]} layers ({time.time() - t0:.0f}s); "
              f"agreement by layer: {' '.join(f'{a:.2f}' for a in T.mean(1)[::3].tolist())}", file=sys.stderr)
        torch.manual_seed(args.seed)
        router = Router(model.config.n_layers, feats.shape[2], args.hidden)
        router.mu[:-1], router.sd[:-1] = feats.mean(1), feats.std(1) + 1e-6
        train(router, feats, labels, args.epochs, seed=args.seed, ckpt=runs / f"{out.stem}.resume.pt")
        router.to(model.tok_emb.device, model.tok_emb.dtype)
        threshold = pick_threshold(model, router, args.min_layer, val, args.target_agreement, base)
        out.parent.mkdir(parents=True, exist_ok=True)
        router.save(Path(f"{out}.tmp"), {"base_model": model_id(model), "tuning": args.tuning, "n_layers": model.config.n_layers,
                                         "dim": model.config.dim, "threshold": threshold, "min_layer": args.min_layer,
                                         "lam": args.lam, "beta": args.beta, "seed": args.seed, "epochs": args.epochs})
        os.replace(f"{out}.tmp", out)
        (runs / f"{out.stem}.resume.pt").unlink(missing_ok=True)
        print(f"wrote {out} (threshold {threshold}) after {time.time() - t0:.0f}s", file=sys.stderr)
    gates = ALL_GATES if args.all_gates else GATES
    records = sweep(model, router, data["heldout_generated"], "eval-generated", gates, base) + \
        sweep(model, router, data["heldout_human"], "eval-human", gates, base)
    threshold = float(router.meta["threshold"]) if router else None
    print(report(records, args.plot))
    for r in records:
        if r["policy"] == "router" and r["setting"] == threshold:
            print(f"\nshipped threshold {threshold} on {r['scenario']} (n = {r['n']} tokens): agreement {r['agreement']:.1%} "
                  f"[{r['agreement_lo']:.1%}, {r['agreement_hi']:.1%}], mean exit layer {r['mean_exit_layer']:.1f} of "
                  f"{model.config.n_layers}, compute saved {r['compute_saved']:.1%}, ppl {r['ppl']:.1f} (full {r['full_ppl']:.1f})")
    print(f"\nplot: {args.plot}; total {time.time() - t0:.0f}s")
    if args.json:
        meta = {"command": "python train_exits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "model": model.name, "model_id": model_id(model), "tuning": args.tuning, "router": router and str(out), "threshold": threshold}
        Path(args.json).write_text(json.dumps({"meta": meta, "records": records}, indent=2))

if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
