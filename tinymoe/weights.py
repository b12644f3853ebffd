"""Find a checkpoint (directory, Hugging Face cache, alias) and read its safetensors lazily."""
import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"

# Aliases: a Hugging Face repo id, or a model shipped inside the package.
ALIASES = {
    "mixtral": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "deepseek-moe": "deepseek-ai/deepseek-moe-16b-chat",
    "qwen3-moe": "Qwen/Qwen3-30B-A3B",
    "tiny": ASSETS / "tiny-mixtral",
    "tiny-mixtral": ASSETS / "tiny-mixtral",
    "tiny-deepseek": ASSETS / "tiny-deepseek",
    "tiny-lpr": ASSETS / "tiny-lpr",
}


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint; the message is one line."""


def hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def _snapshot(cache: Path, repo: str) -> Path | None:
    root = cache / ("models--" + repo.replace("/", "--"))
    ref = root / "refs" / "main"
    if ref.is_file():
        snap = root / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    snaps = [p for p in (root / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def resolve(model: str | os.PathLike) -> Path:
    """A model argument -> the directory holding its config.json and safetensors."""
    name = str(model)
    target = ALIASES.get(name, name)
    if isinstance(target, str) and target.startswith("~"):
        target = os.path.expanduser(target)
    if isinstance(target, Path) or Path(target).exists():
        path = Path(target)
        if (path / "config.json").is_file():
            return path
        if path.is_dir():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        if path.is_file():  # e.g. .../model.safetensors or .../config.json: the checkpoint is its folder
            if (path.parent / "config.json").is_file():
                return path.parent
            raise CheckpointError(f"{path} is a file and its folder has no config.json; pass the checkpoint "
                                  f"directory (the one holding config.json and the .safetensors files)")
        raise CheckpointError(f"model {name!r} not found at {path}")
    if os.path.isabs(target) or target.startswith((".", "~")) or target.count("/") > 1:
        raise CheckpointError(f"model {name!r} not found: no such file or directory")
    if target.count("/") == 1:
        looked = []
        for cache in hf_cache_dirs():
            snap = _snapshot(cache, target)
            if snap is not None:
                return snap
            looked.append(str(cache / ("models--" + target.replace("/", "--"))))
        raise CheckpointError(
            f"model {name!r} ({target}) is not on this machine; looked in {', '.join(looked)}; "
            f"on a connected machine run `huggingface-cli download {target}` and copy the cache here "
            f"(or set HF_HOME)")
    raise CheckpointError(
        f"model {name!r} is neither a directory, a Hugging Face repo id (ORG/NAME) nor an alias "
        f"({', '.join(ALIASES)})")


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class _SafetensorsFile:
    """One .safetensors file, memory-mapped. We parse the header ourselves so that each tensor's
    pages can be dropped once converted: peak memory stays near the loaded weights' size."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot open {path}: {e.strerror}") from None
        size = os.fstat(self._fd).st_size
        try:
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(os.pread(self._fd, n, 8))
        except (struct.error, ValueError) as e:
            os.close(self._fd)
            raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated header: {e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.tensors = header
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if self.data_start + end > size:
            os.close(self._fd)
            raise CheckpointError(
                f"{path} is truncated: its header needs {self.data_start + end} bytes, the file has {size}")
        # Copy-on-write so torch.frombuffer gets a writable buffer; we never write, so nothing is copied.
        self._mm = mmap.mmap(self._fd, size, access=mmap.ACCESS_COPY) if size else None

    def _span(self, name: str) -> tuple[torch.dtype, int, int, int]:
        """(dtype, elements, start, end) of a tensor's bytes in the file, checked."""
        info = self.tensors[name]
        src_dtype = _DTYPES.get(info["dtype"])
        if src_dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = (self.data_start + o for o in info["data_offsets"])
        count = math.prod(info["shape"])
        if count * src_dtype.itemsize != end - start:
            raise CheckpointError(f"{self.path}: tensor {name} has {end - start} bytes for shape {info['shape']}")
        return src_dtype, count, start, end

    def read_into(self, name: str, out: torch.Tensor) -> None:
        src_dtype, count, start, end = self._span(name)
        if out.numel():
            out.copy_(torch.frombuffer(self._mm, dtype=src_dtype, count=count, offset=start).view(out.shape))
            self._drop_pages(start, end)

    def view(self, name: str) -> torch.Tensor:
        """The tensor as stored (its dtype), read in place from the mapping: no copy. Drop it and
        call `release` before reading on, or its pages stay resident."""
        src_dtype, count, start, _ = self._span(name)
        shape = self.tensors[name]["shape"]
        if not count:
            return torch.empty(shape, dtype=src_dtype)
        return torch.frombuffer(self._mm, dtype=src_dtype, count=count, offset=start).view(shape)

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        _, _, start, end = self._span(name)
        if rows is not None:  # only rows r0..r1 of the leading dimension
            shape = self.tensors[name]["shape"]
            row = (end - start) // shape[0] if shape and shape[0] else 0
            start, end = start + rows[0] * row, start + rows[1] * row
        if end > start:
            self._drop_pages(start, end)

    def _drop_pages(self, start: int, end: int):
        page = mmap.PAGESIZE
        lo = start - start % page
        if end > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)
            os.posix_fadvise(self._fd, lo, end - lo, os.POSIX_FADV_DONTNEED)

    def close(self):
        if self._mm is not None:
            self._mm.close()
        os.close(self._fd)


class Checkpoint:
    """Tensor name -> file for a single-file or sharded (model.safetensors.index.json) checkpoint."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid index ({e})") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} lists shard {missing[0]} which is missing from {self.dir}")
            self._where = dict(weight_map)
        elif single.is_file():
            self._where = None
        else:
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {self.dir}")
        self._files: dict[str, _SafetensorsFile] = {}
        if self._where is None:
            self._where = {name: single.name for name in self._file(single.name).tensors}

    def _file(self, fname: str) -> _SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = _SafetensorsFile(self.dir / fname)
        return self._files[fname]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def _holding(self, name: str, shape=None) -> _SafetensorsFile:
        """The file holding `name`, checking it is there (with `shape`, if given)."""
        fname = self._where.get(name)
        if fname is None:
            raise CheckpointError(f"checkpoint {self.dir} has no tensor {name}")
        f = self._file(fname)
        if name not in f.tensors:
            raise CheckpointError(f"{f.path} has no tensor {name} (the index says it does)")
        got = tuple(f.tensors[name]["shape"])
        if shape is not None and got != tuple(shape):
            raise CheckpointError(f"{f.path}: tensor {name} has shape {list(got)}, expected {list(shape)}")
        return f

    def info(self, name: str) -> tuple[str, list[int]]:
        """(safetensors dtype name, shape) of a tensor, without reading it."""
        t = self._holding(name).tensors[name]
        return t["dtype"], list(t["shape"])

    def read(self, name: str, out: torch.Tensor) -> None:
        """Copy one tensor into `out` (converting dtype), checking it exists and has out's shape."""
        self._holding(name, out.shape).read_into(name, out)

    def view(self, name: str, shape=None) -> torch.Tensor:
        """One tensor as stored, without a copy (checked against `shape` if given); `release(name)`
        once it is no longer needed drops its pages."""
        return self._holding(name, shape).view(name)

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Drop the pages of a tensor (or of its rows r0..r1) read by `view`: a mapped page
        that was read stays resident until then."""
        self._holding(name).release(name, rows)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()
