"""Train ADEPT's exit router with the preference reward R = λ·T − β·C, and evaluate it.

    python train_exits.py                 # default model: data, targets, training, evaluation
    python train_exits.py --eval          # evaluate the shipped router only
    python train_exits.py --tuning D --out R.safetensors   # a router for a model tuned by tune_exits.py
    python train_exits.py --calibrate     # the calibrated KV fill's statistics, beside the router file
    python train_exits.py --target prompt # the router for prompt tokens (exits/<model>.prompt.safetensors)
    python train_exits.py --classify DIR --out C.safetensors   # exit classifiers for labelled documents

Targets. One full-depth pass gives, for token j and layer i, the state
(h, q, k, v) and T(i,j) = 1 if the shared head at layer i predicts the full model's
argmax (what greedy generation needs), else 0; C(i) = i/L. With R(i) = λ·T(i) − β·C(i)
the soft label of Exit over Continue at layer i is σ(R(i) − max_{i'>i} R(i')): the
Bradley–Terry preference of exiting now over the best later exit. The router is
trained on it with binary cross-entropy, the base model frozen.

Prompt tokens (--target prompt) are read only through their K/V, by the tokens after
them, so their task term is the harm their fill does there: T(i, j) = −E(i, j), the
relative error of the K/V that the (calibrated) fill gives token j from h_i, summed over
the layers it would skip, each weighted by the mean attention later tokens pay j there.

Exit classifiers (--classify). One full-depth pass per training document gives every layer's
pooled features (the mean over its tokens of rmsnorm(h)); a logistic-regression head per layer is
fitted on them. Heads fitted on four fifths of the documents label the fifth (out of fold): what
held-out documents will see. On those labels every candidate policy (confidence gates, patience,
static depths) is scored, and the file ships the cheapest, by mean decision layer, whose accuracy
is within --budget points of full depth's; it records them all. The gate's router is trained on
the same probabilities, T(i) = 1 where layer i's head gives the label that layer L's head gives.

Data (data.py), without downloads: text the model generates itself from built-in prompts,
and English docstrings of the Python standard library ("human text"), or your own files
with --data. Whole documents are held out, never seen in training.
"""
import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adept import (ExitClassifier, FullDepth, PromptPolicy, Router, RouterPolicy, Stats,
                   document_states, pooled, router_features)
from checkpoint import (DEFAULT_EXITS, DTYPES, POOLING, UserError, load, load_fill, load_router, load_tuning,
                        model_id, read_labelled, save_classifier, save_router, save_safetensors,
                        run)
from convert import default_checkpoint
from data import (chunks, docstrings, generated_text, held_out_arg, read_text, resume, save_atomic,
                  split, split_fingerprint)
from evaluate import ALL_GATES, GATES, THRESHOLDS, check_output, evaluate, full_reference, report, sweep
from kv_cache import skipped_kv
from sample import parse_policy


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
    data = {"train": gen[k_gen:] + human_train, "heldout_generated": gen[:k_gen],
            "heldout_human": human_heldout[:args.eval_chunks]}
    if not data["heldout_human"]:  # the built-in prompts and docstrings always leave some
        raise UserError("no held-out human text to evaluate on: give more text with --data")
    n = {k: sum(len(ids) - s for ids, s in seqs) for k, seqs in data.items()}
    print(f"data: {n['train']} training (and validation) tokens, {n['heldout_generated']} held-out generated, "
          f"{n['heldout_human']} held-out human", file=sys.stderr)
    return data


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


@torch.no_grad()
def fill_statistics(model, seqs, skip=4):
    """mu [L+1, D]: the mean hidden state after 0..L layers (the calibrated fill, kv_cache.py), over the
    tokens of seqs past the first `skip` of each (attention sinks, whose states are outsized)."""
    total, n = 0, 0
    for ids, _ in seqs:
        hs, ids = [], torch.tensor([ids], device=model.tok_emb.device)
        model(ids, hidden_states=hs)
        h = torch.stack([model.tok_emb[ids]] + [h for h, *_ in hs])[:, 0, skip:].double()  # [L+1, T - skip, D]
        total, n = total + h.sum(1), n + h.shape[1]
    return (total / n).float(), n


