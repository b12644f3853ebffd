"""The one-call decode step (models/native_decode.py + kernels/cpu_decode.cpp) against the per-op
path it replaces: the same logits and the same K/V writes, bit for bit, step by step."""
import sys

import checkpoints
import pytest
import torch

import tinymoe.engine.model_runner as model_runner
from tinymoe import load_model, settings
from tinymoe.engine import LLM, SamplingParams
from tinymoe.experts.plan import Copy, ExpertPlan
from tinymoe.kernels import cpu_linear
from tinymoe.kernels.native import native
from tinymoe.models import native_decode
from tinymoe.routing.metrics import LoadRecorder

pytestmark = pytest.mark.skipif(native() is None, reason="the native library is unavailable here")


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


def checked_runner(llm, monkeypatch):
    """Every step runs twice, per-op path first, from the same cache; asserts both agree and
    counts the steps the one-call path took."""
    runner, cache, taken = llm.runner, llm.runner.cache, []
    run, step = runner.run, model_runner.decode_step
    llm.checked_steps = 0

    def counted(*args):
        out = step(*args)
        taken.append(out is not None)
        return out

    def both(batch):
        llm.checked_steps += 1
        k, v = cache.k.clone(), cache.v.clone()
        with settings.override(native_step=False):
            ref_logits, _ = run(batch)
        ref_k, ref_v = cache.k.clone(), cache.v.clone()
        cache.k.copy_(k)
        cache.v.copy_(v)
        with settings.override(native_step=True):
            logits, seqs = run(batch)
        assert torch.equal(logits, ref_logits)
        assert torch.equal(cache.k, ref_k) and torch.equal(cache.v, ref_v)
        return logits, seqs

    monkeypatch.setattr(model_runner, "decode_step", counted)
    monkeypatch.setattr(runner, "run", both)
    return taken


