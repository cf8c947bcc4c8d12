"""The LLaMA forward pass: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

One `Transformer` holds every layer's weights stacked along a leading layer axis
(`wqkv[i]` is layer i's fused Q/K/V projection). Stacking is what lets the ADEPT
KV fill (kv_cache.py) project one hidden state through all skipped layers' K/V
weights in a single batched matmul. Weights are stored as [in, out], so a layer is
`x @ w`: on CPU a row vector times a row-major matrix streams memory about 1.5x
faster than `x @ w.T` (measured for the default model's shapes), and single-token
decode is memory-bound. Reading a checkpoint into it is checkpoint.py's job.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kv_cache import KVCache, SequenceCache


@dataclass
class Config:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "linear" | "llama3", ...}; None = plain RoPE
    tie_embeddings: bool = False
    head_dim: int | None = None         # None = dim // n_heads; some checkpoints set it apart

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads

    @property
    def q_dim(self):
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim


class Transformer(torch.nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        L, D, F_, Q, kv = c.n_layers, c.dim, c.ffn_dim, c.q_dim, c.kv_dim
        P = lambda *shape: torch.nn.Parameter(torch.empty(*shape), requires_grad=False)
        self.tok_emb = P(c.vocab_size, D)
        self.attn_norm = P(L, D)           # input RMSNorm of each layer's attention
        self.wqkv = P(L, D, Q + 2 * kv)    # [in, out]: columns are q | k | v
        self.wo = P(L, Q, D)
        self.ffn_norm = P(L, D)
        self.w13 = P(L, D, 2 * F_)         # columns are gate (w1) | up (w3)
        self.w2 = P(L, F_, D)
        self.norm = P(D)
        self.lm_head = P(D, c.vocab_size)  # a transposed copy of tok_emb when tied
        self.fill_mu = None                # [L+1, D]: the calibrated fill's means (kv_cache.py)
        self.register_buffer("cos", torch.empty(c.max_seq_len, c.head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(c.max_seq_len, c.head_dim), persistent=False)
        if self.cos.device.type != "meta":
            self.init_rope()

    def init_rope(self):
        """cos/sin tables [max_seq_len, head_dim] in the rotate-half layout, computed in float64."""
        pos = torch.arange(self.config.max_seq_len, dtype=torch.float64)
        freqs = torch.outer(pos, rope_inv_freq(self.config)).repeat(1, 2)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    def rope(self, x, pos):
        """Rotate-half RoPE of x [B, n, heads, head_dim] at positions pos [n]."""
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [n, 1, head_dim]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def new_cache(self, batch, max_len, mask_unwritten=False) -> KVCache:
        c = self.config
        if max_len > c.max_seq_len:
            raise ValueError(f"{max_len} tokens exceed the model's context length of "
                             f"{c.max_seq_len}; use a shorter prompt or fewer new tokens")
        return KVCache(c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim, self.tok_emb.dtype,
                       self.tok_emb.device, mask_unwritten)

    def layer(self, i, h, pos, cache, mask):
        """Run layer i on the tokens of h at positions pos; return the new h and its (q, k, v).

        h: [B, n, D]; pos: LongTensor [n]. The tokens' K/V are written to the cache first,
        then each token attends to cache positions [0, end) where mask [n, end] (or
        [B, 1, n, end]) is True. The mask's width, a Python int, says where the context
        ends, so the layer never waits for a device tensor. q and k are returned before
        RoPE, so that they describe the token, not its position.
        """
        c = self.config
        B, n, D = h.shape
        x = F.rms_norm(h, (D,), self.attn_norm[i], c.norm_eps)
        q, k, v = (x @ self.wqkv[i]).split((c.q_dim, c.kv_dim, c.kv_dim), dim=-1)
        qr = self.rope(q.view(B, n, c.n_heads, c.head_dim), pos)
        kr = self.rope(k.view(B, n, c.n_kv_heads, c.head_dim), pos)
        cache.write(i, pos, kr, v.view(B, n, c.n_kv_heads, c.head_dim))
        keys, values, valid = cache.read(i, mask.shape[-1])  # [B, kv_heads, end, hd]
        if valid is not None:  # the empty-KV ablation: skipped layers' slots are masked out
            mask = mask & valid  # [n, end]; a token always sees itself
        a = F.scaled_dot_product_attention(qr.transpose(1, 2), keys, values, attn_mask=mask,
                                           enable_gqa=True)
        a = a.transpose(1, 2).reshape(B, n, c.q_dim)  # [B, heads, n, hd] -> [B, n, q_dim]
        h = h + a @ self.wo[i]
        x = F.rms_norm(h, (D,), self.ffn_norm[i], c.norm_eps)
        gate, up = (x @ self.w13[i]).chunk(2, dim=-1)
        return h + (F.silu(gate) * up) @ self.w2[i], (q, k, v)

    def head(self, h):
        """Logits from a hidden state of any layer: final norm + the shared LM head (the exit head
        of Shan et al., arXiv 2412.01455: no extra heads)."""
        return F.rms_norm(h, (self.config.dim,), self.norm, self.config.norm_eps) @ self.lm_head

    def forward(self, ids, exit_layer=None, hidden_states=None):
        """Logits [B, T, vocab] for ids [B, T], the whole sequence at once.

        exit_layer [B, T] (1..L; None = all L) forces an ADEPT exit pattern in a dense form that
        autograd can follow: every token runs every layer, but after its exit layer e its h stays
        h_e. At each deeper layer its K/V are then computed from h_e, which is exactly the
        decoupled fill (kv_cache.py), later tokens attend to them, and its logits come from the
        head at e. With `fill_mu` set, layer i reads h_e + mu[i] - mu[e] for such a token: the
        calibrated fill. It equals adept.forward_tokens under the same pattern (tested) without
        its savings: exit tuning (tune_exits.py) trains through it. With a list `hidden_states`,
        each layer's (h, q, k, v) is appended to it.
        """
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device)
        mask = pos[:, None] >= pos[None, :]  # causal
        h, cache, mu = self.tok_emb[ids], SequenceCache(), self.fill_mu
        for i in range(self.config.n_layers):
            # does layer i+1 run for the token? If not, it reads the exit state (calibrated)
            ran = None if exit_layer is None else (exit_layer > i)[..., None]
            x = h if ran is None or mu is None else \
                torch.where(ran, h, h + (mu[i] - mu[exit_layer]))
            h_next, qkv = self.layer(i, x, pos, cache, mask)
            h = h_next if ran is None else torch.where(ran, h_next, h)
            if hidden_states is not None:
                hidden_states.append((h, *qkv))
        return self.head(h)


def rope_inv_freq(c: Config) -> torch.Tensor:
    """Rotary frequencies, with the 'linear' and 'llama3' context-extension schemes."""
    inv = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
    s = c.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    orig = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((orig / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0 beyond orig/lo, 1 below orig/hi
    return (1 - smooth) * inv / factor + smooth * inv
