import torch

from .base import Router, register


@register("topk")
class TopK(Router):
    """The model's own gate, bit for bit: top-k of the softmax, weights by the family rule."""

    def route(self, logits, hidden, ctx):
        probs = ctx.rule.probs(logits)
        # the lower expert on a tie, as the native decode step (torch.topk breaks ties its own way)
        ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :ctx.rule.top_k]
        return ids, ctx.rule.weights(probs, ids)
