"""Build a Transformer for a checkpoint and fill it tensor by tensor from its safetensors."""
from dataclasses import dataclass

import torch

from ..config import load_config
from ..kernels.quant import QWeight, empty_qweight
from ..progress import bar
from ..weights import Checkpoint, CheckpointError, resolve
from . import deepseek_moe, mixtral, qwen3_moe
from .prototype_gate import PrototypeGate
from .quantize import QuantSpec, parse_quant, part_of, quantize_into
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


@dataclass(frozen=True)
class Entry:
    """One thing loading fills (and `tinymoe quantize` writes), in the model's order.

    kind "param": a parameter of ours (`name`) read from checkpoint tensor `source`;
    "linear": a `Linear` (module `name`) of `part` whose weight is checkpoint tensor `source`,
    stored as `base`.qweight / `base`.scales when quantised;
    "experts": the routed experts (module `name`), `source` per expert the checkpoint names of
    its (gate, up, down) weights."""
    kind: str
    name: str
    source: str | tuple
    part: str | None = None
    base: str | None = None


def tensor_plan(model: Transformer, ckpt_has=lambda name: True) -> list[Entry]:
    """What to read for `model` (built, not yet quantised), in order. `ckpt_has(name)` tells
    whether the checkpoint holds a tensor (a tied LM head may be absent)."""
    cfg = model.config
    layout = LAYOUTS[cfg.family]
    out, experts = [], set()
    for name, _ in model.named_parameters():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            source = layout.checkpoint_names(name, cfg.moe_layers[layer], cfg.num_experts)
        else:
            source = name
        if isinstance(source, list):  # routed experts, one entry for the three stacks
            module = name.rsplit(".", 1)[0]
            if module not in experts:
                experts.add(module)
                stacks = [layout.checkpoint_names(f"{module}.{w}", True, cfg.num_experts)
                          for w in ("w_gate", "w_up", "w_down")]
                out.append(Entry("experts", module, tuple(zip(*stacks)), "experts"))
            continue
        base = source.removesuffix(".weight")
        if name == "lm_head.weight" and cfg.tie_embeddings and not ckpt_has(name):
            source = "model.embed_tokens.weight"
        part = part_of(name, cfg)
        if part is None:
            out.append(Entry("param", name, source))
        else:
            out.append(Entry("linear", name.removesuffix(".weight"), source, part, base))
    return out


def model_dtype(cfg, dtype=None) -> torch.dtype:
    """The dtype a model loads in: `dtype`, else the checkpoint's (float32 if it says none)."""
    return parse_dtype(dtype) or parse_dtype(cfg.dtype) or torch.float32


def check_quant(cfg, quant, where) -> QuantSpec:
    """The spec to load a checkpoint with: what a quantised checkpoint holds (a different `quant`
    is refused), else `quant` parsed (None: nothing quantised). Raised before any weight."""
    requested = None if quant is None else parse_quant(quant)
    if cfg.quantization is None:
        return requested or QuantSpec()
    stored = QuantSpec.from_config(cfg.quantization, f"{where}/config.json")
    if requested is not None and requested != stored:
        raise ValueError(f"{where} holds weights quantised as {stored.describe()}, not {requested.describe()}: "
                         f"load it without quant, or quantise the original checkpoint")
    return stored


def load_model(path_or_name, dtype=None, device=None, progress: bool = False, quant=None) -> Transformer:
    """A checkpoint directory, HF repo id in the local cache, or alias -> an eval-mode Transformer.

    `dtype=None` keeps the checkpoint's own dtype. `quant` (a QuantSpec or its text: "int8",
    "int4", "experts=int4,attn=int8", ...; models/quantize.py) quantises those weights, as their
    values in `dtype`, while loading; a checkpoint written by `tinymoe quantize` loads as it was
    written (its codes read directly), and refuses another `quant`. Peak memory stays near the loaded weights' size: the
    model is built on the meta device and each tensor is read straight into place, or read,
    quantised a few rows at a time into place and its pages dropped. `model.quant` is the spec."""
    if quant is not None:
        parse_quant(quant)  # a bad spec fails before the checkpoint is even looked for
    model_dir = resolve(path_or_name)
    cfg = load_config(model_dir)
    spec = check_quant(cfg, quant, model_dir)
    stored = cfg.quantization is not None
    dtype = model_dtype(cfg, dtype)
    device = torch.device(device or "cpu")
    ckpt = Checkpoint(model_dir)
    try:
        with torch.device("meta"):
            model = Transformer(cfg).to(dtype)
            for block in model.moe_blocks():
                if isinstance(block.gate, PrototypeGate):
                    block.gate.float()  # small, and its cosine scores want fp32
        plan = tensor_plan(model, ckpt.__contains__)
        precision = spec.parts()
        for entry in plan:
            if entry.kind == "linear" and precision[entry.part] != "full":
                lin = model.get_submodule(entry.name)
                lin.hold(empty_qweight(lin.out_features, lin.in_features, precision[entry.part], spec.int4_group,
                                       "meta"))
        # the experts fill their own storage (Experts.fill), one expert at a time, and keep the
        # reader: a plan that frees some of them reads them back through it
        filled = {id(b.experts) for b in model.moe_blocks()}
        for module in model.modules():
            if id(module) not in filled:
                module.to_empty(device=device, recurse=False)
        model.fuse_storage()
        readers = []
        with torch.no_grad():
            for entry in bar(plan, desc=f"loading {model_dir.name}", unit="tensor", disable=not progress):
                if entry.kind == "param":
                    ckpt.read(entry.source, model.get_parameter(entry.name).data)
                elif entry.kind == "linear":
                    _fill_linear(model.get_submodule(entry.name), entry, ckpt, stored, dtype)
                else:
                    experts = model.get_submodule(entry.name)
                    codes = precision["experts"] if stored and precision["experts"] != "full" else None
                    reader = ExpertReader(model_dir, entry.source, codes, (cfg.moe_intermediate_size, cfg.hidden_size),
                                          spec.int4_group)
                    readers.append(reader)
                    reader.ckpt = ckpt
                    experts.fill(reader, precision["experts"], spec.int4_group)
                    reader.finish()
                    if device.type != "cpu":
                        experts.to(device)
    finally:
        for reader in readers:
            reader.ckpt = None  # from now on each read opens the checkpoint itself
        ckpt.close()
    model.source_dir = model_dir
    model.quant = spec
    return model.eval()


