"""The measuring stick: teacher-forced evaluation through the real ADEPT path, one record
schema for every figure (its fields: docs/RESULTS.md), 95% Wilson intervals, tables.
Used by train_exits.py (--eval, and after training) and bench.py.
"""
import math
import os
import sys
from pathlib import Path

import torch

from checkpoint import UserError

from adept import Confidence, FullDepth, RouterPolicy, Static, Stats, forward_tokens


def wilson(k, n, z=1.96):
    """95% Wilson score interval of the rate k/n (stays inside [0, 1] and is honest near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    mid = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return min(p, max(0.0, mid - half)), max(p, min(1.0, mid + half))  # p itself stays inside despite rounding


def ratio_interval(full_s, s, n_boot=2000, seed=0):
    """95% bootstrap interval, over items, of the throughput ratio sum(full_s) / sum(s)."""
    f, p = torch.tensor(full_s, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    idx = torch.randint(len(f), (n_boot, len(f)), generator=torch.Generator().manual_seed(seed))
    r = f[idx].sum(1) / p[idx].sum(1)
    return float(r.quantile(0.025)), float(r.quantile(0.975))


def record(policy, setting, scenario, n, n_agree, stats, model="base", reference="base", **measured):
    """One measured figure: `n_agree` of `n` scored tokens (or documents) agree with the reference's argmax."""
    lo, hi = wilson(n_agree, n)
    return {"policy": policy, "setting": setting, "scenario": scenario, "model": model, "reference": reference, "n": n,
            "mean_exit_layer": stats.mean_exit_layer, "compute_saved": stats.saved, "ideal_speedup": stats.ideal_speedup,
            "tokens": stats.tokens, "macs": stats.total_macs, "full_macs": stats.full_macs,
            "bytes": stats.weight_bytes + stats.kv_bytes, "full_bytes": stats.full_bytes,
            "agreement": n_agree / max(n, 1), "agreement_lo": lo, "agreement_hi": hi, **measured}


@torch.no_grad()
def full_reference(model, seqs):
    """Full depth's log-probabilities [n_scored, vocab] for the scored tokens of each sequence."""
    return [model(torch.tensor([ids], device=model.tok_emb.device))[0, start:].float().log_softmax(-1) for ids, start in seqs]


@torch.no_grad()
def evaluate(model, seqs, policy, ref):
    """Teacher-forced through the real ADEPT path, prompt included (as in generation): n scored
    tokens, how many have the reference's argmax, the cost counters, and {"kl": the mean
    KL(reference ‖ policy), "ppl": the policy's perplexity of the text}."""
    stats, n, n_agree, kl, nll = Stats(), 0, 0, 0.0, 0.0
    for (ids, start), r in zip(seqs, ref):
        cache = model.new_cache(1, len(ids))
        t = torch.tensor(ids, device=model.tok_emb.device)
        if start:
            forward_tokens(model, t[:start], 0, cache, policy, Stats())  # the prompt: exits here change the cache
        logits, _ = forward_tokens(model, t[start:], start, cache, policy, stats, logits="all")
        logp = logits.float().log_softmax(-1)
        n, n_agree = n + len(r), n_agree + int((logp.argmax(-1) == r.argmax(-1)).sum())
        kl += float((r.exp() * (r - logp)).sum())
        nll -= float(logp[:-1].gather(1, t[start + 1:, None]).sum())
    return n, n_agree, stats, {"kl": kl / n, "ppl": math.exp(nll / (n - len(seqs)))}


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
    runs = [(base, "base", "full", None)] if base else []  # base's own full depth comes first
    runs += [(model, which, name, s) for name, values in settings.items() for s in values]
    for net, who, name, s in runs:
        n, k, stats, m = evaluate(net, seqs, make[name](s), ref)
        full_ppl = rows[0]["ppl"] if rows else m["ppl"]
        rows.append(record(name, s, scenario, n, k, stats, who, "base", **m, full_ppl=full_ppl))
        print(f"\r  {scenario} {name} {s}: agreement {k / n:.1%}, saved {stats.saved:.1%}   ",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows


# The columns of a report: (record key, heading, format); a report shows those that any of its records has.
COLUMNS = [("scenario", "scenario", "{}"), ("text", "text", "{}"), ("model", "model", "{}"),
           ("policy", "policy", "{}"), ("setting", "setting", "{}"), ("readout", "readout", "{}"),
           ("n", "n", "{}"), ("mean_exit_layer", "mean exit layer", "{:.1f}"),
           ("compute_saved", "compute saved", "{:.1%}"), ("tokens_per_s", "tokens/s", "{:.1f}"),
           ("speedup", "speed-up", "{:.2f}"), ("ideal_speedup", "ideal", "{:.2f}"),
           ("roofline_ideal", "roofline", "{:.2f}"), ("agreement", "agreement [95% CI]", "{:.1%}"),
           ("kl", "KL", "{:.3f}"), ("ppl", "ppl", "{:.2f}"), ("full_ppl", "full's ppl", "{:.2f}"),
           ("accuracy", "accuracy", "{:.1%}"), ("margin", "margin", "{:.2f}")]


def report(records):
    """One markdown table of records, a row each."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in records)]
    cell = lambda r, k, f: "" if r.get(k) is None else f.format(r[k]) + (
        f" [{r['agreement_lo']:.1%}, {r['agreement_hi']:.1%}]" if k == "agreement" else "")
    rows = [[cell(r, k, f) for k, _, f in cols] for r in records]
    return "\n".join("| " + " | ".join(row) + " |" for row in [[h for _, h, _ in cols], ["---"] * len(cols), *rows])


def check_output(path, what, folder=False):
    """Refuse, before any long work, an output path that could not be written at the end of it."""
    p = Path(path)
    if p.exists() and p.is_dir() != folder:
        raise UserError(f"{what} {p} is {'not ' if folder else ''}a directory; give a {'folder' if folder else 'file'} name")
    parent = p if folder and p.is_dir() else p.parent
    if not parent.is_dir():
        raise UserError(f"{what} {p}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{what} {p}: the folder {parent} is not writable")
