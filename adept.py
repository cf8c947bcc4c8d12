"""ADEPT: token-level early exit in prefill and in decode (see ../shared/ADEPT.md §3).

The whole mechanism is `forward_tokens`: it runs a set of tokens through the layers,
and after each layer asks an exit policy which of the still-active tokens leave. A
token that exits after layer e gets the K/V of layers e+1..L filled from h_e in one
batched operation (kv_cache.fill_decoupled) and predicts with the shared head at e.
Prefill is `forward_tokens` over the prompt; a decode step is `forward_tokens` over one
token. Full depth is the `FullDepth` policy, which never exits.

Layers are counted from 1 here: "exit at layer e" means layers 1..e ran (blocks
0..e-1 in model.py) and e = L is full depth.
"""
import math
import time
from pathlib import Path
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kv_cache import fill_decoupled, fill_sequential
from checkpoint import model_id, read_artifact
from model import UserError

# ----------------------------------------------------------------------------- cost accounting


@dataclass
class Stats:
    """Work done, in multiply-accumulates (MACs), split by where it went."""
    tokens: int = 0
    layers: int = 0          # sum over tokens of layers computed (= exit layers)
    layer_macs: int = 0      # projections, MLP and attention of computed layers
    router_macs: int = 0     # the exit policy's own work (a router, or the head for a confidence gate)
    fill_macs: int = 0       # K/V projections of skipped layers
    head_macs: int = 0       # the LM head that produces the token's logits
    full_macs: int = 0       # what full depth would have cost the same tokens

    @property
    def total_macs(self):
        return self.layer_macs + self.router_macs + self.fill_macs + self.head_macs

    @property
    def mean_exit_layer(self):
        return self.layers / max(self.tokens, 1)

    @property
    def saved(self):
        """Fraction of full-depth compute saved (negative when the policy costs more than it saves)."""
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
    policy at layers min_layer..min(e_j, L-1), and had layers e_j+1..L filled.
    """
    c, L, e = model.config, model.config.n_layers, exit_layer
    per_layer = c.dim * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.dim + 3 * c.dim * c.ffn_dim + 2 * c.q_dim * (pos + 1)  # [n]
    layers, layer_work, router_work, skipped, full = torch.stack(  # one read-back for all five
        [e.sum(), (e * per_layer).sum(), policy.work(c, pos, e), (L - e).sum(), L * per_layer.sum()]).tolist()
    heads = n_logits * c.dim * c.vocab_size
    stats.tokens += len(e)
    stats.layers += layers
    stats.layer_macs += layer_work
    stats.router_macs += router_work
    stats.fill_macs += skipped * c.dim * 2 * c.kv_dim if fill else 0
    stats.head_macs += heads
    stats.full_macs += full + heads


# ----------------------------------------------------------------------------- exit policies


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
        """Its MACs for tokens at pos [n] that exited at e [n]: asked at layers min_layer..min(e, L-1)."""
        return (e.clamp(max=c.n_layers - 1) - self.min_layer + 1).clamp(min=0).sum() * self.macs(c)


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
    """Paper 2's gate: exit when the shared head's max probability (or low entropy) says the token is settled.

    Evaluating the head costs D*vocab MACs per token and layer, counted as router work.
    """
    def __init__(self, threshold, min_layer=1, entropy=False, vocab_size=None):
        what, hi = ("entropy threshold (nats)", math.log(vocab_size)) if entropy else ("confidence threshold", 1.0)
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

    def __init__(self, c, hidden=32):
        super().__init__()
        P = lambda *s: torch.nn.Parameter(torch.zeros(*s))
        n_layers, n_features, self.dim = c.n_layers, c.dim + c.q_dim + 2 * c.kv_dim, c.dim
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

    @torch.no_grad()
    def folded(self):
        """Per layer (w1, b1, w2, b2) for inference, with the constants folded into the weights once:
        the standardisation, (x - mu) / sd @ w1 + b1 = x @ (w1 / sd) + (b1 - (mu / sd) @ w1); the √D of
        rmsnorm(h) = √D·h / |h| (up to its ε); and GELU's, x·Φ(x) = (u + u·erf(u)) / √2 with u = x / √2.
        Five small operations fewer per layer (RouterPolicy.decide), and a Python list, whose indexing is
        free where a tensor's is an op."""
        w1 = self.w1 / self.sd[..., None]
        b1 = self.b1 - torch.einsum("lf,lfh->lh", self.mu / self.sd, self.w1)
        w1[:, :self.dim] *= self.dim ** 0.5
        return list(zip(w1 * 0.5 ** 0.5, b1 * 0.5 ** 0.5, self.w2 * 0.5 ** 0.5, self.b2))

    def macs(self):
        return self.w1.shape[1] * self.w1.shape[2] + self.w2.shape[1]

    def save(self, path, meta):
        from safetensors.torch import save_file
        self.meta = {k: str(v) for k, v in meta.items()} | {"features": self.FEATURES, "hidden": str(self.w2.shape[1])}
        save_file({k: t.detach().float().cpu().contiguous() for k, t in self.state_dict().items()}, str(path), metadata=self.meta)

    @classmethod
    def load(cls, path, model):
        """Load a router file, refusing one trained for other weights or with other features."""
        meta, tensors = read_artifact(path, "router", "train one for this model with train_exits.py or pass --exits PATH", model)
        if meta.get("features") != cls.FEATURES:
            raise UserError(f"router {path} uses features {meta.get('features')!r}; this code computes {cls.FEATURES!r}")
        try:
            router = cls(model.config, int(meta["hidden"]))
            ok = int(meta["hidden"]) >= 1 and 0 <= float(meta["threshold"]) <= 1 and 1 <= int(meta.get("min_layer", 1)) <= model.config.n_layers
        except (KeyError, ValueError, RuntimeError):
            ok = False
        if not ok:
            raise UserError(f"{path} has malformed metadata (hidden {meta.get('hidden')!r}, threshold {meta.get('threshold')!r}, "
                            f"min_layer {meta.get('min_layer')!r}); retrain it")
        want = {k: tuple(t.shape) for k, t in router.state_dict().items()}
        for k in want.keys() | tensors.keys():
            if k not in tensors or want.get(k) != tuple(tensors[k].shape):
                raise UserError(f"{path} is damaged: tensor {k} is {tuple(tensors[k].shape) if k in tensors else 'missing'}, "
                                f"not of shape {want.get(k)} as this model needs; retrain it")
        router.load_state_dict(tensors)
        router.meta = meta
        return router.to(model.tok_emb.device, model.tok_emb.dtype)


