"""One-off measurement (issue 17): what the router's exit decision costs, and where an exiting router's prefill time goes.

1. RouterPolicy.decide alone, one token and 256 tokens, best of 5 rounds: as it ran before (rmsnorm(h) by
   F.rms_norm, the standardisation folded, GELU written out as x·0.5·(1 + erf(x/√2))) and now (√D and
   GELU's constants folded into the weights too: h/|h|, u + u·erf(u)).
2. 256-token prefills (12 documents of the Python reference manual, twice, alternating with full depth)
   with the shipped router: time inside decide and inside the KV fill, per prefill.

    python docs/router_cost.py
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import adept
from adept import FullDepth, Stats, forward_tokens, load_fill, make_policy
from bench import human_documents
from checkpoint import load
from convert import default_checkpoint

model, tok = load(default_checkpoint())
load_fill(model)
c, policy = model.config, make_policy("router", model)
r = policy.router
w1s = r.w1 / r.sd[..., None]
b1s = r.b1 - torch.einsum("lf,lfh->lh", r.mu / r.sd, r.w1)


def before(i, h, q, k, v):
    x = torch.addmm(b1s[i - 1], torch.cat((F.rms_norm(h, (c.dim,), None, c.norm_eps), q, k, v), dim=-1), w1s[i - 1])
    return torch.addmv(r.b2[i - 1], x * 0.5 * (1 + torch.erf(x * 0.7071067811865476)), r.w2[i - 1]) >= policy.logit


def best(f, n):
    for _ in range(100):
        f()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        times.append((time.perf_counter() - t0) / n)
    return min(times)


with torch.no_grad():
    for n in (1, 256):
        h, q, k, v = (torch.randn(n, d) * 3 for d in (c.dim, c.q_dim, c.kv_dim, c.kv_dim))
        old = best(lambda: bool(before(20, h, q, k, v).any()), 3000 if n == 1 else 300)
        new = best(lambda: bool(policy.decide(model, 20, None, h, q, k, v).any()), 3000 if n == 1 else 300)
        print(f"decide, {n} token(s): before {old * 1e6:.1f} us, now {new * 1e6:.1f} us")

    spent = {"decide": 0.0, "fill": 0.0}

    def timed(name, f):
        def g(*a):
            t0 = time.perf_counter()
            out = f(*a)
            spent[name] += time.perf_counter() - t0
            return out
        return g
    fill, decide = adept.KV_FILLS["decoupled"], policy.decide
    docs = human_documents(tok, 256, 12)[0] * 2
    full_s, router_s, stats = 0.0, 0.0, Stats()
    for d in docs:
        t = torch.tensor(d)
        t0 = time.perf_counter()
        forward_tokens(model, t, 0, model.new_cache(1, len(d)), FullDepth(), Stats())
        full_s += time.perf_counter() - t0
        adept.KV_FILLS["decoupled"], policy.decide = timed("fill", fill), timed("decide", decide)
        t0 = time.perf_counter()
        forward_tokens(model, t, 0, model.new_cache(1, len(d)), policy, stats)
        router_s += time.perf_counter() - t0
        adept.KV_FILLS["decoupled"], policy.decide = fill, decide
    n = len(docs)
    print(f"prefill 256, n = {n}: full {full_s / n * 1e3:.1f} ms, shipped router {router_s / n * 1e3:.1f} ms "
          f"({full_s / router_s:.3f}x, ideal {stats.ideal_speedup:.3f}, mean exit {stats.mean_exit_layer:.2f}); "
          f"inside it: decide {spent['decide'] / n * 1e3:.2f} ms, fill {spent['fill'] / n * 1e3:.2f} ms")
