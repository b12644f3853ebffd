"""DeepSeek-MoE v1 (16b): dense first layer, 64 fine-grained experts top-6 with weights NOT
renormalised, and shared experts stored as one always-on MLP named `shared_experts`."""
from .layout import Layout

LAYOUT = Layout(moe_prefix="mlp", expert_names=("gate_proj", "up_proj", "down_proj"))
