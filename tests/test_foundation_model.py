"""The exact forward: logits against transformers (Mixtral, Qwen3-MoE) and an independent float64
reference (DeepSeek-MoE v1, which transformers lacks)."""
import json

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import tinymoe
from tinymoe.config import load_config


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        return ref(ids).logits


MIXTRAL_CONFIGS = [
    dict(),                                                                       # GQA 3:1, 3 layers
    dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=5, intermediate_size=27,
         num_local_experts=5, num_experts_per_tok=3, num_hidden_layers=2, seed=1),  # MHA, odd sizes
    dict(num_attention_heads=8, num_key_value_heads=1, hidden_size=64, num_hidden_layers=4,
         rope_theta=500.0, seed=2),                                               # MQA, theta
]
QWEN3_CONFIGS = [
    dict(),                                                                       # renormalised, dense layer 1
    dict(norm_topk_prob=False, num_experts=10, num_experts_per_tok=4, mlp_only_layers=[],
         decoder_sparse_step=2, hidden_size=36, head_dim=12, seed=3),            # sparse every 2nd layer
]


@pytest.mark.parametrize("overrides", MIXTRAL_CONFIGS)
def test_mixtral_matches_transformers(tmp_path, overrides):
    path = checkpoints.mixtral(tmp_path, **overrides)
    ids = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tinymoe.load_model(path)(ids)
    assert rel_err(ours, hf_logits(path, ids)) < 1e-4


@pytest.mark.parametrize("overrides", QWEN3_CONFIGS)
def test_qwen3_matches_transformers(tmp_path, overrides):
    path = checkpoints.qwen3_moe(tmp_path, shard=True, **overrides)
    ids = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tinymoe.load_model(path)(ids)
    assert rel_err(ours, hf_logits(path, ids)) < 1e-4


def deepseek_reference(path, ids):
    """DeepSeek-MoE v1 written from the published architecture, in float64, one token at a time for
    the experts: softmax gate over all experts, top-k, weights NOT renormalised, shared experts
    always on, first layer dense."""
    cfg = json.loads((path / "config.json").read_text())
    W = {k: v.double() for k, v in load_file(path / "model.safetensors").items()}
    H, D = cfg["num_attention_heads"], cfg["hidden_size"]
    hd, eps, k = D // H, cfg["rms_norm_eps"], cfg["num_experts_per_tok"]
    T = ids.shape[0]

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def mlp(x, p):
        return (torch.nn.functional.silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) \
            @ W[p + "down_proj.weight"].T

    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if cfg.get("rope_scaling"):  # DeepSeek's linear scaling divides the positions by the factor
        assert cfg["rope_scaling"]["type"] == "linear"
        inv = inv / cfg["rope_scaling"]["factor"]
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # [T, H, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    x = W["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, W[p + "input_layernorm.weight"])
        q = rope((h @ W[p + "self_attn.q_proj.weight"].T).view(T, H, hd))
        kk = rope((h @ W[p + "self_attn.k_proj.weight"].T).view(T, H, hd))
        v = (h @ W[p + "self_attn.v_proj.weight"].T).view(T, H, hd)
        scores = torch.einsum("thd,shd->hts", q, kk) / hd ** 0.5
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        att = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, D)
        x = x + att @ W[p + "self_attn.o_proj.weight"].T
        h = norm(x, W[p + "post_attention_layernorm.weight"])
        if i < cfg["first_k_dense_replace"]:
            x = x + mlp(h, p + "mlp.")
            continue
        probs = (h @ W[p + "mlp.gate.weight"].T).softmax(-1)
        out = mlp(h, p + "mlp.shared_experts.")
        for t in range(T):
            top = torch.topk(probs[t], k)
            for w, e in zip(top.values, top.indices.tolist()):
                out[t] += w * mlp(h[t], f"{p}mlp.experts.{e}.")
        x = x + out
    return norm(x, W["model.norm.weight"]) @ W["lm_head.weight"].T


