"""One normalised ModelConfig for every supported family, read from a checkpoint's config.json.

Every field read is checked (type and range) so that a bad config.json is one line naming the
field, raised before any weight is touched."""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = {
    "MixtralForCausalLM": "mixtral",
    "DeepseekForCausalLM": "deepseek_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}

# RoPE variants implemented (models/transformer.py Rotary). "dynamic" is refused on purpose: its
# frequencies change with the sequence length, so K already in the paged cache would be stale.
ROPE_TYPES = ("default", "linear", "yarn")
_ROPE_KEYS = {
    "default": {"rope_theta"},
    "linear": {"rope_theta", "factor"},
    "yarn": {"rope_theta", "factor", "original_max_position_embeddings", "attention_factor",
             "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"},
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
    rope_scaling: dict | None = None  # None, {"type": "linear", "factor"} or {"type": "yarn", ...}
    max_position: int = 4096
    tie_embeddings: bool = False
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    prototype_router: dict | None = None  # tinymoe extension: gate trained with latent prototypes
    quantization: dict | None = None  # a checkpoint written by `tinymoe quantize`: its quantization_config

    @property
    def shared_intermediate_size(self) -> int:
        return self.num_shared_experts * self.moe_intermediate_size

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source} must hold a JSON object, got {_kind(raw)}")
        archs = raw.get("architectures")
        if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"{source}: architectures must be a list naming the model class, got {archs!r}; "
                              f"supported: {', '.join(FAMILIES)}")
        arch = archs[0]
        if arch not in FAMILIES:
            raise ConfigError(f"unsupported architecture {arch!r}; supported: {', '.join(FAMILIES)}")
        family = FAMILIES[arch]
        fields = _Fields(raw, source, arch)
        cfg = _READERS[family](fields)
        cfg.quantization = _quantization(fields)
        return cfg


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return ModelConfig.from_dict(raw, str(path))


def _kind(value) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


_REQUIRED = object()


class _Fields:
    """Typed reads of config.json fields; each bad one is a ConfigError naming the field."""

    def __init__(self, raw: dict, source: str, arch: str):
        self.raw, self.source, self.arch = raw, source, arch

    def error(self, text: str) -> ConfigError:
        return ConfigError(f"{self.source}: {text}")

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def _get(self, key, default):
        value = self.raw.get(key)
        if value is None:  # null counts as absent, as transformers reads it
            if default is _REQUIRED:
                raise self.error(f"{self.arch} needs the key {key!r}")
            return default, False
        return value, True

    def integer(self, key: str, default=_REQUIRED, low: int = 1):
        value, given = self._get(key, default)
        if given and (type(value) is not int or value < low):
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise self.error(f"{key} must be {what}, got {value!r}")
        return value

    def number(self, key: str, default=_REQUIRED):
        value, given = self._get(key, default)
        if given and not _positive_number(value):
            raise self.error(f"{key} must be a positive number, got {value!r}")
        return float(value) if given else value

    def flag(self, key: str, default):
        value, given = self._get(key, default)
        if given and type(value) is not bool:
            raise self.error(f"{key} must be true or false, got {value!r}")
        return value

    def text(self, key: str, default):
        value, given = self._get(key, default)
        if given and not isinstance(value, str):
            raise self.error(f"{key} must be a string, got {value!r}")
        return value

    def token_ids(self, key: str) -> list[int]:
        value, _ = self._get(key, [])
        ids = [value] if type(value) is int else value
        if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
            raise self.error(f"{key} must be a token id or a list of token ids, got {value!r}")
        return list(ids)

    def top_k(self, experts: int, experts_key: str) -> int:
        k = self.integer("num_experts_per_tok")
        if experts and k > experts:
            raise self.error(f"num_experts_per_tok ({k}) exceeds {experts_key} ({experts})")
        return k


def _positive_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0


