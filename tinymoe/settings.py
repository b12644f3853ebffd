"""Engine-wide choices in one frozen object: which kernel backend runs, whether the native CPU
library and its one-call decode step are used, where that library is built and for which
instructions, the CPU threads,
how idle OpenMP threads wait, whether the CPU counts as having bf16 matmul instructions, and the
default KV cache budget.

`Settings.from_env()` reads them from the TINYMOE_* variables (each bad value is a one-line
ValueError); `install(settings)` makes them the process's; `current()` is what the kernels and
the engine read (built from the environment on its first call, not at import).
`LLM(..., settings=...)` and the `tinymoe` command install theirs.

`wait_policy` cannot be applied by `install`: libgomp (torch's OpenMP runtime, which the native
library shares) reads OMP_WAIT_POLICY / GOMP_SPINCOUNT once, when `import torch` loads it. The
`tinymoe` command exports it before any command imports torch (`omp_environment`; importing the
package imports nothing); a library user sets OMP_WAIT_POLICY or GOMP_SPINCOUNT before importing
torch (or tinymoe). "spin" (the default) bridges the short gaps between a decode step's parallel
regions without a sleep and wake-up each: batch-1 decode of mixtral-mini int4 ~1.25x faster than
"passive" on a 2-vCPU VM (bench/threads.py, docs/benchmarks.md). Spinning threads make a 2-thread
decode collapse when another process keeps a core busy, which the engine's thread count, unless
fixed, avoids by stepping with fewer threads (engine/cpu_share.py); `threads` is applied by
`install`.

`native_isa` (TINYMOE_NATIVE_ISA) is what the native library is compiled for: "native" (this
CPU's instructions, `-march=native`: AVX512-VNNI or AVX-VNNI integer dot products where the CPU
has them, vdpbf16ps for bf16 activations with AVX512-BF16), "avx512" (`-mno-avx512bf16`: the
FMA kernels of bf16 weights on AVX-512) or "avx2" (`-march=native -mno-avx512f -mno-avxvnni`: the
AVX2 code), each in its own cached build, so every path runs, and is tested, on one machine. Tests change one field at a
time through `kernels.use_backend` and `cpu_linear.bf16_instructions`.

`batch_invariant` (TINYMOE_BATCH_INVARIANT, on by default): every CPU matmul of bf16 or quantised
weights runs in the native kernels whatever its row count. They sum each row in one fixed order,
so a request's numbers (and greedy tokens) are the same alone and in any batch, on the per-op
path and the one-call step. Off, with bf16 instructions, batches over the measured row counts go
to torch's GEMM (`cpu_linear.native_rows`, `quant_native`), whose result for a row changes with
the number of rows: faster prefill on small models, answers that depend on the load
(bench/batch_invariance.py).
"""
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


BACKENDS = ("triton", "torch", "auto")
NATIVE_ISAS = ("native", "avx512", "avx2")  # what the native library is built for (native.ISA_FLAGS)
# how idle OpenMP threads wait for work: sleep at once, spin SPIN_ROUNDS rounds then sleep, spin
WAIT_POLICIES = ("passive", "spin", "active")
SPIN_ROUNDS = "10000"  # "spin": GOMP_SPINCOUNT, enough to bridge the gaps inside a decode step
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # set by the user: they win over wait_policy
KV_CACHE_BYTES = 512 << 20


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _default_cache() -> Path:
    return Path.home() / ".cache" / "tinymoe"


