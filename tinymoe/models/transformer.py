"""The transformer pieces every family shares: RMSNorm, RoPE, GQA attention, dense MLP, MoE block.

Module names follow the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`, ...) so that
loading is a name mapping, not a translation."""
import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..experts import Experts, ExpertPlan
from ..kernels.quant import QWeight
from ..kernels.rotary import rope_frequencies
from ..routing import GateRule, RouteContext
from ..routing.topk import TopK
from .prototype_gate import PrototypeGate


class Linear(nn.Linear):
    """A bias-free projection whose matmul is `kernels.linear` (a native kernel on CPU). It holds
    either `weight` (a Parameter in the model's dtype) or, once `hold` is called, a quantised
    matrix: `qweight` (codes) and `scales` as buffers, so `.to(device)` moves them. The scales
    are kept as int16 bit patterns: `.to(dtype)` converts floating buffers, and these must stay
    bf16 whatever the model's dtype."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.precision, self.group = "full", 0
        self._qweight: QWeight | None = None  # the QWeight view of the buffers, built on first use

    @property
    def quantised(self) -> bool:
        return self.precision != "full"

    def hold(self, qw: QWeight) -> None:
        """Replace the weight by the quantised matrix qw (its tensors are kept, not copied)."""
        if qw.shape != (self.out_features, self.in_features):
            raise ValueError(f"a {list(qw.shape)} quantised matrix cannot replace a "
                             f"[{self.out_features}, {self.in_features}] weight")
        if "weight" in self._parameters:
            del self.weight
        self.precision, self.group = qw.precision, qw.group
        self.register_buffer("qweight", qw.q)
        self.register_buffer("scales", qw.scales.view(torch.int16))
        self._qweight = None

    def kernel_weight(self):
        """What `kernels.linear` multiplies by: the weight Tensor, or the QWeight."""
        if self.precision == "full":
            return self.weight
        if self._qweight is None:
            self._qweight = QWeight(self.precision, self.qweight, self.scales.view(torch.bfloat16), self.group,
                                    self.in_features)
        return self._qweight

    def _apply(self, fn, *args, **kwargs):
        self._qweight = None  # the buffers are replaced
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        return kernels.linear(x, self.kernel_weight())


def _adjacent(*tensors: torch.Tensor) -> bool:
    """Contiguous tensors of one dtype, each starting where the previous one ends."""
    end = tensors[0].data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.dtype != tensors[0].dtype or t.data_ptr() != end:
            return False
        end += t.numel() * t.element_size()
    return True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Rotary:
    """cos/sin tables for RoPE. On the CPU grown on demand (max_position can be 128k); on another
    device built once for `max_position` tokens, as reading the positions there would wait for it
    every forward (positions past it are the caller's error; the engine keeps within the context)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None, max_position: int | None = None):
        self.inv_freq, self.scale = rope_frequencies(head_dim, theta, scaling)
        self.cos = self.sin = torch.empty(0, head_dim // 2, device="cpu")
        self.max_position = max_position

    def __call__(self, positions: torch.Tensor):
        if positions.device.type != "cpu" and self.max_position is not None:
            need = max(self.max_position, self.cos.shape[0])
        else:
            need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0] or self.cos.device != positions.device:
            n = max(need, 2 * self.cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32, device="cpu"), self.inv_freq).to(positions.device)
            self.cos, self.sin = freqs.cos() * self.scale, freqs.sin() * self.scale  # YaRN's mscale
        return self.cos[positions], self.sin[positions]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, cfg.num_heads * hd)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd)
        self.o_proj = Linear(cfg.num_heads * hd, d)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_eps)
        self.qk_norm = cfg.qk_norm

    def qkv_weight(self) -> torch.Tensor | QWeight:
        """q, k and v stacked as one [(H + 2 KV) hd, D] matrix: one matmul instead of three. The
        three parameters are views of it (nothing is stored twice); when they are not adjacent
        in memory (replaced by .to(), say), they are stacked again first. Quantised (the three
        share the "attn" precision), the same holds for their codes and scales, and the fused
        matrix is a QWeight: rows are quantised independently, so it is the three stacked."""
        if self.q_proj.quantised:
            return self._fused_qweight()
        q, k, v = self.q_proj.weight, self.k_proj.weight, self.v_proj.weight
        if not _adjacent(q, k, v):
            self._view_into(torch.cat((q.data, k.data, v.data)))
        return q.data.as_strided((len(q) + len(k) + len(v), q.shape[1]), (q.shape[1], 1))

    def fuse_storage(self) -> None:
        """Before loading: q, k and v become views of one fresh matrix (contents discarded), so
        the loader writes them straight into the fused layout."""
        if self.q_proj.quantised:
            lin = self.q_proj, self.k_proj, self.v_proj
            self._qviews_into(torch.empty(sum(len(p.qweight) for p in lin), *lin[0].qweight.shape[1:],
                                          dtype=lin[0].qweight.dtype, device=lin[0].qweight.device),
                              torch.empty(sum(len(p.scales) for p in lin), *lin[0].scales.shape[1:],
                                          dtype=torch.int16, device=lin[0].scales.device))
            return
        q, k, v = self.q_proj.weight, self.k_proj.weight, self.v_proj.weight
        self._view_into(torch.empty(len(q) + len(k) + len(v), q.shape[1], dtype=q.dtype, device=q.device))

    def _view_into(self, w: torch.Tensor) -> None:
        q, k, v = self.q_proj.weight, self.k_proj.weight, self.v_proj.weight
        q.data, k.data, v.data = w.split((len(q), len(k), len(v)))

    def _qviews_into(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        lin = self.q_proj, self.k_proj, self.v_proj
        sizes = [len(p.qweight) for p in lin]
        for p, c, s in zip(lin, codes.split(sizes), scales.split(sizes)):
            p.qweight, p.scales, p._qweight = c, s, None

    def _fused_qweight(self) -> QWeight:
        lin = self.q_proj, self.k_proj, self.v_proj
        codes, scales = [p.qweight for p in lin], [p.scales for p in lin]
        if not (_adjacent(*codes) and _adjacent(*scales)):
            self._qviews_into(torch.cat(codes), torch.cat(scales))
            codes, scales = [p.qweight for p in lin], [p.scales for p in lin]
        rows = sum(len(c) for c in codes)
        first = lin[0].kernel_weight()
        return first._replace(q=codes[0].as_strided((rows, *codes[0].shape[1:]), codes[0].stride()),
                              scales=first.scales.as_strided((rows, *scales[0].shape[1:]), scales[0].stride()))

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = kernels.linear(x, self.qkv_weight())
        v = qkv[..., (H + KV) * hd:].view(B, T, KV, hd)
        if self.qk_norm:
            q, k = qkv[..., :H * hd].view(B, T, H, hd), qkv[..., H * hd:(H + KV) * hd].view(B, T, KV, hd)
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = kernels.apply_rotary(q, cos, sin), kernels.apply_rotary(k, cos, sin)
        else:  # q and k heads side by side share the rotation: one call
            qk = kernels.apply_rotary(qkv[..., :(H + KV) * hd].view(B, T, H + KV, hd), cos, sin)
            q, k = qk[:, :, :H], qk[:, :, H:]
        if cache is None:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True).transpose(1, 2)
        else:
            o = cache.attend(self.layer_idx, q.view(B * T, self.num_heads, self.head_dim),
                             k.view(B * T, self.num_kv_heads, self.head_dim),
                             v.view(B * T, self.num_kv_heads, self.head_dim))
        return self.o_proj(o.reshape(B, T, -1))


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """gate -> router -> routed experts (+ shared experts). Routers are plugs (docs/DESIGN.md)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        proto = cfg.prototype_router
        if proto:
            self.gate = PrototypeGate(D, E, proto["latent_dim"], proto["temperature"])
        else:
            self.gate = Linear(D, E)
        self.experts = Experts(torch.empty(E, I, D), torch.empty(E, I, D), torch.empty(E, D, I))
        self.shared_experts = DenseMLP(D, cfg.shared_intermediate_size) if cfg.num_shared_experts else None
        self.router = TopK()
        self.router_plan: ExpertPlan | None = None  # the expert plan the router brought, if any
        self.ctx = RouteContext(layer_idx, cfg.num_layers, GateRule(E, cfg.top_k, cfg.renormalize))
        self.recorder = None
        # None, or an object seeing this block's forward: routed(block, x [T, D], logits [T, E],
        # ids [T, k]) after routing and expert(block, expert, x_rows, h) per active expert (its
        # input rows and SwiGLU activations, fp32); calibration's statistics come from it
        self.observer = None

    def set_router(self, router, plan: ExpertPlan | None = None) -> None:
        """Route with `router`, its choice served by the experts under `plan` (what the router's
        attach returned). Without one, the experts go back to the default plan if the previous
        router's plan is applied; a plan applied directly to the experts is left alone."""
        if plan is not None:
            self.experts.apply_plan(plan)
        elif self.router_plan is not None:
            self.experts.apply_plan(ExpertPlan.default(self.experts.num_experts))
        self.router, self.router_plan = router, plan

    def route(self, flat):
        """Tokens [T, D] -> (expert ids [T, k], their weights in flat's dtype), recorded if asked."""
        logits = self.gate(flat)
        ids, weights = self.router.route(logits, flat, self.ctx)
        if self.recorder is not None:
            self.recorder.record(self.ctx.layer, ids)
        if self.observer is not None:
            self.observer.routed(self, flat, logits, ids)
        return ids, weights.to(flat.dtype)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        ids, weights = self.route(flat)
        observer, seen = self.observer, None
        if observer is not None:
            seen = lambda expert, xs, h: observer.expert(self, expert, xs, h)  # noqa: E731
        out = self.experts(flat, ids, weights, seen)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MoEBlock(cfg, layer_idx) if cfg.moe_layers[layer_idx] else \
            DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, residual, cos, sin, cache):
        # Residual adds are fused into the norms: x is the last sub-block's output.
        h, residual = (self.input_layernorm(x), x) if residual is None else self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, cache)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)


class Transformer(nn.Module):
    """forward(input_ids [B, T], positions [T] = arange(T), cache=None) -> logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position)

    def fuse_storage(self) -> None:
        """Before loading (contents discarded): the fused q/k/v layout, so no weight is copied into
        it later (the experts fill their own fused storage, `Experts.fill`)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_storage()

    def moe_blocks(self):
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoEBlock)]

    def hidden_states(self, input_ids, positions=None, cache=None):
        T = input_ids.shape[-1]
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)
        cos, sin = self.rotary(positions.reshape(-1))
        x, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, cache)
        return self.model.norm(x, residual)[0]

    def logits(self, hidden):
        return self.lm_head(hidden)

    def forward(self, input_ids, positions=None, cache=None):
        return self.logits(self.hidden_states(input_ids, positions, cache))
