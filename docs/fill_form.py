"""One-off: the decoupled fill with its normalisation taken apart, against kv_cache.skipped_kv as shipped, in place.

rmsnorm_l(h + d_l) = (h + d_l) * w_l / rms(h + d_l), d_l = mu[l] - mu[e]; the mean square comes from
|h + d|^2 = |h|^2 + 2 h.d + |d|^2, an [S, n] matmul, so the [S, n, D] input is written once (addcmul) and the
1/rms scales the narrower bmm output, where F.rms_norm makes several passes over [S, n, D].
Prompt-static e prefill of 256-token documents (windows bench.py does not score), each run right after full
depth, the two forms alternating in order; the fill's own time is summed in place. Usage: python fill_form.py [N]
"""
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
import adept
import kv_cache
from adept import FullDepth, PromptPolicy, Stats, forward_tokens, load_fill, make_policy
from bench import human_documents
from checkpoint import load
from convert import default_checkpoint

model, tok = load(default_checkpoint())
load_fill(model)


def taken_apart(model, h, pos, e):
    c, mu = model.config, model.fill_mu
    w = model.attn_norm[e:]                                                                   # [S, D]
    d = torch.zeros_like(w) if mu is None else mu[e:c.n_layers] - mu[e]                      # [S, D]
    sq = (h.square().sum(-1) + 2 * d @ h.T + d.square().sum(-1, keepdim=True)) / c.dim       # [S, n]
    x = torch.addcmul(d[:, None] * w[:, None], h[None], w[:, None])                         # [S, n, D]
    kv = torch.bmm(x, model.wqkv[e:, :, c.q_dim:]) * torch.rsqrt(sq + c.norm_eps)[..., None]
    k, v = kv.unflatten(-1, (2, c.n_kv_heads, c.head_dim)).unbind(2)
    return model.rope(k, pos), v


N = int(sys.argv[1]) if len(sys.argv) > 1 else 24
docs = human_documents(tok, 256, 200 + N)[0][200:]
shipped, fill, spent = kv_cache.skipped_kv, kv_cache.fill_decoupled, [0.0]


def timed_fill(*a):
    t = time.perf_counter()
    fill(*a)
    spent[0] += time.perf_counter() - t


adept.KV_FILLS["decoupled"] = timed_fill


def run(policy, ids):
    spent[0] = 0.0
    t = time.perf_counter()
    forward_tokens(model, ids, 0, model.new_cache(1, len(ids)), policy, Stats())
    return time.perf_counter() - t, spent[0]


with torch.inference_mode():
    h = torch.randn(255, model.config.dim) * 20
    a, b = shipped(model, h, torch.arange(255), 12), taken_apart(model, h, torch.arange(255), 12)
    print("largest difference, relative to the largest K/V:", max(float((x - y).abs().max() / x.abs().max()) for x, y in zip(a, b)))
    res = {}
    for j, d in enumerate(docs):
        ids = torch.tensor(d)
        for e in (12, 16, 20, 24, 27):
            policy = PromptPolicy(make_policy("static", model, exit_layer=e), FullDepth(), len(d) - 1)
            forms = [("shipped", shipped), ("taken apart", taken_apart)]
            for name, f in (forms if j % 2 else forms[::-1]):
                kv_cache.skipped_kv = f
                full_s, _ = run(FullDepth(), ids)
                s, fill_s = run(policy, ids)
                res.setdefault((e, name), []).append((full_s / s, 1e3 * fill_s, 1e3 * s))
        print(f"\r{j + 1}/{N}", end="", file=sys.stderr, flush=True)
print(file=sys.stderr)
print(f"{N} documents; medians")
print("| prompt depth | form | speed-up | fill, ms | prefill, ms |\n|---|---|---|---|---|")
for (e, name), rs in sorted(res.items()):
    print(f"| {e} | {name} | " + " | ".join(f"{statistics.median(r[i] for r in rs):.{3 if i == 0 else 1}f}" for i in range(3)) + " |")
