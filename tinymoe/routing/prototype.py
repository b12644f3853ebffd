"""Latent prototype routing (docs/routing.md, section 4): top-k by cos(mu(x), P). Parameters come
from the model's own prototype gate when it was trained with one (`models.prototype_gate`, which
computes its logits with `prototype_scores` below), else from a calibration file fitted post hoc
(calibrate.fit_prototypes)."""
import torch
import torch.nn.functional as F

from .base import Option, Router, register
from .topk import TopK


def prototype_scores(x, norm_weight, norm_bias, enc_weight, enc_bias, prototypes, eps=1e-5):
    """cos(mu, P) with mu = A SiLU(LayerNorm(x)) + a; fp32 throughout. [T, D] -> [T, E]."""
    h = F.layer_norm(x.float(), (x.shape[-1],), norm_weight.float(), norm_bias.float(), eps)
    mu = F.linear(F.silu(h), enc_weight.float(), enc_bias.float())
    return F.normalize(mu, dim=-1) @ F.normalize(prototypes.float(), dim=-1).T

KEYS = ("proto.norm.weight", "proto.norm.bias", "proto.encoder.weight", "proto.encoder.bias",
        "proto.prototypes")


@register("prototype")
class Prototype(Router):
    """Options: weights="model" (the family rule on the gate's p of the chosen experts) or
    "prototype" (softmax over the chosen s / tau)."""

    OPTIONS = {"weights": Option("choice", "model", choices=("model", "prototype"))}

    def setup(self):
        self.params = None

    def attach(self, block, calib):
        if getattr(block.gate, "is_prototype_gate", False):
            self.params = None  # the gate's logits already are cos(mu, P) / tau
            return
        if calib is None or any(key not in calib for key in KEYS):
            raise ValueError("prototype needs fitted prototypes for a model trained without them "
                             "(run `tinymoe calibrate`, then pass --calib FILE)")
        self.params = [calib[key] for key in KEYS]
        self.tau = float(calib.get("proto.temperature", torch.tensor(1.0)))

    def route(self, logits, hidden, ctx):
        rule = ctx.rule
        if self.params is None:  # a trained prototype gate: its own top-k is the routing
            return TopK().route(logits, hidden, ctx)
        params = [t.to(hidden.device) for t in self.params]
        s = prototype_scores(hidden, *params)
        ids = s.topk(rule.top_k, dim=-1).indices
        if self.weights == "prototype":
            return ids, torch.softmax(s.gather(-1, ids) / self.tau, dim=-1)
        return ids, rule.weights(rule.probs(logits), ids)
