"""`segment_of`: which segment each index falls in, given sorted segment boundaries, in Triton:
the segment conv finds each row's segment with it, the chunked scan each chunk slot's."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def segment_of(bounds, idx, n_seg, SEARCH_STEPS: tl.constexpr):
    """For each index, the number of segment ends bounds[1:] <= index: its segment, or n_seg for an
    index past bounds[-1]. bounds[1:] is sorted, so a binary search of fixed depth
    (SEARCH_STEPS = n_seg.bit_length()) finds it."""
    lo = tl.zeros_like(idx)
    hi = tl.zeros_like(idx) + n_seg
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        end = tl.load(bounds + 1 + mid, mask=mid < n_seg, other=0)
        right = (end <= idx) & (mid < hi)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    return lo
