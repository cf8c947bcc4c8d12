"""The preallocated KV cache, and the ADEPT fill of the layers a token skipped.

A token that exits after layer e never runs layers e+1..L, yet later tokens attend
to its keys and values in those layers. ADEPT's answer (`fill_decoupled`) is to
compute them all from the exit hidden state h_e at once:

    K_l = rope(rmsnorm_l(h_e) @ W_K^l),  V_l = rmsnorm_l(h_e) @ W_V^l   for l = e+1..L

Nothing in that formula depends on another skipped layer, so one batched matmul over
the stacked weights of layers e+1..L does it. `fill_sequential` is the CALM-style
loop over the same formula, one layer after another: the reference the tests use.

Calibrated fill: layer l would have seen h_{l-1}, not h_e, and the residual stream
drifts with depth in much the same way for every token. With `model.fill_mu` set
([L+1, D], mu[j] = the mean hidden state after j layers, measured on training text by
the fill calibration of train_exits.py), layer l reads h_e + (mu[l-1] - mu[e]) instead: one add.
"""
import torch
import torch.nn.functional as F

CHECK_WRITES = False  # tests set this: every read then asserts that its slots were written


class KVCache:
    """k, v: [n_layers, batch, n_kv_heads, max_len, head_dim], allocated once.

    mask_unwritten=True is the ablation ADEPT argues against: skipped layers are left empty
    and masked out, not filled."""

    def __init__(self, n_layers, batch, max_len, n_kv_heads, head_dim, dtype, device,
                 mask_unwritten=False):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        # masked slots are still multiplied (by a zero weight): no NaN from fresh memory in them
        alloc = torch.zeros if mask_unwritten else torch.empty
        self.k = alloc(shape, dtype=dtype, device=device)
        self.v = alloc(shape, dtype=dtype, device=device)
        self.mask_unwritten = mask_unwritten
        self.written = None
        if CHECK_WRITES or mask_unwritten:
            self.written = torch.zeros(n_layers, max_len, dtype=torch.bool, device=device)

    def write(self, i, pos, k, v):
        """Store layer i's k, v [B, n, n_kv_heads, head_dim] at positions pos [n] (i a slice of S
        layers: k, v [S, B, n, n_kv_heads, head_dim])."""
        self.k[i][..., pos, :] = k.transpose(-3, -2)
        self.v[i][..., pos, :] = v.transpose(-3, -2)
        if self.written is not None:
            self.written[i, pos] = True

    def read(self, i, end):
        """Layer i's keys and values at positions [0, end): two views [B, n_kv_heads, end,
        head_dim], and which of those positions may be attended to ([end] bool), or None for all."""
        if self.mask_unwritten:
            return self.k[i, :, :, :end], self.v[i, :, :, :end], self.written[i, :end]
        if self.written is not None and not bool(self.written[i, :end].all()):
            missing = (~self.written[i, :end]).nonzero().flatten().tolist()
            raise AssertionError(f"layer {i}: positions {missing[:8]} read from the KV cache "
                                 "before being written")
        return self.k[i, :, :, :end], self.v[i, :, :, :end], None


class SequenceCache:
    """The cache of a whole sequence computed at once (model.forward): it hands each layer's K/V
    straight to that layer's attention and keeps nothing else. Nothing is written in place, so
    autograd can follow it, and no memory is allocated ahead."""

    def write(self, i, pos, k, v):
        # [B, n, kv_heads, hd] -> [B, kv_heads, n, hd]
        self.k, self.v = k.transpose(1, 2), v.transpose(1, 2)

    def read(self, i, end):
        return self.k[:, :, :end], self.v[:, :, :end], None


def skipped_kv(model, h, pos, e):
    """K (roped) and V that layers e+1..L would make of hidden states h [n, D] at positions pos [n]:
    [L - e, n, n_kv_heads, head_dim] each. RMSNorm's 1/rms(h) is the same for every layer, so
    without calibration h is normalised once and only each layer's norm weight differs; then one
    bmm projects through all the skipped layers' K/V weights at once.
    """
    c, mu = model.config, model.fill_mu
    # calibrated: layer l reads h_e + mu[l] - mu[e]
    h = h[None] if mu is None else h[None] + (mu[e:c.n_layers, None] - mu[e])
    x = F.rms_norm(h, (c.dim,), None, c.norm_eps) * model.attn_norm[e:, None]   # [S, n, D]
    kv = torch.bmm(x, model.wqkv[e:, :, c.q_dim:])  # [S, n, 2 * kv_dim]
    k, v = kv.unflatten(-1, (2, c.n_kv_heads, c.head_dim)).unbind(2)
    return model.rope(k, pos), v


def fill_decoupled(cache, model, h, pos, e):
    """ADEPT's fill: the K/V of every skipped layer of tokens that exit after layer e, in one
    batched operation.

    h: [n, D], the exit hidden states of n tokens at positions pos [n] of a one-sequence cache
    (forward_tokens runs batch 1). Layers are 0-indexed in the cache: the skipped ones are e..L-1.
    """
    k, v = skipped_kv(model, h, pos, e)
    cache.write(slice(e, None), pos, k[:, None], v[:, None])  # [S, B=1, n, kv_heads, hd]


def fill_layer(cache, model, h, pos, e, i):
    """Layer i's K/V (0-indexed, i >= e) for tokens that exited after layer e, states h [n, D]."""
    c, mu = model.config, model.fill_mu
    h = h if mu is None else h + (mu[i] - mu[e])
    x = F.rms_norm(h, (c.dim,), model.attn_norm[i], c.norm_eps)
    k, v = (x @ model.wqkv[i, :, c.q_dim:]).view(1, len(pos), 2, c.n_kv_heads, c.head_dim).unbind(2)
    cache.write(i, pos, model.rope(k, pos), v)  # [B=1, n, kv_heads, hd]


def fill_sequential(cache, model, h, pos, e):
    """Reference for `fill_decoupled`: the same formula, one skipped layer after another."""
    for i in range(e, model.config.n_layers):
        fill_layer(cache, model, h, pos, e, i)
