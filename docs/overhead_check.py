"""One-off measurement (issue 17) on the tree it is committed with: the mechanism's own cost and the shipped
router against full depth, in decode and in 256-token prefill, alternating with full depth as bench.py does,
with a reduced sample (this session's machine runs about 3x slower than the one of docs/bench.json); in prefill
also the prompt policies (the read position at full depth) that bench.py measures.

    python docs/overhead_check.py [N_DOCS] [REPEATS]
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adept import FullDepth, PromptPolicy, load_fill, make_policy
from bench import PROMPTS, human_documents, run_decode, run_prefill
from checkpoint import load
from convert import default_checkpoint

n_docs, repeats = (int(a) for a in (sys.argv[1:] + ["48", "3"][len(sys.argv) - 1:])[:2])
model, tok = load(default_checkpoint())
load_fill(model)
policies = {("base", "full", None): (model, FullDepth()),
            ("base", "router", 1.0): (model, make_policy("router", model, threshold=1.0)),
            ("base", "router", None): (model, make_policy("router", model)),
            ("base", "static", 26): (model, make_policy("static", model, exit_layer=26))}
prompts = [tok.prompt(p) for p in PROMPTS]
t0 = time.time()
run_decode(model, prompts[:1], 4, FullDepth())  # warm-up
pairs = {k: [] for k in policies}
for rep in range(repeats):
    for key, (m, pol) in policies.items():
        ref = run_decode(model, prompts, 40, FullDepth())
        pairs[key].append((run_decode(m, prompts, 40, pol), ref))
    print(f"decode repeat {rep + 1}/{repeats} ({time.time() - t0:.0f}s)", file=sys.stderr)
print(f"decode, {len(prompts)} prompts x 40 greedy tokens, median of {repeats} pairs (each right after full depth):")
for key, ps in pairs.items():
    stats = ps[-1][0]["stats"]
    print(f"  {key[1]} {key[2]}: {statistics.median(r['tokens_per_s'] / f['tokens_per_s'] for r, f in ps):.3f}x "
          f"(ideal {stats.ideal_speedup:.3f}, mean exit {stats.mean_exit_layer:.2f}); "
          "pairs " + ", ".join(f"{r['tokens_per_s'] / f['tokens_per_s']:.3f}" for r, f in ps))
docs, _ = human_documents(tok, 256, n_docs)
prompt = {("base", "prompt-static", k): (model, PromptPolicy(make_policy("static", model, exit_layer=k), FullDepth(), "last"))
          for k in (12, 24)}
prompt[("base", "prompt-router", 0.5)] = (model, PromptPolicy(make_policy(
    "router", model, threshold=0.5, exits=str(Path(__file__).resolve().parent.parent / "exits/smollm2-135m-instruct.prompt.safetensors")),
    FullDepth(), "last"))
out = run_prefill(model, docs, {k: v for k, v in policies.items() if k[1] != "full"} | prompt)
print(f"prefill, {n_docs} human 256-token documents, each policy right after full depth on the same document:")
for key, (n, agree, stats, measured) in out.items():
    print(f"  {key[1]} {key[2]}: {measured['speedup']:.3f}x (ideal {stats.ideal_speedup:.3f}, {measured['speedup'] / stats.ideal_speedup:.3f} of it), "
          f"agreement {agree}/{n}")
print(f"total {time.time() - t0:.0f}s", file=sys.stderr)
