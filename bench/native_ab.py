"""Two builds of the native CPU library, A/B in one process: decode tokens/s of the same model.

    python bench/native_ab.py --base REV [--files F.cpp,...] [--model DIR] [--quant SPEC] [--batch 1]
                              [--tokens 64] [--rounds 7]
    python bench/native_ab.py --base REV --gemv 4x14336,64x1024 [--precision int4] [--rows 1] [--rounds 7]

A is the library built from the kernel sources of git revision REV (tinymoe/kernels/*.cpp, *.h;
with --files only those, the others as in the working tree), B from the working tree; both with
the flags the engine uses (native.FLAGS and this machine's Settings.native_isa). One model is
loaded once; each round times `LLM.generate` (greedy, a 16-token prompt per sequence, --tokens new tokens, EOS ignored) once with A loaded, then once
with B, so a noisy host's slow phases fall on both. Prints each build's median tokens/s over the
rounds after the first, B / A, and whether every round gave the same tokens. Without --model,
bench/decode.py's Mixtral-shaped random checkpoint is written to a temp dir. The header's ABI
must match between the revisions (native.check_abi says where it does not).

--gemv: the core's speed instead of the model's. Each N x K weight (pick it to stay in L2, and
large enough that the ~1 us ctypes call is small beside it) times --rows bf16 activation rows
(default 1) on one thread, the two builds alternating call by call, 100 x --rounds calls each: the
median as ns per 64 bytes of weight codes, A / B, and whether both builds gave the same bits.
"""
import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from decode import fix_threads, write_checkpoint

from tinymoe import LLM, settings
from tinymoe.engine.sampling_params import SamplingParams
from tinymoe.kernels import cpu_linear, native
from tinymoe.kernels.quant import quantize

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


def sources_at(rev: str, files: list[str] | None = None) -> dict[str, bytes]:
    """The kernel sources and headers, `files` (default: all) as at `rev`, the rest as in the
    working tree (a file added since `rev` then needs its header from the working tree too)."""
    names = [p.name for p in native.SOURCES + native.HEADERS]
    unknown = set(files or ()) - set(names)
    if unknown:
        raise SystemExit(f"--files: {', '.join(sorted(unknown))} is not a kernel source; they are {', '.join(names)}")
    return {n: subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:tinymoe/kernels/{n}"], check=True,
                              capture_output=True).stdout if files is None or n in files
            else (REPO / "tinymoe" / "kernels" / n).read_bytes() for n in names}


def use(lib: Path) -> None:
    """Every later native() call returns `lib`, bound and ABI-checked as the engine's own."""
    native._build = lambda cache_dir, isa="native": lib
    native._load.cache_clear()
    if native.native() is None:
        raise SystemExit(f"{lib}: the native library did not load")


def gemv_core(libs: dict[str, Path], shapes: list[tuple[int, int]], precision: str, rounds: int,
              rows: int = 1) -> None:
    """An M-row GEMV on one thread through both builds, alternating call by call: a noisy host's
    slow phases (seconds long here) then fall on both alike."""
    bound = {}
    for name, lib in libs.items():
        use(lib)
        bound[name] = native.native()
    for N, K in shapes:
        torch.manual_seed(N + K)
        w = torch.randn(N, K)
        w = w.bfloat16() if precision == "bf16" else quantize(w, precision)
        m = cpu_linear.matrix(w)
        code_bytes = N * K * 2 if precision == "bf16" else w.q.numel()
        x = torch.randn(rows, K).bfloat16()
        ys = {k: torch.empty(rows, N) for k in libs}
        ns = {k: [] for k in libs}
        for i in range(rounds * 100):
            for name, lib in sorted(bound.items(), reverse=i % 2 == 1):  # each build first every other time
                start = time.perf_counter_ns()
                lib.linear_matrix(x.data_ptr(), 1, rows, K, ctypes.byref(m), N, ys[name].data_ptr(), 0, 1)
                ns[name].append((time.perf_counter_ns() - start) / (code_bytes / 64))
        a, b = (statistics.median(ns[k]) for k in ("A", "B"))
        same = torch.equal(ys["A"], ys["B"])
        print(f"{precision} {N} x {K}, {rows} row(s), 1 thread, median of {rounds * 100} calls each: A {a:.2f} ns, "
              f"B {b:.2f} ns a 64 B of codes, A / B {a / b:.2f}; {'same bits' if same else 'RESULTS DIFFER'}")


def shape_list(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in part.split("x")) for part in text.split(",")]
    except ValueError:
        raise SystemExit(f"--gemv {text!r}: give shapes as NxK[,NxK...]")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision of build A")
    ap.add_argument("--files", help="the kernel files build A takes from --base, e.g. cpu_quant.cpp "
                                    "(default: all; the others come from the working tree)")
    ap.add_argument("--model", help="checkpoint dir (default: bench/decode.py's random Mixtral shape)")
    ap.add_argument("--quant", help="--quant SPEC for the model (int8, int4, ...)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--gemv", type=shape_list, help="NxK[,NxK...]: time the matmul core (--rows rows), not a model")
    ap.add_argument("--precision", choices=["bf16", "int8", "int4"], default="int4", help="with --gemv")
    ap.add_argument("--rows", type=int, default=1, help="with --gemv: activation rows")
    args = ap.parse_args()
    fix_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        libs = {"A": build(sources_at(args.base, args.files.split(",") if args.files else None), tmp / "a.so"),
                "B": build({p.name: p.read_bytes() for p in native.SOURCES + native.HEADERS}, tmp / "b.so")}
        if args.gemv:
            return gemv_core(libs, args.gemv, args.precision, args.rounds, args.rows)
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
