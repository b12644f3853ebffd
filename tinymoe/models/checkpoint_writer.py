"""`tinymoe quantize`: write a quantised checkpoint that `load_model` reads directly.

The output directory holds safetensors (one `model.safetensors`, or shards with
`model.safetensors.index.json`), the source's tokenizer and generation files, and its
`config.json` with one key added:

    "quantization_config": {"quant_method": "tinymoe", "format_version": 1,
                            "parts": {"experts": "int4", "shared": "full", "dense": "full",
                                      "attn": "int8", "head": "int8"},
                            "int4_group": 64}

- `quant_method`: whose format this is; tinymoe refuses any other method's checkpoint, and
  other tools can tell this one is not theirs.
- `format_version`: the tensor layout, 1 = `kernels/quant.py`'s: int8 codes with one bf16 scale
  per output channel; int4 nibble pairs with a bf16 (scale, zero) per channel and group.
- `parts`: for each part of models/quantize.py (routed `experts`, `shared` experts, `dense`
  MLPs, `attn` q/k/v/o, the LM `head`) the precision it is stored in ("full", "int8", "int4").
- `int4_group`: the int4 group asked for (32, 64 or 128); a matrix with fewer inputs uses
  `kernels.quant.int4_group(K, int4_group)`, so each matrix's group follows from its shape.

Tensors: a quantised matrix is `<base>.qweight` (I8 [N, K], or U8 [N, KP / 2] for int4) and
`<base>.scales` (BF16 [N], or [N, KP / g, 2]), where `<base>` is the Hugging Face module name
(`model.layers.0.self_attn.q_proj`, `lm_head`); routed experts are stored per expert in the
family's layout (`model.layers.0.block_sparse_moe.experts.3.w1.qweight`). Every other tensor
tinymoe reads (embeddings, norms, gates, full-precision parts) is copied as it is: same name,
dtype and bytes. A tied LM head that is quantised is written as `lm_head.*`.

Quantised matrices are quantised from their values in the checkpoint's `torch_dtype` (what
`load_model(..., quant=...)` does with the default dtype), so loading the written checkpoint gives
the on-the-fly quantised model bit for bit. The source is read tensor by tensor through its
memory map and each quantised matrix is built a few rows at a time, so neither the model nor
a bf16 copy of it is ever held whole.
"""
import json
import shutil
from pathlib import Path

import torch

from ..config import load_config
from ..progress import bar
from ..weights import Checkpoint, CheckpointError, resolve
from .loader import model_dtype, tensor_plan
from ..kernels.quant import qweight_shapes
from .quantize import parse_quant, quantize_matrix
from .transformer import Transformer

SHARD_BYTES = 4 << 30
# What is copied beside the weights: the tokenizer (tokenizer.py reads these) and generation defaults.
COPIED = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
          "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")
