"""ADEPT: token-level early exit in prefill and in decode (Yoo et al., arXiv 2601.03700).

The whole mechanism is `forward_tokens`: it runs a set of tokens through the layers,
and after each layer asks an exit policy which of the still-active tokens leave. A
token that exits after layer e gets the K/V of layers e+1..L filled from h_e in one
batched operation (kv_cache.fill_decoupled) and predicts with the shared head at e.
Prefill is `forward_tokens` over the prompt; a decode step is `forward_tokens` over one
token. Full depth is the `FullDepth` policy, which never exits. Classification (`classify`)
is the same pass over a document: a small head per layer reads the document's pooled state,
and the whole document stops at the layer where a gate says its label is settled.

Layers are counted from 1 here: "exit at layer e" means layers 1..e ran (blocks
0..e-1 in model.py) and e = L is full depth.
"""
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kv_cache import fill_decoupled, fill_layer, fill_sequential

# ---------------------------------------------------------------------------------- cost accounting


@dataclass
class Stats:
    """Work done, in multiply-accumulates (MACs) split by where it went, and in bytes read."""
    tokens: int = 0
    layers: int = 0          # sum over tokens of layers computed (= exit layers)
    layer_macs: int = 0      # projections, MLP and attention of computed layers
    router_macs: int = 0     # the exit policy's own work (a router, or a confidence gate's head)
    fill_macs: int = 0       # K/V projections of skipped layers
    head_macs: int = 0       # the LM head that produces the token's logits
    full_macs: int = 0       # what full depth would have cost the same tokens
    weight_bytes: int = 0    # weights read: each layer run, K/V columns filled, heads, routers
    kv_bytes: int = 0        # the K/V cache read by attention
    full_bytes: int = 0      # what full depth would have read for the same tokens

    @property
    def total_macs(self):
        return self.layer_macs + self.router_macs + self.fill_macs + self.head_macs

    @property
    def mean_exit_layer(self):
        return self.layers / max(self.tokens, 1)

    @property
    def saved(self):
        """Fraction of full-depth compute saved (negative when the policy costs more than it
        saves)."""
        return 1 - self.total_macs / max(self.full_macs, 1)

    @property
    def ideal_speedup(self):
        """1 / (1 - saved): the speed-up these counts promise if time followed the MACs."""
        return self.full_macs / max(self.total_macs, 1)


def count(stats, model, policy, pos, exit_layer, n_logits, fill):
    """Add the work of one forward_tokens call to `stats`, from its tokens' exit layers alone.

    Counting once here, not layer by layer inside the loop, keeps the loop free of
    bookkeeping (and of host-device syncs). Token j at position p ran layers 1..e_j
    (each: projections, MLP, and attention over p + 1 positions), was asked by the
    policy at layers min_layer..min(e_j, L-1), and had layers e_j+1..L filled (lazily: only
    those up to the deepest layer any token ran). Bytes: a layer's weights are read once per
    call if any token runs it, whatever the number of rows, and so are the K/V columns of each
    layer a fill computes (once per exit layer), the head and the policy's weights per layer
    asked; attention reads the cache's K/V up to the call's last position at each layer run.
    """
    c, L, e = model.config, model.config.n_layers, exit_layer
    projections = c.dim * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.dim + 3 * c.dim * c.ffn_dim
    per_layer = projections + 2 * c.q_dim * (pos + 1)  # [n]
    given_kv = lambda x: {"none": 0 * x, "lazy": (e.max() - x).clamp(min=0)}.get(fill, L - x)
    filled = given_kv(e)  # [n] the skipped layers each token's fill gives K/V
    at = torch.arange(L, device=e.device)  # the exit layers below L that occur, once each:
    exits = torch.zeros(L + 1, dtype=torch.long, device=e.device).index_fill_(0, e, 1)[:L]
    fills = given_kv(at) * exits
    layers, layer_work, router_work, skipped, full, deepest, fill_reads, router_reads = (
        torch.stack([e.sum(), (e * per_layer).sum(), policy.work(c, pos, e), filled.sum(),
                     L * per_layer.sum(), e.max(), fills.sum(), policy.weights(c, pos, e)])
        .tolist())  # one read-back for all eight
    heads = n_logits * c.dim * c.vocab_size
    stats.tokens += len(e)
    stats.layers += layers
    stats.layer_macs += layer_work
    stats.router_macs += router_work
    stats.fill_macs += skipped * c.dim * 2 * c.kv_dim
    stats.head_macs += heads
    stats.full_macs += full + heads
    b, head = model.tok_emb.element_size(), c.dim * c.vocab_size * (n_logits > 0)
    kv_per_layer = (int(pos[-1]) + 1) * 2 * c.kv_dim * b
    stats.weight_bytes += b * (deepest * projections + fill_reads * c.dim * 2 * c.kv_dim + head
                               + router_reads)
    stats.kv_bytes += deepest * kv_per_layer
    stats.full_bytes += b * (L * projections + head) + L * kv_per_layer


