import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """The routed experts of one MoE layer, computed by grouping tokens per expert."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
        super().__init__()
        self.w_gate = nn.Parameter(w_gate, requires_grad=False)  # [E, I, D]
        self.w_up = nn.Parameter(w_up, requires_grad=False)      # [E, I, D]
        self.w_down = nn.Parameter(w_down, requires_grad=False)  # [E, D, I]

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // k
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token_of[start:start + n]
            xe = x[rows]
            h = F.silu(F.linear(xe, self.w_gate[e])) * F.linear(xe, self.w_up[e])
            ye = F.linear(h, self.w_down[e]) * weights.reshape(-1)[order[start:start + n], None]
            out.index_add_(0, rows, ye)
            start += n
        return out
