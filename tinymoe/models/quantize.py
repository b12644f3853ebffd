"""Which weights of a model are quantised, and to what: `QuantSpec` and its text form.

A spec gives each part of the model a precision, "full" (the model's dtype), "int8" or "int4"
(the formats of `kernels/quant.py`), and one int4 group size:

- `experts`: the routed experts; `shared`: DeepSeek's shared experts; `dense`: the dense MLPs
  (DeepSeek's first layers, Qwen3's `mlp_only_layers`); `attn`: q, k, v and o of every layer;
  `head`: the LM head.
- Router gates and embeddings always stay full precision: a gate's logits decide which experts
  run, so rounding them changes the routing itself (and the routers' exactness), and both are
  small (an embedding is a table lookup, not a matmul).

Text forms (`parse_quant`): None, "none", "bf16" or "full" (nothing quantised); "int8" (every
part); "int4" (every part but the LM head, which is int8: as llama.cpp's Q4_0 keeps its output
tensor in Q6_K. On the embedded models an int4 head alone cost +0.25% perplexity of int4's
+0.30 / +0.20%, bench/quality.py); "int4:g32" (with the group: 32, 64 or 128); per part
"experts=int4,attn=int8,head=int8" (unnamed parts stay full; an int4 part may carry the group,
"experts=int4:g32").
"""
from dataclasses import dataclass

import torch

from ..kernels.moe_op import PRECISIONS
from ..kernels.quant import INT4_GROUP, INT4_GROUPS, QWeight, empty_qweight, quantize

PARTS = ("experts", "shared", "dense", "attn", "head")
NONE = ("none", "bf16", "full")
# Rows quantised at a time: the format is per row, so quantising in chunks gives the same codes
# while the float temporaries stay small whatever the matrix (an LM head can be 100k rows).
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class QuantSpec:
    """Per part a precision in PRECISIONS, and the int4 group (in kernels.quant.INT4_GROUPS).
    The group only matters when a part is int4; without one it is the default, so two specs that
    quantise the same way compare equal."""
    experts: str = "full"
    shared: str = "full"
    dense: str = "full"
    attn: str = "full"
    head: str = "full"
    int4_group: int = INT4_GROUP

    def __post_init__(self):
        for part in PARTS:
            if getattr(self, part) not in PRECISIONS:
                raise ValueError(f"unknown precision {getattr(self, part)!r} for {part}; "
                                 f"precisions: {', '.join(PRECISIONS)}")
        if self.int4_group not in INT4_GROUPS:
            raise ValueError(f"int4 group must be one of {', '.join(map(str, INT4_GROUPS))}, got {self.int4_group!r}")
        if "int4" not in self.parts().values():
            object.__setattr__(self, "int4_group", INT4_GROUP)

    def parts(self) -> dict[str, str]:
        return {part: getattr(self, part) for part in PARTS}

    @property
    def quantised(self) -> bool:
        """Is anything quantised?"""
        return any(p != "full" for p in self.parts().values())

    def describe(self) -> str:
        """The shortest text `parse_quant` reads back as this spec: "none", "int8", "int4:g32",
        "experts=int4,attn=int8"."""
        parts = self.parts()
        group = "" if self.int4_group == INT4_GROUP else f":g{self.int4_group}"
        if set(parts.values()) == {"full"}:
            return "none"
        for only in ("int8", "int4"):
            if parts == _preset(only):
                return only + (group if only == "int4" else "")
        return ",".join(f"{part}={p}{group if p == 'int4' else ''}" for part, p in parts.items() if p != "full")

    def to_config(self) -> dict:
        """The `quantization_config` of a checkpoint written with this spec (checkpoint_writer.py
        documents the fields)."""
        return {"quant_method": "tinymoe", "format_version": 1, "parts": self.parts(), "int4_group": self.int4_group}

    @classmethod
    def from_config(cls, qc: dict, source: str = "config.json") -> "QuantSpec":
        """A checkpoint's `quantization_config` (envelope already checked by config.py) -> spec."""
        parts, group = qc.get("parts"), qc.get("int4_group", INT4_GROUP)
        if not isinstance(parts, dict):
            raise ValueError(f"{source}: quantization_config.parts must be an object, got {parts!r}")
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"{source}: quantization_config.parts has unknown part {unknown[0]!r}; "
                             f"parts: {', '.join(PARTS)}")
        for part, p in parts.items():
            if p not in PRECISIONS:
                raise ValueError(f"{source}: quantization_config.parts.{part} is {p!r}; "
                                 f"precisions: {', '.join(PRECISIONS)}")
        if type(group) is not int or group not in INT4_GROUPS:
            raise ValueError(f"{source}: quantization_config.int4_group must be one of "
                             f"{', '.join(map(str, INT4_GROUPS))}, got {group!r}")
        return cls(**parts, int4_group=group)