# ------------------------------------------------------------------------------------ exit policies


class Policy:
    """Decides, after layer i, which of the active tokens exit.

    decide() gets the layer's state (h, q, k, v) for the n active tokens: h [n, D] after
    the layer, q [n, D] and k, v [n, kv_dim] of the layer (before RoPE), and their
    positions pos [n]. It returns a bool tensor [n] (True = exit now), or None for
    "nobody exits". It is not asked before `min_layer`, nor after the last layer.
    macs() is its own work per token and layer asked, for the cost counters.
    """
    min_layer = 1

    def decide(self, model, i, pos, h, q, k, v):
        return None  # this base policy never exits: FullDepth

    def macs(self, c):
        return 0

    def work(self, c, pos, e):
        """Its MACs for tokens at pos [n] that exited at e [n]: asked at layers min_layer..min(e,
        L-1)."""
        return (e.clamp(max=c.n_layers - 1) - self.min_layer + 1).clamp(min=0).sum() * self.macs(c)

    def weights(self, c, pos, e):
        """Its weights read in a call: those its macs() multiply (a matrix-vector product reads
        each weight once), at each layer asked, up to the deepest of its tokens' exits e [n]
        (pos [n] as in work(), for policies that treat positions apart)."""
        return (e.max().clamp(max=c.n_layers - 1) - self.min_layer + 1).clamp(min=0) * self.macs(c)


class FullDepth(Policy):
    """Never exit: the plain model."""


class Static(Policy):
    """Every token exits at layer k."""
    def __init__(self, k, n_layers):
        check_range("static exit layer", k, 1, n_layers)
        self.k = self.min_layer = k

    def decide(self, model, i, pos, h, q, k, v):
        return torch.ones(len(pos), dtype=torch.bool, device=h.device) if i == self.k else None


class Confidence(Policy):
    """The gate of Shan et al.: exit when the shared head's max probability (or low entropy)
    says the token is settled.

    Evaluating the head costs D*vocab MACs per token and layer, counted as router work.
    """
    def __init__(self, threshold, min_layer=1, entropy=False, vocab_size=None):
        what, hi = ("entropy threshold (nats)", math.log(vocab_size)) if entropy else \
            ("confidence threshold", 1.0)
        check_range(what, threshold, 0.0, hi)
        self.threshold, self.min_layer, self.entropy = threshold, min_layer, entropy

    def decide(self, model, i, pos, h, q, k, v):
        logp = model.head(h).float().log_softmax(-1)
        if self.entropy:
            return -(logp.exp() * logp).sum(-1) <= self.threshold
        return logp.max(-1).values.exp() >= self.threshold

    def macs(self, c):
        return c.dim * c.vocab_size