_CODE_DTYPES = {"int8": "I8", "int4": "U8"}


def _read_qweight(ckpt: Checkpoint, base: str, like: QWeight) -> QWeight:
    """The stored QWeight `base`.qweight / `base`.scales, viewed in place, checked against the
    shapes and dtypes `like` has."""
    for suffix, dtype, shape in ((".qweight", _CODE_DTYPES[like.precision], like.q.shape),
                                 (".scales", "BF16", like.scales.shape)):
        got, got_shape = ckpt.info(base + suffix)
        if got != dtype or got_shape != list(shape):
            raise CheckpointError(f"{ckpt.dir}: {base}{suffix} is {got} {got_shape}, expected {dtype} {list(shape)} "
                                  f"for {like.precision} (int4 group {like.group or '-'})")
    return like._replace(q=ckpt.view(base + ".qweight"), scales=ckpt.view(base + ".scales"))


def _fill_linear(lin, entry: Entry, ckpt: Checkpoint, stored: bool, dtype: torch.dtype) -> None:
    if not lin.quantised:
        ckpt.read(entry.source, lin.weight.data)
        return
    out = lin.kernel_weight()
    if stored:
        qw = _read_qweight(ckpt, entry.base, out)
        out.q.copy_(qw.q)
        out.scales.copy_(qw.scales)
        del qw
        ckpt.release(entry.base + ".qweight")
        ckpt.release(entry.base + ".scales")
    else:
        quantize_into(ckpt.view(entry.source, out.shape), out, dtype,
                      lambda r0, r1: ckpt.release(entry.source, (r0, r1)))


class ExpertReader:
    """`read(e)` for `Experts.fill`: expert e's (gate [I, D], up [I, D], down [D, I]) from the
    checkpoint, as stored: Tensors in the checkpoint's dtype, or QWeights (`precision`) from a
    quantised checkpoint. While loading (`ckpt` set to the loader's open checkpoint) they are
    views of its mapping, each expert's pages dropped when the next is read; afterwards (a later
    plan reading freed weights again) each call opens the checkpoint and returns copies."""

    def __init__(self, model_dir, names, precision: str | None, shape: tuple[int, int], group: int):
        I, D = shape
        self.dir, self.names, self.precision, self.group = model_dir, names, precision, group
        self.shapes = ((I, D), (I, D), (D, I))
        self.ckpt: Checkpoint | None = None
        self._last = None

    def _tensors(self, e: int) -> list[str]:
        return [n if self.precision is None else n.removesuffix(".weight") + s
                for n in self.names[e] for s in ((".qweight", ".scales") if self.precision else ("",))]

    def _read(self, ckpt: Checkpoint, e: int) -> tuple:
        if self.precision is None:
            return tuple(ckpt.view(n, shape) for n, shape in zip(self.names[e], self.shapes))
        return tuple(_read_qweight(ckpt, n.removesuffix(".weight"),
                                   empty_qweight(*shape, self.precision, self.group, "meta"))
                     for n, shape in zip(self.names[e], self.shapes))

    def __call__(self, e: int) -> tuple:
        if self.ckpt is None:
            ckpt = Checkpoint(self.dir)
            try:
                return tuple(w.clone() if isinstance(w, torch.Tensor) else
                             w._replace(q=w.q.clone(), scales=w.scales.clone()) for w in self._read(ckpt, e))
            finally:
                ckpt.close()
        self.finish()
        self._last = e
        return self._read(self.ckpt, e)

    def finish(self) -> None:
        """Drop the pages of the expert read last (while loading)."""
        if self._last is not None and self.ckpt is not None:
            for name in self._tensors(self._last):
                self.ckpt.release(name)
        self._last = None