@torch.no_grad()
def prompt_targets(model, seqs):
    """Router features [L-1, N, F] and T = −E [L, N] for every token of seqs, read as prompt tokens (see the top)."""
    c, L, dev = model.config, model.config.n_layers, model.tok_emb.device
    feats, T = [], []
    for ids, _ in seqs:
        n, hs = len(ids), []
        pos = torch.arange(n, device=dev)
        model(torch.tensor([ids], device=dev), hidden_states=hs)
        k = torch.stack([model.rope(k[0].view(n, c.n_kv_heads, c.head_dim), pos) for _, _, k, _ in hs])  # [L, n, kv_heads, hd]
        v = torch.stack([v[0].view(n, c.n_kv_heads, c.head_dim) for *_, v in hs])
        q = torch.stack([model.rope(q[0].view(n, c.n_heads, c.head_dim), pos) for _, q, _, _ in hs])
        a = torch.einsum("lqhd,lkhd->lhqk", q, k.repeat_interleave(c.n_heads // c.n_kv_heads, 2)) / c.head_dim ** 0.5
        a = a.masked_fill(pos[:, None] < pos[None], -math.inf).softmax(-1).mean(1)  # [L, query, key], heads averaged
        weight = a.sum(1) / (n - pos)  # [L, n]: the mean attention a token receives from the queries at or after it
        rel = lambda x, y: (x - y).flatten(2).norm(dim=-1) / y.flatten(2).norm(dim=-1).clamp(min=1e-6)  # [S, n]
        E = torch.zeros(L, n, device=dev)  # E[L-1] = 0: full depth fills nothing
        for i in range(1, L):  # exit after layer i: blocks i..L-1 are filled from h_i
            kf, vf = skipped_kv(model, hs[i - 1][0][0], pos, i)
            E[i - 1] = (weight[i:] * (rel(kf, k[i:]) + rel(vf, v[i:])) / 2).sum(0)
        feats.append(torch.stack([router_features(model, h[0], q[0], k[0], v[0]) for h, q, k, v in hs[:-1]]))
        T.append(-E)
    return torch.cat(feats, 1).float().cpu(), torch.cat(T, 1).float().cpu()


def train(router, feats, labels, epochs, lr=3e-3, batch=512, seed=0, ckpt=None, stop_after=None, progress=True, recipe=None):
    """BCE on the soft labels, all layers' routers at once, the features standardised here.
    Resumes from `ckpt` if made with the same `recipe` (data.resume); returns epoch losses."""
    router.mu[:-1], router.sd[:-1] = feats.mean(1), feats.std(1) + 1e-6
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    start, losses = 0, []
    if state := resume(ckpt, recipe):
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
            save_atomic({"router": router.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "losses": losses,
                         "recipe": recipe}, ckpt)
        if stop_after is not None and epoch + 1 >= stop_after:
            break
    return losses


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


# ----------------------------------------------------------------------------- exit classifiers (--classify)


@torch.inference_mode()
def document_features(model, tok, docs, n_tokens, ckpt=None, recipe=None, read=None):
    """Features of each document's first n_tokens, stacked at dim -2; resumable. read(ids) gives
    one document's; by default every layer's pooled features [L, D], so the result is [L, N, D]."""
    from tqdm import tqdm
    read = read or (lambda ids: readouts(model, [ids])[0][:, 0])
    state = resume(ckpt, recipe) or {"feats": {}, "recipe": recipe}
    for j, (name, text, _) in enumerate(tqdm(docs, desc="features", leave=False)):
        if name not in state["feats"]:
            state["feats"][name] = read(tok.encode(text)[:n_tokens])
        if ckpt and (j % 100 == 99 or j == len(docs) - 1):
            save_atomic(state, ckpt)
    return torch.stack([state["feats"][name] for name, *_ in docs], -2)


@torch.inference_mode()
def readouts(model, docs):
    """Every layer's features of documents [ids] from one full-depth pass each: the mean of
    rmsnorm(h) over the tokens, and the last token's rmsnorm(h), each [L, N, D]."""
    feats = []
    for ids in docs:
        hs = []
        model(torch.tensor([ids], device=model.tok_emb.device), hidden_states=hs)
        feats.append(torch.stack([both_readouts(model, h[0]) for h, *_ in hs]).float().cpu())
    feats = torch.stack(feats, 2)  # [L, 2, N, D]
    return feats[:, 0], feats[:, 1]


def fit_heads(clf, feats, y, steps=300, lr=0.05, weight_decay=1e-3):
    """Logistic regression of every layer's head at once (full batch, Adam): feats [L, N, D], y [N]."""
    clf.mu.copy_(feats.mean(1))
    clf.sd.copy_(feats.std(1) + 1e-6)
    opt = torch.optim.Adam([clf.w, clf.b], lr=lr, weight_decay=weight_decay)
    L = feats.shape[0]
    for _ in range(steps):
        logits = torch.stack([clf(i + 1, feats[i]) for i in range(L)])  # [L, N, C]
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(L))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf


def fit_rows(model, labels, feats, y):
    """A head for each row of feats [R, N, D] (a layer, or a token-level policy's pool): R heads
    in one ExitClassifier, row r's at index r + 1."""
    c = dataclasses.replace(model.config, n_layers=feats.shape[0])
    return fit_heads(ExitClassifier(c, labels), feats, y)


def out_of_fold(model, labels, feats, y, folds=5, seed=0):
    """Each training document's label probabilities [L, N, C] from heads fitted on the other folds:
    what held-out documents will see, for choosing the policy and training the gate's router."""
    N = feats.shape[1]
    fold = torch.randperm(N, generator=torch.Generator().manual_seed(seed)) % min(folds, N)
    probs = torch.empty(feats.shape[0], N, len(labels))
    for f in fold.unique():
        clf = fit_heads(ExitClassifier(model.config, labels), feats[:, fold != f], y[fold != f])
        with torch.no_grad():
            part = feats[:, fold == f]
            probs[:, fold == f] = torch.stack([clf(i + 1, part[i]) for i in range(len(part))]).softmax(-1)
    return probs


def candidates(L):
    """The document policies a classifier file may ship, as sample.py's --policy spells them; at
    equal cost and accuracy the first is chosen: the simplest."""
    return ([f"static:{k}" for k in range(1, L)]
            + [f"patience:{k}" for k in range(2, min(6, L - 1) + 1)]
            + [f"confidence:{t}"
               for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999)]
            + ["full"])


