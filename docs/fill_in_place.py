"""One-off for issue 17: what one fill_decoupled call costs inside a prefill with the shipped router (the skipped
layers' weights cold), by exit layer, against the same calls repeated in a loop (weights warm); and the time of the
router's decisions and of the fill per prefill.
python docs/fill_in_place.py N (documents)."""
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import adept
from adept import Stats, forward_tokens, load_fill, make_policy
from bench import human_documents
from checkpoint import load
from convert import default_checkpoint

model, tok = load(default_checkpoint())
load_fill(model)
docs, _ = human_documents(tok, 256, int(sys.argv[1]) if len(sys.argv) > 1 else 12)
router, fill, events, decisions = make_policy("router", model), adept.KV_FILLS["decoupled"], [], []
decide = type(router).decide


def timed_decide(*args):
    t0 = time.perf_counter()
    out = decide(*args)
    decisions.append(time.perf_counter() - t0)
    return out


def timed_fill(cache, model, h, pos, e):
    t0 = time.perf_counter()
    fill(cache, model, h, pos, e)
    events.append((e, h.clone(), pos.clone(), time.perf_counter() - t0))


adept.KV_FILLS["decoupled"], type(router).decide = timed_fill, timed_decide
t0 = time.perf_counter()
for ids in docs:
    forward_tokens(model, torch.tensor(ids), 0, model.new_cache(1, len(ids)), router, Stats())
per_doc = lambda x: f"{sum(x) / len(docs) * 1e3:.1f} ms"
print(f"per prefill of 256 tokens ({len(docs)} documents): {per_doc([time.perf_counter() - t0])} in all, "
      f"{per_doc([s for *_, s in events])} in {len(events) / len(docs):.1f} fill calls, {per_doc(decisions)} in "
      f"{len(decisions) / len(docs):.0f} decisions")
adept.KV_FILLS["decoupled"], type(router).decide = fill, decide
cache, by = model.new_cache(1, 256), collections.defaultdict(list)
for e, h, pos, s in events:
    fill(cache, model, h, pos, e)
    t0 = time.perf_counter()
    for _ in range(20):
        fill(cache, model, h, pos, e)
    by[e].append((len(pos), s, (time.perf_counter() - t0) / 20))
print("| exit layer | events | tokens per event | in the prefill (µs) | the same call in a loop (µs) |\n|---|---|---|---|---|")
for e in sorted(by):
    n, a, b = (sum(x) / len(by[e]) for x in zip(*by[e]))
    print(f"| {e} | {len(by[e])} | {n:.1f} | {a * 1e6:.0f} | {b * 1e6:.0f} |")
