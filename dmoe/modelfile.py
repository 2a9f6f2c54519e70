"""Open and verify a .m file (GGUF v3, llama.cpp's qwen3moe convention); zero-copy tensor views.

The file is memory-mapped and nothing is read until a view is touched, so a rank that takes
only its experts' byte ranges never pages in the rest. Every tensor's type, shape and extent
are checked against the config and the file size before any is used.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT

from dmoe import quant
from dmoe.config import ARCH, ConfigError, ModelConfig

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_NAME = 256  # longer than any real tensor name (ggml's limit is 64)
TENSORS_PER_LAYER = 12  # expected_shapes' blk.N.* entries

# GGUF value types -> struct format (scalars); 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class ModelFileError(Exception):
    """A file that is not a usable .m, with a message that says what is wrong."""


def _short(value: Any) -> str:
    """A header value in a one-line message: repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # numpy order: [..., rows, cols]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return quant.row_bytes(self.qtype, self.shape[-1])


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model with its shape (numpy order), by llama.cpp name."""
    d, E, ff = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (cfg.vocab_size, d),
        "output_norm.weight": (d,),
    }
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (d,),
            b + "attn_q.weight": (cfg.q_dim, d),
            b + "attn_k.weight": (cfg.kv_dim, d),
            b + "attn_v.weight": (cfg.kv_dim, d),
            b + "attn_output.weight": (d, cfg.q_dim),
            b + "attn_q_norm.weight": (cfg.head_dim,),
            b + "attn_k_norm.weight": (cfg.head_dim,),
            b + "ffn_norm.weight": (d,),
            b + "ffn_gate_inp.weight": (E, d),
            b + "ffn_gate_exps.weight": (E, ff, d),
            b + "ffn_up_exps.weight": (E, ff, d),
            b + "ffn_down_exps.weight": (E, d, ff),
        })
    return shapes


class _Cursor:
    """Reads GGUF's little-endian header fields, failing with the offset on truncation."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > self.size:
            raise ModelFileError(f"truncated file: header needs byte {self.pos + n}, file has {self.size}")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """An array of strings: the tokenizer's 150k tokens and merges, read in a tight loop (the generic
        path per item cost a second at every start)."""
        buf, pos, out, unpack = self.buf, self.pos, [], struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > self.size:
                break
            (n,) = unpack(buf, pos)
            out.append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
            pos += 8 + n
        if len(out) < count or pos > self.size:
            raise ModelFileError(f"truncated file: header needs byte {pos + 8}, file has {self.size}")
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            sub, count = self.scalar("<I"), self.scalar("<Q")
            if sub in _NUMPY:
                return np.frombuffer(self.take(count * np.dtype(_NUMPY[sub]).itemsize), _NUMPY[sub]).tolist()
            if sub == 8:
                return self.strings(count)
            return [self.value(sub) for _ in range(count)]
        raise ModelFileError(f"corrupt header: unknown value type {vtype} at byte {self.pos}")


