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
train_exits.py --calibrate), layer l reads h_e + (mu[l-1] - mu[e]) instead: one add.
"""
import torch
import torch.nn.functional as F

CHECK_WRITES = False  # tests set this: every read then asserts that its slots were written


class KVCache:
    """k, v: [n_layers, batch, n_kv_heads, max_len, head_dim], allocated once.

    mask_unwritten=True is the ablation that ADEPT argues against: skipped layers are
    left empty and attention masks them out, instead of reading a filled entry.
    """

    def __init__(self, n_layers, batch, max_len, n_kv_heads, head_dim, dtype, device, mask_unwritten=False):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        # masked slots are still multiplied (by a zero weight), so they must not hold NaN from fresh memory
        alloc = torch.zeros if mask_unwritten else torch.empty
        self.k = alloc(shape, dtype=dtype, device=device)
        self.v = alloc(shape, dtype=dtype, device=device)
        self.mask_unwritten = mask_unwritten
        track = CHECK_WRITES or mask_unwritten
        self.written = torch.zeros(n_layers, max_len, dtype=torch.bool, device=device) if track else None

    def write(self, i, pos, k, v):
        """Store layer i's k, v [B, n, n_kv_heads, head_dim] at positions pos [n]."""
        self.k[i][:, :, pos] = k.transpose(1, 2)
        self.v[i][:, :, pos] = v.transpose(1, 2)
        if self.written is not None:
            self.written[i, pos] = True

    def read(self, i, end):
        """Layer i's keys and values at positions [0, end): two views [B, n_kv_heads, end, head_dim],
        and which of those positions may be attended to ([end] bool), or None for all."""
        if self.mask_unwritten:
            return self.k[i, :, :, :end], self.v[i, :, :, :end], self.written[i, :end]
        if self.written is not None and not bool(self.written[i, :end].all()):
            missing = (~self.written[i, :end]).nonzero().flatten().tolist()
            raise AssertionError(f"layer {i}: positions {missing[:8]} read from the KV cache before being written")
        return self.k[i, :, :, :end], self.v[i, :, :, :end], None


class SequenceCache:
    """The cache of a whole sequence computed at once (model.forward): it hands each layer's K/V
    straight to that layer's attention and keeps nothing else. Nothing is written in place, so
    autograd can follow it, and no memory is allocated ahead."""

    def write(self, i, pos, k, v):
        self.k, self.v = k.transpose(1, 2), v.transpose(1, 2)  # [B, n, kv_heads, hd] -> [B, kv_heads, n, hd]

    def read(self, i, end):
        return self.k[:, :, :end], self.v[:, :, :end], None


def skipped_kv(model, h, pos, layers, exit_layer):
    """K (roped) and V of hidden states h [n, D] at positions pos [n], as the given layers would make them.

    layers: a slice of layer indices (0-based); exit_layer [n]: each token's e. Returns k, v:
    [len(layers), n, n_kv_heads, head_dim]. Without calibration RMSNorm's 1/rms(h) is the same
    for every layer, so h is normalised once and only each layer's norm weight is applied per
    layer; then one bmm projects through all of them.
    """
    c, mu = model.config, model.fill_mu
    S, n = len(range(c.n_layers)[layers]), h.shape[0]
    if mu is None:
        x = F.rms_norm(h, (c.dim,), None, c.norm_eps)[None] * model.attn_norm[layers, None, :]  # [S, n, D]
    else:  # calibrated: layer l (0-based) reads h_e + mu[l] - mu[e]
        h = h[None] + (mu[layers, None] - mu[exit_layer][None])                               # [S, n, D]
        x = F.rms_norm(h, (c.dim,), None, c.norm_eps) * model.attn_norm[layers, None, :]
    kv = torch.bmm(x, model.wqkv[layers, :, c.q_dim:])                                      # [S, n, 2*kv_dim]
    k, v = kv.view(S, n, 2, c.n_kv_heads, c.head_dim).unbind(2)
    return model.rope(k, pos), v


def fill_decoupled(cache, model, h, pos, exit_layer):
    """ADEPT's fill: K/V of every skipped layer of every exiting token, in one batched operation.

    h: [n, D], the hidden states of n tokens (batch row 0) at positions pos [n], where
    token j exited after exit_layer[j] layers (LongTensor [n], 1..L). Layers are
    0-indexed in the cache, so token j's skipped layers are exit_layer[j]..L-1.
    """
    L = model.config.n_layers
    first = int(exit_layer.min())
    if first >= L:
        return
    k, v = skipped_kv(model, h, pos, slice(first, L), exit_layer)    # [S, n, kv_heads, hd]
    layer = torch.arange(first, L, device=h.device)[:, None].expand(-1, len(pos))
    p = pos[None].expand_as(layer)
    keep = layer >= exit_layer[None]                                  # [S, n]: a layer token j skipped
    layer, p = layer[keep], p[keep]
    cache.k[layer, 0, :, p] = k[keep]                                 # [M, kv_heads, hd]
    cache.v[layer, 0, :, p] = v[keep]
    if cache.written is not None:
        cache.written[layer, p] = True


def fill_sequential(cache, model, h, pos, exit_layer):
    """Reference for `fill_decoupled`: each token, each skipped layer, one after another."""
    c, mu = model.config, model.fill_mu
    for j in range(len(pos)):
        p, e = pos[j:j + 1], int(exit_layer[j])
        for i in range(e, c.n_layers):
            x = F.rms_norm(h[j] if mu is None else h[j] + (mu[i] - mu[e]), (c.dim,), model.attn_norm[i], c.norm_eps)
            k, v = (x @ model.wqkv[i, :, c.q_dim:]).view(1, 1, 2, c.n_kv_heads, c.head_dim).unbind(2)  # [B=1, n=1, ...]
            cache.write(i, p, model.rope(k, p), v)