@dataclass(frozen=True)
class Settings:
    backend: str = "auto"           # "auto": Triton for CUDA tensors, torch otherwise; or "triton", "torch"
    native: bool = True             # the native CPU library (else torch ops only)
    native_step: bool = True        # the one-call decode step of that library (else per op)
    cache_dir: Path = field(default_factory=_default_cache)  # where the native library is built
    native_isa: str = "native"      # build it for this CPU, or "avx512" (no AVX512-BF16), "avx2" (AVX2 only)
    threads: int | None = None      # torch's CPU threads, set on install and fixed (None: an LLM on the CPU
                                    # steps with the cores less those other work keeps busy, engine/cpu_share.py)
    wait_policy: str = "spin"       # how the `tinymoe` command has libgomp wait (see above)
    cpu_bf16: bool | None = None    # take the paths of a CPU with bf16 instructions (None: its flags say)
    batch_invariant: bool = True    # CPU matmuls of any row count in the native fixed-order kernels
    kv_cache_bytes: int = KV_CACHE_BYTES  # KV cache budget of an LLM not given kv_cache_tokens

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        for name in ("native", "native_step", "batch_invariant"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Settings.{name} takes True or False, not {getattr(self, name)!r}")
        if self.cpu_bf16 is not None and not isinstance(self.cpu_bf16, bool):
            raise TypeError(f"Settings.cpu_bf16 takes True, False or None, not {self.cpu_bf16!r}")
        if not isinstance(self.cache_dir, (str, os.PathLike)) or not str(self.cache_dir):
            raise TypeError(f"Settings.cache_dir takes a folder path, not {self.cache_dir!r}")
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.native_isa not in NATIVE_ISAS:
            raise ValueError(f"Settings.native_isa takes 'native', 'avx512' or 'avx2', not {self.native_isa!r}")
        if self.threads is not None and not _positive(self.threads):
            raise ValueError(f"Settings.threads takes a positive integer or None, not {self.threads!r}")
        if self.wait_policy not in WAIT_POLICIES:
            raise ValueError(f"Settings.wait_policy takes 'passive', 'spin' or 'active', not {self.wait_policy!r}")
        if not _positive(self.kv_cache_bytes):
            raise ValueError(f"Settings.kv_cache_bytes takes a positive integer, not {self.kv_cache_bytes!r}")

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        """The settings the TINYMOE_* variables of `environ` (default os.environ) describe; unset
        or empty variables keep the defaults."""
        env = os.environ if environ is None else environ
        given = {}
        backend = env.get("TINYMOE_BACKEND", "")
        if backend:
            if backend not in BACKENDS:
                raise ValueError(f"TINYMOE_BACKEND={backend!r}: use triton, torch or auto (or leave it unset: auto)")
            given["backend"] = backend
        for var, name, off, on in (("TINYMOE_NATIVE", "native", "torch ops only", "the native CPU library"),
                                   ("TINYMOE_NATIVE_STEP", "native_step", "the per-op decode path",
                                    "the one-call decode step"),
                                   ("TINYMOE_BATCH_INVARIANT", "batch_invariant",
                                    "torch's GEMM for many rows, results depending on the batch",
                                    "every request's results independent of its batch")):
            value = env.get(var, "")
            if value not in ("", "0", "1"):
                raise ValueError(f"{var}={value!r}: use 0 ({off}) or 1 ({on}, the default)")
            if value:
                given[name] = value == "1"
        if "TINYMOE_CACHE" in env:
            cache = env["TINYMOE_CACHE"]
            if not cache:
                raise ValueError("TINYMOE_CACHE is empty: give the native library's build folder or leave it "
                                 "unset (~/.cache/tinymoe)")
            if os.path.exists(cache) and not os.path.isdir(cache):
                raise ValueError(f"TINYMOE_CACHE={cache!r} is not a folder")
            given["cache_dir"] = Path(cache)
        isa = env.get("TINYMOE_NATIVE_ISA", "")
        if isa:
            if isa not in NATIVE_ISAS:
                raise ValueError(f"TINYMOE_NATIVE_ISA={isa!r}: use native (this CPU's instructions, the default), "
                                 "avx512 (no AVX512-BF16) or avx2 (the AVX2 code only)")
            given["native_isa"] = isa
        bf16 = env.get("TINYMOE_CPU_BF16", "")
        if bf16 not in ("", "0", "1"):
            raise ValueError(f"TINYMOE_CPU_BF16={bf16!r}: use 0 (no bf16 instructions), 1 (bf16 instructions) or "
                             "leave it unset (detect)")
        if bf16:
            given["cpu_bf16"] = bf16 == "1"
        threads = env.get("TINYMOE_THREADS", "")
        if threads:
            if not (threads.isascii() and threads.isdigit() and int(threads) > 0):
                raise ValueError(f"TINYMOE_THREADS={threads!r}: use a positive integer (or leave it unset: the "
                                 "cores other work leaves free)")
            given["threads"] = int(threads)
        policy = env.get("TINYMOE_WAIT_POLICY", "")
        if policy:
            if policy not in WAIT_POLICIES:
                raise ValueError(f"TINYMOE_WAIT_POLICY={policy!r}: use passive, spin (the default) or active")
            given["wait_policy"] = policy
        return cls(**given)


def omp_environment(wait_policy: str, environ=None) -> dict:
    """The variables to export so libgomp waits by `wait_policy`: none if `environ` (default
    os.environ) already sets OMP_WAIT_POLICY or GOMP_SPINCOUNT. Useful only before torch loads."""
    if wait_policy not in WAIT_POLICIES:
        raise ValueError(f"Settings.wait_policy takes 'passive', 'spin' or 'active', not {wait_policy!r}")
    env = os.environ if environ is None else environ
    if any(env.get(var) for var in OMP_VARS):
        return {}
    return {"GOMP_SPINCOUNT": SPIN_ROUNDS} if wait_policy == "spin" else {"OMP_WAIT_POLICY": wait_policy}


_installed: Settings | None = None


def current() -> Settings:
    """The installed settings; on first use, the environment's."""
    global _installed
    if _installed is None:
        _installed = Settings.from_env()
    return _installed


def install(settings: Settings) -> None:
    """Make `settings` the process's, setting torch's threads if it names them."""
    global _installed
    if not isinstance(settings, Settings):
        raise TypeError(f"install takes a tinymoe.Settings, not {type(settings).__name__}")
    import torch
    if settings.threads is not None and torch.get_num_threads() != settings.threads:
        torch.set_num_threads(settings.threads)
    _installed = settings


class override:
    """Change some fields of the installed settings now (`override(backend="torch")`); as a
    context manager, put those fields back on exit, leaving any other change made meanwhile."""

    def __init__(self, **changes):
        unknown = set(changes) - {f.name for f in fields(Settings)}
        if unknown:
            raise TypeError(f"Settings has no field {', '.join(sorted(unknown))}")
        import torch
        now = current()
        self._previous = {name: getattr(now, name) for name in changes}
        self._threads = torch.get_num_threads()
        install(replace(now, **changes))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        install(replace(current(), **self._previous))
        if "threads" in self._previous:  # threads=None leaves torch's count: put back the one before
            import torch
            torch.set_num_threads(self._threads)
