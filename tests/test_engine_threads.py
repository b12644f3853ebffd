"""One LLM shared by several threads: their requests join one running batch, each output equal
to the same request run alone (fp32 tiny Mixtral, greedy)."""
import threading

import pytest

from test_engine import add_tokenizer, prompts
from tinymoe import load_model
from tinymoe.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_mixtral):
    m = load_model(tiny_mixtral)
    assert next(m.parameters()).dtype.is_floating_point and next(m.parameters()).element_size() == 4
    return m


@pytest.fixture(scope="module")
def with_tokenizer(tiny_mixtral, tmp_path_factory):
    return add_tokenizer(tiny_mixtral, tmp_path_factory.mktemp("threads") / "mixtral")


def run_threads(*targets, timeout=60):
    """Start every target at once (a barrier); re-raise the first error a thread hit."""
    barrier, errors = threading.Barrier(len(targets)), []

    def wrap(fn):
        def body():
            try:
                barrier.wait()
                fn()
            except BaseException as e:  # noqa: BLE001 - reported to the test below
                errors.append(e)
        return body
    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def record_batches(llm):
    """The request ids of every step's batch."""
    batches, run = [], llm.runner.run

    def recording(batch):
        batches.append({seq.seq_id for seq, _ in batch})
        return run(batch)
    llm.runner.run = recording
    return batches


def test_two_threads_share_one_batch_and_get_their_solo_outputs(model):
    ps = prompts([3, 17, 8, 30, 1, 12, 5, 9, 22, 4, 14, 7, 2, 11, 19, 6], seed=21)
    solo = LLM(model, block_size=4)
    alone = [solo.generate(p, GREEDY)[0].token_ids for p in ps]
    llm = LLM(model, block_size=4, max_batch_tokens=64)  # prefills chunked: the threads' requests overlap
    batches = record_batches(llm)
    results = {}

    def batch_of_eight():  # thread 0: one call with 8 requests
        results.update(zip(range(8), llm.generate(ps[:8], GREEDY)))

    def one_by_one():      # thread 1: 8 calls of one request each
        for i in range(8, 16):
            results[i] = llm.generate(ps[i], GREEDY)[0]
    run_threads(batch_of_eight, one_by_one)
    assert [results[i].token_ids for i in range(16)] == alone
    assert all(results[i].finish_reason == "length" for i in range(16))
    ids0, ids1 = {results[i].request_id for i in range(8)}, {results[i].request_id for i in range(8, 16)}
    assert any(b & ids0 and b & ids1 for b in batches), "the threads' requests never shared a step"
    assert not llm.has_unfinished() and llm.blocks.num_free == llm.blocks.num_blocks


def test_generate_and_stream_from_two_threads(with_tokenizer):
    texts = ["the cat sat on", "hello world", "a dog ran to", "how are you", "the mat", "i am fine"]
    solo = LLM(with_tokenizer, block_size=4)
    alone = [solo.generate(t, GREEDY)[0] for t in texts]
    llm = LLM(with_tokenizer, block_size=4)
    batches = record_batches(llm)
    generated, streamed = [], []

    def generating():
        generated.extend(llm.generate(texts[:3], GREEDY))

    def streaming():
        for t in texts[3:]:
            stream = llm.stream(t, GREEDY)
            streamed.append(("".join(stream), stream.output))
    run_threads(generating, streaming)
    assert [o.token_ids for o in generated] == [o.token_ids for o in alone[:3]]
    assert [o.text for o in generated] == [o.text for o in alone[:3]]
    for (joined, out), ref in zip(streamed, alone[3:]):
        assert joined == out.text == ref.text and out.token_ids == ref.token_ids
    gen_ids = {o.request_id for o in generated}
    assert any(b & gen_ids and b - gen_ids for b in batches), "the stream never shared a step with generate"
    assert not llm.has_unfinished() and llm.blocks.num_free == llm.blocks.num_blocks


def test_abort_from_another_thread_ends_a_stream_with_its_text(with_tokenizer):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    full = LLM(with_tokenizer, block_size=4).generate("the cat sat on", params)[0]
    llm = LLM(with_tokenizer, block_size=4)
    stream = llm.stream("the cat sat on", params)
    started, pieces = threading.Event(), []

    def consume():
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == 3:
                started.set()
        started.set()
    consumer = threading.Thread(target=consume)
    consumer.start()
    assert started.wait(30)
    llm.abort(stream.request_id)
    consumer.join(30)
    assert not consumer.is_alive()
    out = stream.output
    assert out.finish_reason == "abort" and 3 <= len(out.token_ids) < 200
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    assert "".join(pieces) == out.text and full.text.startswith(out.text)
    assert not llm.has_unfinished() and llm.blocks.num_free == llm.blocks.num_blocks
