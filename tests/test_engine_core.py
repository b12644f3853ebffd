"""The engine's model-free parts: block manager, scheduler, sampler."""
import pytest
import torch

from tinymoe.engine.block_manager import BlockManager
from tinymoe.engine.sampler import apply_repetition_penalty, filter_logits, sample
from tinymoe.engine.sampling_params import SamplingParams
from tinymoe.engine.scheduler import Scheduler
from tinymoe.engine.sequence import Sequence, Status


def seq(tokens, **params):
    return Sequence(list(tokens), SamplingParams(**params))


# --- block manager ----------------------------------------------------------------------------

def test_allocate_and_release_count_references():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(10))
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and bm.num_free == 5
    assert all(bm.blocks[b].ref == 1 for b in a.block_table)
    a.token_ids += [10, 11, 12]  # 13 tokens now need a 4th block
    assert bm.can_append(a)
    bm.append(a)
    assert len(a.block_table) == 4 and bm.num_free == 4
    bm.release(a)
    assert bm.num_free == 8 and a.block_table == [] and a.num_computed == 0


def test_prefix_cache_reuses_full_computed_blocks_only():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(10))
    bm.allocate(a)
    assert bm.allocate is not None and a.num_computed == 0  # nothing cached yet
    a.num_computed = 10
    bm.commit(a)  # blocks 0 and 1 are full and computed; block 2 holds 2 tokens
    b = seq(list(range(8)) + [99, 98, 97])
    cached = bm.allocate(b)
    assert cached == 8 and b.num_computed == 8 and bm.prefix_hits == 2
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.blocks[a.block_table[0]].ref == 2
    # A prompt that a cached prefix covers entirely still computes its last token.
    c = seq(range(8))
    assert bm.allocate(c) == 4 and c.block_table[1] != a.block_table[1]
    # A different first block changes every later hash (chained), so nothing matches.
    d = seq([42] + list(range(1, 10)))
    assert bm.allocate(d) == 0


def test_released_cached_blocks_survive_until_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    a.num_computed = 5
    bm.commit(a)
    bm.release(a)
    assert bm.num_free == 4
    b = seq([1, 2, 3, 4, 6])
    assert bm.allocate(b) == 4 and bm.prefix_hits == 2
    bm.release(b)
    # Filling the whole cache with new content evicts the cached blocks and their hashes.
    c = seq(range(100, 108))
    bm.allocate(c)
    assert bm.cached == {} and bm.num_free == 0
    assert not bm.can_allocate(seq([1, 2, 3, 4, 7]))


def test_no_prefix_caching_when_disabled():
    bm = BlockManager(num_blocks=8, block_size=2, prefix_caching=False)
    a = seq(range(6))
    bm.allocate(a)
    a.num_computed = 6
    bm.commit(a)
    assert bm.allocate(seq(range(7))) == 0 and bm.prefix_hits == 0


# --- scheduler --------------------------------------------------------------------------------

def run_fake(sched: Scheduler, seqs, next_token=lambda s: len(s) % 50, max_steps=1000):
    """Drive the scheduler like the engine does, with a fake model; returns the per-step batches."""
    for s in seqs:
        sched.add(s)
    steps = []
    while sched.has_unfinished():
        batch = sched.schedule()
        assert batch, "the scheduler made no progress"
        steps.append([(s.seq_id, n) for s, n in batch])
        for s, n in batch:
            assert len(s.block_table) * sched.blocks.block_size >= s.num_computed + n
        sched.advance(batch)
        for s, n in batch:
            if s.num_computed == len(s):
                s.append(next_token(s))
                if s.num_output_tokens >= s.params.max_tokens:
                    s.finish("length")
        sched.reap()
        assert len(steps) < max_steps
    return steps


def test_prefill_is_chunked_to_the_token_budget_and_decodes_go_first():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_batch_tokens=8)
    a, b = seq(range(3), max_tokens=6), seq(range(20), max_tokens=2)
    steps = run_fake(sched, [a, b])
    assert steps[0] == [(a.seq_id, 3), (b.seq_id, 5)]
    assert steps[1] == [(a.seq_id, 1), (b.seq_id, 7)]
    assert steps[2] == [(a.seq_id, 1), (b.seq_id, 7)]  # b's prompt (20 tokens) is done after this
    assert steps[3] == [(a.seq_id, 1), (b.seq_id, 1)]
    assert a.finished and b.finished and a.num_output_tokens == 6 and b.num_output_tokens == 2
    assert sched.blocks.num_free == 64


