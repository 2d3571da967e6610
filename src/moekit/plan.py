"""The dispatch plan: which (token, slot) rows go to which expert, built once per call.

Routing is the model's: it hands us ``top_k_index [T, K]``. The plan sorts the T*K (token, slot) rows by
expert id so every expert owns one contiguous block of rows; the up-projection, the down-projection and the
backward pass all walk the same plan. Expert-parallel sentinel rows (id == num_experts) sort to the tail and
are excluded from every block, so they cost no GEMM work and contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class DispatchPlan:
    """Rows sorted by expert. S = T*K rows in all, of which ``num_routed`` go to a real expert.

    sorted_rows:       [S] int64  flat row index (token * K + slot) at each sorted position
    token_of_row:      [S] int64  token index at each sorted position (sorted_rows // K)
    expert_of_row:     [S] int64  expert id at each sorted position (ascending; sentinels last)
    tokens_per_expert: [E] int64  rows per expert
    offsets:           [E] int32  cumulative end of each expert's block (grouped_mm's ``offs``)
    row_of_slot:       [T, K] int64  sorted position of each (token, slot); >= num_routed for sentinel slots
    """

    num_tokens: int
    top_k: int
    num_experts: int
    num_routed: int
    sorted_rows: Tensor
    token_of_row: Tensor
    expert_of_row: Tensor
    tokens_per_expert: Tensor
    offsets: Tensor
    row_of_slot: Tensor

    @cached_property
    def tokens_per_expert_list(self) -> list[int]:
        """Host copy of ``tokens_per_expert`` for per-expert loops (one device sync, once per plan)."""
        return self.tokens_per_expert.tolist()

    def expert_blocks(self) -> list[tuple[int, int, int]]:
        """(expert, start, end) for every expert that received rows."""
        blocks, start = [], 0
        for expert, count in enumerate(self.tokens_per_expert_list):
            if count:
                blocks.append((expert, start, start + count))
            start += count
        return blocks


def build_plan(top_k_index: Tensor, num_experts: int) -> DispatchPlan:
    """Sort the routed rows of ``top_k_index [T, K]`` by expert.

    Ids must lie in [0, num_experts]; ``num_experts`` itself is the expert-parallel sentinel ("not on this
    rank") and is skipped. Anything else is a caller bug and raises instead of reading out of bounds.
    """
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must have shape [num_tokens, top_k], got {tuple(top_k_index.shape)}")
    if top_k_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"top_k_index must be an integer tensor, got dtype {top_k_index.dtype}")
    num_tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1).long()  # [S]
    # Rows per id 0..E (E = sentinel), without bincount's device sync; clamping only keeps bad ids in bounds
    # until the check below rejects them.
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_ids.device)
    counts.scatter_add_(0, expert_ids.clamp(0, num_experts), torch.ones_like(expert_ids))
    # Stable sort: rows of one expert keep token order, so results are reproducible run to run. Everything is
    # queued before the sync below, so after it the host goes straight on to the expert kernels (the device idles
    # for as long as the host needs between the sync and the next launch).
    expert_of_row, sorted_rows = torch.sort(expert_ids, stable=True)
    tokens_per_expert = counts[:num_experts]
    offsets = torch.cumsum(tokens_per_expert, dim=0).to(torch.int32)
    token_of_row = sorted_rows // max(top_k, 1)
    row_of_slot = torch.empty_like(sorted_rows)
    row_of_slot[sorted_rows] = torch.arange(sorted_rows.numel(), device=sorted_rows.device)
    num_routed = 0
    if expert_ids.numel():
        # The one host sync of a call: the range check and the routed-row count, fetched together.
        low, high, num_sentinels = torch.stack([expert_ids.min(), expert_ids.max(), counts[num_experts]]).tolist()
        if low < 0 or high > num_experts:
            raise ValueError(
                f"top_k_index holds expert id {low if low < 0 else high}, outside [0, {num_experts}] "
                f"(num_experts={num_experts}; {num_experts} itself marks an expert-parallel sentinel)"
            )
        num_routed = expert_ids.numel() - num_sentinels
    return DispatchPlan(
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
        num_routed=num_routed,
        sorted_rows=sorted_rows,
        token_of_row=token_of_row,
        expert_of_row=expert_of_row,
        tokens_per_expert=tokens_per_expert,
        offsets=offsets,
        row_of_slot=row_of_slot.view(num_tokens, top_k),
    )
