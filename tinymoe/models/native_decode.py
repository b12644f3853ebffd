"""The one-call decode step: a decode batch from token ids to logits (embeddings, every layer,
the LM head) in one native call (`kernels/cpu_decode.cpp`), for the models it covers; None
otherwise, and the caller runs `Transformer.hidden_states` and `logits`. Same arithmetic as that
path (it chains the same native ops); what it saves is the Python and torch glue between them, a
quarter of a batch-1 step (docs/DESIGN.md, "One-call decode").

Covered: bf16 models on the CPU with the native library (Mixtral, DeepSeek-MoE, Qwen3-MoE), their
projections bf16 or quantised (`Linear.kernel_weight()` a QWeight) and their expert copies in any
precision (any plan; the gate stays bf16). A layer with a linear gate, the `topk` router, the
default plan and no recorder routes natively; any other router, gate, plan or a recorder is
called back from the native step (`_PythonRouting`), so routers stay Python plugs.
`Settings.native_step` False (`TINYMOE_NATIVE_STEP=0`) turns the step off (for A/B runs)."""
import ctypes
import weakref

import torch

from .. import settings
from ..kernels import cpu_linear
from ..kernels.attention import native_head_dim
from ..kernels.moe_cpu import copy_matrices
# the decode step's structs and enums: cpu_kernels.h's, mirrored and checked at load in native.py
from ..kernels.native import (COPY_OUT_OF_RANGE, DENSE, ROUTE_CALLBACK, ROUTE_FAILED, ROUTE_FN, ROUTE_TOPK,
                              TOKEN_OUT_OF_RANGE, DecodeLayer, DecodeModel, Matrix, RouteBuffers, native)
from ..kernels.quant import QWeight
from ..routing.topk import TopK
from .transformer import DenseMLP, Linear, MoEBlock, Transformer


def _routing(block: MoEBlock) -> int:
    native_gate = (type(block.router) is TopK and block.recorder is None and type(block.gate) is Linear
                   and block.experts.one_full_copy_each)
    return ROUTE_TOPK if native_gate else ROUTE_CALLBACK


class _PythonRouting:
    """Routes the ROUTE_CALLBACK layers when the native step calls back: the block's own gate,
    router and recorder (`MoEBlock.route`), then its plan's copies (`Experts.physical_ids`), as
    the per-op path does. An exception is kept for the caller to raise."""

    def __init__(self, blocks: dict[int, MoEBlock]):
        self.blocks = blocks
        self.callback = ROUTE_FN(self._route)
        self.hidden = self.ids = self.weights = None
        self.error = None

    def buffers(self, N: int, D: int, k: int) -> RouteBuffers:
        self.hidden = torch.empty(N, D, dtype=torch.bfloat16)
        self.ids = torch.empty(N, k, dtype=torch.int64)
        self.weights = torch.empty(N, k, dtype=torch.float32)
        self.error = None
        return RouteBuffers(self.hidden.data_ptr(), self.ids.data_ptr(), self.weights.data_ptr())

    def _route(self, layer: int) -> int:
        try:
            block = self.blocks[layer]
            ids, weights = block.route(self.hidden)
            copies = block.experts.physical_ids(ids)
            block.experts.last_physical_ids = copies
            if copies.shape != self.ids.shape or weights.shape != self.ids.shape:
                raise ValueError(f"router {block.router.name!r} returned {tuple(copies.shape)} expert ids and "
                                 f"{tuple(weights.shape)} weights for {tuple(self.ids.shape)} slots")
            self.ids.copy_(copies)
            self.weights.copy_(weights)
            return 0
        except BaseException as e:  # noqa: BLE001 - it must not unwind through the native frames
            self.error = e
            return 1


def _linears(model: Transformer) -> list[Linear]:
    """Every projection the step reads, the LM head included."""
    out = [model.lm_head]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        if isinstance(mlp, MoEBlock):
            if type(mlp.gate) is Linear:
                out.append(mlp.gate)
            mlp = mlp.shared_experts
        if mlp is not None:
            out += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return out


