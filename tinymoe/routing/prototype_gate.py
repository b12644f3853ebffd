"""The latent-prototype gate (docs/routing.md, section 4): logits = cos(mu(x), P) / tau."""
import torch
import torch.nn.functional as F
from torch import nn


def prototype_scores(x, norm_weight, norm_bias, enc_weight, enc_bias, prototypes, eps=1e-5):
    """cos(mu, P) with mu = A SiLU(LayerNorm(x)) + a; fp32 throughout. [T, D] -> [T, E]."""
    h = F.layer_norm(x.float(), (x.shape[-1],), norm_weight.float(), norm_bias.float(), eps)
    mu = F.linear(F.silu(h), enc_weight.float(), enc_bias.float())
    return F.normalize(mu, dim=-1) @ F.normalize(prototypes.float(), dim=-1).T


class PrototypeGate(nn.Module):
    """A gate trained with latent prototype routing; used in place of the linear gate."""

    def __init__(self, hidden_size: int, num_experts: int, latent_dim: int, temperature: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.encoder = nn.Linear(hidden_size, latent_dim)
        self.prototypes = nn.Parameter(torch.empty(num_experts, latent_dim))
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = prototype_scores(x, self.norm.weight, self.norm.bias, self.encoder.weight,
                             self.encoder.bias, self.prototypes, self.norm.eps)
        return s / self.temperature
