"""One-off: what one small tensor operation costs inside the decode loop, against the same operation in a loop.

python docs/ops_in_place.py ROUNDS
In place: a policy asked at layers 12..29 like the shipped router runs one operation of the router's kind there and
never exits; each decode step runs full depth and every such policy in turn (own caches, order flipped every step),
48 steps a round. Prints the median extra time per asked layer over full depth, and the same operation's time
repeated 3,000 times in a loop (inputs and weights in cache).
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adept import FullDepth, Policy, Stats, forward_tokens, load_fill, make_policy  # noqa: E402
from checkpoint import load  # noqa: E402
from convert import default_checkpoint  # noqa: E402

model, tok = load(default_checkpoint())
load_fill(model)
w1, b1, w2, b2 = make_policy("router", model, threshold=1.0).layers[20]  # the folded router's weights at one layer
u, z, x, o = torch.randn(1, 16), torch.randn(1), torch.randn(1, w1.shape[0]), torch.zeros(1, dtype=torch.bool)
OPS = {  # the operations of RouterPolicy.decide and forward_tokens' test, on a decode step's shapes
    "vector_norm(h)": lambda h, q, k, v: torch.linalg.vector_norm(h, dim=-1, keepdim=True),
    "h / norm": lambda h, q, k, v: h / 3.0,
    "cat(h, q, k, v)": lambda h, q, k, v: torch.cat((h, q, k, v), dim=-1),
    "addmm [1,1536]x[1536,16]": lambda h, q, k, v: torch.addmm(b1, x, w1),
    "erf [1,16]": lambda h, q, k, v: torch.erf(u),
    "addcmul [1,16]": lambda h, q, k, v: torch.addcmul(u, u, u),
    "addmv [1,16]x[16]": lambda h, q, k, v: torch.addmv(b2, u, w2),
    "z >= logit": lambda h, q, k, v: z >= 0.5,
    "bool(out.any())": lambda h, q, k, v: bool(o.any()),
    "F.gelu [1,16] (not used)": lambda h, q, k, v: torch.nn.functional.gelu(u),
}


class One(Policy):
    min_layer = 12

    def __init__(self, op):
        self.op = op

    def decide(self, model, i, pos, h, q, k, v):
        self.op(h, q, k, v)


ids = tok.prompt("Explain how a bicycle works.")
policies = {"full": FullDepth()} | {name: One(op) for name, op in OPS.items()}
steps, asked = 48, 18
times = {k: [] for k in policies}
with torch.inference_mode():
    for r in range(int(sys.argv[1])):
        caches = {k: model.new_cache(1, len(ids) + steps) for k in policies}
        for k in policies:
            forward_tokens(model, torch.tensor(ids), 0, caches[k], FullDepth(), Stats())
        for s in range(steps):
            for k in (list(policies) if (r + s) % 2 else list(reversed(policies))):
                t0 = time.perf_counter()
                forward_tokens(model, torch.tensor([100 + s]), len(ids) + s, caches[k], policies[k], Stats())
                times[k].append(time.perf_counter() - t0)
    h, q, k, v = torch.randn(1, 576), torch.randn(1, 576), torch.randn(1, 192), torch.randn(1, 192)
    print(f"full-depth decode step: median {statistics.median(times['full']) * 1e3:.2f} ms of {len(times['full'])}")
    print("| operation | in place, extra per asked layer (median, quartiles) | in a loop |\n|---|---|---|")
    for name, op in OPS.items():
        d = [(t - f) / asked * 1e6 for f, t in zip(times["full"], times[name])]
        q1, _, q3 = statistics.quantiles(d)
        t0 = time.perf_counter()
        for _ in range(3000):
            op(h, q, k, v)
        print(f"| {name} | {statistics.median(d):.1f} µs ({q1:.0f}, {q3:.0f}) | {(time.perf_counter() - t0) / 3000 * 1e6:.1f} µs |")