class RouterPolicy(Policy):
    """The learned ADEPT policy: exit when the router's P(exit) reaches the threshold τ.

    The threshold and minimum exit layer default to those the router file was trained with.
    """
    def __init__(self, router, threshold=None, min_layer=None):
        threshold = float(router.meta.get("threshold", 0.5)) if threshold is None else threshold
        check_range("router threshold", threshold, 0.0, 1.0)
        self.router, self.threshold = router, threshold
        self.min_layer = int(router.meta.get("min_layer", 1)) if min_layer is None else min_layer
        self.layers = router.folded()
        self.logit = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else (threshold - 0.5) * math.inf  # ±inf at 1, 0

    def decide(self, model, i, pos, h, q, k, v):
        """The router's logit z with its constants folded (Router.folded); sigmoid(z) >= threshold is
        decided as z >= logit(threshold): no sigmoid per layer."""
        w1, b1, w2, b2 = self.layers[i - 1]
        u = torch.addmm(b1, torch.cat((h / torch.linalg.vector_norm(h, dim=-1, keepdim=True), q, k, v), dim=-1), w1)
        return torch.addmv(b2, torch.addcmul(u, u, torch.erf(u)), w2) >= self.logit

    def macs(self, c):
        return self.router.macs()


class PromptPolicy(Policy):
    """Prefill with two targets. Of a prompt token only the K/V are read, by the tokens after it;
    the read position (the last prompt token, whose output starts generation) is read itself.
    So tokens before position `read` exit by `prompt`, those from it on by `policy`, the decode policy."""
    def __init__(self, prompt, policy, read):
        self.prompt, self.policy, self.read = prompt, policy, read
        self.min_layer = min(prompt.min_layer, policy.min_layer)

    def decide(self, model, i, pos, h, q, k, v):
        n = int((pos < self.read).sum())  # the active positions ascend: the prompt's come first
        outs = [pol.decide(model, i, pos[s], h[s], q[s], k[s], v[s]) if i >= pol.min_layer and len(pos[s]) else None
                for pol, s in ((self.prompt, slice(None, n)), (self.policy, slice(n, None)))]
        if outs[0] is None and outs[1] is None:
            return None
        return torch.cat([torch.zeros(m, dtype=torch.bool, device=h.device) if o is None else o
                          for o, m in zip(outs, (n, len(pos) - n))])

    def work(self, c, pos, e):
        r = pos >= self.read
        return self.prompt.work(c, pos[~r], e[~r]) + self.policy.work(c, pos[r], e[r])