class Router(torch.nn.Module):
    """One small MLP per layer, P(exit | state at layer i) = sigmoid(router(i, features)).

    Per layer rather than shared: the residual stream's statistics drift strongly with
    depth, and separate weights cost nothing at inference (only layer i's are read).
    Inputs are standardised with per-layer statistics from the training data.
    """
    FEATURES = "rmsnorm(h)|q|k|v"

    def __init__(self, c, hidden=32, n_features=None):
        super().__init__()
        P = lambda *s: torch.nn.Parameter(torch.zeros(*s))
        n_layers = c.n_layers
        n_features = n_features or c.dim + c.q_dim + 2 * c.kv_dim  # default: the token router's
        self.register_buffer("mu", torch.zeros(n_layers, n_features))
        self.register_buffer("sd", torch.ones(n_layers, n_features))
        self.w1, self.b1 = P(n_layers, n_features, hidden), P(n_layers, hidden)
        self.w2, self.b2 = P(n_layers, hidden), P(n_layers)
        torch.nn.init.normal_(self.w1, std=n_features ** -0.5)
        self.meta = {}

    def forward(self, i, x):
        """Exit logits [n] for features x [n, n_features] at layer i (1-based)."""
        z = (x - self.mu[i - 1]) / self.sd[i - 1]
        return F.gelu(z @ self.w1[i - 1] + self.b1[i - 1]) @ self.w2[i - 1] + self.b2[i - 1]

    def macs(self):
        return self.w1.shape[1] * self.w1.shape[2] + self.w2.shape[1]


def router_features(model, h, q, k, v):
    """The router's view of the state at a layer: rmsnorm(h) (no weight), then q, k, v
    [n, D + q_dim + 2 * kv_dim]; training reads the same."""
    x = F.rms_norm(h, (model.config.dim,), None, model.config.norm_eps)
    return torch.cat((x, q, k, v), dim=-1)


class RouterPolicy(Policy):
    """The learned ADEPT policy: exit when the router's P(exit) reaches the threshold τ.

    The threshold and minimum exit layer default to those the router file was trained with.
    """
    def __init__(self, router, threshold=None, min_layer=None):
        threshold = float(router.meta.get("threshold", 0.5)) if threshold is None else threshold
        check_range("router threshold", threshold, 0.0, 1.0)
        self.router, self.threshold = router, threshold
        self.min_layer = int(router.meta.get("min_layer", 1)) if min_layer is None else min_layer
        # sigmoid(z) >= τ is decided as z >= logit(τ): in float32 sigmoid reaches 1.0 above
        # z ~ 17, which would let a very sure token through τ = 1 (never exit); ±inf at τ = 1, 0
        self.logit = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else \
            (threshold - 0.5) * math.inf

    def decide(self, model, i, pos, h, q, k, v):
        return self.router(i, router_features(model, h, q, k, v)) >= self.logit

    def macs(self, c):
        return self.router.macs()


class PromptPolicy(Policy):
    """Prefill with two targets. Of a prompt token only the K/V are read, by the tokens after it;
    the read position (the last prompt token, whose output starts generation) is read itself.
    So tokens before position `read` exit by `prompt`, those from it on by `policy`, the decode
    policy."""
    def __init__(self, prompt, policy, read):
        self.prompt, self.policy, self.read = prompt, policy, read
        self.min_layer = min(prompt.min_layer, policy.min_layer)

    def decide(self, model, i, pos, h, q, k, v):
        n = int((pos < self.read).sum())  # the active positions ascend: the prompt's come first
        outs = [pol.decide(model, i, pos[s], h[s], q[s], k[s], v[s])
                if i >= pol.min_layer and len(pos[s]) else None
                for pol, s in ((self.prompt, slice(None, n)), (self.policy, slice(n, None)))]
        if outs[0] is None and outs[1] is None:
            return None
        return torch.cat([torch.zeros(m, dtype=torch.bool, device=h.device) if o is None else o
                          for o, m in zip(outs, (n, len(pos) - n))])

    def work(self, c, pos, e):
        r = pos >= self.read
        return self.prompt.work(c, pos[~r], e[~r]) + self.policy.work(c, pos[r], e[r])

    def weights(self, c, pos, e):
        r = pos >= self.read  # each policy up to its own tokens' deepest exit (0: none of them)
        return self.prompt.weights(c, pos, e * ~r) + self.policy.weights(c, pos, e * r)