def decision_layers(probs, spec):
    """The layer [N] (1-based) each document is read at under a policy, from every layer's label
    probabilities [L, N, C]: the first layer its gate settles at, as adept's gates decide, else
    L."""
    L, N = probs.shape[:2]
    name, s = parse_policy(spec, {})
    if name in ("static", "full"):
        return torch.full((N,), s.get("exit_layer", L))
    if name == "confidence":
        settled = probs.max(-1).values >= s["threshold"]
    else:  # patience: the same label k layers in a row
        label, run = probs.argmax(-1), torch.ones(L, N)
        for i in range(1, L):
            run[i] = torch.where(label[i] == label[i - 1], run[i - 1] + 1, 1)
        settled = run >= s["patience"]
    settled[-1] = True
    return settled.float().argmax(0) + 1


def choose_policy(probs, y, budget):
    """The cheapest candidate (lowest mean decision layer, which time follows) whose accuracy on
    out-of-fold probabilities [L, N, C] is within `budget` of full depth's: (policy, table), the
    table a row (policy, accuracy, mean decision layer, within budget) per candidate. Full depth,
    the last, always qualifies."""
    rows = []
    for spec in candidates(probs.shape[0]):
        d = decision_layers(probs, spec)
        right = probs[d - 1, torch.arange(len(y))].argmax(-1) == y
        rows.append((spec, int(right.sum()) / len(y), int(d.sum()) / len(y)))
    table = [(*row, row[1] >= rows[-1][1] - budget - 1e-9) for row in rows]
    return min((row for row in table if row[3]), key=lambda row: (row[2], -row[1]))[0], table


# ------------------------------------------------------- token-level exit in classification


