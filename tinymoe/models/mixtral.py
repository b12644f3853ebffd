"""Mixtral: 8 experts, top-2, renormalised softmax weights, no shared experts."""
from .layout import Layout

LAYOUT = Layout(moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"))