def test_deepseek_matches_float64_reference(tiny_deepseek):
    ids = torch.randint(0, 96, (1, 21), generator=torch.Generator().manual_seed(2))
    model = tinymoe.load_model(tiny_deepseek)
    assert model.config.moe_layers == (False, True, True)
    assert not model.config.renormalize and model.config.num_shared_experts == 2
    with torch.no_grad():
        ours = model(ids)[0]
    assert rel_err(ours, deepseek_reference(tiny_deepseek, ids[0])) < 1e-4


def test_bf16_runs_close_to_fp32(tiny_checkpoint):
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = tinymoe.load_model(tiny_checkpoint)(ids)
        half = tinymoe.load_model(tiny_checkpoint, dtype="bf16")(ids)
    assert half.dtype == torch.bfloat16
    assert rel_err(half, full) < 0.05
    assert (half.argmax(-1) == full.argmax(-1)).float().mean() > 0.8


def test_batch_rows_are_independent(tiny_mixtral):
    model = tinymoe.load_model(tiny_mixtral)
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        together = model(ids)
        alone = torch.cat([model(ids[i:i + 1]) for i in range(3)])
    assert rel_err(together, alone) < 1e-5


def test_config_reads_both_rope_spellings_and_expert_keys(tmp_path):
    base = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=10, hidden_size=8, num_hidden_layers=4,
                num_attention_heads=2, intermediate_size=8, moe_intermediate_size=4, num_experts_per_tok=2,
                decoder_sparse_step=2, mlp_only_layers=[3])
    for extra, theta in [(dict(rope_theta=123.0, num_experts=6), 123.0),
                         (dict(rope_parameters={"rope_theta": 77.0, "rope_type": "default"},
                               num_local_experts=6), 77.0)]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **extra}))
        cfg = load_config(tmp_path)
        assert cfg.rope_theta == theta and cfg.num_experts == 6
        assert cfg.moe_layers == (False, True, False, False)  # every 2nd layer, layer 3 forced dense
        assert cfg.head_dim == 4 and cfg.qk_norm


