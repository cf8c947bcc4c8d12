"""One-off for issue 17: prefill with the K/V of exited tokens written layer by layer while other tokens still run
(the weights are then in cache) against ADEPT's fill at exit time. python docs/lazy_fill.py N (documents)."""
import sys, time, torch
import torch.nn.functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from checkpoint import load
from convert import default_checkpoint
from adept import DEFAULT_EXITS, FullDepth, Stats, forward_tokens, load_fill, make_policy, count, PromptPolicy
from kv_cache import fill_decoupled
from bench import human_documents
torch.manual_seed(0)
model, tok = load(default_checkpoint())
load_fill(model)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 24
docs, _ = human_documents(tok, 256, N)
c = model.config

def fill_layer(cache, model, l, hp, pp):
    """K/V of layer l (0-based) for pending tokens: hp = h_e - mu[e] (calibrated) or h_e."""
    x = hp if model.fill_mu is None else hp + model.fill_mu[l]
    x = F.rms_norm(x, (c.dim,), model.attn_norm[l], c.norm_eps)
    k, v = (x @ model.wqkv[l, :, c.q_dim:]).view(1, len(pp), 2, c.n_kv_heads, c.head_dim).unbind(2)
    cache.write(l, pp, model.rope(k, pp), v)

def forward_lazy(model, ids, start, cache, policy, stats):
    L, n = model.config.n_layers, len(ids)
    pos = torch.arange(start, start + n, device=ids.device)
    mask = pos[:, None] >= torch.arange(start + n, device=ids.device)[None]
    exit_layer = torch.full((n,), L, dtype=torch.long)
    h_exit = torch.empty(n, c.dim)
    active, p, m, h = torch.arange(n), pos, mask, model.tok_emb[ids][None]
    hp, pp = None, None  # pending: exited tokens' (shifted) states and positions
    for i in range(1, L + 1):
        if hp is not None:
            fill_layer(cache, model, i - 1, hp, pp)
        h, (q, k, v) = model.layer(i - 1, h, p, cache, m)
        if i == L or i < policy.min_layer:
            continue
        out = policy.decide(model, i, p, h[0], q[0], k[0], v[0])
        if out is None or not out.any():
            continue
        gone = active[out]
        exit_layer[gone] = i
        he = h[0, out]
        h_exit[gone] = he
        stay = ~out
        active, p, m, h = active[stay], p[stay], m[stay], h[:, stay]
        if len(active) == 0:  # nobody runs the layers left: fill them at once
            fill_decoupled(cache, model, he, pos[gone], i)  # (only this event's tokens; earlier pending ones too:)
            if hp is not None:
                for l in range(i, L):
                    fill_layer(cache, model, l, hp, pp)
            hp = None
            break
        he = he if model.fill_mu is None else he - model.fill_mu[i]
        hp, pp = (he, pos[gone]) if hp is None else (torch.cat((hp, he)), torch.cat((pp, pos[gone])))
    h_exit[active] = h[0]
    count(stats, model, policy, pos, exit_layer, 1, True)
    return model.head(h_exit[-1]), exit_layer

router = make_policy("router", model)
prompt = PromptPolicy(make_policy("router", model, threshold=0.5, exits=DEFAULT_EXITS.with_suffix(".prompt.safetensors")), FullDepth(), 255)
def timed(fn, ids, pol):
    t = torch.tensor(ids); st = Stats()
    t0 = time.perf_counter()
    logits, e = fn(model, t, 0, model.new_cache(1, len(ids)), pol, st)
    return time.perf_counter() - t0, logits, st
timed(forward_tokens, docs[0], FullDepth())
for name, pol in (("router", router), ("prompt router 0.5", prompt)):
    tf = tn = tl = 0; maxd = 0; ideal = []
    for ids in docs:
        f, lf, _ = timed(forward_tokens, ids, FullDepth())
        a, la, st = timed(forward_tokens, ids, pol)
        f2, _, _ = timed(forward_tokens, ids, FullDepth())
        b, lb, _ = timed(forward_lazy, ids, pol)
        tf += f + f2; tn += a; tl += b; ideal.append(st.ideal_speedup)
        maxd = max(maxd, float((la - lb).abs().max()))
        assert la.argmax() == lb.argmax()
    print(f"{name}: full {tf/2/N*1e3:.1f} ms; now {tf/2/tn:.3f}x, lazy {tf/2/tl:.3f}x; ideal {sum(ideal)/N:.3f}; max |logit diff| {maxd:.2e}")