# ----------------------------------------------------------------------------------- classification


def pooled(model, h):
    """A document's features: the mean over its tokens of rmsnorm(h) (no weight), h [..., n, D]."""
    return F.rms_norm(h, (model.config.dim,), None, model.config.norm_eps).mean(-2)


class ExitClassifier(torch.nn.Module):
    """One linear head per layer on a document's pooled features: logits over its labels.

    Early-exit classification (DeeBERT, PABEE, BERxiT) reads a small head at every layer, and the
    frozen model's intermediate layers already carry a document's label. Features are standardised
    with per-layer statistics of the training documents. `router` is the learned gate's Router
    (features | probabilities), or None.
    """
    def __init__(self, c, labels):
        super().__init__()
        L, D, C = c.n_layers, c.dim, len(labels)
        self.labels, self.router = list(labels), None
        self.register_buffer("mu", torch.zeros(L, D))
        self.register_buffer("sd", torch.ones(L, D))
        self.w = torch.nn.Parameter(torch.zeros(L, D, C))
        self.b = torch.nn.Parameter(torch.zeros(L, C))

    def forward(self, i, x):
        """Label logits [..., C] at layer i (1-based) for pooled features x [..., D]."""
        return ((x - self.mu[i - 1]) / self.sd[i - 1]) @ self.w[i - 1] + self.b[i - 1]


class Gate:
    """Says after layer i, from the document's pooled features x [D] and its head's label
    probabilities p [C], whether the label is settled. reset() starts a new document."""
    def reset(self):
        pass


class MaxProb(Gate):
    """The confidence gate: the label is settled when the head's top probability reaches τ."""
    def __init__(self, threshold):
        check_range("confidence threshold", threshold, 0.0, 1.0)
        self.threshold = threshold

    def settled(self, i, x, p):
        return float(p.max()) >= self.threshold


class Patience(Gate):
    """PABEE's gate: settled when the heads of k layers in a row give the same label."""
    def __init__(self, k):
        check_range("patience", k, 1, math.inf)
        self.k = k

    def reset(self):
        self.last, self.run = None, 0

    def settled(self, i, x, p):
        label = int(p.argmax())
        self.run, self.last = (self.run + 1 if label == self.last else 1), label
        return self.run >= self.k


class RouterGate(Gate):
    """ADEPT's learned gate: a Router on the document's features and its head's probabilities,
    trained with the preference reward (T = 1 where layer i's head gives full depth's label)."""
    def __init__(self, router, threshold):
        check_range("router threshold", threshold, 0.0, 1.0)
        self.router, self.threshold = router, threshold

    def settled(self, i, x, p):
        return float(torch.sigmoid(self.router(i, torch.cat((x, p))[None])[0])) >= self.threshold


class DocumentExit(Policy):
    """A document stops at the first layer where the gate says its label is settled: every token
    still running exits there. Before that, `tokens` (a token-level policy, or None) may let single
    tokens leave; they stay in the pool at their exit state, and their K/V at the layers still to
    run come from the fill. Asked from layer 1: the pool needs every exit."""
    def __init__(self, classifier, gate, tokens=None):
        self.classifier, self.gate, self.tokens = classifier, gate, tokens

    def decide(self, model, i, pos, h, q, k, v):
        x = F.rms_norm(h, (model.config.dim,), None, model.config.norm_eps)  # [n_active, D]
        if i == 1:  # a new document: every token is active
            self.n, self.exited = len(pos), 0
            self.gate.reset()
        pool = (self.exited + x.sum(0)) / self.n  # [D]: every token as it stands at layer i
        if self.gate.settled(i, pool, self.classifier(i, pool).float().softmax(-1).to(pool.dtype)):
            return torch.ones(len(pos), dtype=torch.bool, device=h.device)
        out = self.tokens.decide(model, i, pos, h, q, k, v) if self.tokens else None
        if out is not None:
            self.exited = self.exited + x[out].sum(0)
        return out

    def macs(self, c):
        """The head (D x labels) and router at each layer asked: the document's, not a token's."""
        return c.dim * len(self.classifier.labels) + (
            self.gate.router.macs() if isinstance(self.gate, RouterGate) else 0)

    def work(self, c, pos, e):
        """Pooling each active token (D), and macs() at each layer asked."""
        tokens = self.tokens.work(c, pos, e) if self.tokens else 0
        asked = e.max().clamp(max=c.n_layers - 1)
        return e.clamp(max=c.n_layers - 1).sum() * c.dim + asked * self.macs(c) + tokens

    def weights(self, c, pos, e):
        return super().weights(c, pos, e) + (self.tokens.weights(c, pos, e) if self.tokens else 0)


