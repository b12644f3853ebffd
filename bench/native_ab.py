"""Two builds of the native CPU library, A/B in one process: decode tokens/s of the same model.

    python bench/native_ab.py --base REV [--model DIR] [--quant SPEC] [--batch 1] [--tokens 64]
                              [--rounds 7]

A is the library built from the kernel sources of git revision REV (tinymoe/kernels/*.cpp, *.h),
B from the working tree; both with the flags the engine uses (native.FLAGS and this machine's
Settings.native_isa). One model is loaded once; each round times `LLM.generate` (greedy, a
16-token prompt per sequence, --tokens new tokens, EOS ignored) once with A loaded, then once
with B, so a noisy host's slow phases fall on both. Prints each build's median tokens/s over the
rounds after the first, B / A, and whether every round gave the same tokens. Without --model,
bench/decode.py's Mixtral-shaped random checkpoint is written to a temp dir. The header's ABI
must match between the revisions (native.check_abi says where it does not).
"""
import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from decode import write_checkpoint

from tinymoe import LLM, settings
from tinymoe.engine.sampling_params import SamplingParams
from tinymoe.kernels import native

REPO = Path(__file__).resolve().parents[1]


def build(sources: dict[str, bytes], out: Path) -> Path:
    """A library from {file name: text} of the kernel sources, with the engine's flags."""
    src = out.with_suffix("")
    src.mkdir()
    for name, text in sources.items():
        (src / name).write_bytes(text)
    flags = native.FLAGS + native.ISA_FLAGS[settings.current().native_isa]
    cxx = [src / p.name for p in native.SOURCES]
    subprocess.run(["g++", *flags, *map(str, cxx), "-o", str(out)], check=True)
    return out


def sources_at(rev: str) -> dict[str, bytes]:
    names = [p.name for p in native.SOURCES + native.HEADERS]
    return {n: subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:tinymoe/kernels/{n}"], check=True,
                              capture_output=True).stdout for n in names}


def use(lib: Path) -> None:
    """Every later native() call returns `lib`, bound and ABI-checked as the engine's own."""
    native._build = lambda cache_dir, isa="native": lib
    native._load.cache_clear()
    if native.native() is None:
        raise SystemExit(f"{lib}: the native library did not load")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision of build A")
    ap.add_argument("--model", help="checkpoint dir (default: bench/decode.py's random Mixtral shape)")
    ap.add_argument("--quant", help="--quant SPEC for the model (int8, int4, ...)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        libs = {"A": build(sources_at(args.base), tmp / "a.so"),
                "B": build({p.name: p.read_bytes() for p in native.SOURCES + native.HEADERS}, tmp / "b.so")}
        use(libs["A"])
        model = args.model or write_checkpoint(tmp / "model")
        llm = LLM(model, quant=args.quant)
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
        prompts = [list(range(5 + i, 21 + i)) for i in range(args.batch)]
        speed, outputs = {k: [] for k in libs}, set()
        for _ in range(args.rounds):
            for name, lib in libs.items():
                use(lib)
                start = time.perf_counter()
                out = llm.generate(prompts, params)
                speed[name].append(args.batch * args.tokens / (time.perf_counter() - start))
                outputs.add(str([o.token_ids for o in out]))
    a, b = (statistics.median(speed[k][1:]) for k in ("A", "B"))
    print(f"{args.quant or 'checkpoint dtype'}, batch {args.batch}, {args.tokens} tokens, median of "
          f"{args.rounds - 1} rounds: A ({args.base}) {a:.1f} t/s, B (working tree) {b:.1f} t/s, B / A {b / a:.2f}; "
          f"{'same tokens every round' if len(outputs) == 1 else 'TOKENS DIFFER between rounds'}")


if __name__ == "__main__":
    main()
