"""The gate of checkpoints trained with latent prototype routing (docs/DESIGN.md, "Checkpoints
trained with latent prototype routing"): logits = cos(mu(x), P) / tau. The module and its
weights are the model's; the score function is routing's (`routing.prototype.prototype_scores`),
which the post-hoc prototype router and calibration use too."""
import torch
from torch import nn

from ..routing.prototype import prototype_scores


class PrototypeGate(nn.Module):
    """Used in place of the linear gate; its logits already are the prototype router's scores
    over tau, which `is_prototype_gate` tells the router (routing never imports models)."""

    is_prototype_gate = True

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
