"""Real GGUF files for tests and the demo, written with the `gguf` package's own writer.

Tensors are float32 filled from `numpy.random.default_rng(seed)`, so a (seed, layout) pair always
gives the same bytes, and different seeds give different digests. Tensors are generated and
written one at a time (the writer's streaming mode), so a file of a few hundred MiB needs only
one tensor's worth of memory.
"""

from __future__ import annotations

import os
import pathlib

import gguf
import numpy as np

KiB = 1024
MiB = 1024 * KiB

# The largest tensor make_gguf_of_size uses: bounds memory while keeping the tensor count small.
MAX_TENSOR_BYTES = 16 * MiB
# Room left for the header, metadata and tensor infos when aiming at a total size.
_HEADER_ALLOWANCE = 2 * KiB
# Tensor sizes are rounded to this: a multiple of the GGUF alignment (32), so there is no padding
# between tensors and the total is predictable, and of 64 floats, so every tensor can be 2-D.
_GRAIN = 256


def _shape(n_elements: int) -> tuple[int, ...]:
    # 2-D like real weight matrices when it divides evenly.
    for cols in (1024, 256, 64):
        if n_elements % cols == 0 and n_elements >= cols:
            return (n_elements // cols, cols)
    return (n_elements,)


def _add_metadata(
    writer: gguf.GGUFWriter, *, name: str, n_tensors: int, size_label: str | None
) -> None:
    # general.architecture is added by the writer itself.
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    if size_label is not None:
        writer.add_size_label(size_label)
    writer.add_context_length(2048)
    writer.add_embedding_length(256)
    writer.add_block_count(n_tensors)
    writer.add_feed_forward_length(1024)
    writer.add_head_count(8)
    writer.add_layer_norm_rms_eps(1e-5)


def make_gguf(
    path: os.PathLike | str,
    *,
    n_tensors: int = 4,
    tensor_bytes: int = 64 * KiB,
    seed: int = 0,
    arch: str = "llama",
    name: str = "modelfs-test",
    size_label: str | None = None,
) -> pathlib.Path:
    """Write a valid GGUF with `n_tensors` float32 tensors of `tensor_bytes` each (a multiple of 4)."""
    if n_tensors < 1 or tensor_bytes < 4 or tensor_bytes % 4:
        raise ValueError("need n_tensors >= 1 and tensor_bytes a positive multiple of 4")
    path = pathlib.Path(path)
    shape = _shape(tensor_bytes // 4)
    writer = gguf.GGUFWriter(path, arch)
    try:
        _add_metadata(writer, name=name, n_tensors=n_tensors, size_label=size_label)
        for i in range(n_tensors):
            writer.add_tensor_info(f"blk.{i}.ffn_up.weight", shape, np.dtype(np.float32), tensor_bytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for _ in range(n_tensors):
            writer.write_tensor_data(rng.standard_normal(shape, dtype=np.float32))
    finally:
        writer.close()
    return path


def tensor_layout(size_bytes: int) -> tuple[int, int]:
    """(n_tensors, tensor_bytes) whose GGUF comes out at or just under `size_bytes`."""
    payload = max(size_bytes - _HEADER_ALLOWANCE, _GRAIN)
    n_tensors = max(1, -(-payload // MAX_TENSOR_BYTES))
    tensor_bytes = max(_GRAIN, payload // n_tensors // _GRAIN * _GRAIN)
    return n_tensors, tensor_bytes


def make_gguf_of_size(
    path: os.PathLike | str, size_bytes: int, seed: int = 0, **kwargs
) -> pathlib.Path:
    """A GGUF of roughly `size_bytes` (within a few KiB below it); extra kwargs go to make_gguf."""
    n_tensors, tensor_bytes = tensor_layout(size_bytes)
    return make_gguf(path, n_tensors=n_tensors, tensor_bytes=tensor_bytes, seed=seed, **kwargs)