@torch.inference_mode()
def document_states(model, ids, policy, stats):
    """Run a document's tokens ids [n] until the policy has exited them all (FullDepth: at L;
    Static(k): at k; DocumentExit: where its gate settles): each token's exit state h [n, D], and
    the layer d the document is read at, the deepest exit. Nothing is filled above d: nobody
    reads it."""
    cache = model.new_cache(1, len(ids))
    h, e = forward_tokens(model, ids, 0, cache, policy, stats, logits=None, kv_fill="lazy")
    return h, int(e.max())


@torch.inference_mode()
def classify(model, classifier, ids, policy, stats):
    """A document's label probabilities [C] and the layer d its label was read at: the head of
    layer d reads the pooled exit states of all tokens, each as it stands at d."""
    h, d = document_states(model, ids, policy, stats)
    pool_and_head = model.config.dim * (len(classifier.labels) + len(ids))
    stats.head_macs += pool_and_head
    stats.full_macs += pool_and_head
    return classifier(d, pooled(model, h)).float().softmax(-1), d


def check_range(what, x, lo, hi):
    if not lo <= x <= hi:
        raise ValueError(f"{what} {x} is out of range; it must be in [{lo}, {hi}]")


# ---------------------------------------------------------------------- the forward pass with exits


# How the K/V of skipped layers are produced: ADEPT's batched fill, the layer-by-layer
# reference, lazily (each skipped layer only when a token still running reaches it: for a
# single pass whose cache nobody reads afterwards, as in classification), or not at all
# (the cache then masks those slots out: an ablation).
KV_FILLS = {"decoupled": fill_decoupled, "sequential": fill_sequential, "lazy": None, "none": None}


def forward_tokens(model, ids, start, cache, policy, stats, logits="last", kv_fill="decoupled"):
    """Run tokens ids [n] (one sequence) at positions start.. through the model with per-token exit.

    Only active tokens are computed at each layer; they attend causally to every
    earlier position's K/V at that layer, exited tokens' filled K/V included.
    Returns (out, exit_layer), exit_layer LongTensor [n]; out is the logits from the head at
    each token's exit layer, [vocab] for the last token (logits="last") or [n, vocab] ("all"),
    or with logits=None the tokens' exit hidden states [n, D] and no head at all.
    """
    L, n = model.config.n_layers, len(ids)
    pos = torch.arange(start, start + n, device=ids.device)
    mask = pos[:, None] >= torch.arange(start + n, device=ids.device)[None]  # [n, end]: causal
    exit_layer = torch.full((n,), L, dtype=torch.long, device=ids.device)
    h_exit = torch.empty(n, model.config.dim, dtype=model.tok_emb.dtype, device=ids.device)
    # The active tokens: their index among the n, positions, mask rows and h [1, n_active, D].
    # They change only when a token exits, so a layer nobody exits at costs no indexing.
    active, p, m, h = torch.arange(n, device=ids.device), pos, mask, model.tok_emb[ids][None]
    pending = []  # lazy fill: (h, pos, e) of exited tokens, filled as the others go on
    for i in range(1, L + 1):
        for h_e, p_e, e in pending:
            fill_layer(cache, model, h_e, p_e, e, i - 1)
        h, (q, k, v) = model.layer(i - 1, h, p, cache, m)
        if i == L or i < policy.min_layer:
            continue
        out = policy.decide(model, i, p, h[0], q[0], k[0], v[0])
        if out is None or not out.any():  # the one host-device sync per layer that early exit needs
            continue
        gone = active[out]
        exit_layer[gone] = i
        h_exit[gone] = h[0, out]
        if kv_fill == "lazy":
            pending.append((h[0, out], p[out], i))
        elif KV_FILLS[kv_fill]:
            KV_FILLS[kv_fill](cache, model, h[0, out], p[out], i)
        stay = ~out
        active, p, m, h = active[stay], p[stay], m[stay], h[:, stay]
        if len(active) == 0:
            break
    h_exit[active] = h[0]
    count(stats, model, policy, pos, exit_layer, {"all": n, "last": 1, None: 0}[logits], kv_fill)
    if logits is None:
        return h_exit, exit_layer
    return model.head(h_exit if logits == "all" else h_exit[-1]), exit_layer


