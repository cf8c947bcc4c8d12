"""One-off: prompt tokens exit at a static depth e except the last W, which run full depth with the read
position (PromptPolicy with read = n - W, the decode policy FullDepth). Real path (forward_tokens), calibrated
fill, held-out windows of the reference manual that bench.py does not score (its 200..); each setting timed after
full depth on the same document, as bench.run_prefill does. python prompt_window.py N_DOCS (from the repository root)"""
import sys, math, statistics, torch
sys.path.insert(0, ".")
from adept import FullDepth, PromptPolicy, Static, Stats, load_fill
from bench import human_documents, prefill_last
from adept import forward_tokens
import time


@torch.inference_mode()
def prefill_window(model, ids, policy, stats):
    """bench.prefill_last with the PromptPolicy's read position as given (prefill_last maps only "last" / "question")."""
    t = torch.tensor(ids)
    t0 = time.perf_counter()
    logits, _ = forward_tokens(model, t, 0, model.new_cache(1, len(ids)), policy, stats)
    return logits.float().log_softmax(-1), time.perf_counter() - t0
from checkpoint import load
from convert import default_checkpoint

n_docs = int(sys.argv[1])
model, tok = load(default_checkpoint())
load_fill(model)
L = model.config.n_layers
docs = human_documents(tok, 256, 200 + n_docs)[0][200:]
settings = [(e, w) for e in (22, 23, 24) for w in (1, 8, 16, 32, 64)]
acc = {s: dict(agree=0, kl=0.0, s=0.0, full_s=0.0, stats=Stats()) for s in settings}
prefill_last(model, docs[0], FullDepth(), Stats())  # warm-up
wilson = lambda k, n: ((k / n + 1.92 / n - 1.96 * math.sqrt(k / n * (1 - k / n) / n + 0.96 / n ** 2)) / (1 + 3.84 / n),
                       (k / n + 1.92 / n + 1.96 * math.sqrt(k / n * (1 - k / n) / n + 0.96 / n ** 2)) / (1 + 3.84 / n))
for j, ids in enumerate(docs):
    ref, full_s = prefill_last(model, ids, FullDepth(), Stats())  # as bench.run_prefill: full depth, then every setting
    for (e, w), a in acc.items():
        logp, s = prefill_window(model, ids, PromptPolicy(Static(e, L), FullDepth(), len(ids) - w), a["stats"])
        a["agree"] += int(logp.argmax() == ref.argmax())
        a["kl"] += float((ref.exp() * (ref - logp)).sum())
        a["s"] += s
        a["full_s"] += full_s
    print(f"\r{j + 1}/{len(docs)}", end="", file=sys.stderr, flush=True)
print(f"\n{len(docs)} documents of 256 tokens (manual windows 200..{199 + len(docs)}), calibrated fill")
print("| e | last W at full depth | agreement [95% CI] | KL | mean depth | compute saved | ideal | speed-up |")
print("|---|---|---|---|---|---|---|---|")
for (e, w), a in acc.items():
    n = len(docs); lo, hi = wilson(a["agree"], n); st = a["stats"]
    print(f"| {e} | {w} | {a['agree']}/{n} = {a['agree'] / n:.1%} [{lo:.1%}, {hi:.1%}] | {a['kl'] / n:.3f} | "
          f"{st.mean_exit_layer:.1f} | {st.saved:.1%} | {1 / (1 - st.saved):.3f} | {a['full_s'] / a['s']:.3f} |")
