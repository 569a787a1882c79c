"""Slicing and sharding a QuantizedWeight for tensor parallelism, without unpacking.

The packed codes are 16-row x 128-column blocks stored row-block-major ([row blocks][column blocks]
[256 * bits bytes]) and the packed scales [row blocks][groups][16] (docs/format.md). A sub-matrix whose
rows start at a multiple of 16 and whose columns start at a multiple of 128 and of the group size (each
may end at the matrix's edge) is therefore a box of whole blocks and whole scale groups: a strided copy
of bytes, on whatever device the weight lives, exactly the packed form of the sliced weight.

    w_rank = lutmm.shard(qw, dim=0, rank=r, world_size=4)    # column-parallel: rows N / 4 each
    w_rank = lutmm.shard(qw, dim=1, rank=r, world_size=4)    # row-parallel: columns K / 4 each (sum the partial Y)
    w_sub = lutmm.slice_weight(qw, rows=slice(0, 4096), cols=slice(0, 2048))
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _core
from ._api import ROW_BLOCK, QuantizedWeight

COL_BLOCK = 128  # columns per packed block


def _range(sl, n: int, what: str, unit: int) -> tuple[int, int]:
    """(start, stop) of slice `sl` over n items, start a multiple of `unit`, stop too or n."""
    if sl is None:
        return 0, n
    if isinstance(sl, tuple) and len(sl) == 2:
        sl = slice(*sl)
    if not isinstance(sl, slice):
        raise ValueError(f"{what}: expected a slice or (start, stop), got {type(sl).__name__}")
    start, stop, step = sl.indices(n)
    if step != 1:
        raise ValueError(f"{what}: step {step}; only contiguous slices keep whole blocks")
    if stop <= start:
        raise ValueError(f"{what}: [{start}, {stop}) is empty (the weight has {n})")
    if start % unit or (stop % unit and stop != n):
        raise ValueError(f"{what}: [{start}, {stop}) must start at a multiple of {unit} and end at one or at {n} "
                         "(whole packed blocks and scale groups; docs/format.md)")
    return start, stop


def slice_weight(qw: QuantizedWeight, rows=None, cols=None) -> QuantizedWeight:
    """The QuantizedWeight of W[rows, cols] (rows = out_features N, cols = in_features K), on qw's device,
    without unpacking. rows: a slice (or (start, stop)) starting at a multiple of 16; cols: starting at a
    multiple of 128 and of the group size; each ends at such a multiple or at the edge (so a weight with one
    scale group per row, group_size = K, is only sliced along N). Raises ValueError naming the bound
    otherwise.

    Each condition is checked once: the bounds by _range, the weight's own shape (and so, with those
    bounds, the sub-weight's) by _core.packed_bytes. (The C++ slice_packed checks the same conditions for
    its host pointers; this function runs on any device and does not call it.)"""
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"qw: expected a QuantizedWeight, got {type(qw).__name__}")
    N, K, bits, g = qw.N, qw.K, qw.bits, qw.group_size
    n0, n1 = _range(rows, N, "rows", ROW_BLOCK)
    # unit max(128, g): whole column blocks and scale groups; with g = K it admits only [0, K), i.e. a
    # weight with one scale group per row can't be cut along K
    k0, k1 = _range(cols, K, "cols", max(COL_BLOCK, g))
    nb, kb, groups = -(-N // ROW_BLOCK), -(-K // COL_BLOCK), K // g
    block_bytes = qw.packed.numel() // (nb * kb)
    if qw.packed.numel() != _core.packed_bytes(N, K, bits, g) or qw.packed_scales.numel() != nb * groups * ROW_BLOCK:
        raise ValueError(f"qw: {qw.packed.numel()} packed bytes / {qw.packed_scales.numel()} scales do not match "
                         f"shape {qw.shape}, bits {bits}, group size {g}")
    rb = slice(n0 // ROW_BLOCK, -(-n1 // ROW_BLOCK))
    packed = qw.packed.reshape(nb, kb, block_bytes)[rb, k0 // COL_BLOCK:-(-k1 // COL_BLOCK)].reshape(-1)
    scales = qw.packed_scales.reshape(nb, groups, ROW_BLOCK)[rb, k0 // g:k1 // g].reshape(-1)
    # a valid shape (packed_bytes above) cut at such bounds is a valid shape: no second validate_shape
    return QuantizedWeight(packed.clone(), scales.clone(), qw.table, bits, g, (n1 - n0, k1 - k0), qw.table_kind)


def shard(qw: QuantizedWeight, dim: int, rank: int, world_size: int) -> QuantizedWeight:
    """Rank `rank`'s equal part of W among `world_size` along dim 0 (rows: column-parallel, each rank
    computes its slice of Y) or dim 1 (columns: row-parallel, each rank's X slice times it gives a partial
    Y to sum). The part must be whole blocks: N / world_size a multiple of 16, or K / world_size a multiple
    of 128 and of the group size."""
    if dim not in (0, 1):
        raise ValueError(f"dim: expected 0 (rows, N) or 1 (columns, K), got {dim}")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank / world_size: expected 0 <= rank < world_size, got {rank} / {world_size}")
    n = qw.shape[dim]
    if n % world_size:
        raise ValueError(f"dim {dim}: {n} is not divisible by world_size {world_size}")
    part = n // world_size
    sl = slice(rank * part, (rank + 1) * part)
    return slice_weight(qw, rows=sl) if dim == 0 else slice_weight(qw, cols=sl)
