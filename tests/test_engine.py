"""The engine end to end on each family's tiny checkpoint, against full recomputation."""
import json
import shutil

import pytest
import torch

from tinymoe import load_model
from tinymoe.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def full_recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference: no cache, the whole sequence through load_model's forward every step."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(lengths, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def add_tokenizer(checkpoint, target):
    """A copy of `checkpoint` with a small trained BPE tokenizer (ids 0-2: <unk> <s> </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    shutil.copytree(checkpoint, target)
    text = ("the cat sat on the mat. a dog ran to the park and the cat ran home. "
            "hello world, how are you today? i am fine, thank you. ") * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(target / "tokenizer.json"))
    (target / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    return target


@pytest.fixture(scope="module")
def mixtral_model(tiny_mixtral):
    return load_model(tiny_mixtral)


@pytest.fixture(scope="module")
def mixtral_with_tokenizer(tiny_mixtral, tmp_path_factory):
    return add_tokenizer(tiny_mixtral, tmp_path_factory.mktemp("tok") / "mixtral")


def test_greedy_with_cache_equals_full_recompute(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    llm = LLM(model, block_size=4)
    ps = prompts([5, 13, 1])
    outs = llm.generate(ps, GREEDY)
    for p, out in zip(ps, outs):
        assert out.token_ids == full_recompute_greedy(model, p, 16)
        assert out.finish_reason == "length"


def test_triton_kernels_plug_into_the_same_cache(mixtral_model):
    """The attention-kernel Triton ops (Triton's interpreter on CPU) through the engine's paged cache:
    chunked prefill over cached blocks, then batched decode, give the torch backend's tokens."""
    from tinymoe import kernels
    ps = prompts([9, 3], seed=8)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    def run():
        return [o.token_ids for o in LLM(mixtral_model, block_size=4, max_num_seqs=2, max_batch_tokens=6)
                .generate(ps, params)]
    with kernels.use_backend("torch"):
        expected = run()
    with kernels.use_backend("triton"):
        assert run() == expected


def test_requests_arriving_mid_decode_get_their_solo_tokens(mixtral_model):
    ps = prompts([3, 17, 8, 30, 1, 12], seed=1)
    alone = [full_recompute_greedy(mixtral_model, p, 16) for p in ps]
    # A small token budget chunks the long prompts and mixes them with running decodes.
    llm = LLM(mixtral_model, block_size=4, max_num_seqs=6, max_batch_tokens=10)
    ids, results = [], {}
    for i, p in enumerate(ps):
        ids.append(llm.add_request(p, GREEDY))
        for _ in range(i % 3):
            results.update((o.request_id, o.token_ids) for o in llm.step())
    while llm.has_unfinished():
        results.update((o.request_id, o.token_ids) for o in llm.step())
    assert [results[i] for i in ids] == alone


def test_prefix_cache_reuses_blocks_with_identical_output(mixtral_model):
    prefix = prompts([40], seed=2)[0]
    a, b = prefix + [5, 6, 7], prefix + [9, 10]
    cold = LLM(mixtral_model, block_size=4, prefix_caching=False).generate([a, b], GREEDY)
    llm = LLM(mixtral_model, block_size=4)
    first = llm.generate(a, GREEDY)[0]
    second = llm.generate(b, GREEDY)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 40
    assert llm.blocks.prefix_hits == 10
    assert [first.token_ids, second.token_ids] == [o.token_ids for o in cold]
    # The same prompt again: everything but its last token comes from the cache.
    again = llm.generate(a, GREEDY)[0]
    assert again.num_cached_tokens == 40 and again.token_ids == first.token_ids


def test_small_cache_preempts_and_every_request_completes(mixtral_model):
    ps = prompts([10, 7, 12, 9], seed=3)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    alone = [full_recompute_greedy(mixtral_model, p, 30) for p in ps]
    # 64 slots, while the four requests grow to about 40 tokens each.
    llm = LLM(mixtral_model, block_size=4, kv_cache_tokens=64)
    outs = llm.generate(ps, params)
    assert llm.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_seeded_sampling_repeats_whatever_the_batch(mixtral_model):
    llm = LLM(mixtral_model, block_size=4)
    p = prompts([6], seed=4)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True)
    solo = llm.generate(p, seeded)[0].token_ids
    batched = llm.generate([p] + prompts([3, 9], seed=5), [seeded] + [SamplingParams(temperature=1.0, max_tokens=12)] * 2)
    assert batched[0].token_ids == solo
    other = llm.generate(p, SamplingParams(temperature=1.0, top_p=0.9, seed=12, max_tokens=12, ignore_eos=True))
    assert other[0].token_ids != solo


