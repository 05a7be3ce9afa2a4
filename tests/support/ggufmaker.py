"""Make small or large *valid* GGUF files for tests and benchmarks.

Owns: make_gguf (tiny file, returns its tensors), make_gguf_of_size (GiB-sized
file written tensor by tensor, bounded memory) and tensors_equal (compare two files).
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

ARCH = "llama"
# Largest tensor written at once by make_gguf_of_size; keeps memory bounded.
MAX_PIECE_BYTES = 64 * 1024 * 1024
# Generous allowance for header + KV + tensor infos, so the result stays <= size_bytes.
_HEADER_ALLOWANCE = 64 * 1024


def _add_metadata(writer: gguf.GGUFWriter, name: str) -> None:
    """A few typical KVs so readers (and modelfs) see realistic metadata."""
    writer.add_name(name)
    writer.add_description("synthetic GGUF for modelfs tests")
    writer.add_context_length(2048)
    writer.add_uint32("modelfs.test.seed_marker", 7)


def make_gguf(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_tensors: int = 4,
    tensor_elems: int = 1024,
    name: str = "test-model",
) -> dict[str, np.ndarray]:
    """Write a small valid GGUF of random float32 tensors; return them by name for comparison."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {
        f"blk.{i}.weight": rng.standard_normal(tensor_elems, dtype=np.float32)
        for i in range(n_tensors)
    }
    writer = gguf.GGUFWriter(path, ARCH)
    try:
        _add_metadata(writer, name)
        for tname, data in tensors.items():
            writer.add_tensor(tname, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return tensors


def make_gguf_of_size(
    path: str | os.PathLike[str],
    size_bytes: int,
    seed: int = 0,
    name: str = "big-test-model",
) -> Path:
    """Write a valid GGUF of roughly size_bytes (within 1 MiB; never larger unless tiny).

    Tensor infos are declared up front and each tensor (<= 64 MiB, int8 random
    bytes plus one small float32) is generated and written one at a time, so
    memory stays bounded even for multi-GiB files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    align = gguf.GGUF_DEFAULT_ALIGNMENT

    small_elems = 256  # one float32 tensor so the file has a mixed dtype layout
    budget = max(size_bytes - _HEADER_ALLOWANCE - small_elems * 4, 0)
    budget -= budget % align  # keep every piece aligned -> no padding surprises
    pieces: list[int] = []
    while budget > 0:
        piece = min(budget, MAX_PIECE_BYTES)
        pieces.append(piece)
        budget -= piece

    writer = gguf.GGUFWriter(path, ARCH)
    try:
        _add_metadata(writer, name)
        writer.add_tensor_info("token_embd.weight", (small_elems,), np.dtype(np.float32), small_elems * 4)
        for i, nbytes in enumerate(pieces):
            writer.add_tensor_info(f"blk.{i}.weight", (nbytes,), np.dtype(np.int8), nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.write_tensor_data(rng.standard_normal(small_elems, dtype=np.float32))
        for nbytes in pieces:
            writer.write_tensor_data(np.frombuffer(rng.bytes(nbytes), dtype=np.int8))
    finally:
        writer.close()
    return path


def read_tensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """All tensors of a GGUF file by name (memory-mapped, not copied)."""
    return {t.name: t.data for t in gguf.GGUFReader(path).tensors}


def tensors_equal(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str]) -> bool:
    """True when both files hold the same tensor names, types, shapes and bytes."""
    ta = gguf.GGUFReader(path_a).tensors
    tb = gguf.GGUFReader(path_b).tensors
    if len(ta) != len(tb):
        return False
    for a, b in zip(ta, tb, strict=True):
        if (a.name, a.tensor_type, list(a.shape)) != (b.name, b.tensor_type, list(b.shape)):
            return False
        if not np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)):
            return False
    return True


def tensors_match(path: str | os.PathLike[str], expected: dict[str, np.ndarray]) -> bool:
    """True when the file's tensors equal `expected` (as returned by make_gguf)."""
    got = read_tensors(path)
    return got.keys() == expected.keys() and all(
        np.array_equal(got[k], expected[k]) for k in expected
    )