def _weighted(model: Transformer) -> list[torch.nn.Module]:
    """The modules whose plain `weight` the step reads: the embeddings and the norms."""
    out = [model.model.embed_tokens, model.model.norm]
    for layer in model.model.layers:
        out += [layer.input_layernorm, layer.post_attention_layernorm]
        if layer.self_attn.qk_norm:
            out += [layer.self_attn.q_norm, layer.self_attn.k_norm]
    return out


class _Parts:
    """The model's MoE blocks, the modules of its plain weights and its projections: the modules
    are fixed after construction (their parameters and buffers may be replaced, so they are read
    from the modules each time), so these lists are built once per model."""

    def __init__(self, model: Transformer):
        self.blocks, self.weighted, self.linears = model.moe_blocks(), _weighted(model), _linears(model)


_parts = weakref.WeakKeyDictionary()


def _parts_of(model: Transformer) -> _Parts:
    if model not in _parts:
        _parts[model] = _Parts(model)
    return _parts[model]


def covers(model: Transformer, k_cache: torch.Tensor) -> bool:
    """Can the one-call step run this model, as it is configured now, on this cache?"""
    cfg = model.config
    if not settings.current().native_step or native() is None:
        return False
    if k_cache.dtype != torch.bfloat16 or not k_cache.is_contiguous() or not native_head_dim(cfg.head_dim):
        return False
    # an observer needs each layer's expert activations, which only the per-op path reports
    return all(block.observer is None for block in _parts_of(model).blocks)


class _NotCovered(Exception):
    pass


def _at(t: torch.Tensor) -> int:
    """The address the native step reads t at: a contiguous bf16 CPU tensor's."""
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous():
        raise _NotCovered
    return t.data_ptr()


def _matrix(w: torch.Tensor | QWeight) -> Matrix:
    """The native Matrix of a projection's weight (bf16 Tensor or QWeight) read in place."""
    if isinstance(w, torch.Tensor):
        _at(w)
    elif w.q.device.type != "cpu" or not (w.q.is_contiguous() and w.scales.is_contiguous()):
        raise _NotCovered
    return cpu_linear.matrix(w)


def _weight_key(w: torch.Tensor | QWeight) -> tuple:
    if isinstance(w, torch.Tensor):
        return w.data_ptr(), w.dtype
    return w.precision, w.q.data_ptr(), w.scales.data_ptr(), w.group


def _dense(mlp: DenseMLP | None) -> dict:
    if mlp is None:
        return {}
    return {"mlp_gate": _matrix(mlp.gate_proj.kernel_weight()), "mlp_up": _matrix(mlp.up_proj.kernel_weight()),
            "mlp_down": _matrix(mlp.down_proj.kernel_weight()), "mlp_I": mlp.gate_proj.out_features}


def _describe(model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float):
    """The DecodeModel struct, the Python routing it calls back, and what the struct points into
    (to be kept alive with it); raises _NotCovered when a weight is not in a layout the native
    step reads. The weights themselves are not held: the cache key (their addresses, and each
    layer's ExpertCopies, weakly) changes before any of them can go."""
    cfg, keep, routed = model.config, [], {}
    layers = (DecodeLayer * cfg.num_layers)()
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        fields = {"attn_norm": _at(layer.input_layernorm.weight), "qkv": _matrix(attn.qkv_weight()),
                  "o": _matrix(attn.o_proj.kernel_weight()), "mlp_norm": _at(layer.post_attention_layernorm.weight),
                  "k_cache": _at(k_cache[i]), "v_cache": _at(v_cache[i])}
        if attn.qk_norm:
            fields.update(q_norm=_at(attn.q_norm.weight), k_norm=_at(attn.k_norm.weight))
        block = layer.mlp
        if isinstance(block, MoEBlock):
            copies = block.experts.copies()
            matrices = copy_matrices(copies)
            if matrices is None:
                raise _NotCovered
            keep += [matrices.w13, matrices.w2]
            routing = _routing(block)
            if routing == ROUTE_TOPK:
                fields["gate"] = _at(block.gate.weight)
            else:
                routed[i] = block
            fields.update(routing=routing, w13=ctypes.addressof(matrices.w13), w2=ctypes.addressof(matrices.w2),
                          copies=copies.num_copies, **_dense(block.shared_experts))
        else:
            fields.update(routing=DENSE, **_dense(block))
        layers[i] = DecodeLayer(**fields)
    routing = _PythonRouting(routed)
    head = _matrix(model.lm_head.kernel_weight())
    desc = DecodeModel(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, int(cfg.renormalize), k_cache.shape[2],
                       model.model.norm.eps, scale, layers, _at(model.model.embed_tokens.weight),
                       _at(model.model.norm.weight), routing.callback, head, model.lm_head.out_features)
    return desc, routing, keep + [layers]