def test_max_num_seqs_limits_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_batch_tokens=64)
    seqs = [seq(range(4), max_tokens=3) for _ in range(3)]
    steps = run_fake(sched, seqs)
    assert [s for s, _ in steps[0]] == [seqs[0].seq_id, seqs[1].seq_id]
    assert all(s.finished for s in seqs)


def test_out_of_blocks_preempts_the_newest_and_everything_completes():
    # 6 blocks of 4 tokens; three requests that each grow to 16 tokens cannot all fit.
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_batch_tokens=64)
    seqs = [seq([i] * 5, max_tokens=11) for i in range(3)]
    run_fake(sched, seqs)
    assert sched.num_preemptions > 0
    assert seqs[0].num_preemptions == 0  # the oldest is never the victim while newer ones run
    assert all(s.finished and s.num_output_tokens == 11 for s in seqs)
    assert bm.num_free == 6


def test_preempted_sequence_is_recomputed_with_its_generated_tokens():
    bm = BlockManager(4, 4, prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_batch_tokens=64)
    a, b = seq(range(8), max_tokens=6), seq(range(8), max_tokens=6)
    for s in (a, b):
        sched.add(s)
    sched.advance(sched.schedule())  # two 8-token prompts fill all four blocks
    a.append(1)
    b.append(1)
    batch = sched.schedule()  # a needs a third block: b, the newest, is preempted
    assert [s for s, _ in batch] == [a] and b.status is Status.WAITING and b.num_computed == 0
    assert list(sched.waiting) == [b] and len(b) == 9 and b.block_table == []
    sched.advance(batch)
    a.finish("length")
    sched.reap()
    assert sched.schedule() == [(b, 9)]  # recomputed: prompt and its generated token


# --- sampler ----------------------------------------------------------------------------------

PROBS = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])


def draws(n=400, **params):
    seqs = [seq([0], **params) for _ in range(n)]
    logits = PROBS.log().expand(n, -1).clone()
    return set(sample(logits, seqs))


@pytest.mark.parametrize("params, allowed", [
    (dict(top_k=2), {0, 1}),
    (dict(top_p=0.75), {0, 1}),
    (dict(top_p=0.85), {0, 1, 2}),
    (dict(min_p=0.15), {0, 1, 2}),
    (dict(top_k=3, min_p=0.25), {0, 1}),  # min_p judged on what top-k left
    (dict(top_k=1), {0}),
])
def test_filters_never_sample_outside_their_set(params, allowed):
    assert draws(temperature=1.0, **params) == allowed


def test_unfiltered_sampling_reaches_the_tail():
    assert draws(temperature=1.0, n=2000) == set(range(6))


def test_filter_logits_per_row_parameters():
    logits = PROBS.log().expand(2, -1)
    out = filter_logits(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.75]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(out).tolist() == [[True, True] + [False] * 4, [True, True] + [False] * 4]
    assert torch.equal(out[0, :2], logits[0, :2])


def test_seeded_sampling_repeats_and_seeds_differ():
    def run(seed):
        s = seq([0], temperature=1.0, seed=seed)
        out = []
        for _ in range(40):
            out.append(sample(PROBS.log()[None].clone(), [s])[0])
        return out
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_seeded_rows_do_not_depend_on_batch_neighbours():
    def first_tokens(batch_size):
        seqs = [seq([0], temperature=1.0, seed=3)] + [seq([0], temperature=1.0) for _ in range(batch_size - 1)]
        return [sample(PROBS.log().expand(batch_size, -1).clone(), seqs)[0] for _ in range(1)] + \
               [sample(PROBS.log().expand(batch_size, -1).clone(), seqs)[0] for _ in range(20)]
    assert first_tokens(1) == first_tokens(5)


def test_greedy_and_mixed_batch():
    logits = torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 0.0]])
    assert sample(logits, [seq([0], temperature=0), seq([0], temperature=0)]) == [1, 0]
    out = sample(logits.clone(), [seq([0], temperature=0), seq([0], temperature=1.0, top_k=1)])
    assert out == [1, 0]


def test_repetition_penalty_follows_the_sign_of_the_logit():
    logits = torch.tensor([2.0, -2.0, 1.0])
    apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert logits.tolist() == [1.0, -4.0, 1.0]
    # Greedy with a penalty: the repeated favourite loses to the runner-up.
    assert sample(torch.tensor([[2.0, 1.5]]), [seq([0], temperature=0, repetition_penalty=2.0)]) == [1]


def test_sampling_params_validate():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert SamplingParams(stop="x").stop == ["x"]