COPIED_DIRS = ("additional_chat_templates",)
_ST_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.bfloat16: "BF16"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class _Job:
    """One source tensor and what it becomes: `outputs` [(name, dtype, shape)], made by `make()`."""

    def __init__(self, source: str, source_bytes: int, outputs: list, make):
        self.source, self.source_bytes, self.outputs, self.make = source, source_bytes, outputs, make

    @property
    def nbytes(self) -> int:
        return sum(_ITEMSIZE[d] * _numel(s) for _, d, s in self.outputs)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_output(out, model_dir: Path) -> Path:
    """The output directory: new, or an empty directory, and not the source. Checked before any work."""
    out = Path(out)
    if out.resolve() == Path(model_dir).resolve():
        raise ValueError(f"the output directory {out} is the source checkpoint; write to a new directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"the output directory {out} exists and is not empty")
    return out


def write_quantized(model, quant, out, progress: bool = False, shard_bytes: int = SHARD_BYTES) -> dict:
    """Quantise checkpoint `model` (a directory, cached repo id or alias) as `quant` says
    (models/quantize.py) into the directory `out`. Returns {"dir", "tensors", "bytes",
    "source_bytes", "quant"}."""
    spec = parse_quant(quant)
    if not spec.quantised:
        raise ValueError(f"quant spec {quant!r} quantises nothing; give int8, int4 or parts, e.g. "
                         f"experts=int4,attn=int8")
    model_dir = resolve(model)
    cfg = load_config(model_dir)
    if cfg.quantization is not None:
        raise ValueError(f"{model_dir} is already a quantised checkpoint; quantise the original one")
    out = check_output(out, model_dir)
    ckpt = Checkpoint(model_dir)
    try:
        jobs = _jobs(cfg, ckpt, spec)
        shards = _shards(jobs, shard_bytes)
        out.mkdir(parents=True, exist_ok=True)
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        with bar(total=len(jobs), desc=f"quantizing {model_dir.name}", unit="tensor", disable=not progress) as b:
            for name, shard in zip(names, shards):
                _write_shard(out / name, shard, ckpt, b.update)
    finally:
        ckpt.close()
    total = sum(j.nbytes for j in jobs)
    if len(shards) > 1:
        weight_map = {o[0]: n for n, shard in zip(names, shards) for j in shard for o in j.outputs}
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    raw = json.loads((model_dir / "config.json").read_text())
    raw["quantization_config"] = spec.to_config()
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for fname in COPIED:
        if (model_dir / fname).is_file():
            shutil.copyfile(model_dir / fname, out / fname)
    for dname in COPIED_DIRS:
        if (model_dir / dname).is_dir():
            shutil.copytree(model_dir / dname, out / dname)
    return {"dir": out, "tensors": sum(len(j.outputs) for j in jobs), "bytes": total,
            "source_bytes": sum({j.source: j.source_bytes for j in jobs}.values()), "quant": spec}


def _jobs(cfg, ckpt: Checkpoint, spec) -> list[_Job]:
    """Every tensor to write, in the model's order (the loader's plan), shapes checked."""
    with torch.device("meta"):
        net = Transformer(cfg)
    precision, dtype = spec.parts(), model_dtype(cfg)
    jobs, seen = [], set()

    def expect(name, shape) -> tuple[str, int]:
        dtype, got = ckpt.info(name)
        if got != list(shape):
            raise CheckpointError(f"{ckpt.dir}: tensor {name} has shape {got}, expected {list(shape)}")
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{ckpt.dir}: tensor {name} has unsupported dtype {dtype}")
        return dtype, _ITEMSIZE[dtype] * _numel(shape)

    def copy(name, shape):
        if name not in seen:  # a tied LM head reads the embeddings, written once
            seen.add(name)
            dtype, nbytes = expect(name, shape)
            jobs.append(_Job(name, nbytes, [(name, dtype, list(shape))], lambda: [ckpt.view(name)]))

    def quantised(name, base, shape, prec):
        _, nbytes = expect(name, shape)
        q_shape, s_shape, _ = qweight_shapes(*shape, prec, spec.int4_group)
        outputs = [(base + ".qweight", "I8" if prec == "int8" else "U8", list(q_shape)),
                   (base + ".scales", "BF16", list(s_shape))]

        def make():
            qw = quantize_matrix(ckpt.view(name, shape), prec, spec.int4_group, dtype,
                                 done=lambda r0, r1: ckpt.release(name, (r0, r1)))
            return [qw.q, qw.scales]
        jobs.append(_Job(name, nbytes, outputs, make))

    for entry in tensor_plan(net, ckpt.__contains__):
        if entry.kind == "param":
            copy(entry.source, net.get_parameter(entry.name).shape)
        elif entry.kind == "linear":
            lin = net.get_submodule(entry.name)
            shape = (lin.out_features, lin.in_features)
            if precision[entry.part] == "full":
                copy(entry.source, shape)
            else:
                quantised(entry.source, entry.base, shape, precision[entry.part])
        else:
            experts = net.get_submodule(entry.name)
            shapes = [experts.w_gate.shape[1:], experts.w_up.shape[1:], experts.w_down.shape[1:]]
            for names in entry.source:
                for name, shape in zip(names, shapes):
                    if precision["experts"] == "full":
                        copy(name, shape)
                    else:
                        quantised(name, name.removesuffix(".weight"), tuple(shape), precision["experts"])
    return jobs


def _shards(jobs: list[_Job], limit: int) -> list[list[_Job]]:
    shards, size = [[]], 0
    for job in jobs:
        if shards[-1] and size + job.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    return shards


def _write_shard(path: Path, jobs: list[_Job], ckpt: Checkpoint, tick) -> None:
    """A safetensors file written tensor by tensor: the header first (every shape is known in
    advance), then each job's tensors as they are made."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for job in jobs:
        for name, dtype, shape in job.outputs:
            size = _ITEMSIZE[dtype] * _numel(shape)
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for job in jobs:
            tensors = job.make()
            for (name, dtype, shape), t in zip(job.outputs, tensors):
                if list(t.shape) != shape or (t.dtype in _ST_DTYPES and _ST_DTYPES[t.dtype] != dtype):
                    raise AssertionError(f"{name}: made {t.dtype} {list(t.shape)}, declared {dtype} {shape}")
                if t.numel():
                    f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del tensors
            ckpt.release(job.source)
            tick(1)
