"""One-off: the mechanism's own cost in decode against model size, on random weights of real LLaMA shapes.

python docs/overhead_by_size.py STEPS ROUNDS
For each shape, one decode step at a time: full depth, then a router that never exits (threshold 1.0, asked from
layer 0.4 L on, as the shipped one from 12 of 30), then full again..., each with its own cache, the order flipped
every step. Prints the median per-step speed ratio and the router's extra time per asked layer.
Random weights: the time of these ops does not depend on the values.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adept import FullDepth, Router, RouterPolicy, Stats, forward_tokens  # noqa: E402
from model import Config, Transformer  # noqa: E402

SHAPES = {  # the SmolLM2 family's shapes (config.json of each checkpoint)
    "135M": Config(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152, tie_embeddings=True),
    "360M": Config(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560, vocab_size=49152, tie_embeddings=True),
    "1.7B": Config(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, ffn_dim=8192, vocab_size=49152, tie_embeddings=True),
}
steps, rounds = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
for name, c in SHAPES.items():
    model = Transformer(c)
    for p in model.parameters():
        p.normal_(0.0, 0.02, generator=g) if p.dim() > 1 else p.fill_(1.0)
    router = Router(c, 16)
    router.meta = {"threshold": "1.0", "min_layer": str(round(0.4 * c.n_layers))}
    policies = {"full": FullDepth(), "never": RouterPolicy(router)}
    asked = c.n_layers - 1 - policies["never"].min_layer + 1
    ratios, extra = [], []
    with torch.inference_mode():
        prompt = torch.randint(c.vocab_size, (32,), generator=g)
        for r in range(rounds):
            caches = {k: model.new_cache(1, 32 + steps) for k in policies}
            for k in policies:
                forward_tokens(model, prompt, 0, caches[k], FullDepth(), Stats())
            for s in range(steps):
                t = {}
                for k in (list(policies) if (r + s) % 2 else list(reversed(policies))):
                    t0 = time.perf_counter()
                    forward_tokens(model, prompt[s:s + 1], 32 + s, caches[k], policies[k], Stats())
                    t[k] = time.perf_counter() - t0
                ratios.append(t["full"] / t["never"])
                extra.append((t["never"] - t["full"]) / asked * 1e6)
                full_ms = t["full"] * 1e3
    q = statistics.quantiles(ratios)
    print(f"{name}: {c.n_layers} layers, router asked at {asked}; full step ~{full_ms:.0f} ms; never-exiting router / full "
          f"speed, median of {len(ratios)} steps {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}, {q[2]:.3f}); "
          f"extra per asked layer {statistics.median(extra):.0f} us", flush=True)
    del model
