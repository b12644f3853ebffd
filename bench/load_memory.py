"""Peak resident memory while loading a checkpoint, against the checkpoint's size (target <= 1.3x).

    python bench/load_memory.py [--model DIR] [--layers 2] [--shard-mb 0] [--quant experts=int8]

Without --model it writes a Mixtral-shaped random bf16 checkpoint (hidden 1024, intermediate
3584, 8 experts, vocab 32000) to a temp dir. Each load runs in a fresh process; the figure is
the peak RSS of that process minus its RSS just before loading (modules already imported).
safetensors' own `load_file` is measured in the same run as the baseline. For each tinymoe load
it then applies an R&Q plan to every MoE layer and prints the routed experts' resident bytes
before and after, beside the plan's accounted bytes. Experts loaded through their parameters
(no `Experts.fill` reader) keep them, so only filled experts free what the plan does not use."""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = r"""
import resource, sys, torch, json
import tinymoe, safetensors.torch
def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS')) / 1024
before = rss_mb()
path, how, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
experts = {}
if how == 'tinymoe':
    import tinymoe
    from tinymoe.routing.rnq import rnq_plan
    m = tinymoe.load_model(path, dtype=dtype, quant=sys.argv[4] or None)
    held = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in
                                                      (*m.parameters(), *m.buffers())}.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # loading's, before any plan
    blocks = m.moe_blocks()
    experts['before'] = sum(b.experts.resident_bytes() for b in blocks)
    for b in blocks:  # an R&Q plan from a synthetic calibration: expert 0 hot, importance rising with e
        ex = b.experts
        E = ex.num_experts
        ex.apply_plan(rnq_plan([10.0 if e == 0 else 1.0 for e in range(E)], list(range(E)),
                               {p: ex.copy_bytes(p) for p in ('full', 'int8', 'int4')}))
    experts['after'] = sum(b.experts.resident_bytes() for b in blocks)
    experts['accounted'] = sum(b.experts.weight_bytes() for b in blocks)
    experts['rss_after_mb'] = rss_mb()
else:
    from safetensors.torch import load_file
    import glob
    sd = {}
    for f in sorted(glob.glob(path + '/*.safetensors')):
        sd.update(load_file(f))
    torch.stack([t.float().sum() for t in sd.values()])  # touch every page, as a model would
    held = sum(t.numel() * t.element_size() for t in sd.values())
if how != 'tinymoe':
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({'before_mb': before, 'peak_mb': peak, 'held_mb': held / 2**20,
                  'experts': {k: v / 2**20 if k != 'rss_after_mb' else v for k, v in experts.items()}}))
"""


def write_checkpoint(path: Path, layers: int, shard_mb: int):
    import torch
    from safetensors.torch import save_file
    D, I, E, V, H, KV = 1024, 3584, 8, 32000, 16, 4
    hd = D // H
    cfg = dict(architectures=["MixtralForCausalLM"], vocab_size=V, hidden_size=D, intermediate_size=I,
               num_hidden_layers=layers, num_attention_heads=H, num_key_value_heads=KV,
               num_local_experts=E, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
               max_position_embeddings=4096, torch_dtype="bfloat16")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))

    def t(*shape):
        return (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": t(V, D), "model.norm.weight": t(D), "lm_head.weight": t(V, D)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": t(D), p + "post_attention_layernorm.weight": t(D),
                        p + "self_attn.q_proj.weight": t(D, D), p + "self_attn.k_proj.weight": t(KV * hd, D),
                        p + "self_attn.v_proj.weight": t(KV * hd, D), p + "self_attn.o_proj.weight": t(D, D),
                        p + "block_sparse_moe.gate.weight": t(E, D)})
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors.update({q + "w1.weight": t(I, D), q + "w3.weight": t(I, D), q + "w2.weight": t(D, I)})
    if not shard_mb:
        save_file(tensors, path / "model.safetensors")
        return
    shards, cur, size = [], {}, 0
    for name, x in tensors.items():
        cur[name] = x
        size += x.numel() * 2
        if size >= shard_mb * 2**20:
            shards.append(cur)
            cur, size = {}, 0
    shards += [cur] if cur else []
    weight_map = {}
    for n, shard in enumerate(shards):
        fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname)
        weight_map.update({k: fname for k in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def measure(path: Path, how: str, dtype: str, quant: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), how, dtype, quant], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{how} load failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an existing checkpoint directory")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shard-mb", type=int, default=0, help="write the random checkpoint in shards of this size")
    ap.add_argument("--quant", default="experts=int8", help="comma-separated --quant specs to load with as well")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else Path(tmp) / "ckpt"
        if not args.model:
            subprocess.run([sys.executable, __file__, "--write", str(path), str(args.layers), str(args.shard_mb)],
                           check=True)
        size_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        print(f"checkpoint: {path} ({size_mb:.0f} MiB)\n")
        print("| loader | dtype | quant | weights held MiB | peak RSS growth MiB | x checkpoint | x weights held |")
        print("|---|---|---|---|---|---|---|")
        rows = [("tinymoe", "auto", ""), ("tinymoe", "float32", "")] + \
            [("tinymoe", "auto", q) for q in args.quant.split(",") if q] + [("safetensors.load_file", "auto", "")]
        experts = []
        for how, dtype, quant in rows:
            r = measure(path, "tinymoe" if how == "tinymoe" else "safetensors", dtype, quant)
            grow = r["peak_mb"] - r["before_mb"]
            print(f"| {how} | {dtype} | {quant or '-'} | {r['held_mb']:.0f} | {grow:.0f} | {grow / size_mb:.2f} | "
                  f"{grow / r['held_mb']:.2f} |")
            if r["experts"]:
                experts.append((dtype, quant, r["experts"], r["peak_mb"]))
        print("\nRouted experts' resident bytes (`Experts.resident_bytes`) before and after an R&Q plan "
              "(synthetic calibration), against the plan's accounted bytes (`weight_bytes`):\n")
        print("| dtype | quant | experts resident MiB | after R&Q plan MiB | plan's accounted MiB | RSS after plan MiB |")
        print("|---|---|---|---|---|---|")
        for dtype, quant, e, peak in experts:
            print(f"| {dtype} | {quant or '-'} | {e['before']:.1f} | {e['after']:.1f} | {e['accounted']:.1f} | "
                  f"{e['rss_after_mb']:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--write":
        write_checkpoint(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
