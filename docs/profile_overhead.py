"""Where a decode step's and a 256-token prefill's time beyond full depth goes (docs/RESULTS.md).

Plain timers in the real loop (adept.forward_tokens), every variant alternating with full depth.
Each variant is asked at layers 12..29 like the shipped router and never exits, adding one piece:
  ask          the exit decision itself (a bool tensor, read back once per layer)
  features     + the router's features: rmsnorm(h) and the concatenation with q, k, v
  standardise  + (x - mu) / sd, what the router did before it was folded
  mlp          + the unfolded router MLP (the code before issue 17)
  router 1.0   the shipped router as it runs now, at a threshold that never exits

    python docs/profile_overhead.py .                  # this code
    git worktree add /tmp/old 43e2cce && python docs/profile_overhead.py /tmp/old   # before issue 17
"""
import os
import statistics
import sys
import time

code = os.path.abspath(sys.argv[1])
sys.path.insert(0, code)
os.chdir(code)
import torch  # noqa: E402

from adept import FullDepth, Policy, Stats, forward_tokens, make_policy, router_features  # noqa: E402
from bench import human_documents  # noqa: E402
try:
    from convert import default_checkpoint  # noqa: E402
    from checkpoint import load  # noqa: E402
except ImportError:  # the layout before the checkpoint/convert split
    from model import default_checkpoint, load  # noqa: E402

model, tok = load(default_checkpoint())
router = make_policy("router", model, threshold=1.0)
R = router.router


class Ask(Policy):
    min_layer = 12
    extra = staticmethod(lambda i, h, q, k, v: None)

    def decide(self, model, i, pos, h, q, k, v, *stats):
        self.extra(i, h, q, k, v)
        return torch.zeros(len(pos), dtype=torch.bool, device=h.device)


def variant(extra):
    p = Ask()
    p.extra = extra
    return p


policies = {"full": FullDepth(), "ask": Ask(),
            "features": variant(lambda i, h, q, k, v: router_features(model, h, q, k, v)),
            "standardise": variant(lambda i, h, q, k, v: (router_features(model, h, q, k, v) - R.mu[i - 1]) / R.sd[i - 1]),
            "mlp": variant(lambda i, h, q, k, v: R(i, router_features(model, h, q, k, v))), "router 1.0": router,
            "static 29": make_policy("static", model, exit_layer=29), "static 26": make_policy("static", model, exit_layer=26)}


def report(what, seconds, stats):
    full = statistics.median(seconds["full"])
    print(f"{what} ({code}): full depth {full * 1e3:.2f} ms")
    for k, s in seconds.items():
        m = statistics.median(s)
        print(f"  {k:12s} {1e3 * (m - full):+6.2f} ms  {full / m:.3f}x  (ideal {stats[k].ideal_speedup if hasattr(stats[k], 'ideal_speedup') else 1 / (1 - stats[k].saved):.3f})")


ids = tok.encode("<|im_start|>user\nExplain how a bicycle works.<|im_end|>\n<|im_start|>assistant\n")
seconds, stats = {k: [] for k in policies}, {k: Stats() for k in policies}
with torch.no_grad():
    cache = model.new_cache(1, len(ids) + 8)
    forward_tokens(model, torch.tensor(ids), 0, cache, FullDepth(), Stats())
    for rep in range(100):  # 8 decode steps per variant, 100 rounds, medians
        for k, p in policies.items():
            t0 = time.perf_counter()
            for j in range(8):
                forward_tokens(model, torch.tensor([42]), len(ids) + j, cache, p, stats[k])
            seconds[k].append((time.perf_counter() - t0) / 8)
report("decode step, median of 100 rounds", seconds, stats)
docs, _ = human_documents(tok, 256, 8)
seconds, stats = {k: [] for k in policies}, {k: Stats() for k in policies}
with torch.no_grad():
    for rep in range(3):  # 8 documents, 3 rounds, medians
        for d in docs:
            for k, p in policies.items():
                t0 = time.perf_counter()
                forward_tokens(model, torch.tensor(d), 0, model.new_cache(1, 256), p, stats[k])
                seconds[k].append(time.perf_counter() - t0)
report("prefill of 256 tokens, median of 24", seconds, stats)
