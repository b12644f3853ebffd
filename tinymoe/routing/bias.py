"""Auxiliary-loss-free balancing applied online (docs/routing.md, section 6, after DeepSeek-V3):
select top-k of p + b, weight by the unbiased p, nudge b towards the mean load after each pass."""
import torch

from .base import Option, Router, register


@register("bias")
class Bias(Router):
    OPTIONS = {"gamma": Option("number", 1e-3, lo=0)}  # the bias step per pass

    def attach(self, block, calib):
        start = getattr(block.gate, "e_score_correction_bias", None)
        if start is not None:
            block.ctx.state["bias"] = start.detach().float().clone()

    def route(self, logits, hidden, ctx):
        rule = ctx.rule
        probs = rule.probs(logits)
        bias = ctx.state.get("bias")
        if bias is None:
            bias = ctx.state["bias"] = torch.zeros(rule.num_experts, device=probs.device)
        ids = (probs + bias).topk(rule.top_k, dim=-1).indices
        load = torch.bincount(ids.reshape(-1), minlength=rule.num_experts).float()
        bias += self.gamma * torch.sign(load.mean() - load)  # route() runs once per layer per pass
        return ids, rule.weights(probs, ids)