def test_repetition_penalty_and_filters_run_through_the_engine(mixtral_model):
    llm = LLM(mixtral_model, block_size=4)
    p = prompts([6], seed=7)[0]
    plain = llm.generate(p, GREEDY)[0].token_ids
    penalised = llm.generate(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                               repetition_penalty=5.0))[0].token_ids
    assert len(set(penalised)) > len(set(plain))  # the tiny model repeats itself; the penalty breaks that
    top1 = llm.generate(p, SamplingParams(temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True))[0]
    assert top1.token_ids == plain  # top-k 1 is greedy whatever the temperature


def test_eos_and_stop_tokens_end_a_request(mixtral_model):
    llm = LLM(mixtral_model, block_size=4)
    p = prompts([5], seed=6)[0]
    free = llm.generate(p, GREEDY)[0].token_ids
    stop_at = free[3]
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free[:free.index(stop_at) + 1] and out.finish_reason == "stop"


def test_prompt_past_the_context_is_a_clear_error(mixtral_model):
    llm = LLM(mixtral_model, max_model_len=32)
    with pytest.raises(ValueError, match="prompt has 40 tokens, but the context holds 32"):
        llm.generate(prompts([40])[0], GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", GREEDY)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):
        llm.generate([5, 500], GREEDY)
    assert not llm.has_unfinished()


def test_generation_stops_at_the_context_end(mixtral_model):
    llm = LLM(mixtral_model, max_model_len=20, block_size=4)
    out = llm.generate(prompts([15])[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_text_stream_chat_and_stop_strings(mixtral_with_tokenizer):
    llm = LLM(mixtral_with_tokenizer, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = llm.generate("the cat sat on", params)[0]
    assert out.prompt_token_ids[0] == llm.tokenizer.bos_id
    assert out.text == llm.tokenizer.decode(out.prompt_token_ids + out.token_ids)[
        len(llm.tokenizer.decode(out.prompt_token_ids)):]
    stream = llm.stream("the cat sat on", params)
    pieces = list(stream)
    assert "".join(pieces) == out.text and stream.output.token_ids == out.token_ids and len(pieces) > 1
    # A stop string cuts the text before it, also when streamed.
    stop = out.text.strip()[3:6]
    cut = llm.generate("the cat sat on", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == out.text[:out.text.index(stop)]
    streamed = llm.stream("the cat sat on", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert "".join(streamed) == cut.text
    # chat renders the family's template (Mixtral [INST] format) and replies.
    reply = llm.chat([{"role": "user", "content": "hello"}], params)
    expected = llm.tokenizer.encode("<s>[INST] hello [/INST]", add_bos=False)
    assert reply.prompt_token_ids == expected and reply.prompt_token_ids.count(llm.tokenizer.bos_id) == 1
    assert len(reply.token_ids) == 24


def test_a_loaded_model_brings_its_checkpoints_tokenizer(mixtral_with_tokenizer):
    llm = LLM(load_model(mixtral_with_tokenizer), router=None)
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("the cat") and len(out.token_ids) == 3
    with pytest.raises(ValueError, match="dtype applies when LLM loads the model by name"):
        LLM(llm.model, dtype="bfloat16")


def test_abandoned_stream_frees_its_blocks(mixtral_with_tokenizer):
    llm = LLM(mixtral_with_tokenizer, block_size=4)
    stream = llm.stream("hello world", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream_iter = iter(stream)  # a fresh iterator; the first was closed by break
    del stream_iter
    assert not llm.has_unfinished() and llm.blocks.num_free == llm.blocks.num_blocks


def interrupt_after(monkeypatch, steps: int):
    """Make LLM._step raise KeyboardInterrupt (a Ctrl-C) once `steps` steps have run."""
    calls, original = [], LLM._step

    def step(self):
        calls.append(1)
        if len(calls) > steps:
            raise KeyboardInterrupt
        return original(self)
    monkeypatch.setattr(LLM, "_step", step)
    return calls


def test_interrupted_generate_aborts_and_keeps_what_was_generated(mixtral_model, monkeypatch):
    llm = LLM(mixtral_model, block_size=4)
    ps = prompts([5, 9, 3], seed=9)
    params = [GREEDY, GREEDY, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)]
    full = llm.generate(ps, params)
    interrupt_after(monkeypatch, 5)  # one step of prefill (a token each), then four decodes
    with pytest.raises(KeyboardInterrupt) as info:
        llm.generate(ps, params)
    outs = info.value.outputs
    assert [o.finish_reason for o in outs] == ["abort", "abort", "length"]
    assert [o.token_ids for o in outs] == [full[0].token_ids[:5], full[1].token_ids[:5], full[2].token_ids]
    assert not llm.has_unfinished() and llm.blocks.num_free == llm.blocks.num_blocks
    monkeypatch.undo()
    assert [o.token_ids for o in llm.generate(ps, params)] == [o.token_ids for o in full]  # still usable


def test_numpy_and_torch_token_ids_are_prompts(mixtral_model):
    import numpy as np
    llm = LLM(mixtral_model, block_size=4)
    a, b = prompts([6, 6], seed=10)
    one, two = llm.generate(a, GREEDY)[0].token_ids, llm.generate(b, GREEDY)[0].token_ids
    for single in (np.array(a), np.array(a, dtype=np.int32), np.array(a, dtype=np.uint8), torch.tensor(a),
                   [np.int64(t) for t in a]):
        assert [o.token_ids for o in llm.generate(single, GREEDY)] == [one]
    for several in (np.array([a, b]), torch.tensor([a, b], dtype=torch.int32), [np.array(a), torch.tensor(b)]):
        assert [o.token_ids for o in llm.generate(several, GREEDY)] == [one, two]


def test_bad_token_id_arrays_are_one_line_errors_before_any_step(mixtral_model, monkeypatch):
    import numpy as np
    llm = LLM(mixtral_model, block_size=4)
    steps = interrupt_after(monkeypatch, 0)
    cases = [
        (np.array([1.0, 2.0], dtype=np.float32), TypeError, "token ids must be integers, not float32"),
        (torch.tensor([1.0, 2.0]), TypeError, "token ids must be integers, not torch.float32"),
        (np.array([True, False]), TypeError, "token ids must be integers, not bool"),
        (np.zeros((1, 2, 3), dtype=np.int64), ValueError,
         "a token-id array must be 1-D (one prompt) or 2-D (several prompts), not 3-D"),
        (np.array(5), ValueError, "a token-id array must be 1-D (one prompt) or 2-D (several prompts), not 0-D"),
        ([np.array([[1, 2]])], ValueError, "a token-id array must be 1-D, not 2-D"),
        ([[1.5, 2]], TypeError, "token ids must be integers, not float"),
        ([None], TypeError, "a prompt is text or token ids, not NoneType"),
    ]
    for prompt, kind, message in cases:
        with pytest.raises(kind) as info:
            llm.generate(prompt, GREEDY)
        assert str(info.value) == message
    assert steps == [] and not llm.has_unfinished()
