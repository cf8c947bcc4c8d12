"""One-off: how many layers the router is asked at, against what it costs and keeps (the shipped router, decode).

python docs/min_layer.py REPEATS
For min_layer 12 (shipped), 16, 20, 24: the shipped router (threshold 0.47) and the same never exiting (1.0). Decode:
bench.py's 6 chat prompts, 40 new tokens, each at full depth and right after it by the policy, REPEATS times; speed-up =
median of the pairs' ratios, ideal from the counters. Teacher-forced agreement with full depth along 16 held-out
generated 256-token texts (bench.py's decode-tf set), through evaluate.py as bench.py does.
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adept import FullDepth, generate, load_fill, make_policy  # noqa: E402
from bench import PROMPTS, generated_documents, total  # noqa: E402
from checkpoint import load  # noqa: E402
from convert import default_checkpoint  # noqa: E402
from evaluate import evaluate, full_reference, wilson  # noqa: E402

model, tok = load(default_checkpoint())
load_fill(model)
prompts = [tok.prompt(q) for q in PROMPTS]
seqs = generated_documents(model, tok, 256, 32)[:16]
refs = full_reference(model, seqs)
tps = lambda g: (len(g.tokens) - 1) / g.decode_s
print("| min_layer | layers asked | never exits: decode speed-up (ideal) | shipped 0.47: decode speed-up (ideal; share) | teacher-forced agreement |")
print("|---|---|---|---|---|")
for min_layer in (12, 16, 20, 24):
    row = {}
    for tau in (1.0, 0.47):
        pol = make_policy("router", model, threshold=tau, min_layer=min_layer)
        pairs = []
        for r in range(int(sys.argv[1])):
            for p in prompts:
                f = generate(model, p, 40, FullDepth())
                pairs.append((generate(model, p, 40, pol), f))
        ideal = total([g.decode for g, _ in pairs]).ideal_speedup
        row[tau] = (statistics.median(tps(g) / tps(f) for g, f in pairs), ideal, len(pairs))
    n, k, stats, _ = evaluate(model, seqs, make_policy("router", model, min_layer=min_layer), refs)
    lo, hi = wilson(k, n)
    (s1, i1, m), (s2, i2, _) = row[1.0], row[0.47]
    print(f"| {min_layer} | {29 - min_layer + 1} | {s1:.3f} ({i1:.3f}) | {s2:.3f} ({i2:.3f}; {s2 / i2:.3f}) | "
          f"{k / n:.1%} [{lo:.1%}, {hi:.1%}] of {n}, mean exit {stats.mean_exit_layer:.2f} | pairs {m}", flush=True)