def run_three(llm, threads=1):
    """Three requests of different lengths: steps with three, two and one sequence (one token
    has its own native path)."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for p, n in zip(prompts([5, 13, 2]), (6, 10, 14)):
            llm.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        while llm.has_unfinished():
            llm.step()
    finally:
        torch.set_num_threads(threads_before)


@pytest.mark.parametrize("family, threads, cache_tokens", [
    ("mixtral", 1, None), ("deepseek", 1, None), ("qwen3", 1, None),
    ("mixtral", 2, None),  # the native matmuls split over threads
    ("mixtral", 1, 28),    # a cache too small for all three: preempted and recomputed
])
def test_one_call_step_equals_the_per_op_path(family, threads, cache_tokens, tiny_mixtral, tiny_qwen3, tmp_path,
                                              monkeypatch):
    # Mixtral: renormalised top-2; DeepSeek: a dense first layer, shared experts, no
    # renormalisation (head_dim 16: the native attention takes multiples of 8); Qwen3: per-head
    # q/k norms, a dense layer, top-3
    if family == "deepseek":
        path = checkpoints.deepseek_moe(tmp_path, hidden_size=64)
    else:
        path = {"mixtral": tiny_mixtral, "qwen3": tiny_qwen3}[family]
    model = load_model(path, dtype="bfloat16")
    llm = LLM(model, block_size=4, kv_cache_tokens=cache_tokens)
    taken = checked_runner(llm, monkeypatch)
    run_three(llm, threads)
    assert all(native_decode._routing(b) == native_decode.ROUTE_TOPK for b in model.moe_blocks())
    assert sum(taken) >= 12
    assert (llm.scheduler.num_preemptions > 0) == (cache_tokens is not None)


@pytest.mark.parametrize("invariant", [True, False], ids=["batch-invariant", "gemm-allowed"])
def test_batches_over_16_follow_the_rows_decision(invariant, tiny_mixtral, monkeypatch, bf16_cpu):
    """Batch-invariant (the default), the one-call step takes every decode batch. Otherwise, with
    bf16 instructions (forced here both ways) a batch over 16 sequences is left to the per-op
    path, whose projections then run torch's GEMM; without, the one-call step takes it. Either
    way the step it takes equals the per-op path bit for bit."""
    model = load_model(tiny_mixtral, dtype="bfloat16")
    llm = LLM(model, block_size=4)
    sizes, decode_step = [], native_decode.decode_step

    def sized(model, ids, *rest):
        sizes.append(len(ids))
        return decode_step(model, ids, *rest)
    monkeypatch.setattr(model_runner, "decode_step", sized)
    taken = checked_runner(llm, monkeypatch)
    with settings.override(batch_invariant=invariant):
        for p, n in zip(prompts([3 + i % 5 for i in range(18)]), [3] * 6 + [6] * 12):
            llm.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        while llm.has_unfinished():
            llm.step()
    # each step is offered twice: with the one-call step off (the per-op reference), then on
    assert not any(taken[0::2])
    assert taken[1::2] == [size <= 16 or invariant or not bf16_cpu for size in sizes[1::2]]
    assert 18 in sizes and 12 in sizes  # both sides of 16 were stepped


def full_replicas(model):
    """Every expert once plus full-precision replicas of experts 0 and 2: copies picked per token."""
    for block in model.moe_blocks():
        E = block.experts.num_experts
        block.experts.apply_plan(ExpertPlan([Copy(e, "full") for e in range(E)] + [Copy(0, "full"), Copy(2, "full")]))


@pytest.mark.parametrize("setup", ["laser", "balanced", "recorder", "replicas", "prototype gate"])
def test_other_routing_is_called_back_and_equals_the_per_op_path(setup, tiny_mixtral, monkeypatch):
    model = load_model("tiny-lpr" if setup == "prototype gate" else tiny_mixtral, dtype="bfloat16")
    llm = LLM(model, router=setup if setup in ("laser", "balanced") else "topk", block_size=4)
    recorder = LoadRecorder().attach(model) if setup == "recorder" else None
    chosen = []
    if setup == "replicas":
        full_replicas(model)
        for block in model.moe_blocks():
            def recorded(ids, pick=block.experts.physical_ids):
                chosen.append(pick(ids))
                return chosen[-1]
            monkeypatch.setattr(block.experts, "physical_ids", recorded)
    taken = checked_runner(llm, monkeypatch)
    run_three(llm)
    if setup == "replicas":  # replicas were chosen, and their pointers led to the right weights
        assert any(int(c.max()) >= model.config.num_experts for c in chosen)
    assert all(native_decode._routing(b) == native_decode.ROUTE_CALLBACK for b in model.moe_blocks())
    assert sum(taken) >= 12
    if recorder is not None:  # each step runs twice (per-op, then native when it takes it): each run records
        passes = len(recorder.passes["run"][model.moe_blocks()[0].ctx.layer])
        assert passes == 2 * llm.checked_steps


def test_a_router_error_surfaces_from_the_native_step(tiny_mixtral):
    model = load_model(tiny_mixtral, dtype="bfloat16")
    llm = LLM(model, router="balanced", block_size=4)
    llm.generate(prompts([4]), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # prefill + decode fine
    block = model.moe_blocks()[1]

    def failing(logits, hidden, ctx):
        raise RuntimeError("router failed")
    block.router.route = failing
    with pytest.raises(RuntimeError, match="router failed"):
        llm.generate(prompts([4]), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    llm = LLM(model, router="balanced", block_size=4)
    balanced = block.router.route
    prefill_done = []

    def out_of_range(logits, hidden, ctx):
        ids, weights = balanced(logits, hidden, ctx)
        if prefill_done:  # decode steps: a copy the plan does not have
            ids = ids + ctx.rule.num_experts
        prefill_done.append(1)
        return ids, weights
    block.router.route = out_of_range
    with pytest.raises(ValueError, match="outside its layer's plan"):
        llm.generate(prompts([4]), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))


def test_what_it_does_not_cover_takes_the_per_op_path(tiny_mixtral):
    fp32 = load_model(tiny_mixtral)
    mixed = load_model(tiny_mixtral, dtype="bfloat16")
    observed = load_model(tiny_mixtral, dtype="bfloat16")
    for model, covered in ((fp32, False), (mixed, True), (observed, False)):
        llm = LLM(model, block_size=4)
        if model is mixed:  # quantised copies are covered too
            for block in model.moe_blocks():
                E = block.experts.num_experts
                block.experts.apply_plan(ExpertPlan([Copy(e, "int8" if e == 1 else "full") for e in range(E)]))
        if model is observed:  # only the per-op path reports the experts' activations
            model.moe_blocks()[0].observer = object()
        assert native_decode.covers(model, llm.runner.cache.k) == covered
        if model is not observed:
            out = llm.generate(prompts([7]), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
            assert len(out.token_ids) == 4


QUANT = {  # name -> (load_model's quant, a plan of every expert plus quantised replicas)
    "int8": ("int8", False),
    "int4": ("int4", False),
    "mixed parts": ("experts=int4,shared=int8,dense=int4,attn=int8,head=int8", False),
    "R&Q-like": ("attn=int4", True),
}


def rnq_like(model):
    """Every expert at the base precision plus int4 and int8 replicas: copies picked per token."""
    for block in model.moe_blocks():
        E = block.experts.num_experts
        block.experts.apply_plan(ExpertPlan([Copy(e) for e in range(E)] + [Copy(0, "int4"), Copy(2, "int4"),
                                                                            Copy(1, "int8")]))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("family", ["mixtral", "deepseek", "qwen3"])
def test_quantised_one_call_step_equals_the_per_op_path(family, quant, threads, tiny_mixtral, tiny_qwen3, tmp_path,
                                                        monkeypatch):
    """int8 / int4 projections and expert copies, per part or through a plan: the one-call step
    reads them as the per-op path's kernels do, logits and caches bit for bit."""
    if family == "deepseek":
        path = checkpoints.deepseek_moe(tmp_path, hidden_size=64)
    else:
        path = {"mixtral": tiny_mixtral, "qwen3": tiny_qwen3}[family]
    spec, replicas = QUANT[quant]
    model = load_model(path, dtype="bfloat16", quant=spec)
    if replicas:
        rnq_like(model)
    layer = model.model.layers[-1]
    assert not isinstance(layer.self_attn.o_proj.kernel_weight(), torch.Tensor)  # quantised projections
    if quant != "R&Q-like":
        precision = spec if quant != "mixed parts" else "int4"
        assert {name for name, _ in layer.mlp.experts.copies().where} == {precision}
    llm = LLM(model, block_size=4)
    taken = checked_runner(llm, monkeypatch)
    run_three(llm, threads)
    routing = native_decode.ROUTE_CALLBACK if replicas else native_decode.ROUTE_TOPK
    assert all(native_decode._routing(b) == routing for b in model.moe_blocks())
    assert sum(taken) >= 12


