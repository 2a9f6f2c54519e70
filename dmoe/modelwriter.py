"""Write a .m file tensor by tensor, chunk by chunk, so memory stays bounded whatever the model size.

Used by the HF converter and the synthetic-model generator. The header (metadata and tensor
table) is written first with the `gguf` package's writer; the data follows in table order,
each tensor aligned as GGUF requires. Output goes to `PATH.tmp` and is renamed only when
complete, so a failed run never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import gguf
import numpy as np
import psutil
from gguf import GGMLQuantizationType as QT
from tqdm import tqdm

from dmoe import quant
from dmoe.config import ARCH, ModelConfig
from dmoe.mixes import FILE_TYPES, tensor_types
from dmoe.modelfile import DEFAULT_ALIGNMENT, expected_shapes

# Chunks are either float32 values [..., cols] (quantised here) or the format's bytes
# uint8 [..., row_bytes] (written as they are); together they cover the tensor in row order.
ChunkSource = Callable[[str], Iterable[np.ndarray]]


def _peak_rss_mb() -> float:
    mem = psutil.Process().memory_info()
    return getattr(mem, "peak_wset", None) or _linux_hwm_mb() or mem.rss / 2**20


def _linux_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@contextmanager
def _atomic_output(path: str) -> Iterator[str]:
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_model(
    path: str,
    cfg: ModelConfig,
    file_type: str,
    chunks: ChunkSource,
    metadata: dict[str, Any] | None = None,
    tokenizer: Callable[[gguf.GGUFWriter], None] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Write the whole model with the tensor types of `file_type` (mixes.FILE_TYPES); `chunks(name)` yields
    each tensor's data. Returns a summary (bytes, seconds, MB/s, peak RSS in MB)."""
    types = tensor_types(cfg, file_type)
    shapes = expected_shapes(cfg)
    t0 = time.perf_counter()
    with _atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_name((metadata or {}).get("general.name", "qwen3moe"))
        w.add_file_type(FILE_TYPES[file_type].ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in {**cfg.gguf_metadata(), **(metadata or {})}.items():
            if key == "general.name":
                continue
            _add_value(w, key, value)
        if tokenizer is not None:
            tokenizer(w)
        total = 0
        for name, shape in shapes.items():
            nbytes = int(np.prod(shape[:-1])) * quant.row_bytes(types[name], shape[-1])
            w.add_tensor_info(name, (*shape[:-1], quant.row_bytes(types[name], shape[-1])), np.dtype(np.uint8),
                              nbytes, raw_dtype=types[name])
            total += nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="tensors 0/" + str(len(shapes)))
        for i, (name, shape) in enumerate(shapes.items()):
            fout.write(b"\0" * (-fout.tell() % DEFAULT_ALIGNMENT))
            written = 0
            for chunk in chunks(name):
                data = _encode(chunk, types[name], shape[-1], name)
                data.tofile(fout)
                written += data.nbytes
                bar.update(data.nbytes)
            expected = int(np.prod(shape[:-1])) * quant.row_bytes(types[name], shape[-1])
            if written != expected:
                raise ValueError(f"tensor {name}: wrote {written} bytes, expected {expected}")
            bar.set_description(f"tensors {i + 1}/{len(shapes)}")
        bar.close()
        w.close()
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "mb_s": total / 2**20 / seconds, "peak_rss_mb": _peak_rss_mb()}


def _encode(chunk: np.ndarray, qtype: QT, cols: int, name: str) -> np.ndarray:
    if chunk.dtype == np.uint8:
        if chunk.shape[-1] != quant.row_bytes(qtype, cols):
            raise ValueError(f"tensor {name}: raw chunk rows of {chunk.shape[-1]} bytes, expected "
                             f"{quant.row_bytes(qtype, cols)}")
        return np.ascontiguousarray(chunk)
    if chunk.shape[-1] != cols:
        raise ValueError(f"tensor {name}: chunk rows of {chunk.shape[-1]} values, expected {cols}")
    return quant.quantize(chunk, qtype)


def _add_value(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value)
