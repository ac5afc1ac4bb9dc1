"""Launch configurations (block sizes, warps) of generated kernels.

One function per kernel shape, both pure functions of the sizes, so the cost
model can replace them (or an autotuner can sweep around them) without
touching code generation. The numbers follow what saturates HBM on H100-class
GPUs: pointwise blocks of 1024 elements over 4 warps (8 elements, two 128-bit
accesses per thread for fp32), reduction blocks of about 4096 elements.
"""

from __future__ import annotations

import dataclasses

# Reduced extents up to this many elements stay in registers (one block per row).
PERSISTENT_REDUCTION_MAX = 4096
# Reductions across rows (strided) stay persistent only this short.
COLUMN_PERSISTENT_MAX = 64
# Split a reduction in two kernels when it would run on at most SPLIT_MAX_BLOCKS blocks and its rows
# are long (a split costs a second kernel and keeps the rows' epilogue out of the first one) ...
SPLIT_MIN_REDUCED = 1 << 16
SPLIT_MIN_REDUCED_COLUMNS = 1 << 12
SPLIT_MAX_BLOCKS = 64
# ... into chunks of at least SPLIT_MIN_CHUNK elements, until there are SPLIT_TARGET_BLOCKS blocks.
SPLIT_MIN_CHUNK = 1024
SPLIT_TARGET_BLOCKS = 512
# Adjacent columns one block of a reduction across rows covers (a 32-byte sector of bf16).
COLUMN_BLOCK = 16
# Elements of one reduction block (XBLOCK * RBLOCK) the heuristics aim for.
REDUCTION_BLOCK_ELEMENTS = 4096


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    persistent: bool
    xblock: int
    rblock: int
    num_warps: int


def pointwise_config(xnumel: int) -> LaunchConfig:
    xblock = min(1024, max(16, _pow2(xnumel)))
    num_warps = max(1, min(4, xblock // 128))
    return LaunchConfig(False, xblock, 1, num_warps)


def _column_xblock(xnumel: int) -> int:
    """Columns per block of a looped reduction across rows: 16+ adjacent columns (a 32-byte sector
    of bf16), up to 64 while that still leaves 256 blocks or more (two per SM of an H100)."""
    xblock = max(1, min(64, _pow2(xnumel) // 256, _pow2(xnumel)))
    return max(xblock, min(COLUMN_BLOCK, _pow2(xnumel)))


def split_reduction_factor(xnumel: int, rnumel: int, inner: bool) -> int:
    """Into how many chunks to cut each reduced row so that a reduction with few, long rows
    (a full sum, a bias gradient) runs on enough blocks: 1 = no split. The chunk count must
    divide rnumel; the partial results are reduced again by a second, small kernel.
    `inner`: rows are contiguous; otherwise a block covers COLUMN_BLOCK adjacent columns."""
    blocks = xnumel if inner else -(-xnumel // _column_xblock(xnumel))
    if rnumel < (SPLIT_MIN_REDUCED if inner else SPLIT_MIN_REDUCED_COLUMNS) or blocks > SPLIT_MAX_BLOCKS:
        return 1
    factor = 1
    while rnumel % (2 * factor) == 0 and rnumel // (2 * factor) >= SPLIT_MIN_CHUNK and blocks * factor < SPLIT_TARGET_BLOCKS:
        factor *= 2
    return factor


def reduction_config(xnumel: int, rnumel: int, inner: bool) -> LaunchConfig:
    """`inner`: the reduced elements of a row are adjacent in memory (the usual last-dim case)."""
    # Across rows (not inner) a block must span many rows to read whole memory segments.
    if rnumel <= (PERSISTENT_REDUCTION_MAX if inner else COLUMN_PERSISTENT_MAX):
        rblock = max(2, _pow2(rnumel))
        xblock = max(1, min(REDUCTION_BLOCK_ELEMENTS // rblock, _pow2(xnumel), 64 if inner else 128))
        persistent = True
    elif inner:
        xblock, rblock, persistent = 1, 2048, False
    else:
        xblock = _column_xblock(xnumel)
        rblock, persistent = min(256, REDUCTION_BLOCK_ELEMENTS // xblock), False
    num_warps = max(1, min(16, (xblock * rblock) // 256))
    return LaunchConfig(persistent, xblock, rblock, num_warps)
