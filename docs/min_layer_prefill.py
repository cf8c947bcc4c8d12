"""One-off: the shipped router asked from layer 12 (shipped) or 20, in prefill, as bench.py measures it.

python docs/min_layer_prefill.py DOCS   (human 256-token documents, bench.py's run_prefill: each document at full
depth, then by every policy right after it; the read position runs the router too, as in bench.py's "router" rows)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adept import load_fill, make_policy  # noqa: E402
from bench import human_documents, run_prefill  # noqa: E402
from checkpoint import load  # noqa: E402
from convert import default_checkpoint  # noqa: E402
from evaluate import wilson  # noqa: E402

model, tok = load(default_checkpoint())
load_fill(model)
docs, _ = human_documents(tok, 256, int(sys.argv[1]))
policies = {("base", "router", (tau, m)): (model, make_policy("router", model, threshold=tau, min_layer=m))
            for m in (12, 20) for tau in (0.47, 1.0)}
print("| threshold | min_layer | speed-up (ideal; share) | next-token agreement | KL | mean exit |\n|---|---|---|---|---|---|")
for key, (n, k, stats, m) in run_prefill(model, docs, policies).items():
    if key[1] == "router":
        lo, hi = wilson(k, n)
        print(f"| {key[2][0]} | {key[2][1]} | {m['speedup']:.3f} ({stats.ideal_speedup:.3f}; {m['speedup'] / stats.ideal_speedup:.3f}) | "
              f"{k / n:.1%} [{lo:.1%}, {hi:.1%}] of {n} | {m['kl']:.4f} | {stats.mean_exit_layer:.2f} |")
