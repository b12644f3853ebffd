"""Expert parallelism: placement, and two ranks over gloo giving the single process's tokens."""
import json
import time

import pytest
import torch

import checkpoints
from tinymoe import LLM, SamplingParams
from tinymoe.engine.parallel import TIMEOUT_S, ParallelError, run_spmd
from tinymoe.experts.plan import Copy, ExpertPlan
from tinymoe.experts.placement import add_replicas, pack, parse_placement, place

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


# --- placement (pure) ---------------------------------------------------------------------------

def test_contiguous_placement_splits_experts_in_order():
    plan = place(ExpertPlan.default(8), 2)
    assert [c.device for c in plan.copies] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [c.device for c in place(ExpertPlan.default(6), 4).copies] == [0, 0, 1, 1, 2, 2]


def test_eplb_replicates_the_heaviest_and_spreads_its_copies():
    load = torch.tensor([100, 10, 10, 10, 10, 10, 10, 40])
    plan = place(ExpertPlan.default(8), 2, "eplb", load)
    assert len(plan.copies) == 10
    assert [c.expert for c in plan.copies[8:]] == [0, 0]  # 100 / 1 > 40, then 100 / 2 = 50 > 40 still
    ranks_of_0 = {c.device for c in plan.copies if c.expert == 0}
    assert ranks_of_0 == {0, 1}
    assert [sum(c.device == g for c in plan.copies) for g in (0, 1)] == [5, 5]
    assert len(place(ExpertPlan.default(8), 2, "eplb:4", load).copies) == 12


def test_add_replicas_is_greedy_on_load_per_copy():
    plan = add_replicas(ExpertPlan.default(3), torch.tensor([90, 50, 10]), 3)
    # 90 -> 45 (copy to 0), then 50 > 45 (copy to 1), then 45 > 30 -> 0 again
    assert [c.expert for c in plan.copies[3:]] == [0, 1, 0]


def test_pack_balances_and_avoids_two_copies_of_one_expert_on_a_rank():
    weight = [50.0, 50.0, 30.0, 20.0, 20.0, 10.0]
    expert = [0, 0, 1, 2, 3, 4]
    rank_of = pack(weight, expert, 2)
    assert rank_of[0] != rank_of[1]
    totals = [sum(w for w, g in zip(weight, rank_of) if g == r) for r in (0, 1)]
    assert max(totals) - min(totals) <= 20
    assert rank_of.count(0) == rank_of.count(1) == 3


def test_a_replica_plan_is_packed_by_expected_load():
    plan = ExpertPlan([Copy(e) for e in range(4)] + [Copy(0, "int8")])
    placed = place(plan, 2, "contiguous", torch.tensor([80, 20, 20, 20]))
    assert {c.device for c in placed.copies if c.expert == 0} == {0, 1}


@pytest.mark.parametrize("spec, message", [("rr", "unknown placement"), ("eplb:x", "bad placement"),
                                           ("contiguous:2", "bad placement")])
def test_bad_placements(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_placement(spec)


def test_eplb_needs_loads_and_enough_copies():
    with pytest.raises(ValueError, match="eplb placement needs calibrated expert loads"):
        place(ExpertPlan.default(4), 2, "eplb")
    with pytest.raises(ValueError, match="at least 8 expert copies"):
        place(ExpertPlan.default(4), 8)


# --- two ranks ----------------------------------------------------------------------------------

PROMPTS = [[5, 9, 17, 3, 44, 8], [12, 7], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40], [3, 3, 60, 2]]


def _tokens(llm, prompts):
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


def _check_equal(path, dtype, **kw):
    single = LLM(str(path), dtype=dtype, **{k: v for k, v in kw.items() if k != "placement"})
    want_batch, want_alone = _tokens(single, PROMPTS), [_tokens(single, [p])[0] for p in PROMPTS]
    ep = LLM(str(path), dtype=dtype, expert_parallel=2, **kw)
    try:
        assert _tokens(ep, PROMPTS) == want_batch
        assert [_tokens(ep, [p])[0] for p in PROMPTS] == want_alone
        # each rank holds only its copies: half the experts here
        experts = ep.model.moe_blocks()[0].experts
        assert experts.copies().num_copies < experts.num_copies
    finally:
        ep.close()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_moe"])
def test_two_ranks_give_the_single_process_tokens(tmp_path, family):
    _check_equal(getattr(checkpoints, family)(tmp_path / family), "float32")


@pytest.mark.parametrize("name", ["tiny", "tiny-deepseek"])
def test_two_ranks_on_the_shipped_models_in_bf16(name):
    _check_equal(name, "bfloat16")


