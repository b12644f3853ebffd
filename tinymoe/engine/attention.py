"""Prefill attention over the paged KV cache (torch); decode and store_kv are tinymoe.kernels' ops."""
import torch
import torch.nn.functional as F


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_table: torch.Tensor, context_len: int, scale: float) -> torch.Tensor:
    """The last n = q.shape[0] tokens of one sequence, q [n, H, hd], attending causally over its
    first `context_len` cached tokens (a cached prefix, then the n new ones)."""
    n = q.shape[0]
    bs = k_cache.shape[1]
    blocks = block_table[:-(-context_len // bs)]
    k = k_cache[blocks].flatten(0, 1)[:context_len].transpose(0, 1)
    v = v_cache[blocks].flatten(0, 1)[:context_len].transpose(0, 1)
    start = context_len - n
    mask = torch.arange(context_len, device=q.device) <= torch.arange(start, context_len, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=True).transpose(0, 1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A whole sequence with nothing cached before it: q [n, H, hd], k/v [n, KV, hd]."""
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