def _preset(precision: str) -> dict[str, str]:
    """The parts of a one-word spec: every part in `precision`, but int4's head in int8."""
    parts = dict.fromkeys(PARTS, precision)
    if precision == "int4":
        parts["head"] = "int8"
    return parts


def _precision(text: str, spec: str) -> tuple[str, int | None]:
    """'int4' -> ('int4', None); 'int4:g32' -> ('int4', 32)."""
    name, sep, group = text.partition(":")
    if name not in PRECISIONS:
        raise ValueError(f"quant spec {spec!r}: unknown precision {name!r}; precisions: {', '.join(PRECISIONS)}")
    if not sep:
        return name, None
    if name != "int4":
        raise ValueError(f"quant spec {spec!r}: a group (:{group}) applies to int4 only")
    if not (group.startswith("g") and group[1:].isdigit() and int(group[1:]) in INT4_GROUPS):
        raise ValueError(f"quant spec {spec!r}: int4 group {group!r} is not one of "
                         f"{', '.join(f'g{g}' for g in INT4_GROUPS)}")
    return name, int(group[1:])


def parse_quant(spec) -> QuantSpec:
    """None, a QuantSpec or its text form (module docstring) -> QuantSpec; a bad one is a
    one-line ValueError naming the problem."""
    if spec is None:
        return QuantSpec()
    if isinstance(spec, QuantSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"quant takes a spec such as 'int8' or 'experts=int4,attn=int8', not {type(spec).__name__}")
    text = spec.strip()
    if text in NONE:
        return QuantSpec()
    if not text:
        raise ValueError("quant spec is empty; use none, int8, int4, int4:g32 or per part "
                         "experts=int4,attn=int8")
    if "=" not in text:
        precision, group = _precision(text, spec)
        return QuantSpec(**_preset(precision), int4_group=group or INT4_GROUP)
    chosen, groups = {}, set()
    for item in text.split(","):
        part, sep, value = (s.strip() for s in item.partition("="))
        if not item.strip():
            raise ValueError(f"quant spec {spec!r} has an empty item")
        if not sep or not part or not value:
            raise ValueError(f"quant spec {spec!r}: {item.strip()!r} is not PART=PRECISION")
        if part not in PARTS:
            raise ValueError(f"quant spec {spec!r}: unknown part {part!r}; parts: {', '.join(PARTS)}")
        if part in chosen:
            raise ValueError(f"quant spec {spec!r} names {part!r} twice")
        chosen[part], group = _precision(value, spec)
        if group is not None:
            groups.add(group)
    if len(groups) > 1:
        raise ValueError(f"quant spec {spec!r} gives several int4 groups; one group serves the whole model")
    return QuantSpec(**chosen, int4_group=groups.pop() if groups else INT4_GROUP)


def part_of(name: str, cfg) -> str | None:
    """The part a weight of ours belongs to (a parameter name of `Transformer`, such as
    "model.layers.0.self_attn.q_proj.weight" or "model.layers.1.mlp.experts.w_gate"), or None for
    what always stays full precision (norms, embeddings, gates)."""
    if name == "lm_head.weight":
        return "head"
    if not name.startswith("model.layers."):
        return None
    layer = int(name.split(".")[2])
    if ".self_attn." in name and name.endswith("_proj.weight"):
        return "attn"
    if ".mlp.experts.w_" in name:
        return "experts"
    if ".mlp.shared_experts." in name:
        return "shared"
    if not cfg.moe_layers[layer] and name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight",
                                                    "mlp.down_proj.weight")):
        return "dense"
    return None


def quantize_into(w: torch.Tensor, out: QWeight, dtype: torch.dtype, done=None) -> QWeight:
    """Quantise w [N, K], as its values in the model's `dtype`, into `out`'s tensors (from
    `empty_qweight`) a few rows at a time; the codes equal `kernels.quant.quantize(w.to(dtype),
    ...)`'s, as the format is per row. `done(r0, r1)`, if given, is told each block of rows that is
    no longer needed (the loader drops its pages)."""
    rows = max(1, CHUNK_ELEMENTS // max(1, w.shape[-1]))
    requested = out.group or INT4_GROUP
    for r in range(0, w.shape[0], rows):
        qw = quantize(w[r:r + rows].to(dtype), out.precision, requested)
        out.q[r:r + rows].copy_(qw.q)
        out.scales[r:r + rows].copy_(qw.scales)
        if done is not None:
            done(r, min(r + rows, w.shape[0]))
    return out


def quantize_matrix(w: torch.Tensor, precision: str, group: int, dtype: torch.dtype, done=None) -> QWeight:
    """w [N, K] -> the QWeight of its values in `dtype`, quantised in chunks of rows (`quantize_into`)."""
    return quantize_into(w, empty_qweight(w.shape[0], w.shape[1], precision, group), dtype, done)
