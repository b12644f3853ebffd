"""Build a Transformer for a checkpoint and fill it tensor by tensor from its safetensors."""
import torch

from ..config import load_config
from ..progress import bar
from ..weights import Checkpoint, resolve
from . import deepseek_moe, mixtral, qwen3_moe
from .prototype_gate import PrototypeGate
from .transformer import Transformer

LAYOUTS = {"mixtral": mixtral.LAYOUT, "deepseek_moe": deepseek_moe.LAYOUT, "qwen3_moe": qwen3_moe.LAYOUT}

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return None
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPE_NAMES)} or auto")
    return _DTYPE_NAMES[name]


def load_model(path_or_name, dtype=None, device=None, progress: bool = False) -> Transformer:
    """A checkpoint directory, HF repo id in the local cache, or alias -> an eval-mode Transformer.

    `dtype=None` keeps the checkpoint's own dtype. Peak memory stays near the weights' size:
    the model is built on the meta device and each parameter is read straight into place."""
    model_dir = resolve(path_or_name)
    cfg = load_config(model_dir)
    dtype = parse_dtype(dtype) or parse_dtype(cfg.dtype) or torch.float32
    device = torch.device(device or "cpu")
    ckpt = Checkpoint(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
        for block in model.moe_blocks():
            if isinstance(block.gate, PrototypeGate):
                block.gate.float()  # small, and its cosine scores want fp32
    model.to_empty(device=device)
    model.fuse_storage()
    layout = LAYOUTS[cfg.family]
    params = list(model.named_parameters())
    try:
        with torch.no_grad():
            for name, param in bar(params, desc=f"loading {model_dir.name}", unit="tensor",
                                   disable=not progress):
                _fill(param, name, ckpt, layout, cfg)
    finally:
        ckpt.close()
    model.source_dir = model_dir
    return model.eval()


def _fill(param, name, ckpt, layout, cfg):
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        names = layout.checkpoint_names(name, cfg.moe_layers[layer], cfg.num_experts)
    else:
        names = name
    if name == "lm_head.weight" and name not in ckpt and cfg.tie_embeddings:
        names = "model.embed_tokens.weight"
    if isinstance(names, list):
        for e, n in enumerate(names):
            ckpt.read(n, param.data[e])
    else:
        ckpt.read(names, param.data)