def check_range(what, x, lo, hi):
    if not lo <= x <= hi:
        raise UserError(f"{what} {x} is out of range; it must be in [{lo}, {hi}]")


# ----------------------------------------------------------------------------- the forward pass with exits


# How the K/V of skipped layers are produced: ADEPT's batched fill, the layer-by-layer
# reference, or not at all (the cache then masks those slots out: an ablation).
KV_FILLS = {"decoupled": fill_decoupled, "sequential": fill_sequential, "none": None}


def forward_tokens(model, ids, start, cache, policy, stats, all_logits=False, kv_fill="decoupled"):
    """Run tokens ids [n] (batch of one sequence) at positions start.. through the model with per-token exit.

    Only active tokens are computed at each layer; they attend causally to every
    earlier position's K/V at that layer, exited tokens' filled K/V included.
    Returns (logits, exit_layer): logits [n, vocab] if all_logits else [vocab] for the
    last token, each from the head at its token's exit layer; exit_layer LongTensor [n].
    """
    L, n = model.config.n_layers, len(ids)
    pos = torch.arange(start, start + n, device=ids.device)
    mask = pos[:, None] >= torch.arange(start + n, device=ids.device)[None]  # [n, end]: causal
    exit_layer = torch.full((n,), L, dtype=torch.long, device=ids.device)
    h_exit = torch.empty(n, model.config.dim, dtype=model.tok_emb.dtype, device=ids.device)
    # The active tokens: their index among the n, positions, mask rows and h [1, n_active, D].
    # They change only when a token exits, so a layer nobody exits at costs no indexing.
    active, p, m, h = torch.arange(n, device=ids.device), pos, mask, model.tok_emb[ids][None]
    for i in range(1, L + 1):
        h, (q, k, v) = model.layer(i - 1, h, p, cache, m)
        if i == L or i < policy.min_layer:
            continue
        out = policy.decide(model, i, p, h[0], q[0], k[0], v[0])
        if out is None or not out.any():  # the one host-device sync per layer that early exit needs
            continue
        gone = active[out]
        exit_layer[gone] = i
        h_exit[gone] = h[0, out]
        if KV_FILLS[kv_fill]:
            KV_FILLS[kv_fill](cache, model, h[0, out], p[out], i)
        stay = ~out
        active, p, m, h = active[stay], p[stay], m[stay], h[:, stay]
        if len(active) == 0:
            break
    h_exit[active] = h[0]
    count(stats, model, policy, pos, exit_layer, n if all_logits else 1, KV_FILLS[kv_fill])
    return (model.head(h_exit) if all_logits else model.head(h_exit[-1])), exit_layer


# ----------------------------------------------------------------------------- generation


def sample(logits, temperature=0.0, top_k=None, top_p=1.0, generator=None):
    """Next token from logits [vocab]: greedy at temperature 0, else softmax sampling with top-k / top-p."""
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
    for flag, x, ok, need in (("--temperature", temperature, 0 <= temperature < math.inf, "a finite number >= 0 (0 = greedy)"),
                              ("--top-k", top_k, top_k is None or top_k >= 1, ">= 1"),
                              ("--top-p", top_p, 0 < top_p <= 1, "in (0, 1]"),
                              ("--max-new-tokens", max_new_tokens, max_new_tokens >= 1, ">= 1")):
        if not ok:
            raise UserError(f"{flag} must be {need}, got {x}")


@dataclass
class Generation:
    tokens: list                      # generated token ids
    prompt_exit_layers: list          # exit layer of every prompt token
    exit_layers: list                 # exit layer of every generated token's step
    prefill: Stats = field(default_factory=Stats)
    decode: Stats = field(default_factory=Stats)
    prefill_s: float = 0.0
    decode_s: float = 0.0


