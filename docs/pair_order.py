"""One-off for issue 17: is the second run of a decode pair slower? Full depth against full depth, per prompt, as
bench.py pairs them. python docs/pair_order.py REPEATS"""
import statistics, sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from adept import FullDepth, generate
from bench import PROMPTS
from checkpoint import load
from convert import default_checkpoint
model, tok = load(default_checkpoint())
prompts = [tok.prompt(q) for q in PROMPTS]
tps = lambda g: (len(g.tokens) - 1) / g.decode_s
generate(model, prompts[0], 4, FullDepth())
ratios = []
for rep in range(int(sys.argv[1])):
    for p in prompts:
        a = generate(model, p, 40, FullDepth()); b = generate(model, p, 40, FullDepth())
        ratios.append(tps(b) / tps(a))
print(f"second / first, full depth both: median {statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f}, "
      f"n = {len(ratios)}, below 1: {sum(r < 1 for r in ratios)}, quartiles {statistics.quantiles(ratios, n=4)}")
