"""What batch invariance (Settings.batch_invariant, the default) costs, and what it buys, in one run.

    python bench/batch_invariance.py [--models mini,tiny] [--batches 1,8,32] [--prompt-len 128]
                                     [--decode-tokens 16] [--rounds 5] [--model DIR]

First, whether torch's bf16 GEMM (what many rows took before, with AMX or AVX512-BF16) gives a
row the same bits alone and among other rows, on the mixtral-mini shapes. Then per model
(`mini`: the Mixtral-shaped random bf16 checkpoint of bench/decode.py, written to a temp dir
unless --model; `tiny`: the embedded tiny-mixtral), the invariance on and off in alternating
rounds of the same process (each mode first in every other round): the time of one
--prompt-len-token prefill, and the median decode step at each batch (prompts of 32 tokens,
--decode-tokens steps, the one-call step where it applies), each the median over --rounds; then
whether request 0's greedy tokens are the same alone and in a batch of 8 and of 32 (else the
first token that differs). Pause other work first: on two shared vCPUs any busy neighbour
moves these figures.
"""
import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decode import SHAPE, write_checkpoint

MODES = {"invariant": True, "GEMM allowed": False}


def gemm_row_dependence(rows=(1, 2, 4, 8, 16, 17, 32, 33, 64, 128)) -> list[str]:
    """Per weight shape the row counts M at which some row of torch's bf16 GEMM differs from that
    row computed alone."""
    D, I, V = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    hd = D // SHAPE["num_attention_heads"]
    out = []
    g = torch.Generator().manual_seed(0)
    for N, K in (((SHAPE["num_attention_heads"] + 2 * SHAPE["num_key_value_heads"]) * hd, D), (2 * I, D), (D, I),
                 (V, D)):
        w = torch.randn(N, K, generator=g).bfloat16()
        x = torch.randn(max(rows), K, generator=g).bfloat16()
        alone = torch.cat([F.linear(x[i:i + 1], w) for i in range(max(rows))])
        differ = [m for m in rows if not torch.equal(F.linear(x[:m], w), alone[:m])]
        out.append(f"{N} x {K}: {', '.join(map(str, differ)) or 'none'}")
    return out


def timed_step(llm) -> float:
    start = time.perf_counter()
    llm.step()
    return time.perf_counter() - start


def prefill_time(llm, prompt) -> float:
    from tinymoe.engine import SamplingParams
    llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    t = timed_step(llm)
    while llm.has_unfinished():
        llm.step()
    return t


def decode_step_time(llm, prompts, steps: int) -> float:
    from tinymoe.engine import SamplingParams
    for p in prompts:
        llm.add_request(p, SamplingParams(temperature=0, max_tokens=1 + steps, ignore_eos=True))
    llm.step()  # the prefills
    times = []
    while llm.has_unfinished():
        times.append(timed_step(llm))
    return statistics.median(times)


def first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return "same" if i is None and len(a) == len(b) else f"differ from token {i}"


def measure(path, args, vocab: int):
    from tinymoe import settings
    from tinymoe.engine import LLM, SamplingParams
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(str(path), dtype="bfloat16", max_num_seqs=max(batches + [32]), max_batch_tokens=8192,
              prefix_caching=False)
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
    prompts = torch.randint(3, vocab, (max(batches + [32]), 32), generator=g).tolist()
    times = {(mode, what): [] for mode in MODES for what in ["prefill"] + batches}
    for r in range(args.rounds):
        for mode, on in list(MODES.items())[::1 if r % 2 else -1]:  # each mode first in every other round
            with settings.override(batch_invariant=on):
                times[mode, "prefill"].append(prefill_time(llm, long_prompt))
                for b in batches:
                    times[mode, b].append(decode_step_time(llm, prompts[:b], args.decode_tokens))
    rows = [(f"prefill {args.prompt_len} tokens", "prefill")] + [(f"decode step, batch {b}", b) for b in batches]
    for label, what in rows:
        inv, gemm = (statistics.median(times[mode, what]) * 1e3 for mode in MODES)
        print(f"| {label} | {inv:.1f} | {gemm:.1f} | {inv / gemm:.2f}x |")
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    for mode, on in MODES.items():
        with settings.override(batch_invariant=on):
            alone = llm.generate(prompts[:1], greedy)[0].token_ids
            found = [f"batch {b}: {first_difference(alone, llm.generate(prompts[:b], greedy)[0].token_ids)}"
                     for b in (8, 32)]
        print(f"request 0's 32 greedy tokens alone vs in a batch, {mode}: {'; '.join(found)}")
    del llm
    gc.collect()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mini,tiny")
    ap.add_argument("--model", default=None, help="a checkpoint to use as `mini`")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    models = args.models.split(",")
    if not set(models) <= {"mini", "tiny"}:
        ap.error(f"--models takes mini and/or tiny, not {args.models!r}")
    from tinymoe.kernels import cpu_linear
    print(f"threads {torch.get_num_threads()}; bf16 instructions: {cpu_linear.native_bf16()}; "
          f"median of {args.rounds} alternating rounds")
    print("torch bf16 GEMM, row counts where a row differs from that row alone:")
    for line in gemm_row_dependence():
        print(f"  {line}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            if name == "mini":
                path = Path(args.model) if args.model else write_checkpoint(Path(tmp) / "mixtral-mini")
                vocab = SHAPE["vocab_size"]
            else:
                path, vocab = "tiny", 4096
            print(f"\n{name}:\n| measure | invariant ms | GEMM allowed ms | invariant / GEMM allowed |")
            print("|---|---|---|---|")
            measure(path, args, vocab)


if __name__ == "__main__":
    main()