def test_deepseek_config_layers(tmp_path):
    cfg = dict(checkpoints.DEEPSEEK_CONFIG, num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = load_config(tmp_path)
    assert c.moe_layers == (False, False, True, False, True, False)
    assert c.shared_intermediate_size == 2 * 16 and c.top_k == 4


def test_fused_qkv_follows_the_parameters(tiny_mixtral):
    model = tinymoe.load_model(tiny_mixtral)
    attn = model.model.layers[0].self_attn
    experts = model.moe_blocks()[0].experts
    E, I, D = experts.w_gate.shape
    # loaded straight into the fused layouts: nothing to copy on the first forward
    assert experts.w_up.data_ptr() == experts.w_gate.data_ptr() + I * D * experts.w_gate.element_size()
    assert experts.full_pool().w13.data_ptr() == experts.w_gate.data_ptr()
    q_ptr = attn.q_proj.weight.data_ptr()
    fused = attn.qkv_weight()
    assert fused.data_ptr() == q_ptr
    assert fused.data_ptr() == attn.q_proj.weight.data_ptr()  # views, not copies
    assert torch.equal(fused, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids)
        model.to(torch.bfloat16)  # new parameters: the fused matrix must be rebuilt from them
        assert attn.qkv_weight().dtype == torch.bfloat16
        attn.v_proj.weight.zero_()
        assert attn.qkv_weight()[-attn.v_proj.weight.shape[0]:].abs().sum() == 0
    assert before.dtype == torch.float32


def _published_rope_scaling(path, scaling: dict):
    """Rewrite config.json the way a model card says to: a top-level `rope_scaling` (and
    rope_theta), as published checkpoints carry it; transformers and tinymoe read the same file."""
    cfg = json.loads((path / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    (path / "config.json").write_text(json.dumps({**cfg, "rope_theta": theta, "rope_scaling": scaling}))
    return path


# Short pre-training lengths so the 40-token inputs run past them and the YaRN ramp covers pairs.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
ROPE_SCALINGS = [
    {"type": "linear", "factor": 2.5},                                     # old spelling: "type"
    YARN,                                                                  # Qwen3's model card, scaled down
    {**YARN, "factor": 3.0, "beta_fast": 8, "beta_slow": 2, "truncate": False},
    {**YARN, "mscale": 0.8, "mscale_all_dim": 0.5},                        # DeepSeek's attention factor
    {**YARN, "attention_factor": 1.3},
]


@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("family", ["mixtral", "qwen3"])
def test_rope_scaling_matches_transformers(tmp_path, family, scaling):
    if family == "mixtral":
        # head_dim given: transformers' YaRN reads config.head_dim, which Mixtral leaves None otherwise
        path = checkpoints.mixtral(tmp_path, num_hidden_layers=2, head_dim=8, rope_theta=500.0, seed=4)
    else:
        path = checkpoints.qwen3_moe(tmp_path, num_hidden_layers=2, rope_theta=1000.0, seed=5)
    path = _published_rope_scaling(path, scaling)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(6))
    model = tinymoe.load_model(path)
    assert model.config.rope_scaling["type"] == scaling.get("rope_type", scaling.get("type"))
    with torch.no_grad():
        ours = model(ids)
    ref = hf_logits(path, ids)
    assert rel_err(ours, ref) < 1e-4
    # the scaling matters: without it the logits are far off
    model.rotary = type(model.rotary)(model.config.head_dim, model.config.rope_theta)
    with torch.no_grad():
        assert rel_err(model(ids), ref) > 1e-3


def test_yarn_extends_the_context_and_the_engine_matches_the_forward(tmp_path):
    path = checkpoints.qwen3_moe(tmp_path, num_hidden_layers=2, max_position_embeddings=32, seed=7)
    model = tinymoe.load_model(_published_rope_scaling(path, YARN))
    assert model.config.max_position == 64  # 4 x 16, past max_position_embeddings (32)
    ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(8))
    llm = tinymoe.LLM(model)
    out = llm.generate([ids[0].tolist()], tinymoe.SamplingParams(max_tokens=6, temperature=0))[0]
    seq = ids[0].tolist()
    with torch.no_grad():  # greedy through the paged cache equals recomputing the whole sequence
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.token_ids == seq[30:]


def test_deepseek_linear_rope_matches_float64_reference(tmp_path):
    path = checkpoints.deepseek_moe(tmp_path, rope_scaling={"type": "linear", "factor": 2.0})
    ids = torch.randint(0, 96, (1, 21), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours = tinymoe.load_model(path)(ids)[0]
    assert rel_err(ours, deepseek_reference(path, ids[0])) < 1e-4


def test_yarn_in_bf16_one_call_decode_equals_the_per_op_path(tmp_path, monkeypatch):
    """The one-call decode step reads the same scaled cos/sin tables as the per-op path."""
    import tinymoe.engine.model_runner as model_runner
    from tinymoe.kernels.native import native
    if native() is None:
        pytest.skip("the native library is unavailable here")
    path = checkpoints.qwen3_moe(tmp_path, num_hidden_layers=2, max_position_embeddings=32, seed=10)
    model = tinymoe.load_model(_published_rope_scaling(path, {**YARN, "attention_factor": 1.5}), dtype="bf16")
    prompt = torch.randint(0, 96, (30,), generator=torch.Generator().manual_seed(11)).tolist()
    params = tinymoe.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    step, taken, outs = model_runner.decode_step, [], {}
    monkeypatch.setattr(model_runner, "decode_step", lambda *a: taken.append(step(*a)) or taken[-1])
    for native_step in (True, False):
        taken.clear()
        with tinymoe.settings.override(native_step=native_step):
            outs[native_step] = tinymoe.LLM(model).generate([prompt], params)[0].token_ids
        assert any(t is not None for t in taken) == native_step
    assert outs[True] == outs[False]