def read_last(prompt, n):
    """Token-level exit for a document of n tokens: the tokens before its last leave by `prompt`
    (a token policy), their K/V at the layers they skip filled (calibrated); the last token runs
    full depth, as the read position does in prefill."""
    return PromptPolicy(prompt, FullDepth(), n - 1)


def both_readouts(model, h):
    """A document's features [2, D] from its tokens' states h [n, D]: the mean over the tokens of
    rmsnorm(h) (the shipped heads' readout), and the last token's rmsnorm(h) (the readout of
    `transformers`' sequence classification)."""
    return torch.stack([pooled(model, h), pooled(model, h[-1:])])


def token_level_read(model, prompts):
    """read(ids) for document_features: [1 + L + P, 2, D], both readouts of the token embeddings
    (layer 0: a bag of words), of every layer from one full-depth pass (every token exits there:
    document-level exit), and of the exit states that each token policy of `prompts` leaves
    under read_last, from the inference path: so each policy's heads fit the pools it makes."""
    def read(ids):
        t = torch.tensor(ids, device=model.tok_emb.device)
        hs = []
        model(t[None], hidden_states=hs)
        rows = [model.tok_emb[t]] + [h[0] for h, *_ in hs]
        rows += [document_states(model, t, read_last(p, len(ids)), Stats())[0] for p in prompts]
        return torch.stack([both_readouts(model, h) for h in rows]).float().cpu()
    return read


def train_classify(model, tok, args, out, runs):
    """--classify DIR: exit classifiers on the frozen model, the policy they ship, their router."""
    labels, docs, notes = read_labelled(args.classify)
    train_docs, held = split(docs, args.held_out, args.seed)
    print(f"{len(docs)} documents ({notes}), {len(labels)} labels; {len(held)} held out "
          f"(--held-out {args.held_out}), {len(train_docs)} to train on", file=sys.stderr)
    t0 = time.time()
    recipe = {"model": model_id(model), "tokens": args.tokens}
    feats = document_features(model, tok, train_docs, args.tokens, runs / f"{out.stem}.features.pt",
                              recipe)
    y = torch.tensor([j for *_, j in train_docs])
    print(f"features of {len(train_docs)} documents x {feats.shape[0]} layers "
          f"({time.time() - t0:.0f}s)", file=sys.stderr)
    torch.manual_seed(args.seed)
    probs = out_of_fold(model, labels, feats, y, seed=args.seed)
    policy, table = choose_policy(probs, y, args.budget / 100)
    print_policies(table, policy, args.budget, len(y))
    clf = fit_heads(ExitClassifier(model.config, labels), feats, y)
    clf.router = train_gate_router(model, clf, feats, probs, args)
    meta = {"base_model": model_id(model), "pooling": POOLING, "tokens": args.tokens,
            "policy": policy, "budget_points": args.budget, "router_threshold": 0.5,
            "seed": args.seed, "held_out": args.held_out, "held_out_documents": len(held),
            "documents": len(docs),
            "read": notes, "held_out_fingerprint": split_fingerprint(held),
            "out_of_fold": json.dumps([{"policy": p, "accuracy": round(a, 5), "within_budget": ok,
                                        "mean_decision_layer": round(m, 3)}
                                       for p, a, m, ok in table]),
            "lam": args.lam, "beta": args.beta}
    save_classifier(clf, out, meta)
    print(f"wrote {out} ({time.time() - t0:.0f}s); its policy: {policy}", file=sys.stderr)


def print_policies(table, chosen, budget, n):
    """The candidates' out-of-fold accuracy and cost, the chosen one marked; budget in points."""
    full = table[-1][1]
    print(f"out-of-fold, {n} documents: full depth {full:.1%}; budget {budget} points below it",
          file=sys.stderr)
    print(f"  {'policy':<18} {'accuracy':>8} {'mean layer':>10}", file=sys.stderr)
    for spec, acc, layer, within in table:
        mark = "  <- shipped: the cheapest within budget" if spec == chosen else \
            "" if within else "  (over budget)"
        print(f"  {spec:<18} {acc:>8.1%} {layer:>10.2f}{mark}", file=sys.stderr)