def _rope(f: _Fields, default_theta: float, max_position: int) -> tuple[float, dict | None, int]:
    """(theta, scaling, max_position). transformers reads rope_scaling before rope_parameters and
    takes rope_theta from that dict first, then from the top level."""
    key = "rope_scaling" if f.has("rope_scaling") else "rope_parameters"
    params = f.raw.get(key) or {}
    if not isinstance(params, dict):
        raise f.error(f"{key} must be an object, got {params!r}")
    theta = params.get("rope_theta", f.raw.get("rope_theta"))
    theta = default_theta if theta is None else theta
    if not _positive_number(theta):
        raise f.error(f"rope_theta must be a positive number, got {theta!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        why = (" (its frequencies change with the sequence length, which the paged KV cache cannot follow)"
               if kind == "dynamic" else "")
        raise f.error(f"{key} type {kind!r} is not supported{why}; supported: {', '.join(ROPE_TYPES)}")
    extra = sorted(set(params) - _ROPE_KEYS[kind] - {"rope_type", "type"})
    if extra:
        raise f.error(f"{key} ({kind}) has unknown key {extra[0]!r}; known: {', '.join(sorted(_ROPE_KEYS[kind]))}")
    if kind == "default":
        return float(theta), None, max_position

    def number(name, default=_REQUIRED, positive=True):
        value = params.get(name)
        if value is None:
            if default is _REQUIRED:
                raise f.error(f"{key} ({kind}) needs {name!r}")
            return default
        ok = _positive_number(value) if positive else type(value) in (int, float) and math.isfinite(value)
        if not ok:
            raise f.error(f"{key} {name} must be a {'positive ' if positive else ''}number, got {value!r}")
        return float(value)

    factor = number("factor")
    if factor < 1:
        raise f.error(f"{key} factor must be at least 1, got {params['factor']!r}")
    if kind == "linear":
        return float(theta), {"type": "linear", "factor": factor}, max_position
    original = params.get("original_max_position_embeddings", max_position)
    if type(original) is not int or original < 1:
        raise f.error(f"{key} original_max_position_embeddings must be a positive integer, got {original!r}")
    truncate = params.get("truncate", True)
    if type(truncate) is not bool:
        raise f.error(f"{key} truncate must be true or false, got {truncate!r}")
    beta_fast, beta_slow = number("beta_fast", 32.0), number("beta_slow", 1.0)
    if beta_fast < beta_slow:
        raise f.error(f"{key} beta_fast ({beta_fast:g}) is smaller than beta_slow ({beta_slow:g})")
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = number("mscale", 0.0, positive=False), number("mscale_all_dim", 0.0, positive=False)
        attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else _yarn_mscale(factor)
    else:
        attention = number("attention_factor")
    scaling = {"type": "yarn", "factor": factor, "original_max_position": original, "beta_fast": beta_fast,
               "beta_slow": beta_slow, "truncate": truncate, "attention_factor": float(attention)}
    # the point of YaRN is the longer context: factor x the pre-training length
    return float(theta), scaling, max(max_position, int(factor * original))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    # the YaRN paper's attention temperature: 0.1 ln(s) + 1, scaled by mscale (DeepSeek's variant)
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _common(f: _Fields, default_theta: float) -> dict:
    hidden, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
    kv = f.integer("num_key_value_heads", heads)
    if heads % kv:
        raise f.error(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    if f.has("head_dim"):
        head_dim = f.integer("head_dim")
    elif hidden % heads:
        raise f.error(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) "
                      f"and no head_dim is given")
    else:
        head_dim = hidden // heads
    if head_dim % 2:
        raise f.error(f"head_dim ({head_dim}) must be even (rotary embeddings rotate pairs)")
    max_position = f.integer("max_position_embeddings", 4096)
    theta, scaling, max_position = _rope(f, default_theta, max_position)
    bos = f.raw.get("bos_token_id")
    if bos is not None and (type(bos) is not int or bos < 0):
        raise f.error(f"bos_token_id must be a token id, got {bos!r}")
    dtype = f.text("torch_dtype", None) or f.text("dtype", None) or "float32"
    return dict(
        vocab_size=f.integer("vocab_size"),
        hidden_size=hidden,
        num_layers=f.integer("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        rms_eps=f.number("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position=max_position,
        tie_embeddings=f.flag("tie_word_embeddings", False),
        dtype=dtype,
        bos_token_id=bos,
        eos_token_id=f.token_ids("eos_token_id"),
    )


def _prototype_router(f: _Fields) -> dict | None:
    proto = f.raw.get("tinymoe_router")
    if proto is None:
        return None
    if (not isinstance(proto, dict) or proto.get("type") != "prototype"
            or type(proto.get("latent_dim")) is not int or proto["latent_dim"] < 1
            or not _positive_number(proto.get("temperature"))):
        raise f.error('tinymoe_router must be {"type": "prototype", "latent_dim": a positive integer, '
                      f'"temperature": a positive number}}, got {json.dumps(proto)}')
    return proto


def _quantization(f: _Fields) -> dict | None:
    """The envelope of a quantised checkpoint's quantization_config (its parts and group are read
    by models/quantize.py's QuantSpec.from_config, which the loader calls before any weight)."""
    qc = f.raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise f.error(f"quantization_config must be an object, got {_kind(qc)}")
    method = qc.get("quant_method")
    if method != "tinymoe":
        raise f.error(f"quantization_config.quant_method {method!r} is not supported: tinymoe reads only "
                      f"checkpoints written by `tinymoe quantize` (quant_method 'tinymoe')")
    if qc.get("format_version") != 1:
        raise f.error(f"quantization_config.format_version {qc.get('format_version')!r} is not supported "
                      f"(this tinymoe reads format 1)")
    return qc


def _mixtral(f: _Fields) -> ModelConfig:
    common = _common(f, 1e6)
    experts = f.integer("num_local_experts")
    return ModelConfig(
        family="mixtral", **common,
        intermediate_size=f.integer("intermediate_size"),
        moe_intermediate_size=f.integer("intermediate_size"),
        num_experts=experts, top_k=f.top_k(experts, "num_local_experts"),
        moe_layers=(True,) * common["num_layers"], renormalize=True,
        prototype_router=_prototype_router(f),
    )


def _deepseek_moe(f: _Fields) -> ModelConfig:
    common = _common(f, 1e4)
    n = common["num_layers"]
    first_dense, freq = f.integer("first_k_dense_replace", 0, low=0), f.integer("moe_layer_freq", 1)
    experts = f.integer("n_routed_experts", 0, low=0)
    scoring = f.text("scoring_func", "softmax")
    if scoring != "softmax":
        raise ConfigError(f"DeepSeek-MoE scoring_func {scoring!r} is not supported (only softmax)")
    return ModelConfig(
        family="deepseek_moe", **common,
        intermediate_size=f.integer("intermediate_size"),
        moe_intermediate_size=f.integer("moe_intermediate_size"),
        num_experts=experts, top_k=f.top_k(experts, "n_routed_experts"),
        moe_layers=tuple(bool(experts) and i >= first_dense and i % freq == 0 for i in range(n)),
        num_shared_experts=f.integer("n_shared_experts", 0, low=0),
        renormalize=f.flag("norm_topk_prob", False),
    )


def _qwen3_moe(f: _Fields) -> ModelConfig:
    common = _common(f, 1e6)
    n = common["num_layers"]
    key = "num_experts" if f.has("num_experts") or not f.has("num_local_experts") else "num_local_experts"
    experts = f.integer(key, low=0)
    step = f.integer("decoder_sparse_step", 1)
    dense = f.raw.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(type(i) is int and 0 <= i < n for i in dense):
        raise f.error(f"mlp_only_layers must be a list of layer indices below num_hidden_layers ({n}), got {dense!r}")
    return ModelConfig(
        family="qwen3_moe", **common,
        intermediate_size=f.integer("intermediate_size"),
        moe_intermediate_size=f.integer("moe_intermediate_size"),
        num_experts=experts, top_k=f.top_k(experts, key),
        moe_layers=tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)),
        renormalize=f.flag("norm_topk_prob", False),
        qk_norm=True,
    )


_READERS = {"mixtral": _mixtral, "deepseek_moe": _deepseek_moe, "qwen3_moe": _qwen3_moe}
