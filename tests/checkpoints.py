"""Tiny random checkpoints in the exact Hugging Face layout of each family, for tests."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def mixtral(path: Path, shard: bool = False, **overrides) -> Path:
    """Written by transformers' MixtralForCausalLM; `shard=True` splits it into several files."""
    from transformers import MixtralConfig, MixtralForCausalLM
    kw = dict(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, num_local_experts=6,
              num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    kw.update(overrides)
    torch.manual_seed(kw.pop("seed", 0))
    model = MixtralForCausalLM(MixtralConfig(**kw)).eval()
    _perturb_norms(model)
    model.save_pretrained(path, max_shard_size="40KB" if shard else "2GB")
    return Path(path)


def qwen3_moe(path: Path, shard: bool = False, **overrides) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    kw = dict(vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, max_position_embeddings=512,
              mlp_only_layers=[1], decoder_sparse_step=1)
    kw.update(overrides)
    torch.manual_seed(kw.pop("seed", 0))
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw)).eval()
    _perturb_norms(model)
    model.save_pretrained(path, max_shard_size="40KB" if shard else "2GB")
    return Path(path)


def _perturb_norms(model):
    # Norm weights start at one; random ones make the comparison see a swapped or missed norm.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


DEEPSEEK_CONFIG = dict(
    architectures=["DeepseekForCausalLM"], model_type="deepseek", vocab_size=96, hidden_size=48,
    intermediate_size=80, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, n_routed_experts=12, n_shared_experts=2, num_experts_per_tok=4,
    first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax",
    rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, torch_dtype="float32")


def deepseek_moe(path: Path, **overrides) -> Path:
    """DeepSeek-MoE v1 with its published tensor names (transformers has no class for it)."""
    cfg = {**DEEPSEEK_CONFIG, **overrides}
    g = torch.Generator().manual_seed(cfg.pop("seed", 0))
    D, V, I, M = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["moe_intermediate_size"]
    hd = D // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    S = cfg["n_shared_experts"] * M

    def w(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    t = {"model.embed_tokens.weight": w(V, D, scale=1.0), "model.norm.weight": 1 + w(D), "lm_head.weight": w(V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + w(D), p + "post_attention_layernorm.weight": 1 + w(D),
                  p + "self_attn.q_proj.weight": w(D, D), p + "self_attn.k_proj.weight": w(kv, D),
                  p + "self_attn.v_proj.weight": w(kv, D), p + "self_attn.o_proj.weight": w(D, D)})
        if i < cfg["first_k_dense_replace"]:
            t.update({p + "mlp.gate_proj.weight": w(I, D), p + "mlp.up_proj.weight": w(I, D),
                      p + "mlp.down_proj.weight": w(D, I)})
            continue
        t[p + "mlp.gate.weight"] = w(cfg["n_routed_experts"], D, scale=0.5)
        for e in range(cfg["n_routed_experts"]):
            t.update({f"{p}mlp.experts.{e}.gate_proj.weight": w(M, D), f"{p}mlp.experts.{e}.up_proj.weight": w(M, D),
                      f"{p}mlp.experts.{e}.down_proj.weight": w(D, M)})
        t.update({p + "mlp.shared_experts.gate_proj.weight": w(S, D), p + "mlp.shared_experts.up_proj.weight": w(S, D),
                  p + "mlp.shared_experts.down_proj.weight": w(D, S)})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path