def train_gate_router(model, clf, feats, probs, args):
    """The learned gate: a Router on (pooled features | head probabilities); T as at the top."""
    c, C = model.config, len(clf.labels)
    x = torch.cat((feats, probs), -1)[:-1]  # [L-1, N, D + C]: the state at each layer a gate is asked
    T = (probs.argmax(-1) == probs[-1].argmax(-1)).float()
    router = Router(c, args.hidden, n_features=c.dim + C)
    train(router, x, preference_labels(T, args.lam, args.beta), args.epochs, seed=args.seed, batch=128,
          progress=False)
    return router


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="base model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="file to write (default, for the default model: exits/<model>.safetensors, "
                   ".prompt.safetensors with --target prompt, .classify.safetensors with --classify)")
    p.add_argument("--data", nargs="+", help="your own text files as the human text (default: stdlib docstrings)")
    p.add_argument("--target", choices=("next-token", "prompt"), default="next-token",
                   help="what the router's exits must preserve: the token's own prediction, or (prompt) its K/V")
    p.add_argument("--lam", type=float, default=4.0, help="λ, weight of task performance T")
    p.add_argument("--beta", type=float, default=1.0, help="β, weight of compute cost C = i/L")
    p.add_argument("--min-layer", type=int, default=None,
                   help="no exit before this layer (default: two thirds of the layers): a shallow exit fills "
                        "deeper layers' K/V from a shallow state, misleading later tokens, and each asked layer "
                        "costs time")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--hidden", type=int, default=16, help="router hidden units per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128, help="length of each generated text")
    p.add_argument("--human-chunks", type=int, default=40, help="128-token chunks of human text to train on")
    p.add_argument("--eval-chunks", type=int, default=8, help="held-out chunks of human text to evaluate on")
    p.add_argument("--target-agreement", type=float, default=0.9,
                   help="default threshold: lowest depth reaching this on validation text")
    p.add_argument("--eval", action="store_true", help="only evaluate the router at --out (or the default one)")
    p.add_argument("--no-router", action="store_true", help="with --eval: full depth, static depths and the gates only")
    p.add_argument("--tuning", help="merge this delta file (tune_exits.py) into the model first: train or evaluate "
                   "a router for it")
    p.add_argument("--calibrate", action="store_true", help="measure the calibrated fill's mean hidden states on "
                   "the training text and write them beside the router file (<out>.fill.safetensors)")
    p.add_argument("--fill", help="fill calibration the router is evaluated with (default: the shipped one for "
                   "the default model, else plain), or 'plain'")
    p.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)  # now tune_exits.py: refused by name
    k = p.add_argument_group("exit classifiers (--classify): a head per layer on a document's pooled features")
    k.add_argument("--classify", metavar="DIR", help="train exit classifiers on this folder (one subfolder of "
                   ".txt files per label) and write them to --out")
    k.add_argument("--tokens", type=int, default=256, help="each document's first tokens that are read")
    k.add_argument("--held-out", default="0.2", help="documents held out of training: a fraction "
                   "of each label (default 0.2, at least one each) or a count; seeded by --seed")
    k.add_argument("--budget", type=float, default=0.5, help="the shipped policy is the cheapest "
                   "whose out-of-fold accuracy is at most this many points below full depth's "
                   "(default 0.5)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--all-gates", action="store_true", help="sweep 5 settings of the confidence and entropy "
                   "gates instead of 2 (they run the head at every layer: slow)")
    p.add_argument("--json", help="write the evaluation here (records in the schema of bench.py --json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p.parse_args(argv)


def check_args(args):
    """Everything the user gave, checked before the minutes of work start; returns the file to write."""
    if args.tune:
        raise UserError("exit tuning has its own command: python tune_exits.py (see its --help)")
    check_ranges([
        ("--lam", args.lam, "> 0"), ("--beta", args.beta, "> 0"), ("--hidden", args.hidden, ">= 1"),
        ("--epochs", args.epochs, ">= 1"), ("--seed", args.seed, "in [0, 2**32)"),
        ("--max-new-tokens", args.max_new_tokens, ">= 8"), ("--tokens", args.tokens, ">= 1"),
        ("--human-chunks", args.human_chunks, ">= 0"), ("--eval-chunks", args.eval_chunks, ">= 1"),
        ("--target-agreement", args.target_agreement, "in (0, 1]"),
        ("--budget", args.budget, "in [0, 100]")])
    try:
        args.held_out = held_out_arg(args.held_out)
    except ValueError as e:
        raise UserError(str(e)) from None
    modes = [m for m, on in (("--classify", args.classify), ("--eval", args.eval), ("--calibrate", args.calibrate),
                             ("--target prompt", args.target == "prompt")) if on]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} are separate runs; give one of them")
    if args.no_router and not args.eval:
        raise UserError("--no-router belongs to --eval (a router run trains a router)")
    if args.checkpoint and not args.out:
        raise UserError("with --checkpoint, name the file to write with --out")
    if args.tuning and not args.out and not args.eval:
        raise UserError("a router for a tuned model is another router: name it with --out")
    suffix = ".classify.safetensors" if args.classify else ".prompt.safetensors" if args.target == "prompt" else None
    out = Path(args.out) if args.out else DEFAULT_EXITS.with_suffix(suffix) if suffix else DEFAULT_EXITS
    return out, (out.with_suffix(".fill.safetensors") if args.calibrate else out)


