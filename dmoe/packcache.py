"""The pack cache: a rank's weights as the kernels lay them out, saved after the first load and mapped
on the next, so a warm start repacks nothing (17 GB of Qwen3-30B-A3B took 30-70 s to repack here).

A cache file belongs to one model file (path, size, modification time), one rank's shard and one version
of the kernels' layout (a hash of their source): any change makes a new key, and the file of the old key
is removed. Layout: the packed arrays back to back (64-byte aligned), then a JSON footer listing them,
its length and a magic number. The map is copy-on-write, so the kernels see ordinary writable arrays
while the pages stay shared with the page cache (reclaimable, never written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import sys
from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT

from dmoe import kernels
from dmoe.kernels import ExpertWeights, Weight, pack_experts, pack_weight, packed_format

MAGIC = b"DMOEPACK"
ALIGN = 64
_TAIL = struct.Struct("<Q8s")  # footer length, magic


class StaleCacheError(Exception):
    """The cache file does not match what this load asks for."""


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dmoe")


LAYOUT_VERSION = 4  # bump on any change of what a packed array holds that the sources below may not show
# Everything that decides what a rank's packed arrays hold: the layouts and repacking (kernels*), the block
# decoding (blocks, quant), which bytes each rank takes (plan, weights) and the cache's own format.
_LAYOUT_SOURCES = ("blocks.py", "quant.py", "plan.py", "weights.py", "packcache.py")


def _layout_version() -> str:
    h = hashlib.sha256(str(LAYOUT_VERSION).encode())
    folder = os.path.dirname(kernels.__file__)
    for name in sorted(os.listdir(folder)):
        if (name.startswith("kernels") and name.endswith(".py")) or name in _LAYOUT_SOURCES:
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


class PackStore:
    """Packs weights for the kernels: fresh (no cache), from a cache file, or fresh while writing one."""

    def __init__(self, model_path: str | None = None, slot: str = "", shard_tag: str = "",
                 cache_dir: str | None = None) -> None:
        """One cache file per (model path, slot): a slot is a rank's place (world size, layout, rank); the key
        (model size and time, the shard's exact ranges, the kernels' layout) says whether its content is current."""
        self.mode, self.path, self._entries, self._next = "pack", "", [], 0
        self._out = None
        self._packed: list[ExpertWeights] = []  # write mode: what to move onto the file once it is complete
        if cache_dir is None or model_path is None:
            return
        st = os.stat(model_path)
        key = hashlib.sha256(
            f"{os.path.realpath(model_path)}|{st.st_size}|{st.st_mtime_ns}|{shard_tag}|{_layout_version()}".encode()
        ).hexdigest()[:16]
        where = f"{os.path.realpath(model_path)}|{slot}"
        stem = f"{os.path.basename(model_path)}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"
        self.path = os.path.join(cache_dir, f"{stem}-{key}.pack")
        if os.path.exists(self.path):
            try:
                self._open_for_reading()
                return
            except (StaleCacheError, OSError, ValueError):
                self._remove(self.path)
        with contextlib.suppress(OSError):
            os.makedirs(cache_dir, exist_ok=True)
            for old in os.listdir(cache_dir):
                if old.startswith(stem) and old.endswith(".pack"):
                    self._remove(os.path.join(cache_dir, old))
            self._out = open(self.path + ".tmp", "wb")  # noqa: SIM115 - closed in finish()
            self.mode = "write"

    def _open_for_reading(self) -> None:
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            f.seek(size - _TAIL.size)
            n, magic = _TAIL.unpack(f.read(_TAIL.size))
            if magic != MAGIC or n > size:
                raise StaleCacheError(f"{self.path}: not a pack cache")
            f.seek(size - _TAIL.size - n)
            self._entries = json.loads(f.read(n))
        self._map = np.memmap(self.path, np.uint8, mode="c")
        if hasattr(mmap, "MADV_WILLNEED"):  # start reading it all in now, in the background
            self._map._mmap.madvise(mmap.MADV_WILLNEED)
        self.mode = "read"

    def preload(self) -> None:
        """Read a mapped cache file in whole now, so that no token waits for the disk (the background
        read-ahead of a 17 GB file is not complete when the first tokens run, nor guaranteed at all)."""
        if self.mode == "read":
            chunk = bytearray(1 << 24)
            with open(self.path, "rb", buffering=0) as f:
                while f.readinto(chunk):
                    pass

    def discard(self) -> None:
        """Remove this store's cache file (it was stale)."""
        self._map = None
        self._remove(self.path)

    @staticmethod
    def _remove(path: str) -> None:
        with contextlib.suppress(OSError):
            os.remove(path)

    def weight(self, parts: list[np.ndarray], qtypes: list[QT], cols: int, col0: int = 0) -> Weight:
        """As kernels.pack_weight, or its packed array from the cache."""
        rows, fmt = sum(p.shape[0] for p in parts), packed_format(qtypes)
        if self.mode == "read":
            return Weight(rows, cols, fmt, self._take(1, rows, cols, fmt, col0), col0)
        return self._save(pack_weight(parts, qtypes, cols, col0))

    def experts(self, raw: np.ndarray, qtype: QT, cols: int, col0: int = 0) -> ExpertWeights:
        """As kernels.pack_experts, or its packed array from the cache."""
        if self.mode == "read":
            fmt = packed_format([qtype])
            n, rows = raw.shape[:2]
            return ExpertWeights(n, rows, cols, fmt, self._take(n, rows, cols, fmt, col0), col0)
        return self._save(pack_experts(raw, qtype, cols, col0))

    def _take(self, n: int, rows: int, cols: int, fmt: str, col0: int = 0) -> np.ndarray:
        shape, dtype = ExpertWeights.layout(n, rows, cols, fmt, col0)
        if self._next >= len(self._entries):
            raise StaleCacheError(f"{self.path}: fewer arrays than the model needs")
        offset, saved_shape, saved_dtype = self._entries[self._next]
        if tuple(saved_shape) != shape or saved_dtype != dtype.str:
            raise StaleCacheError(f"{self.path}: array {self._next} is {saved_dtype} {saved_shape}, need {shape}")
        self._next += 1
        return np.ndarray(shape, dtype, buffer=self._map, offset=offset)

    def _save(self, w: ExpertWeights) -> ExpertWeights:
        if self._out is not None:
            try:
                self._out.write(b"\0" * (-self._out.tell() % ALIGN))
                self._entries.append((self._out.tell(), list(w.data.shape), w.data.dtype.str))
                w.data.tofile(self._out)
                self._packed.append(w)
            except OSError as e:
                self._abandon(f"cannot write the pack cache {self.path}: {e}")
        return w

    def _abandon(self, why: str) -> None:
        print(f"dmoe: warning: {why}; continuing without it", file=sys.stderr)
        if self._out is not None:
            self._out.close()
            self._out = None
        self._packed.clear()
        self._remove(self.path + ".tmp")
        self.mode = "pack"

    def finish(self, report: Callable[[str], None] = lambda _: None) -> None:
        """Write mode: complete the file (footer, rename). Read mode: every cached array must have been used."""
        if self.mode == "read" and self._next != len(self._entries):
            raise StaleCacheError(f"{self.path}: {len(self._entries) - self._next} arrays left over")
        if self._out is None:
            return
        try:
            footer = json.dumps(self._entries).encode()
            self._out.write(footer + _TAIL.pack(len(footer), MAGIC))
            size = self._out.tell()
            self._out.close()
            self._out = None
            os.replace(self.path + ".tmp", self.path)
            report(f"saved the packed weights to {self.path} ({size / 1e9:.2f} GB) for faster starts")
            self._open_for_reading()
            for w in self._packed:  # one copy in memory: the file's pages replace the freshly packed arrays
                w.data = self._take(w.n_experts, w.rows, w.cols, w.fmt, w.col0)
            self._packed.clear()
        except OSError as e:
            self._abandon(f"cannot write the pack cache {self.path}: {e}")
