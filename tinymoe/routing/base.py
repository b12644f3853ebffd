"""The router interface: gate logits in, (expert ids, weights) out."""
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GateRule:
    """A family's own gate: fp32 softmax over all experts, top-k, optional renormalisation."""
    num_experts: int
    top_k: int
    renormalize: bool

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def weights(self, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        w = probs.gather(-1, ids)
        return w / w.sum(-1, keepdim=True) if self.renormalize else w


@dataclass
class RouteContext:
    """Per-MoE-layer context, persistent across forward passes (routers keep state here)."""
    layer: int
    num_layers: int
    rule: GateRule
    state: dict = field(default_factory=dict)


class Router:
    """Subclasses take keyword options only and implement `route`."""
    name = "?"

    def attach(self, block, calib: dict | None) -> None:
        """Called once per MoE block by `install`, before any `route`: read this layer's
        calibration tensors (or None), look at the block's gate/experts (routing engineer,
        additive)."""

    def route(self, logits: torch.Tensor, hidden: torch.Tensor, ctx: RouteContext):
        raise NotImplementedError


ROUTERS: dict[str, type[Router]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        ROUTERS[name] = cls
        return cls
    return deco
