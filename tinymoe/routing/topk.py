import torch

from .base import Router, register


@register("topk")
class TopK(Router):
    """The model's own gate, bit for bit: top-k of the softmax, weights by the family rule."""

    def route(self, logits, hidden, ctx):
        probs = ctx.rule.probs(logits)
        ids = torch.topk(probs, ctx.rule.top_k, dim=-1).indices
        return ids, ctx.rule.weights(probs, ids)