# What the ranges in flags' errors mean ("> 0" is finite too; NaN is in none)
RANGES = {"> 0": lambda x: 0 < x < math.inf, ">= 0": lambda x: x >= 0, ">= 1": lambda x: x >= 1,
          ">= 2": lambda x: x >= 2, ">= 8": lambda x: x >= 8, "in (0, 1]": lambda x: 0 < x <= 1,
          "in [0, 1]": lambda x: 0 <= x <= 1,
          "in [0, 100]": lambda x: 0 <= x <= 100, "in [0, 2**32)": lambda x: 0 <= x < 2 ** 32}


def check_ranges(checks):
    """Refuse a number outside its flag's range: checks are (flag, value, one of RANGES)."""
    for flag, x, need in checks:
        if not RANGES[need](x):
            raise UserError(f"{flag} must be {need}, got {x}")


def prepare(args, out, flag):
    """What this command and tune_exits.py do before the minutes of work: refuse an output file that
    could not be written, or exists without --force; read --data; make runs/ (resume state)."""
    if out:
        check_output(out, flag)
    if out and out.exists() and not args.force:
        raise UserError(f"{out} exists; pass --force to overwrite it or {flag} to write elsewhere")
    if args.json:
        check_output(args.json, "--json")
    args.data_texts = [read_text(f) for f in args.data or []]
    torch.manual_seed(args.seed)
    runs = Path("runs")
    runs.mkdir(exist_ok=True)
    return runs


def main(argv=None):
    args = parse_args(argv)
    out, written = check_args(args)
    runs = prepare(args, None if args.eval else written, "--out")
    model, tok = load(args.checkpoint or default_checkpoint(), args.device, DTYPES[args.dtype])
    if args.tuning:
        load_tuning(model, args.tuning)
    load_fill(model, args.fill)
    L = model.config.n_layers
    if args.min_layer is None:  # on SmolLM2-135M asking from 20 rather than 12 kept agreement, cost less
        args.min_layer = 2 * L // 3
    if not 1 <= args.min_layer <= L:
        raise UserError(f"--min-layer {args.min_layer} is out of range; it must be in [1, {L}]")
    if args.classify:
        return train_classify(model, tok, args, out, runs)
    # what agreement is measured against: the base model, also for a tuned one
    base = load(args.checkpoint or default_checkpoint(), args.device, DTYPES[args.dtype])[0] if args.tuning else None
    router = load_router(out, model) if args.eval and not args.no_router else None
    t0 = time.time()
    data = build_data(base or model, tok, args)
    if args.calibrate:
        return calibrate(model, data["train"], written, t0)
    if not args.eval:
        router = train_router(model, data["train"], args, out, runs, base, t0)
        if args.target == "prompt":
            return  # a prompt router is judged where its tokens are read, by bench.py's prefill figures
    evaluate_router(model, router, data, args, out, base, argv, t0)


