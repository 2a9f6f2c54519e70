"""Read a Hugging Face checkpoint directory: config.json, safetensors shards, tokenizer files.

Shards are parsed and memory-mapped here rather than through the safetensors package, because
numpy has no bfloat16 and Qwen3 checkpoints are bf16: we map the raw bytes and widen bf16 to
float32 ourselves, one tensor at a time.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from dmoe import quant
from dmoe.config import ConfigError, ModelConfig

_DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}


class CheckpointError(Exception):
    """A checkpoint directory that cannot be converted, with a message that names what."""


@dataclass(frozen=True)
class _Entry:
    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class HFCheckpoint:
    """The tensors of every shard by name, read on demand as float32."""

    def __init__(self, directory: str) -> None:
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory}: no such directory")
        self.directory = directory
        cfg_path = os.path.join(directory, "config.json")
        try:
            with open(cfg_path) as f:
                self.hf_config = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{cfg_path}: not found") from None
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable ({e})") from None
        try:
            self.config = ModelConfig.from_hf(self.hf_config)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        shards = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                listed = {os.path.join(directory, s) for s in json.load(f)["weight_map"].values()}
            missing = sorted(s for s in listed if not os.path.exists(s))
            if missing:
                raise CheckpointError(f"{missing[0]}: shard listed in the index is missing")
        if not shards:
            raise CheckpointError(f"{directory}: no .safetensors files")
        self._maps: dict[str, mmap.mmap] = {}
        self.entries: dict[str, _Entry] = {}
        for shard in shards:
            self._read_header(shard)
        self.tokenizer_json = self._read_text("tokenizer.json")
        tok_cfg = self._read_text("tokenizer_config.json")
        self.chat_template: str | None = None
        if tok_cfg:
            template = json.loads(tok_cfg).get("chat_template")
            self.chat_template = template if isinstance(template, str) else None
        if self.chat_template is None:
            self.chat_template = self._read_text("chat_template.jinja")

    def _read_text(self, name: str) -> str | None:
        path = os.path.join(self.directory, name)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    def _read_header(self, shard: str) -> None:
        size = os.path.getsize(shard)
        try:
            with open(shard, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{shard}: unreadable shard (only {size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise CheckpointError(f"{shard}: unreadable shard (header of {n} bytes in a {size}-byte file)")
                header = json.loads(f.read(n))
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{shard}: unreadable shard (corrupt header)") from None
        if mm is not None:
            self._maps[shard] = mm
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = (base + o for o in meta["data_offsets"])
            if end > size:
                raise CheckpointError(f"{shard}: unreadable shard (tensor {name} ends at byte {end}, file has {size})")
            self.entries[name] = _Entry(shard, meta["dtype"], tuple(meta["shape"]), start, end)

    @property
    def nbytes(self) -> int:
        return sum(e.end - e.start for e in self.entries.values())

    def has(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str, shape: tuple[int, ...], index: int | None = None) -> np.ndarray:
        """The tensor (or its sub-tensor `index` along the first axis) as float32, checked against
        the expected shape of the whole."""
        e = self.entries.get(name)
        if e is None:
            raise CheckpointError(f"missing tensor {name}")
        if e.shape != shape:
            raise CheckpointError(f"tensor {name} has shape {list(e.shape)}, expected {list(shape)}")
        if e.dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name}: dtype {e.dtype} is not supported (bf16, f16, f32)")
        np_dtype, size = _DTYPES[e.dtype]
        count = (e.end - e.start) // size
        if count != int(np.prod(shape)):
            raise CheckpointError(f"tensor {name}: {e.end - e.start} bytes do not hold shape {list(shape)}")
        mm = self._maps[e.shard]
        data = np.frombuffer(mm, np_dtype, count=count, offset=e.start).reshape(shape)
        start, nbytes = e.start, e.end - e.start
        if index is not None:
            data = data[index]
            nbytes //= shape[0]
            start += index * nbytes
        out = quant.bf16_to_f32(data) if e.dtype == "BF16" else data.astype(np.float32)
        # A copy now: unmap the pages read, so resident memory stays one tensor, not the checkpoint so far
        # (they stay in the page cache, reclaimable, for anyone who reads them again)
        first = start // mmap.PAGESIZE * mmap.PAGESIZE
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, first, start + nbytes - first)
        return out

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
