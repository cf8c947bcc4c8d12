import sys, time, statistics, torch
from adept import FullDepth, generate, load_fill, make_policy, DEFAULT_EXITS
from checkpoint import load
from convert import default_checkpoint
from bench import PROMPTS
model, tok = load(default_checkpoint(), "cpu", torch.float32); load_fill(model)
never = make_policy("router", model, threshold=1.0)
prompts = [tok.prompt(q) for q in PROMPTS]
tps = lambda g: (len(g.tokens) - 1) / g.decode_s
generate(model, prompts[0], 4, FullDepth())
ff, fn, nf = [], [], []  # full/full (second/first), full then never (never/full), never then full (never/full)
for rep in range(int(sys.argv[1])):
    for p in prompts:
        a = generate(model, p, 40, FullDepth()); b = generate(model, p, 40, FullDepth()); ff.append(tps(b) / tps(a))
        a = generate(model, p, 40, FullDepth()); b = generate(model, p, 40, never); fn.append(tps(b) / tps(a))
        a = generate(model, p, 40, never); b = generate(model, p, 40, FullDepth()); nf.append(tps(a) / tps(b))
    for name, x in (("full second/first", ff), ("never after full", fn), ("never before full", nf)):
        print(rep, name, len(x), f"median {statistics.median(x):.4f} mean {statistics.mean(x):.4f} sd {statistics.stdev(x):.4f}", flush=True)