# model -> (key, description or None, its routing, what it points into). Replaced parameters or
# quantised buffers (loading, .to()), installed routers, applied plans and attached recorders
# change the key (the weights' addresses and formats, each layer's routing mode and its
# ExpertCopies, which the experts rebuild when their plan or storage changes) and rebuild it.
_described = weakref.WeakKeyDictionary()


def _description(model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float):
    parts = _parts_of(model)
    key = (k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape, scale,
           *[(m.weight.data_ptr(), m.weight.dtype) for m in parts.weighted],
           *[_weight_key(lin.kernel_weight()) for lin in parts.linears],
           *[(_routing(b), weakref.ref(b.experts.copies())) for b in parts.blocks])
    cached = _described.get(model)
    if cached is None or cached[0] != key:
        try:
            _described[model] = (key, *_describe(model, k_cache, v_cache, scale))
        except _NotCovered:
            _described[model] = (key, None, None)
    return _described[model][1:3]


@torch.inference_mode()
def decode_step(model: Transformer, input_ids: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                context_lens: torch.Tensor, scale: float) -> torch.Tensor | None:
    """N decode tokens, one per sequence: input_ids and positions [N], caches
    [layers, blocks, block_size, KV, hd], slot_mapping [N] (int64), block_tables [N, W] and
    context_lens [N] (int32). Returns their logits [N, V] as `model.logits` gives them (bf16), or
    None when not covered. The LM head runs inside the native call when `kernels.linear` would
    run it natively for these rows too (else here, after it)."""
    if not covers(model, k_cache) or not cpu_linear.native_rows(len(input_ids)):
        return None  # (torch's GEMM takes the projections of this batch: the per-op path runs it)
    desc, routing = _description(model, k_cache, v_cache, scale)
    if desc is None:
        return None
    N, cfg = len(input_ids), model.config
    buffers = routing.buffers(N, cfg.hidden_size, cfg.top_k) if routing.blocks else RouteBuffers()
    ids = input_ids.to(torch.int64).contiguous()
    cos, sin = model.rotary(positions)
    slots, tables, lens = slot_mapping.contiguous(), block_tables.contiguous(), context_lens.contiguous()
    out = torch.empty(N, cfg.hidden_size, dtype=torch.bfloat16)
    native_head = cpu_linear.supports(out, model.lm_head.kernel_weight())
    logits = torch.empty(N, desc.V, dtype=torch.bfloat16) if native_head else None
    status = native().decode_step_bf16(ctypes.byref(desc), ids.data_ptr(), N, cos.data_ptr(), sin.data_ptr(),
                                       slots.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(),
                                       out.data_ptr(), logits.data_ptr() if native_head else None,
                                       ctypes.byref(buffers), torch.get_num_threads())
    if status == ROUTE_FAILED:
        raise routing.error
    if status == COPY_OUT_OF_RANGE:
        raise ValueError("a router chose expert copies outside its layer's plan")
    if status == TOKEN_OUT_OF_RANGE:
        raise ValueError(f"decode_step: a token id outside [0, {desc.V})")
    return logits if native_head else model.logits(out)
