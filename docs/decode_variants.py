import sys, time, statistics, math, torch
import adept
from adept import FullDepth, generate, load_fill, make_policy, RouterPolicy
from checkpoint import load
from convert import default_checkpoint
from bench import PROMPTS
model, tok = load(default_checkpoint(), "cpu", torch.float32); load_fill(model)
v0 = make_policy("router", model, threshold=1.0)

class V1(RouterPolicy):  # read back the largest logit, exit vector only when someone exits
    def decide(self, model, i, pos, h, q, k, v):
        w1, b1, w2, b2 = self.layers[i - 1]
        u = torch.addmm(b1, torch.cat((h / torch.linalg.vector_norm(h, dim=-1, keepdim=True), q, k, v), dim=-1), w1)
        z = torch.addmv(b2, torch.addcmul(u, u, torch.erf(u)), w2)
        return None if float(z.max()) < self.logit else z >= self.logit
v1 = V1(v0.router, 1.0)
class Hot(RouterPolicy):
    pass
vh = Hot(v0.router, 1.0); vh.layers = [v0.layers[24]] * len(v0.layers)
class Skip(RouterPolicy):  # asked, computes nothing: the loop's own cost
    def decide(self, model, i, pos, h, q, k, v):
        return None
vs = Skip(v0.router, 1.0)
pols = {"v0": v0, "v1 max": v1, "hot w1": vh, "decide->None": vs}
prompts = [tok.prompt(q) for q in PROMPTS]
tps = lambda g: (len(g.tokens) - 1) / g.decode_s
generate(model, prompts[0], 4, FullDepth())
r = {k: [] for k in pols}
for rep in range(int(sys.argv[1])):
    for p in prompts:
        for name, pol in pols.items():
            a = generate(model, p, 40, FullDepth()); b = generate(model, p, 40, pol); r[name].append(tps(b) / tps(a))
    print(rep, " | ".join(f"{k} {statistics.median(x):.4f} ({statistics.mean(x):.4f})" for k, x in r.items()), flush=True)
