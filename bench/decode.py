"""Prefill and decode tokens/s of tinymoe against transformers' generate, in the same run.

    python bench/decode.py [--batches 1,8,32] [--prompt-len 128] [--decode-tokens 32] [--runs 3]
                           [--engines tinymoe,transformers] [--model DIR]

Without --model, transformers writes a Mixtral-shaped random bf16 checkpoint (hidden 1024,
intermediate 3584, 8 experts, top-2, 8 layers, 16 heads, 4 KV heads, vocab 32000) to a temp dir.
Both engines get the same prompts, greedy, no EOS stop. Prefill t/s = batch * prompt_len / the
time to the first token of every prompt; decode t/s (total over the batch) = batch * n / the time
for the n tokens after it. Each figure is the median of --runs. Beside each decode figure: the physical
limit, the weight bytes one decode step must read (attention, norms, gates, the experts the
batch's tokens touch, the LM head) over the memory read bandwidth measured in this run."""
import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=4096, rms_norm_eps=1e-5)


def fix_threads(threads: int | None = None) -> int:
    """Install settings with the thread count fixed (default: torch's current one), so the engine's
    thread governor (engine/cpu_share.py) does not change it mid-measurement; returns it."""
    from dataclasses import replace

    from tinymoe import settings
    threads = threads or torch.get_num_threads()
    settings.install(replace(settings.current(), threads=threads))
    return threads


def write_checkpoint(path: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(**SHAPE, eos_token_id=2, bos_token_id=1)
    with torch.device("cpu"):
        model = MixtralForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    return path


def read_bandwidth(gib: float = 1.0, trials: int = 5) -> float:
    """Bytes/s of streaming reads: the best of `trials` full sums over a buffer far larger than cache."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t))
    return best


def decode_bytes(cfg: dict, batch: int, elem: int = 2) -> float:
    """Weight bytes one decode step reads at `batch`: every dense weight once, and the experts the
    batch's tokens touch, E * (1 - (1 - k/E)^batch) per layer in expectation for uniform routing."""
    D, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    hd = D // cfg["num_attention_heads"]
    attn = 2 * D * D + 2 * D * cfg["num_key_value_heads"] * hd
    touched = E * (1 - (1 - k / E) ** batch)
    per_layer = attn + 2 * D + E * D + touched * 3 * D * I
    return (L * per_layer + D + V * D) * elem


def bench_tinymoe(path, prompts, **llm_opts):
    """`llm_opts` go to LLM (bench/peers.py passes quant=)."""
    from tinymoe.engine import LLM, SamplingParams
    # No prefix cache: repeated runs over the same prompts must recompute them.
    llm = LLM(str(path), dtype="bfloat16", max_num_seqs=64, max_batch_tokens=8192, prefix_caching=False,
              **llm_opts)

    def measure(batch, n):
        """(seconds to the first token of every prompt, seconds for the next n tokens of each)."""
        params = SamplingParams(temperature=0, max_tokens=1 + n, ignore_eos=True)
        start = time.perf_counter()
        for p in prompts[:batch]:
            llm.add_request(p, params)
        llm.step()  # the whole batch's prefill fits one step's token budget
        first = time.perf_counter()
        while llm.has_unfinished():
            llm.step()
        return first - start, time.perf_counter() - first
    measure.llm = llm  # bench/peers.py counts the loaded model's bytes
    return measure


def bench_transformers(path, prompts):
    from transformers import MixtralForCausalLM
    from transformers.generation.streamers import BaseStreamer
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

    class Clock(BaseStreamer):
        """generate() calls put() with the prompt, then once per generated token."""
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            self.times.append(time.perf_counter())

    def measure(batch, n):
        ids = torch.tensor(prompts[:batch])
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1 + n, min_new_tokens=1 + n,
                           do_sample=False, pad_token_id=0, streamer=clock)
        first = clock.times[1]
        return first - start, clock.times[-1] - first
    return measure


ENGINES = {"tinymoe": bench_tinymoe, "transformers": bench_transformers}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a Mixtral-layout checkpoint dir (default: write the random one)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engines", default="tinymoe,transformers")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    fix_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    engines = args.engines.split(",")
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else write_checkpoint(Path(tmp) / "mixtral-mini")
        cfg = {**SHAPE, **json.loads((path / "config.json").read_text())}
        prompts = torch.randint(3, cfg["vocab_size"], (max(batches), args.prompt_len)).tolist()
        bandwidth = read_bandwidth()
        print(f"threads {torch.get_num_threads()}, read bandwidth {bandwidth / 1e9:.1f} GB/s, "
              f"prompt {args.prompt_len} tokens, decode {args.decode_tokens} tokens, median of {args.runs}")
        # Both engines stay loaded and take turns, so a change in the machine's load hits both.
        measures = {name: ENGINES[name](path, prompts) for name in engines}
        for measure in measures.values():
            measure(1, 2)  # warm-up
        results = {}
        for b in batches:
            times = {name: [] for name in engines}
            for _ in range(args.runs):
                for name, measure in measures.items():
                    times[name].append(measure(b, args.decode_tokens))
            for name in engines:
                t_prefill = statistics.median(t for t, _ in times[name])
                t_decode = statistics.median(t for _, t in times[name])
                results[name, b] = (b * args.prompt_len / t_prefill, b * args.decode_tokens / t_decode)
                print(f"  {name:<12} batch {b:>2}: prefill {results[name, b][0]:8.1f} t/s, "
                      f"decode {results[name, b][1]:7.1f} t/s", flush=True)
        del measures
        gc.collect()

    print()
    print("| engine | batch | prefill t/s | decode t/s | decode limit t/s | share of limit |")
    print("|---|---|---|---|---|---|")
    for (name, b), (prefill, decode) in sorted(results.items()):
        limit = b * bandwidth / decode_bytes(cfg, b)
        print(f"| {name} | {b} | {prefill:.0f} | {decode:.1f} | {limit:.1f} | {decode / limit:.2f} |")
    if set(engines) >= {"tinymoe", "transformers"}:
        print()
        print("| batch | prefill ratio (tinymoe / transformers) | decode ratio |")
        print("|---|---|---|")
        for b in batches:
            (tp, td), (hp, hd) = results["tinymoe", b], results["transformers", b]
            print(f"| {b} | {tp / hp:.2f}x | {td / hd:.2f}x |")


if __name__ == "__main__":
    main()