@torch.inference_mode()  # no autograd bookkeeping at all: decode 5-7% faster than under no_grad (docs/RESULTS.md)
def generate(model, prompt_ids, max_new_tokens, policy=None, temperature=0.0, top_k=None, top_p=1.0,
             seed=None, eos_ids=(), on_token=None, kv_fill="decoupled", prompt_policy=None) -> Generation:
    """Prefill the prompt, then decode token by token, each token exiting where the policy says
    (in prefill, the tokens before the last exit by prompt_policy if one is given).

    on_token(token_id, exit_layer) is called as each token is produced (for streaming).
    The exit layer reported for a generated token is that of the step that produced
    it, i.e. the exit layer of the previous token's forward pass.
    """
    policy = policy or FullDepth()
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if len(prompt_ids) == 0:
        raise UserError("the prompt is empty; give some text with --prompt")
    device = model.tok_emb.device
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens, mask_unwritten=kv_fill == "none")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = Generation([], [], [])
    t0 = time.perf_counter()
    prefill = PromptPolicy(prompt_policy, policy, len(prompt_ids) - 1) if prompt_policy else policy
    logits, e = forward_tokens(model, torch.tensor(prompt_ids, device=device), 0, cache, prefill, out.prefill, kv_fill=kv_fill)
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
        logits, e = forward_tokens(model, torch.tensor([token], device=device), len(prompt_ids) + step, cache, policy,
                                   out.decode, kv_fill=kv_fill)
        step_exit = int(e[0])
    out.decode_s = time.perf_counter() - t0
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


DEFAULT_EXITS = Path(__file__).resolve().parent / "exits" / "smollm2-135m-instruct.safetensors"
DEFAULT_FILL = DEFAULT_EXITS.with_suffix(".fill.safetensors")


def load_fill(model, path=None):
    """Calibrate the model's KV fill (kv_cache.py) with a file from train_exits.py --calibrate; 'plain' leaves
    the fill uncorrected; None takes the shipped file where it was measured on this model's weights, else plain."""
    shipped, path = path is None, DEFAULT_FILL if path is None else path
    fix = "make one with train_exits.py --calibrate or pass --fill plain"
    if str(path) == "plain" or (shipped and not path.is_file()):
        model.fill_mu = None
        return model
    meta, tensors = read_artifact(path, "fill calibration", fix, None if shipped else model)
    if meta.get("base_model") != model_id(model):  # the shipped calibration belongs to another model
        return load_fill(model, "plain")
    mu, want = tensors.get("mu"), (model.config.n_layers + 1, model.config.dim)
    if mu is None or tuple(mu.shape) != want:
        raise UserError(f"{path} is damaged: it needs a tensor mu of shape {want}; {fix}")
    model.fill_mu = mu.to(model.tok_emb.device, model.tok_emb.dtype)
    return model


# Each policy of the command line, with the settings it uses.
POLICIES = {"router": ("threshold", "min_layer", "exits"), "confidence": ("threshold", "min_layer"),
            "entropy": ("threshold", "min_layer"), "static": ("exit_layer",), "full": ()}


def make_policy(name, model, threshold=None, min_layer=None, exit_layer=None, exits=None):
    """Build a policy from command-line settings; None = the policy's default. A setting the chosen
    policy does not use is an error, not silently ignored."""
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    for flag, value in {"threshold": threshold, "min_layer": min_layer, "exit_layer": exit_layer, "exits": exits}.items():
        if value is not None and flag not in POLICIES[name]:
            raise UserError(f"--{flag.replace('_', '-')} does nothing with --policy {name}; "
                            f"drop it{' (static exits every token at --exit-layer)' if name == 'static' else ''}")
    L = model.config.n_layers
    if min_layer is not None:
        check_range("--min-layer", min_layer, 1, L)
    if name == "router":
        return RouterPolicy(Router.load(exits or DEFAULT_EXITS, model), threshold, min_layer)
    if name == "full":
        return FullDepth()
    if name == "static":
        return Static(min(24, L) if exit_layer is None else exit_layer, L)
    default = 0.9 if name == "confidence" else 0.5
    return Confidence(default if threshold is None else threshold, min_layer or 1, name == "entropy", model.config.vocab_size)
