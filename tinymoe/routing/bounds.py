"""The balance bounds (docs/routing.md, section 7): `balanced` (least-loaded first, scores only
break ties) and `random` (uniform experts). Both cost accuracy; they mark what balance can reach."""
import torch

from .base import Option, Router, register


@register("balanced")
class Balanced(Router):
    def route(self, logits, hidden, ctx):
        rule = ctx.rule
        E, k = rule.num_experts, rule.top_k
        probs = rule.probs(logits)
        # Experts in score order per token, so a stable sort by load keeps ties on the higher score.
        by_score = probs.argsort(dim=-1, descending=True, stable=True).tolist()
        load = [0] * E
        chosen = []
        for order in by_score:
            pick = sorted(order, key=load.__getitem__)[:k]
            for e in pick:
                load[e] += 1
            chosen.append(pick)
        ids = torch.tensor(chosen, dtype=torch.int64, device=probs.device).view(-1, k)
        return ids, rule.weights(probs, ids)


@register("random")
class Random(Router):
    OPTIONS = {"seed": Option("integer", 0, lo=0, hi=2**64 - 1)}  # torch.Generator's seed range

    def setup(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def route(self, logits, hidden, ctx):
        rule = ctx.rule
        probs = rule.probs(logits)
        noise = torch.rand(probs.shape, generator=self.generator).to(probs.device)
        ids = noise.topk(rule.top_k, dim=-1).indices  # k distinct experts, uniformly
        return ids, rule.weights(probs, ids)
