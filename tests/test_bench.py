"""End to end on a tiny checkpoint: calibrate, every router through the model, bench, eval."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import tinymoe
from tinymoe import benchmark
from tinymoe.evaluation import multiple_choice, read_choices, read_tokens
from tinymoe.routing import ROUTERS, install
from tinymoe.routing.calibrate import calibrate, load_calibration

WORDS = ("the cat sat on a mat while dogs ran over green hills and birds sang songs of summer "
         "rain in old towns near the river").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_mixtral):
    """The tiny Mixtral (6 experts, top-2) with a BPE tokenizer fitting its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    root = tmp_path_factory.mktemp("bench")
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(2000))
    (root / "data.txt").write_text(text)
    path = Path(shutil.copytree(tiny_mixtral, root / "model"))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(path / "tokenizer.json"))
    model = tinymoe.load_model(path)
    tokens = read_tokens(tinymoe.load_tokenizer(path), root / "data.txt")
    calib = calibrate(model, tokens, seq_len=64, batch=8, proto_steps=30)
    calib.save(root / "calib.safetensors")
    return root, path, model, tokens


def test_calibration_file_round_trips(setup):
    root, _, model, _ = setup
    calib = load_calibration(root / "calib.safetensors")
    for block in model.moe_blocks():
        layer = calib.layer(block.ctx.layer)
        q = layer["mass_quantiles"]
        assert q.shape == (101,) and bool((q[1:] >= q[:-1]).all()) and 2 / 6 <= float(q[50]) <= 1
        assert layer["load"].sum() > 0 and bool((layer["importance"] > 0).all())
        assert layer["proto.prototypes"].shape == (6, 16)


def test_every_router_runs_through_the_model(setup):
    root, _, model, tokens = setup
    ids = tokens[:96].view(3, 32)
    install(model, "topk")
    ref = model(ids)
    install(model, "laser", root / "calib.safetensors", eps_high=0.0)  # all peaked: top-k exactly
    assert torch.equal(model(ids), ref)
    for name in sorted(ROUTERS):
        install(model, name, root / "calib.safetensors")
        out = model(ids)
        assert out.shape == ref.shape and torch.isfinite(out).all(), name
    for quant in ("int4", "int8"):
        install(model, "rnq", root / "calib.safetensors", replicas=2, quant=quant)
        for block in model.moe_blocks():
            st = block.ctx.state
            assert len(st["plan"].copies) == 8 and st["plan_bytes"] <= st["budget_bytes"]
            # the plan the model applied, and the bytes its pools hold are the bytes budgeted
            assert block.experts.plan is st["plan"] and block.experts.weight_bytes() == st["plan_bytes"]
            assert any(c.precision == quant for c in st["plan"].copies)
    install(model, "topk")
    assert torch.equal(model(ids), ref)  # the plan is undone


def test_bench_rows_and_balance(setup, tmp_path):
    root, _, model, tokens = setup
    calib = load_calibration(root / "calib.safetensors")
    res = benchmark.run(model, ["topk", "laser", "balanced", "rnq"], [1, 12], tokens, prompt_len=16,
                        gen_len=6, devices=2, calib=calib, min_sequences=4, engine=False)
    rows = {(r.router, r.batch): r for r in res["rows"]}
    assert len(rows) == 8
    assert rows["topk", 12].ppl_delta_pct == 0 and rows["topk", 12].agree_top1 == 1
    # one token a decode pass: nothing to balance, LASER is top-k
    assert rows["laser", 1].i_agg == rows["topk", 1].i_agg and rows["laser", 1].agree_top1 == 1
    assert rows["balanced", 12].i_agg == pytest.approx(1.0)  # 12 * 2 assignments over 6 experts
    assert rows["laser", 12].i_agg <= rows["topk", 12].i_agg
    assert 0 <= rows["laser", 12].flat_frac <= 1
    data = json.loads(benchmark.format_rows(res, "json"))
    assert [list(d) for d in data] == [benchmark.KEYS] * 8
    assert "| laser | 12 |" in benchmark.format_rows(res, "md")
    benchmark.plot_heatmaps(res, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").stat().st_size > 1000


@pytest.mark.parametrize("rounds", [0, 1.5, True, "2"])
def test_bench_rounds_must_be_a_whole_number(setup, rounds):
    _, _, model, tokens = setup
    with pytest.raises(ValueError, match="rounds takes a whole number of 1 or more"):
        benchmark.run(model, ["topk"], [1], tokens, rounds=rounds, engine=False)


def test_multiple_choice_reads_arc_and_mmlu_shapes(setup, tmp_path):
    _, path, model, _ = setup
    f = tmp_path / "mc.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in [
        {"question": "the cat sat on", "choices": ["a mat", "green hills"], "answer": 0},
        {"question": "birds sang", "choices": {"text": ["songs", "rain"], "label": ["A", "B"]}, "answer": "A"},
        {"question": "dogs ran", "choices": ["over", "the", "river"], "answer": "B"},
    ]))
    items = read_choices(f)
    assert [i["answer"] for i in items] == [0, 0, 1]
    install(model, "topk")
    res = multiple_choice(model, tinymoe.load_tokenizer(path), items)
    assert res["items"] == 3 and 0 <= res["acc"] <= 1
    f.write_text(json.dumps({"question": "q", "choices": ["a"], "answer": "Z"}))
    with pytest.raises(ValueError, match="mc.jsonl:1"):
        read_choices(f)


