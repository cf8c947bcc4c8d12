"""One-off: where a 256-token prefill's time goes, layer by layer, for full depth, prompt-static e and the
shipped router, in the real loop (adept.forward_tokens, calibrated fill), each policy right after full depth
on the same document. Timers wrap decide, the fill, count and the head; the rest of each interval is the
layer (with the active set's indexing after an exit event). Usage: python prefill_time_split.py [N docs]
"""
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, ".")
import adept
from adept import FullDepth, PromptPolicy, Stats, forward_tokens, load_fill, make_policy
from bench import human_documents
from checkpoint import load
from convert import default_checkpoint

torch.manual_seed(0)
model, tok = load(default_checkpoint())
load_fill(model)
L = model.config.n_layers
N = int(sys.argv[1]) if len(sys.argv) > 1 else 24
docs = human_documents(tok, 256, 200 + N)[0][200:]  # windows bench.py does not score

log = []  # (what, layer, seconds) of the run in progress
fill, count, head = adept.KV_FILLS["decoupled"], adept.count, model.head


def timed(what, f, layer_of=lambda *a: None):
    def g(*a, **k):
        t = time.perf_counter()
        out = f(*a, **k)
        log.append((what, layer_of(*a), time.perf_counter() - t, t))
        return out
    return g


adept.KV_FILLS["decoupled"] = timed("fill", fill, lambda cache, m, h, pos, e: e)
adept.count = timed("count+head", count)
model.head = timed("count+head", head)


class Timed(adept.Policy):
    """Asked at every layer: stamps the time, then asks the policy inside where it would be asked."""
    min_layer = 1

    def __init__(self, inner):
        self.inner = inner

    def decide(self, model, i, pos, h, q, k, v):
        t = time.perf_counter()
        log.append(("layer", i, len(pos), t))
        out = self.inner.decide(model, i, pos, h, q, k, v) if i >= self.inner.min_layer else None
        log.append(("decide", i, time.perf_counter() - t, t))
        return out

    def work(self, c, pos, e):
        return self.inner.work(c, pos, e)


@torch.inference_mode()
def run(policy, ids):
    log.clear()
    stats = Stats()
    t0 = time.perf_counter()
    forward_tokens(model, ids, 0, model.new_cache(1, len(ids)), Timed(policy), stats)
    total = time.perf_counter() - t0
    # layer i's time: from the end of the previous layer's decide (and fill) to the stamp at layer i
    split, prev = defaultdict(float), t0
    for what, i, x, t in log:
        if what == "layer":
            split["layers, all rows" if x > 1 else "layers, one row"] += t - prev
        else:
            split[what] += x
        prev = t + (x if what != "layer" else 0)
    split["layer L, setup, indexing"] = total - sum(split.values())
    return total, split, stats


policies = {"full": FullDepth(), "router 0.43": make_policy("router", model)}
policies |= {f"prompt-static {e}": PromptPolicy(make_policy("static", model, exit_layer=e), FullDepth(), len(docs[0]) - 1)
             for e in (12, 16, 20, 24, 27)}
res = defaultdict(list)
for j, d in enumerate(docs):
    ids = torch.tensor(d)
    for name, pol in policies.items():
        tf, sf, _ = run(FullDepth(), ids)
        t, s, stats = run(pol, ids)
        res[name].append((tf / t, t, s, stats.ideal_speedup, tf, sf))
    print(f"\r{j + 1}/{N}", end="", file=sys.stderr, flush=True)
print(file=sys.stderr)

keys = ["layers, all rows", "layers, one row", "decide", "fill", "count+head", "layer L, setup, indexing"]
print(f"{N} documents of 256 tokens (reference manual windows 200-{199 + N}); medians over documents, ms")
print("| policy | speed-up (ideal; share) | total | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 3) + "|")
for name, rs in res.items():
    med = lambda f: statistics.median(f(r) for r in rs)
    sp, ideal = med(lambda r: r[0]), med(lambda r: r[3])
    cells = [f"{1e3 * med(lambda r: r[2].get(k, 0.0)):.1f}" for k in keys]
    print(f"| {name} | {sp:.3f} ({ideal:.3f}; {sp / ideal:.3f}) | {1e3 * med(lambda r: r[1]):.1f} | " + " | ".join(cells) + " |")
fl = [r[5] for rs in res.values() for r in rs]
print(f"full depth, per layer of 256 rows: {1e3 * statistics.median(s['layers, all rows'] for s in fl) / (L - 1):.2f} ms "
      f"(median of {len(fl)} runs)")
