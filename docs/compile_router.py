"""One-off: the router's decision compiled by torch.compile (inductor, CPU) against eager, in a loop and in place.

python docs/compile_router.py ROUNDS   (48 decode steps a round: full depth, the never-exiting router, the same compiled,
each with its own cache, the order flipped every step)
"""
import sys, time, statistics, torch
from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adept import *
from checkpoint import load
from convert import default_checkpoint
model, tok = load(default_checkpoint()); load_fill(model)
ids = tok.prompt("Explain how a bicycle works.")
never = make_policy("router", model, threshold=1.0)
def logit(h, q, k, v, w1, b1, w2, b2):
    u = torch.addmm(b1, torch.cat((h / torch.linalg.vector_norm(h, dim=-1, keepdim=True), q, k, v), dim=-1), w1)
    return torch.addmv(b2, torch.addcmul(u, u, torch.erf(u)), w2)
t0 = time.time()
clogit = torch.compile(logit, dynamic=False)
class Compiled(RouterPolicy):
    def decide(self, model, i, pos, h, q, k, v):
        return clogit(h, q, k, v, *self.layers[i - 1]) >= self.logit
comp = Compiled(never.router, 1.0)
pols = {"full": FullDepth(), "never": never, "compiled": comp}
N = 48
with torch.inference_mode():
    h = torch.randn(1, 576); q = torch.randn(1, 576); k = torch.randn(1, 192); v = torch.randn(1, 192)
    for j in range(30): clogit(h, q, k, v, *never.layers[j])
    print("compiled in", time.time() - t0, "s")
    # same decisions? compare logits on random inputs
    for j in range(11, 29):
        a, b = logit(h, q, k, v, *never.layers[j]), clogit(h, q, k, v, *never.layers[j])
        assert torch.allclose(a, b, atol=1e-5), (a, b)
    n = 3000; t0 = time.perf_counter()
    for _ in range(n): clogit(h, q, k, v, *never.layers[20])
    print("compiled loop", (time.perf_counter() - t0) / n * 1e6, "us")
    t0 = time.perf_counter()
    for _ in range(n): logit(h, q, k, v, *never.layers[20])
    print("eager loop", (time.perf_counter() - t0) / n * 1e6, "us")
    times = {k_: [] for k_ in pols}
    for r in range(int(sys.argv[1])):
        caches = {k_: model.new_cache(1, len(ids) + N) for k_ in pols}
        for k_ in pols:
            forward_tokens(model, torch.tensor(ids), 0, caches[k_], FullDepth(), Stats())
        for s in range(N):
            for k_ in (list(pols) if (r + s) % 2 else list(reversed(pols))):
                t0 = time.perf_counter()
                forward_tokens(model, torch.tensor([100 + s]), len(ids) + s, caches[k_], pols[k_], Stats())
                times[k_].append(time.perf_counter() - t0)
for k_ in pols:
    rr = [f / x for f, x in zip(times["full"], times[k_])]
    d = [(x - f) * 1e6 / 18 for f, x in zip(times["full"], times[k_])]
    print(f"{k_:9s} {statistics.median(times[k_])*1e3:.2f} ms; speed vs full (median of {len(rr)}) {statistics.median(rr):.4f}; extra per layer {statistics.median(d):.1f} us")
