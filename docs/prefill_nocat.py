"""One-off: the router's prefill decision without the concatenation (h @ W_h / |h| + qkv @ W_qkv), against the shipped form.

python docs/prefill_nocat.py DOCS   (human 256-token documents; per document full depth and four router variants in turn,
the order flipped every document; the fused qkv is exposed by wrapping Transformer.layer, for this measurement only)
"""
import sys, time, statistics, torch
from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adept import *
from bench import human_documents
from checkpoint import load
from convert import default_checkpoint
import model as M
model, tok = load(default_checkpoint()); load_fill(model)
router = make_policy("router", model).router
class NoCat(RouterPolicy):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        D = model.config.dim
        self.split = [(w1[:D].contiguous(), w1[D:].contiguous(), b1, w2, b2) for w1, b1, w2, b2 in self.layers]
    def decide(self, model, i, pos, h, q, k, v):
        wh, wqkv, b1, w2, b2 = self.split[i - 1]
        qkv = torch.cat((q, k, v), -1) if QKV is None else QKV[0][0]
        u = torch.addmm(b1, qkv, wqkv).addcdiv_(h @ wh, torch.linalg.vector_norm(h, dim=-1, keepdim=True))
        return torch.addmv(b2, torch.addcmul(u, u, torch.erf(u)), w2) >= self.logit
QKV = None
# scratch: make layer expose the fused qkv (only to time the variant without the concatenation)
orig_layer = M.Transformer.layer
def layer(self, i, h, pos, cache, mask):
    global QKV
    out, (q, k, v) = orig_layer(self, i, h, pos, cache, mask)
    # q, k, v are views of one [B, n, Q+2kv] tensor: rebuild that view without a copy
    QKV = [q.as_strided(q.shape[:-1] + (q.shape[-1] + 2 * k.shape[-1],), q.stride())]
    return out, (q, k, v)
M.Transformer.layer = layer
pols = {"full": FullDepth(), "router": RouterPolicy(router), "nocat": NoCat(router),
        "never": RouterPolicy(router, 1.0), "never_nocat": NoCat(router, 1.0)}
docs, _ = human_documents(tok, 256, int(sys.argv[1]))
t = {k: [] for k in pols}; agree = 0
with torch.inference_mode():
    for j, d in enumerate(docs):
        ids = torch.tensor(d); outs = {}
        for k in (list(pols) if j % 2 else list(reversed(pols))):
            t0 = time.perf_counter()
            outs[k] = forward_tokens(model, ids, 0, model.new_cache(1, 256), pols[k], Stats())
            t[k].append(time.perf_counter() - t0)
        agree += int(torch.equal(outs["router"][1], outs["nocat"][1]))
for k in pols:
    print(k, f"{sum(t['full'])/sum(t[k]):.4f} (sum ratio), median pair {statistics.median([f/x for f, x in zip(t['full'], t[k])]):.4f}")
print("same exit layers router vs nocat:", agree, "/", len(docs))