def test_the_allreduce_combine_gives_the_same_tokens(monkeypatch):
    monkeypatch.setenv("TINYMOE_EP_COMBINE", "allreduce")
    _check_equal("tiny-deepseek", "bfloat16")


@pytest.fixture(scope="module")
def tiny_calib(tmp_path_factory):
    from tinymoe import load_model, load_tokenizer
    from tinymoe.evaluation import read_tokens
    from tinymoe.routing.calibrate import calibrate
    model = load_model("tiny")
    tokens = read_tokens(load_tokenizer("tiny"), "tinymoe/assets/data/heldout.txt")[:4096]
    path = tmp_path_factory.mktemp("calib") / "calib.safetensors"
    calibrate(model, tokens, seq_len=128).save(path)
    return str(path)


def test_two_ranks_with_eplb_replicas(tiny_calib):
    _check_equal("tiny", "bfloat16", calib=tiny_calib, placement="eplb")


def test_two_ranks_with_an_rnq_plan(tiny_calib):
    _check_equal("tiny", "bfloat16", router="rnq", calib=tiny_calib)


def test_a_killed_rank_is_one_clear_error_within_the_timeout():
    ep = LLM("tiny", expert_parallel=2)
    try:
        _tokens(ep, PROMPTS[:1])
        ep.runner.ranks.procs[0].kill()
        start = time.monotonic()
        with pytest.raises(ParallelError, match="rank 1 exited with code -9"):
            _tokens(ep, PROMPTS)
        assert time.monotonic() - start < TIMEOUT_S
    finally:
        ep.close()


@pytest.mark.parametrize("value", [0, "2", True, 1.5])
def test_bad_expert_parallel_values(value):
    with pytest.raises(ValueError, match="expert_parallel takes a number of ranks"):
        LLM("tiny", expert_parallel=value)


def test_expert_parallel_needs_the_model_by_name():
    from tinymoe import load_model
    with pytest.raises(ValueError, match="needs the model by name or path"):
        LLM(load_model("tiny"), expert_parallel=2)


def test_eplb_without_calibration_stops_every_rank():
    with pytest.raises(ValueError, match="eplb placement needs calibrated expert loads"):
        LLM("tiny", expert_parallel=2, placement="eplb")


def test_bench_measures_every_rank(tiny_calib):
    from tinymoe import load_tokenizer
    from tinymoe.benchmark import format_rows
    from tinymoe.evaluation import read_tokens
    tokens = read_tokens(load_tokenizer("tiny"), "tinymoe/assets/data/heldout.txt")[:2048]
    res = run_spmd(2, "tinymoe.benchmark:run_ranked", dict(
        model="tiny", routers=["balanced"], batches=[8], tokens=tokens, prompt_len=8, gen_len=4,
        calib=tiny_calib, min_sequences=8, engine=False, rounds=2, reference=True))
    # both routers in each of the two rounds, in turn; top-k (the reference) without being asked for
    assert [(r.router, r.round) for r in res["rows"]] == [("topk", 0), ("balanced", 0), ("topk", 1), ("balanced", 1)]
    assert [r.ppl for r in res["rows"][:2]] == [r.ppl for r in res["rows"][2:]]  # the same windows each round
    rows = {r.router: r for r in res["rows"]}
    for r in rows.values():
        assert r.busy_max_ms >= r.busy_mean_ms > 0
        assert r.ep_step_ms >= r.busy_max_ms
        assert r.straggler >= 1.0
    assert rows["balanced"].i_dev == pytest.approx(1.0)
    keys = json.loads(format_rows(res, "json"))[0]
    assert {"ep_step_ms", "busy_mean_ms", "busy_max_ms", "straggler", "i_dev"} <= keys.keys()


def test_joining_a_torchrun_launch(tmp_path):
    import socket
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(
        "import json, os\n"
        "from tinymoe import LLM, SamplingParams\n"
        "llm = LLM('tiny', expert_parallel=2)\n"
        "out = llm.generate([[5, 9, 17, 3]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))\n"
        "print(json.dumps({'rank': int(os.environ['RANK']), 'tokens': out[0].token_ids}))\n"
        "llm.close()\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(port), str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    # rank 1 serves rank 0's steps inside LLM() and ends there: only rank 0 reaches the print
    assert [line["rank"] for line in lines] == [0]
    want = LLM("tiny").generate([[5, 9, 17, 3]], GREEDY)[0].token_ids[:8]
    assert lines[0]["tokens"] == want
