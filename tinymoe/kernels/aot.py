"""Compile every Triton kernel of tinymoe ahead of time for NVIDIA GPUs, with no GPU present.

    python -m tinymoe.kernels.aot --arch 80,90 [--only NAME_SUBSTRING]

Kernels come from the `AOT_KERNELS` list of each module in `TRITON_MODULES` (the convention is
in backend.py). One line per kernel and architecture; the exit status is 1 if any failed.
This proves the kernels compile for real GPUs: the interpreter used by the tests does not, so
with TRITON_INTERPRET set it reruns itself in a child process with the interpreter off.
"""
import argparse
import importlib
import os
import subprocess
import sys
import time

from tinymoe.kernels.backend import interpreting

# the modules of tinymoe.kernels that define Triton kernels
TRITON_MODULES = ("attention_triton", "moe_align_triton", "moe_gemm", "norm_triton", "rotary_triton")


def collect(only: str | None = None) -> list[tuple]:
    """Every (name, jit fn, signature, constexprs) the Triton modules declare."""
    kernels = []
    for name in TRITON_MODULES:
        module = importlib.import_module(f"tinymoe.kernels.{name}")
        kernels += [k for k in module.AOT_KERNELS if not only or only in k[0]]
    return kernels


def compile_one(fn, signature: dict, constexprs: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget

    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinymoe.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="comma-separated SM versions, e.g. 80,90")
    parser.add_argument("--only", default=None, help="compile only kernels whose name contains this")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch wants comma-separated integers like 80,90, got {args.arch!r}")
    if not archs:
        parser.error("--arch names no architecture")

    if interpreting():
        # triton was imported with its interpreter on, so its kernels here cannot be compiled: do
        # it all in a child process where the interpreter is off
        if os.environ.get("TRITON_INTERPRET") == "0":
            print("tinymoe.kernels.aot: triton was imported with its interpreter on", file=sys.stderr)
            return 2
        child = [sys.executable, "-m", "tinymoe.kernels.aot", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.call(child, env={**os.environ, "TRITON_INTERPRET": "0"})

    # keep fused multiply-adds (triton 3.9's default) and say so, which silences its warning
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    kernels = collect(args.only)
    if not kernels:
        print(f"tinymoe.kernels.aot: no kernel matches {args.only!r}", file=sys.stderr)
        return 1
    failures = 0
    width = max(len(k[0]) for k in kernels)
    for name, fn, signature, constexprs in kernels:
        for arch in archs:
            start = time.perf_counter()
            try:
                asm = compile_one(fn, signature, constexprs, arch).asm
                status = (f"ok    ptx {len(asm['ptx']) / 1024:7.1f} KiB  "
                          f"cubin {len(asm['cubin']) / 1024:7.1f} KiB")
            except Exception as e:  # report every kernel, then fail the run
                failures += 1
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                status = f"FAIL  {type(e).__name__}: {lines[-1] if lines else ''}"
            print(f"{name:<{width}}  sm_{arch}  {status}  {time.perf_counter() - start:5.1f}s", flush=True)
    print(f"{len(kernels) * len(archs) - failures}/{len(kernels) * len(archs)} compiled", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
