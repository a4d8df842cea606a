"""Segments of a batch by group id, shared by the fast advantage paths.

Group ids are arbitrary integers and members of a group need not be contiguous (trainers reorder
batches). A stable sort makes every group one contiguous segment of the sorted order; a binary search
gives each position the end of its segment. Both are device ops with no host synchronisation (unlike
``torch.unique``, whose output size must be read back).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Segments(NamedTuple):
    order: torch.Tensor        # [B] int64: sorted position -> original index
    sorted_ids: torch.Tensor   # [B] int64: group ids in sorted order
    start: torch.Tensor        # [B] int64: first sorted position of this position's group
    end: torch.Tensor          # [B] int64: one past the last sorted position of this group


def segments_by_id(group_ids: torch.Tensor) -> Segments:
    sorted_ids, order = torch.sort(group_ids.to(torch.int64), stable=True)
    start = torch.searchsorted(sorted_ids, sorted_ids, right=False)
    end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
    return Segments(order, sorted_ids, start, end)