def test_parameters_replaced_after_the_first_step_are_seen(tiny_mixtral):
    model = load_model(tiny_mixtral, dtype="bfloat16")
    llm = LLM(model, block_size=4)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = llm.generate(prompts([9]), greedy)[0].token_ids
    with torch.no_grad():  # new storage for the LM head's input: the cached description must follow
        norm = model.model.norm.weight
        norm.data = -norm.data.clone()
    after = llm.generate(prompts([9]), greedy)[0].token_ids
    assert after != before
    assert after == LLM(model, block_size=4).generate(prompts([9]), greedy)[0].token_ids


def test_quantised_weights_replaced_after_the_first_step_are_seen(tiny_mixtral):
    model = load_model(tiny_mixtral, dtype="bfloat16", quant="int8")
    llm = LLM(model, block_size=4)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = llm.generate(prompts([9]), greedy)[0].token_ids
    first = native_decode._described[model]
    assert first[1] is not None  # the one-call step ran
    # new buffers for the last o projection (after every K/V write, so the prefix cache stays
    # valid): the cached description must follow
    o = model.model.layers[-1].self_attn.o_proj
    qw = o.kernel_weight()
    o.hold(qw._replace(q=-qw.q, scales=qw.scales.clone()))
    after = llm.generate(prompts([9]), greedy)[0].token_ids
    assert after != before and native_decode._described[model] is not first
    with settings.override(native_step=False):
        assert after == LLM(model, block_size=4).generate(prompts([9]), greedy)[0].token_ids


@pytest.mark.parametrize("how", ["data", "parameter"])
@pytest.mark.parametrize("replaced", ["embeddings", "final norm", "head"])
def test_weights_replaced_after_the_first_step_are_seen(replaced, how, tiny_mixtral):
    """The step reads the embeddings, the norms and the LM head itself: new storage for any of
    them, swapped in (.data) or as a new Parameter, is followed. (A new prompt after the change:
    the prefix cache holds K/V computed from the old weights.)"""
    model = load_model(tiny_mixtral, dtype="bfloat16")
    llm = LLM(model, block_size=4)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm.generate(prompts([9]), greedy)
    first = native_decode._described[model]
    owner = {"embeddings": model.model.embed_tokens, "final norm": model.model.norm, "head": model.lm_head}[replaced]
    with torch.no_grad():
        new = owner.weight.data.flip(0).clone() if replaced != "final norm" else -owner.weight.data
        if how == "data":
            owner.weight.data = new
        else:
            owner.weight = torch.nn.Parameter(new, requires_grad=False)
    after = llm.generate(prompts([9], seed=1), greedy)[0].token_ids
    assert native_decode._described[model] is not first
    with settings.override(native_step=False):
        assert after == LLM(model, block_size=4).generate(prompts([9], seed=1), greedy)[0].token_ids


def test_the_head_runs_after_the_step_when_linear_would_not_take_it_natively(tiny_mixtral, monkeypatch):
    """When kernels.linear would not run the LM head natively for these rows, the step leaves it to
    model.logits: the same logits as the per-op path either way."""
    model = load_model(tiny_mixtral, dtype="bfloat16", quant="int8")
    llm = LLM(model, block_size=4)
    real, declined = cpu_linear.supports, []

    def not_inside_the_step(x, w):
        if sys._getframe(1).f_code is native_decode.decode_step.__wrapped__.__code__:
            declined.append(1)
            return False
        return real(x, w)
    monkeypatch.setattr(cpu_linear, "supports", not_inside_the_step)
    taken = checked_runner(llm, monkeypatch)
    run_three(llm)
    assert sum(taken) >= 12 and len(declined) == sum(taken)


def test_a_token_outside_the_vocabulary_is_an_error_not_a_read_past_the_embeddings(tiny_mixtral):
    model = load_model(tiny_mixtral, dtype="bfloat16")
    cache = LLM(model, block_size=4).runner.cache
    V = model.config.vocab_size
    for bad in (V, -1):
        with pytest.raises(ValueError, match=rf"token id outside \[0, {V}\)"):
            native_decode.decode_step(model, torch.tensor([bad]), torch.tensor([0]), cache.k, cache.v,
                                      torch.tensor([0]), torch.zeros(1, 1, dtype=torch.int32),
                                      torch.ones(1, dtype=torch.int32), cache.scale)
