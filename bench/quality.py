"""Perplexity of tinymoe bf16 / int8 / int4 beside llama.cpp bf16 / Q8_0 / Q4_0 on the embedded
models, both engines scoring the same token windows of the held-out text.

    python bench/quality.py [--models tiny-mixtral,tiny-deepseek] [--engines tinymoe,llama.cpp]
                            [--precisions bf16,int8,int4] [--window 256] [--max-windows N]

The held-out text (tinymoe/assets/data/heldout.txt) is tokenised once by the model's own
tokenizer (tinymoe's) and cut into non-overlapping windows of --window ids; every engine gets
those ids (no BOS added) and scores each window's tokens 1..W-1, teacher forced. tinymoe:
`load_model(path, quant=...)` (bf16 = the checkpoint as is; int4 = --int4-spec, default "int4",
every linear but the gates). llama.cpp: GGUFs of the same checkpoint made with the shared
converter (`convert_hf_to_gguf.py --outtype bf16|q8_0`, Q4_0 by the shared quantize.py from the
bf16 file, llama.cpp's default recipe: its output matrix becomes Q6_K), made under --gguf-dir
when missing; scored in the llama venv by bench/quality_llama.py.
Prints one JSON line and a markdown table: ppl and its change against the same engine's bf16.
"""
import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tinymoe" / "assets"
MODELS = {"tiny-mixtral": ASSETS / "tiny-mixtral", "tiny-deepseek": ASSETS / "tiny-deepseek"}
ENGINES = ("tinymoe", "llama.cpp")
# precision -> (tinymoe quant spec, llama.cpp type)
PRECISIONS = {"bf16": (None, "bf16"), "int8": ("int8", "q8_0"), "int4": ("int4", "q4_0")}
PEERS = Path(os.environ.get("PEERS", Path.home() / ".cache" / "peers"))
SHARED = Path(os.environ.get("PEERS_SCRIPTS", "/work/shared/peers"))
CONVERTER = PEERS / "src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"


