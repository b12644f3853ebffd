"""One normalised ModelConfig for every supported family, read from a checkpoint's config.json."""
import json
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = {
    "MixtralForCausalLM": "mixtral",
    "DeepseekForCausalLM": "deepseek_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int          # dense MLP width
    moe_intermediate_size: int      # width of one routed expert
    num_experts: int
    top_k: int
    moe_layers: tuple[bool, ...]    # per layer: routed MoE (True) or dense MLP
    num_shared_experts: int = 0     # DeepSeek: one always-on MLP of width n * moe_intermediate_size
    renormalize: bool = True        # renormalise the top-k weights
    qk_norm: bool = False           # Qwen3: RMSNorm on each head's q and k before RoPE
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position: int = 4096
    tie_embeddings: bool = False
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    prototype_router: dict | None = None  # tinymoe extension: gate trained with latent prototypes

    @property
    def shared_intermediate_size(self) -> int:
        return self.num_shared_experts * self.moe_intermediate_size

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        arch = (raw.get("architectures") or ["?"])[0]
        if arch not in FAMILIES:
            raise ConfigError(f"unsupported architecture {arch!r}; supported: {', '.join(FAMILIES)}")
        family = FAMILIES[arch]
        try:
            return _READERS[family](raw)
        except KeyError as e:
            raise ConfigError(f"config.json for {arch} lacks the key {e.args[0]!r}") from None


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return ModelConfig.from_dict(raw)


def _rope_theta(raw: dict, default: float) -> float:
    # Published checkpoints keep rope_theta at the top; transformers 5 writes rope_parameters.
    params = raw.get("rope_parameters") or {}
    return float(params.get("rope_theta", raw.get("rope_theta", default)))


def _eos_ids(raw: dict) -> list[int]:
    eos = raw.get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _common(raw: dict, default_theta: float) -> dict:
    heads = raw["num_attention_heads"]
    return dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(raw, default_theta),
        max_position=raw.get("max_position_embeddings", 4096),
        tie_embeddings=raw.get("tie_word_embeddings", False),
        dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=_eos_ids(raw),
    )


def _mixtral(raw: dict) -> ModelConfig:
    n = raw["num_hidden_layers"]
    return ModelConfig(
        family="mixtral", **_common(raw, 1e6),
        intermediate_size=raw["intermediate_size"],
        moe_intermediate_size=raw["intermediate_size"],
        num_experts=raw["num_local_experts"], top_k=raw["num_experts_per_tok"],
        moe_layers=(True,) * n, renormalize=True,
        prototype_router=raw.get("tinymoe_router"),
    )


def _deepseek_moe(raw: dict) -> ModelConfig:
    n = raw["num_hidden_layers"]
    first_dense, freq = raw.get("first_k_dense_replace", 0), raw.get("moe_layer_freq", 1)
    experts = raw.get("n_routed_experts")
    if raw.get("scoring_func", "softmax") != "softmax":
        raise ConfigError(f"DeepSeek-MoE scoring_func {raw['scoring_func']!r} is not supported (only softmax)")
    return ModelConfig(
        family="deepseek_moe", **_common(raw, 1e4),
        intermediate_size=raw["intermediate_size"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        num_experts=experts or 0, top_k=raw["num_experts_per_tok"],
        moe_layers=tuple(bool(experts) and i >= first_dense and i % freq == 0 for i in range(n)),
        num_shared_experts=raw.get("n_shared_experts") or 0,
        renormalize=bool(raw.get("norm_topk_prob", False)),
    )


def _qwen3_moe(raw: dict) -> ModelConfig:
    n = raw["num_hidden_layers"]
    experts = raw.get("num_experts", raw.get("num_local_experts"))
    if experts is None:
        raise KeyError("num_experts")
    step, dense = raw.get("decoder_sparse_step", 1), set(raw.get("mlp_only_layers") or [])
    return ModelConfig(
        family="qwen3_moe", **_common(raw, 1e6),
        intermediate_size=raw["intermediate_size"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        num_experts=experts, top_k=raw["num_experts_per_tok"],
        moe_layers=tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)),
        renormalize=bool(raw.get("norm_topk_prob", False)),
        qk_norm=True,
    )


_READERS = {"mixtral": _mixtral, "deepseek_moe": _deepseek_moe, "qwen3_moe": _qwen3_moe}