class ModelFile:
    """An open .m file: `config`, `metadata`, `tensors`, and views of tensor bytes."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise ModelFileError(f"{path}: no such file")
        self.size = os.path.getsize(path)
        if self.size < 24:
            raise ModelFileError(f"{path}: not a GGUF/.m file ({self.size} bytes)")
        with open(path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except ModelFileError as e:
            self.close()
            raise ModelFileError(f"{path}: {e}") from None

    def _parse(self) -> None:
        cur = _Cursor(self._mmap, self.size)
        magic = bytes(cur.take(4))
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"not a GGUF/.m file (magic {magic!r}, expected b'GGUF')")
        version = cur.scalar("<I")
        if version != 3:
            raise ModelFileError(f"GGUF version {version} is not supported (need 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise ModelFileError(f"corrupt header: {n_tensors} tensors, {n_kv} keys")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar("<I"))
        self.metadata = meta
        arch = meta.get("general.architecture")
        if arch != ARCH:
            raise ModelFileError(f"architecture is {_short(arch)}, expected {ARCH!r} (a Qwen3-MoE model)")

        raw_infos = []
        for _ in range(n_tensors):
            at = cur.pos
            name = cur.string()
            if len(name) > MAX_NAME or not name.isprintable():
                raise ModelFileError(f"corrupt header: the tensor name at byte {at} is not a name ({len(name)} chars)")
            ndim = cur.scalar("<I")
            if not 1 <= ndim <= 4:
                raise ModelFileError(f"corrupt header: tensor {name} has {ndim} dimensions")
            ne = [cur.scalar("<Q") for _ in range(ndim)]
            raw_infos.append((name, ne, cur.scalar("<I"), cur.scalar("<Q")))
        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
            raise ModelFileError(f"corrupt header: general.alignment is {_short(align)}, not a power of two")
        data_start = (cur.pos + align - 1) // align * align

        tensors: dict[str, TensorInfo] = {}
        for name, ne, type_id, rel in raw_infos:
            try:
                qtype = QT(type_id)
            except ValueError:
                raise ModelFileError(f"tensor {name}: unknown ggml type {type_id}") from None
            if qtype not in quant.SUPPORTED:
                raise ModelFileError(
                    f"tensor {name}: type {qtype.name} is not supported (supported: "
                    f"{', '.join(t.name for t in quant.SUPPORTED)})"
                )
            shape = tuple(int(n) for n in reversed(ne))
            try:
                nbytes = math.prod(shape[:-1]) * quant.row_bytes(qtype, shape[-1])  # exact: no int64 wrap
            except ValueError as e:
                raise ModelFileError(f"tensor {name}: {e}") from None
            info = TensorInfo(name, qtype, shape, data_start + rel, nbytes)
            if info.offset + nbytes > self.size:
                raise ModelFileError(
                    f"truncated file: tensor {name} ends at byte {info.offset + nbytes}, file has {self.size}"
                )
            tensors[name] = info
        self.tensors = tensors

        if "token_embd.weight" not in tensors:
            raise ModelFileError("missing tensor token_embd.weight")
        try:
            self.config = ModelConfig.from_gguf_metadata(
                meta, vocab_size=tensors["token_embd.weight"].shape[0], tied="output.weight" not in tensors
            )
        except ConfigError as e:
            raise ModelFileError(str(e)) from None
        if self.config.num_hidden_layers * TENSORS_PER_LAYER > len(tensors):  # before listing that many layers' names
            raise ModelFileError(f"the header says {self.config.num_hidden_layers} layers; the file holds "
                                 f"{len(tensors)} tensors")
        for name, shape in expected_shapes(self.config).items():
            if name not in tensors:
                raise ModelFileError(f"missing tensor {name}")
            if tensors[name].shape != shape:
                raise ModelFileError(f"tensor {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, zero-copy: uint8 [..., rows, row_bytes]."""
        t = self.tensors[name]
        flat = np.frombuffer(self._mmap, np.uint8, count=t.nbytes, offset=t.offset)
        return flat.reshape(*t.shape[:-1], t.row_bytes)

    def dequantize(self, name: str) -> np.ndarray:
        """The whole tensor as float32 (for small tensors: norms, and for tests)."""
        t = self.tensors[name]
        return quant.dequantize(self.raw(name), t.qtype, t.shape[-1])

    def release(self, name: str) -> None:
        """Tell the kernel we are done with a tensor's pages (after repacking it): unmapped from this process
        and dropped from the page cache, so the file's copy does not compete with the packed one for memory
        (clean pages: nothing is lost; another reader just reads them from disk again)."""
        t = self.tensors[name]
        start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
        if hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)
        if hasattr(os, "posix_fadvise"):
            with open(self.path, "rb") as f:
                os.posix_fadvise(f.fileno(), start, t.offset + t.nbytes - start, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # views still alive: the mapping goes when they do
            self._mmap.close()

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