def csv(text: str, valid, what: str, parser) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in valid]
    if bad or not items:
        parser.error(f"unknown {what} {','.join(bad) or repr(text)} (valid: {', '.join(valid)})")
    return items


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-mixtral,tiny-deepseek")
    ap.add_argument("--engines", default="tinymoe,llama.cpp")
    ap.add_argument("--precisions", default="bf16,int8,int4")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    ap.add_argument("--data", default=str(ASSETS / "data" / "heldout.txt"))
    ap.add_argument("--gguf-dir", default=str(PEERS / "gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int4-spec", default="int4", help="tinymoe's quant spec for the int4 rows, e.g. int4:g32")
    a = ap.parse_args(argv)
    a.models = csv(a.models, MODELS, "model", ap)
    a.engines = csv(a.engines, ENGINES, "engine", ap)
    a.precisions = csv(a.precisions, PRECISIONS, "precision", ap)
    if a.window < 2:
        ap.error(f"--window must be at least 2, got {a.window}")
    if a.max_windows is not None and a.max_windows < 1:
        ap.error(f"--max-windows must be at least 1, got {a.max_windows}")
    if not Path(a.data).is_file():
        ap.error(f"data file {a.data} not found")
    if "llama.cpp" in a.engines:
        if not llama_python().is_file():
            ap.error(f"llama.cpp venv {llama_python()} not found: run {SHARED}/build_llama.sh "
                     f"(set-up step 1 of {SHARED}/README.md)")
        if not CONVERTER.is_file():
            ap.error(f"GGUF converter {CONVERTER} not found: run {SHARED}/build_llama.sh")
    if "tinymoe" in a.engines and any(PRECISIONS[p][0] for p in a.precisions) and not has_quant():
        ap.error("tinymoe.load_model has no quant= argument yet: run with --precisions bf16 "
                 "or --engines llama.cpp")
    if "tinymoe" in a.engines and "int4" in a.precisions:
        from tinymoe.models.quantize import parse_quant
        try:
            parse_quant(a.int4_spec)
        except ValueError as e:
            ap.error(f"--int4-spec: {e}")
    return a


def has_quant() -> bool:
    import tinymoe
    return "quant" in inspect.signature(tinymoe.load_model).parameters


def llama_python() -> Path:
    return PEERS / "venv-llama" / "bin" / "python"


def token_windows(model_dir: Path, data: str, window: int, limit: int | None) -> torch.Tensor:
    import tinymoe
    from tinymoe.evaluation import read_tokens, windows
    tokens = read_tokens(tinymoe.load_tokenizer(model_dir), data)
    if tokens.numel() < window:
        raise ValueError(f"{data} holds {tokens.numel()} tokens, fewer than one window of {window}")
    return windows(tokens, window, limit)


def tinymoe_nll(model_dir: Path, rows: torch.Tensor, quant) -> np.ndarray:
    import tinymoe
    from tinymoe.evaluation import teacher_forced
    kwargs = {"quant": quant} if quant else {}
    model = tinymoe.load_model(model_dir, **kwargs).eval()
    nll, _ = teacher_forced(model, rows, batch=8)
    return nll.double().view(rows.shape[0], -1).numpy()


def run(cmd: list[str], what: str):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{what} failed (exit {done.returncode}): " + " | ".join(tail))


def gguf_file(name: str, model_dir: Path, kind: str, gguf_dir: Path) -> Path:
    """The GGUF of `model_dir` in llama.cpp type `kind`, converted (and quantised) when missing."""
    out = gguf_dir / f"{name}-{kind}.gguf"
    if out.is_file():
        return out
    gguf_dir.mkdir(parents=True, exist_ok=True)
    py = str(llama_python())
    if kind == "q4_0":
        bf16 = gguf_file(name, model_dir, "bf16", gguf_dir)
        run([py, str(SHARED / "quantize.py"), str(bf16), str(out), "q4_0"], f"quantising {bf16} to q4_0")
    else:
        print(f"  converting {model_dir} -> {out}", file=sys.stderr, flush=True)
        run([py, str(CONVERTER), str(model_dir), "--outtype", kind, "--outfile", str(out)],
            f"converting {model_dir} to {kind}")
    return out


def llama_nll(gguf: Path, rows: torch.Tensor, threads: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        win, out = Path(tmp) / "windows.npy", Path(tmp) / "nll.npy"
        np.save(win, rows.numpy())
        run([str(llama_python()), str(Path(__file__).with_name("quality_llama.py")), str(gguf), str(win),
             str(out), "--threads", str(threads)], f"llama.cpp scoring of {gguf}")
        return np.load(out)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    results = []
    for name in a.models:
        rows = token_windows(MODELS[name], a.data, a.window, a.max_windows)
        print(f"{name}: {rows.shape[0]} windows of {a.window} tokens", file=sys.stderr, flush=True)
        nlls = {}
        for engine in a.engines:
            for prec in a.precisions:
                quant, kind = PRECISIONS[prec]
                quant = a.int4_spec if prec == "int4" else quant
                if engine == "tinymoe":
                    nll = tinymoe_nll(MODELS[name], rows, quant)
                else:
                    nll = llama_nll(gguf_file(name, MODELS[name], kind, Path(a.gguf_dir)), rows, a.threads)
                nlls[engine, prec] = nll
                label = (quant if prec == "int4" else prec) if engine == "tinymoe" else kind
                row = {"model": name, "engine": engine, "precision": label,
                       "ppl": math.exp(nll.mean()), "tokens": int(nll.size)}
                base = nlls.get((engine, "bf16"))
                row["delta_pct"] = None if base is None else 100 * (math.exp(nll.mean() - base.mean()) - 1)
                ref = nlls.get(("tinymoe", prec))
                if engine != "tinymoe" and ref is not None:
                    # same model, same windows: how far llama.cpp's per-token NLL is from tinymoe's
                    row["mean_abs_dnll_vs_tinymoe"] = float(np.abs(nll - ref).mean())
                results.append(row)
                print(f"  {engine} {row['precision']}: ppl {row['ppl']:.4f}", file=sys.stderr, flush=True)
    print(json.dumps({"window": a.window, "data": a.data, "rows": results}))
    print()
    print("| model | engine | weights | ppl | change vs bf16 % |")
    print("|---|---|---|---|---|")
    for r in results:
        delta = "-" if r["delta_pct"] is None else f"{r['delta_pct']:+.2f}"
        print(f"| {r['model']} | {r['engine']} | {r['precision']} | {r['ppl']:.3f} | {delta} |")


if __name__ == "__main__":
    main()
