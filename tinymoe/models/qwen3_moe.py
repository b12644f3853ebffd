"""Qwen3-MoE: 128 experts top-8, renormalised iff norm_topk_prob, RMSNorm on q and k per head."""
from .layout import Layout

LAYOUT = Layout(moe_prefix="mlp", expert_names=("gate_proj", "up_proj", "down_proj"))
