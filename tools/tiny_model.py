"""The training-side model of the tiny MoE checkpoints (autograd, aux losses, LPR regularisers).

Module names follow the Hugging Face checkpoints, so `state_dict()` keys are the published
tensor names (Mixtral: `block_sparse_moe.{gate,experts.E.w1/w2/w3}`; DeepSeek-MoE:
`mlp.{gate,experts.E.*_proj,shared_experts.*_proj}`). Inference lives in tinymoe/models;
this copy exists for training and as an independent reference for the shipped weights.
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TinyConfig:
    name: str
    family: str                   # "mixtral" | "deepseek"
    router: str = "softmax"       # "softmax" | "prototype" (latent prototype routing)
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 384  # Mixtral expert width; DeepSeek dense-layer width
    moe_intermediate_size: int = 0  # DeepSeek routed-expert width
    num_experts: int = 8
    top_k: int = 2
    num_shared: int = 0
    first_dense: int = 0
    renormalize: bool = True
    rope_theta: float = 1e6
    rms_eps: float = 1e-5
    aux_coef: float = 1e-3        # switch load-balancing loss (softmax routers only)
    # Latent prototype routing (docs/routing.md, section 4: trained with the model).
    latent_dim: int = 16
    tau: float = 0.1
    lambda_r: float = 0.01
    beta_div: float = 1.0
    beta_kl: float = 0.01
    beta_align: float = 0.1
    max_positions: int = 1024

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


MODELS = {
    "tiny-mixtral": TinyConfig("tiny-mixtral", "mixtral"),
    "tiny-lpr": TinyConfig("tiny-lpr", "mixtral", router="prototype"),
    "tiny-deepseek": TinyConfig(
        "tiny-deepseek", "deepseek", intermediate_size=768, moe_intermediate_size=96,
        num_experts=32, top_k=6, num_shared=2, first_dense=1, renormalize=False,
        rope_theta=1e4, rms_eps=1e-6),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(cfg: TinyConfig, positions: torch.Tensor):
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    ang = positions.float()[:, None] * inv[None]
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    # Hugging Face "rotate_half" convention: pairs are (i, i + hd/2).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        D, H, KV, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, KV * hd, bias=False)
        self.v_proj = nn.Linear(D, KV * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, T, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(B, T, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(B, T, c.num_kv_heads, c.head_dim)
        cs, sn = cos[:, None], sin[:, None]  # [T, 1, hd/2]
        q, k = apply_rope(q, cs, sn), apply_rope(k, cs, sn)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        rep = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MixtralExpert(nn.Module):
    def __init__(self, D: int, I: int):
        super().__init__()
        self.w1 = nn.Linear(D, I, bias=False)  # gate
        self.w2 = nn.Linear(I, D, bias=False)  # down
        self.w3 = nn.Linear(D, I, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MLP(nn.Module):
    def __init__(self, D: int, I: int):
        super().__init__()
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PrototypeGate(nn.Module):
    """mu = A SiLU(LN(x)) + a; scores cos(mu, P) / tau. `logvar` is training-only (not shipped)."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        D, d, E = cfg.hidden_size, cfg.latent_dim, cfg.num_experts
        self.tau = cfg.tau
        self.norm = nn.LayerNorm(D, eps=1e-5)
        self.encoder = nn.Linear(D, d)
        self.logvar = nn.Linear(D, d)
        self.prototypes = nn.Parameter(torch.randn(E, d))
        # Start with little latent noise so routing means something from the first steps.
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, -4.0)

    def latent(self, x):
        h = F.silu(self.norm(x))
        return self.encoder(h), self.logvar(h)

    def scores(self, z):
        return F.normalize(z, dim=-1, eps=1e-6) @ F.normalize(self.prototypes, dim=-1, eps=1e-6).t() / self.tau


class MoE(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        D, E = cfg.hidden_size, cfg.num_experts
        if cfg.router == "prototype":
            self.gate = PrototypeGate(cfg)
        else:
            self.gate = nn.Linear(D, E, bias=False)
        if cfg.family == "mixtral":
            self.experts = nn.ModuleList(MixtralExpert(D, cfg.intermediate_size) for _ in range(E))
        else:
            self.experts = nn.ModuleList(MLP(D, cfg.moe_intermediate_size) for _ in range(E))
        self.shared_experts = MLP(D, cfg.num_shared * cfg.moe_intermediate_size) if cfg.num_shared else None
        self.aux = torch.zeros(())
        self.last_ids = None

    def route(self, x):
        """(ids [N,k], weights [N,k], aux loss) for tokens x [N,D]."""
        c = self.cfg
        if c.router == "prototype":
            mu, logvar = self.gate.latent(x)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
            s = self.gate.scores(z)
            top, ids = s.topk(c.top_k, dim=-1)
            w = top.softmax(-1)  # = Mixtral rule (softmax, top-k, renormalise) on logits s
            aux = self.lpr_loss(mu, logvar, z, ids, w) if self.training else s.new_zeros(())
            return ids, w, aux
        p = self.gate(x).float().softmax(-1)
        w, ids = p.topk(c.top_k, dim=-1)
        if c.renormalize:
            w = w / w.sum(-1, keepdim=True)
        aux = p.new_zeros(())
        if self.training and c.aux_coef:
            frac = torch.zeros_like(p).scatter_add_(1, ids, torch.ones_like(w)).mean(0) / c.top_k
            aux = c.aux_coef * c.num_experts * (frac * p.mean(0)).sum()
        return ids, w, aux

    def lpr_loss(self, mu, logvar, z, ids, w):
        c, P = self.cfg, self.gate.prototypes
        E = c.num_experts

        def gram_off(v):
            v = F.normalize(v, dim=-1, eps=1e-6)
            g = v @ v.t()
            return (g - torch.eye(len(v), device=v.device)).pow(2).sum() / len(v) ** 2

        sub = mu[torch.randperm(len(mu), device=mu.device)[:256]]
        l_div = gram_off(P) + gram_off(sub)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1).mean()
        A = torch.zeros(len(z), E, device=z.device).scatter(1, ids, w.float())
        target = (A.t() @ z) / (A.sum(0)[:, None] + 1e-6)  # weighted mean latent per expert
        l_align = (P - target.detach()).abs().mean()
        return c.lambda_r * (c.beta_div * l_div + c.beta_kl * kl + c.beta_align * l_align)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, w, self.aux = self.route(x)
        self.last_ids = ids.detach()
        out = torch.zeros_like(x)
        flat = ids.reshape(-1)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.cfg.num_experts).tolist()
        tok = order // self.cfg.top_k
        wt = w.reshape(-1)[order].to(x.dtype)
        start = 0
        for e, n in enumerate(counts):
            if n:
                t = tok[start:start + n]
                out.index_add_(0, t, self.experts[e](x[t]) * wt[start:start + n, None])
            start += n
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        if cfg.family == "mixtral":
            self.block_sparse_moe = MoE(cfg)
        elif layer < cfg.first_dense:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        else:
            self.mlp = MoE(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + ffn(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)


class TinyMoE(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "prototypes" not in name and "logvar" not in name:
                nn.init.normal_(p, std=0.02)
        for name, p in self.named_parameters():  # scale residual outputs by depth (GPT-2)
            if name.endswith(("o_proj.weight", "w2.weight", "down_proj.weight")):
                p.data.mul_((2 * cfg.num_layers) ** -0.5)

    def moe_blocks(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, ids):
        T = ids.shape[1]
        cos, sin = rope_tables(self.cfg, torch.arange(T, device=ids.device))
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def aux_loss(self):
        return sum(m.aux for m in self.moe_blocks())
