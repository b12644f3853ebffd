"""Latent prototype routing (docs/routing.md, section 4): top-k by cos(mu(x), P). Parameters come
from the model's own PrototypeGate when it was trained with one, else from a calibration file
fitted post hoc (calibrate.fit_prototypes)."""
import torch

from .base import Option, Router, register
from .prototype_gate import PrototypeGate, prototype_scores
from .topk import TopK

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
        if isinstance(block.gate, PrototypeGate):
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
