"""Torch reference paths of the paged-attention ops, with the signatures of tinymoe.kernels'."""
import torch
import torch.nn.functional as F


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor):
    """Write k, v [N, KV, hd] into the caches [num_blocks, block_size, KV, hd] at flat slots [N]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence, q [B, H, hd], over its first context_lens[b] cached tokens."""
    B, M = block_tables.shape
    _, bs, KV, hd = k_cache.shape
    k = k_cache[block_tables].view(B, M * bs, KV, hd).transpose(1, 2)
    v = v_cache[block_tables].view(B, M * bs, KV, hd).transpose(1, 2)
    mask = torch.arange(M * bs, device=q.device) < context_lens[:, None].to(torch.long)
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None, :],
                                       scale=scale, enable_gqa=True)
    return o[:, :, 0]


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