def calibrate(model, seqs, written, t0):
    """--calibrate: the calibrated fill's mean hidden states, written beside the router file."""
    mu, n = fill_statistics(model, seqs)
    save_safetensors(written, {"mu": mu}, {
        "base_model": model_id(model), "tokens": n,
        "text": "train_exits.py training text (generated + human), positions >= 4"})
    print(f"wrote {written}: mean hidden states after 0..{model.config.n_layers} layers over {n} tokens "
          f"({time.time() - t0:.0f}s)", file=sys.stderr)


def train_router(model, seqs, args, out, runs, base, t0):
    """The router trained on its targets' preference labels; its threshold picked on validation."""
    n_val = max(1, len(seqs) // 10)  # validation sequences (for the threshold), not trained on
    val, train_seqs = seqs[:n_val], seqs[n_val:]
    # Prompts are trained on too: in prefill the router decides for every prompt token (chat
    # template included), and a router that never saw them exits some of them at random.
    make_targets = prompt_targets if args.target == "prompt" else targets
    feats, T = make_targets(model, [(ids, 0) for ids, _ in train_seqs])
    labels = preference_labels(T, args.lam, args.beta)
    print(f"targets: {feats.shape[1]} tokens x {feats.shape[0]} layers ({time.time() - t0:.0f}s); "
          f"mean T by layer: {' '.join(f'{a:.2f}' for a in T.mean(1)[::3].tolist())}", file=sys.stderr)
    torch.manual_seed(args.seed)
    router = Router(model.config, args.hidden)
    recipe = {k: getattr(args, k) for k in ("lam", "beta", "hidden", "seed", "target", "data", "max_new_tokens",
                                            "human_chunks", "tuning", "fill")}  # what features and labels depend on
    train(router, feats, labels, args.epochs, seed=args.seed, ckpt=runs / f"{out.stem}.resume.pt", recipe=recipe)
    router.to(model.tok_emb.device, model.tok_emb.dtype)
    threshold = 0.5 if args.target == "prompt" else pick_threshold(model, router, args.min_layer, val,
                                                                   args.target_agreement, base)  # 0.5: even odds
    save_router(router, out, {
        "base_model": model_id(model), "tuning": args.tuning, "n_layers": model.config.n_layers,
        "dim": model.config.dim, "threshold": threshold, "min_layer": args.min_layer, "lam": args.lam,
        "beta": args.beta, "seed": args.seed, "epochs": args.epochs, "target": args.target,
        "fill": "calibrated" if model.fill_mu is not None else "plain"})
    (runs / f"{out.stem}.resume.pt").unlink(missing_ok=True)
    print(f"wrote {out} (threshold {threshold}) after {time.time() - t0:.0f}s", file=sys.stderr)
    return router


def evaluate_router(model, router, data, args, out, base, argv, t0):
    """Full depth, static depths, the gates and the router on held-out generated and human text."""
    gates = ALL_GATES if args.all_gates else GATES
    records = sweep(model, router, data["heldout_generated"], "eval-generated", gates, base) + \
        sweep(model, router, data["heldout_human"], "eval-human", gates, base)
    threshold = float(router.meta["threshold"]) if router else None
    print(report(records))
    for r in records:
        if r["policy"] == "router" and r["setting"] == threshold:
            print(f"\nshipped threshold {threshold} on {r['scenario']} (n = {r['n']} tokens): agreement "
                  f"{r['agreement']:.1%} [{r['agreement_lo']:.1%}, {r['agreement_hi']:.1%}], mean exit layer "
                  f"{r['mean_exit_layer']:.1f} of {model.config.n_layers}, compute saved {r['compute_saved']:.1%}, "
                  f"ppl {r['ppl']:.1f} (full {r['full_ppl']:.1f})")
    print(f"\ntotal {time.time() - t0:.0f}s")
    if args.json:
        meta = {"command": "python train_exits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "model": model.name, "model_id": model_id(model), "tuning": args.tuning,
                "router": router and str(out), "threshold": threshold}
        Path(args.json).write_text(json.dumps({"meta": meta, "records": records}, indent=2))


if __name__ == "__main__":
    run(main)