# --------------------------------------------------------------------------------------- generation


def sample(logits, temperature=0.0, top_k=None, top_p=1.0, generator=None):
    """Next token from logits [vocab]: greedy at temperature 0, else sampling with top-k / top-p."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(descending=True)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def check_sampling(temperature, top_k, top_p, max_new_tokens):
    for name, x, ok, need in (
            ("temperature", temperature, 0 <= temperature < math.inf,
             "a finite number >= 0 (0 = greedy)"),
            ("top_k", top_k, top_k is None or top_k >= 1, ">= 1"),
            ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1")):
        if not ok:
            raise ValueError(f"{name} must be {need}, got {x}")


@dataclass
class Generation:
    tokens: list                      # generated token ids
    prompt_exit_layers: list          # exit layer of every prompt token
    exit_layers: list                 # exit layer of every generated token's step
    prefill: Stats = field(default_factory=Stats)
    decode: Stats = field(default_factory=Stats)
    prefill_s: float = 0.0
    decode_s: float = 0.0


@torch.inference_mode()  # no autograd bookkeeping at all: decode 5-7% faster than under no_grad
def generate(model, prompt_ids, max_new_tokens, policy=None, temperature=0.0, top_k=None,
             top_p=1.0, seed=None, eos_ids=(), on_token=None, kv_fill="decoupled",
             prompt_policy=None) -> Generation:
    """Prefill the prompt, then decode token by token, each token exiting where the policy says
    (in prefill, the tokens before the last exit by prompt_policy if one is given).

    on_token(token_id, exit_layer) is called as each token is produced (for streaming).
    The exit layer reported for a generated token is that of the step that produced
    it, i.e. the exit layer of the previous token's forward pass.
    """
    policy = policy or FullDepth()
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: there is nothing to continue")
    device = model.tok_emb.device
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens, mask_unwritten=kv_fill == "none")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = Generation([], [], [])
    t0 = time.perf_counter()
    prefill = PromptPolicy(prompt_policy, policy, len(prompt_ids) - 1) if prompt_policy else policy
    ids = torch.tensor(prompt_ids, device=device)
    logits, e = forward_tokens(model, ids, 0, cache, prefill, out.prefill, kv_fill=kv_fill)
    out.prompt_exit_layers = e.tolist()
    step_exit = int(e[-1])
    sync(device)
    out.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        out.tokens.append(token)
        out.exit_layers.append(step_exit)
        if on_token:
            on_token(token, step_exit)
        if token in eos_ids or step == max_new_tokens - 1:
            break
        ids = torch.tensor([token], device=device)
        logits, e = forward_tokens(model, ids, len(prompt_ids) + step, cache, policy, out.decode,
                                   kv_fill=kv_fill)
        step_exit = int(e[0])
    out.decode_s = time.perf_counter() - t0
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
