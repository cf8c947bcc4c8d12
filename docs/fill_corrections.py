"""One-off measurement (issue 18): which correction of the decoupled fill keeps the read position's prediction?

Prompt tokens before the last exit at layer e (dense form, as model.forward(ids, exit_layer)), the
last runs full depth; skipped layer l reads a corrected h_e. Statistics from train_exits.py's training
text (positions >= 4); scored on 256-token windows 200.. of the Python reference manual (bench.py
scores windows 0..199). Corrections: plain (h_e), mean (h_e + mu_l - mu_e, the shipped one), affine
(mu_l + (h_e - mu_e) * sd_l / sd_e), linear (mu_l + A_el (h_e - mu_e), ridge least squares per (e, l));
"+sink": the first 4 positions (attention sinks) run full depth.

    python docs/fill_corrections.py 23,24 100 plain,mean,affine,linear,mean+sink,linear+sink
"""
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import human_documents
from checkpoint import load
from convert import default_checkpoint
from kv_cache import SequenceCache
from train_exits import build_data

depths, n_docs, kinds = [int(x) for x in sys.argv[1].split(",")], int(sys.argv[2]), sys.argv[3].split(",")
model, tok = load(default_checkpoint())
L, D, SINKS = model.config.n_layers, model.config.dim, 4
train = build_data(model, tok, types.SimpleNamespace(seed=0, max_new_tokens=128, data=None, human_chunks=40, eval_chunks=8))["train"]
with torch.no_grad():
    H = []
    for ids, _ in train:
        hs, t = [], torch.tensor([ids])
        model(t, hidden_states=hs)
        H.append(torch.stack([model.tok_emb[t]] + [h for h, *_ in hs])[:, 0, SINKS:].double())
    H = torch.cat(H, 1)  # [L+1, N, D]
    mu, sd, maps = H.mean(1), H.std(1), {}
    X = {e: torch.cat([H[e] - mu[e], torch.ones(H.shape[1], 1, dtype=H.dtype)], 1) for e in depths}
    for e in depths:
        G = X[e].T @ X[e]
        for l in range(e, L):
            maps[(e, l)] = torch.linalg.solve(G + 1e-2 * G.trace() / len(X[e]) * torch.eye(D + 1, dtype=G.dtype),
                                              X[e].T @ (H[l] - mu[l])).float()
    mu, sd = mu.float(), sd.float()
    del H, X
print(f"statistics over {sum(len(i) - SINKS for i, _ in train)} training tokens", file=sys.stderr)


def read_position(ids, e, kind):
    """Log-probs at the last position when the tokens before it exit at e with the fill correction `kind`."""
    T, (fix, *sink) = ids.shape[1], kind.split("+")
    pos = torch.arange(T)
    mask, h, cache = pos[:, None] >= pos[None], model.tok_emb[ids], SequenceCache()
    for i in range(e):
        h, _ = model.layer(i, h, pos, cache, mask)
    he, sinks = h[:, :-1], h[:, :SINKS]
    for i in range(e, L):
        x = {"plain": lambda: he, "mean": lambda: he + mu[i] - mu[e], "affine": lambda: mu[i] + (he - mu[e]) * (sd[i] / sd[e]),
             "linear": lambda: mu[i] + torch.cat([he - mu[e], torch.ones(*he.shape[:2], 1)], -1) @ maps[(e, i)]}[fix]()
        if sink:
            x = torch.cat([sinks, x[:, SINKS:]], 1)
        out, _ = model.layer(i, torch.cat([x, h[:, -1:]], 1), pos, cache, mask)
        sinks, h = out[:, :SINKS], torch.cat([he, out[:, -1:]], 1)
    return model.head(h[0, -1]).float().log_softmax(-1)


docs = human_documents(tok, 256, 200 + n_docs)[0][200:]
with torch.no_grad():
    for e in depths:
        agree, kl = dict.fromkeys(kinds, 0), dict.fromkeys(kinds, 0.0)
        for ids in docs:
            t = torch.tensor([ids])
            ref = model(t)[0, -1].float().log_softmax(-1)
            for k in kinds:
                lp = read_position(t, e, k)
                agree[k] += int(lp.argmax() == ref.argmax())
                kl[k] += float((ref.exp() * (ref - lp)).sum())
        print(f"| {e} | " + " | ".join(f"{agree[k]}/{len(docs)}, KL {kl[k] / len(docs):.3f}" for k in kinds) + " |", flush=True)