def test_cli_calibrate_bench_eval(setup, tmp_path):
    from click.testing import CliRunner
    from tinymoe.cli import cli
    root, path, _, _ = setup
    run = CliRunner().invoke
    calib = tmp_path / "c.safetensors"
    r = run(cli, ["calibrate", str(path), "--data", str(root / "data.txt"), "--out", str(calib),
                  "--seq-len", "64", "--max-tokens", "1024", "--proto-steps", "20"])
    assert r.exit_code == 0, r.output
    r = run(cli, ["bench", str(path), "--router", "topk,laser,rnq", "--router-opt", "replicas=1",
                  "--batch", "6", "--prompt-len", "8", "--gen-len", "3", "--devices", "2", "--data",
                  str(root / "data.txt"), "--calib", str(calib), "--sequences", "2", "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["router"] for row in rows] == ["topk", "laser", "rnq"]
    assert rows[2]["agree_top1"] < 1 or rows[2]["ppl_delta_pct"] != 0  # quantised experts change logits
    r = run(cli, ["eval", str(path), "--router", "laser", "--calib", str(calib), "--data",
                  str(root / "data.txt"), "--window", "32", "--max-windows", "4", "--format", "json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["router"] == "laser" and res["ppl"] > 1 and 0 <= res["agree_top1"] <= 1
    r = run(cli, ["bench", str(path), "--router", "nope", "--data", str(root / "data.txt")])
    assert r.exit_code != 0 and "valid routers" in r.output and "Traceback" not in r.output


# --- progress bars end at their totals (they used to stop at 1150/1152 and 399/400) ---


def _last_bar_line(stderr: str, desc: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"{desc}:")]
    assert lines and "\r" not in stderr, stderr
    return lines[-1]


def test_bench_eval_and_calibrate_bars_end_at_their_totals(tmp_path):
    """The embedded tiny-mixtral through the CLI: stderr is not a terminal, so each bar writes a
    few lines, and the last one shows all of its total done."""
    from click.testing import CliRunner
    from tinymoe.cli import cli
    from tinymoe.weights import ASSETS
    run = CliRunner().invoke
    data = ASSETS / "data" / "heldout.txt"
    # 2 routers x 1 round (batch 2, 2 sequences) x 3 passes (1 prefill + 2 decodes) = 6
    r = run(cli, ["bench", "tiny", "--router", "topk,balanced", "--batch", "2", "--prompt-len", "8",
                  "--gen-len", "3", "--sequences", "2", "--data", str(data), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert "| 6/6 [" in _last_bar_line(r.stderr, "bench")
    assert "100%" in _last_bar_line(r.stderr, "loading tiny-mixtral")
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join((ASSETS / "data" / "heldout_mc.jsonl").read_text().splitlines(True)[:7]))
    r = run(cli, ["eval", "tiny", "--data", str(mc), "--mc-prompt", "{question}", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["items"] == 7 and "| 7/7 [" in _last_bar_line(r.stderr, "eval")
    # top-k's 3 windows, then balanced's 3
    r = run(cli, ["eval", "tiny", "--router", "balanced", "--data", str(data), "--window", "16",
                  "--max-windows", "3", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert "| 6/6 [" in _last_bar_line(r.stderr, "eval")
    # 1000 tokens in windows of 64: calibrate runs 15 whole windows (the bar used to say 16)
    r = run(cli, ["calibrate", "tiny", "--data", str(data), "--out", str(tmp_path / "c.safetensors"),
                  "--seq-len", "64", "--max-tokens", "1000", "--proto-steps", "2"])
    assert r.exit_code == 0, r.output
    assert "| 15/15 [" in _last_bar_line(r.stderr, "calibrate")


def _bench_script(name):
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arg_error(module, argv, capsys) -> str:
    with pytest.raises(SystemExit):
        module.parse_args(argv)
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_rev_ab_refuses_bad_arguments_in_one_line(capsys, tmp_path):
    rev_ab = _bench_script("rev_ab")
    assert _arg_error(rev_ab, ["--base", "no-such-rev"], capsys) == \
        f"rev_ab.py: error: --base no-such-rev: not a revision of {rev_ab.REPO}"
    assert _arg_error(rev_ab, ["--base", "HEAD", "--model", str(tmp_path)], capsys) == \
        f"rev_ab.py: error: --model {tmp_path}: no config.json there"
    assert _arg_error(rev_ab, ["--base", "HEAD", "--rounds", "0", "--seconds", "-1"], capsys) == \
        "rev_ab.py: error: --seconds -1.0, --rounds 0: must be at least 1"
    assert rev_ab.parse_args(["--base", "HEAD"]).rounds == 3


def test_peers_and_quality_refuse_bad_arguments_in_one_line(capsys, tmp_path, monkeypatch):
    peers, quality = _bench_script("peers"), _bench_script("quality")
    assert _arg_error(peers, ["--engines", "tinymoe,vllm"], capsys) == \
        "peers.py: error: unknown engine vllm (valid: tinymoe, llama.cpp, transformers)"
    assert _arg_error(peers, ["--batches", "1,4"], capsys) == "peers.py: error: unknown batch 4 (valid: 1, 8)"
    assert _arg_error(peers, ["--runs", "0"], capsys) == \
        "peers.py: error: --runs and --rounds must be at least 1, got 0 and 3"
    assert _arg_error(peers, ["--rounds", "0"], capsys) == \
        "peers.py: error: --runs and --rounds must be at least 1, got 1 and 0"
    assert _arg_error(peers, ["--engines", "transformers", "--precisions", "int8"], capsys) == \
        "peers.py: error: nothing to run: transformers runs only bf16 on mixtral-mini"
    # missing peer files name the set-up step that makes them
    for script in ("membw.py", "limits.py", "limits_deepseek.py", "llama_bench.py", "hf_bench.py", "gguf_bytes.py"):
        (tmp_path / script).write_text("")
    monkeypatch.setattr(peers, "SHARED", tmp_path)
    monkeypatch.setattr(peers, "README", tmp_path / "README.md")
    monkeypatch.setattr(peers, "PEERS", tmp_path / "peers")
    assert _arg_error(peers, ["--engines", "llama.cpp"], capsys) == (
        f"peers.py: error: missing {tmp_path}/peers/venv-llama/bin/python: make it with "
        f"`bash {tmp_path}/build_llama.sh` (set-up in {tmp_path}/README.md)")
    venv = tmp_path / "peers" / "venv-llama" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("")
    (tmp_path / "peers" / "models" / "deepseek-3L").mkdir(parents=True)
    (tmp_path / "peers" / "models" / "deepseek-3L" / "config.json").write_text("{}")
    gguf = tmp_path / "peers" / "gguf" / "deepseek-3L-q4_0.gguf"
    assert _arg_error(peers, ["--engines", "llama.cpp", "--models", "deepseek-3L", "--precisions", "int4"],
                      capsys) == (
        f"peers.py: error: missing {gguf}: make it with `$V {tmp_path}/quantize.py "
        f"{tmp_path}/peers/gguf/deepseek-3L-bf16.gguf {gguf} q4_0` (set-up in {tmp_path}/README.md)")
    assert _arg_error(quality, ["--models", "tiny-lpr"], capsys) == \
        "quality.py: error: unknown model tiny-lpr (valid: tiny-mixtral, tiny-deepseek)"
    assert _arg_error(quality, ["--window", "1"], capsys) == "quality.py: error: --window must be at least 2, got 1"
    assert _arg_error(quality, ["--engines", "tinymoe", "--data", str(tmp_path / "none.txt")], capsys) == \
        f"quality.py: error: data file {tmp_path}/none.txt not found"
    assert _arg_error(quality, ["--engines", "tinymoe", "--int4-spec", "int4:g48"], capsys) == \
        "quality.py: error: --int4-spec: quant spec 'int4:g48': int4 group 'g48' is not one of g32, g64, g128"
