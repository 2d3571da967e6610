"""The dispatch plan: which (token, slot) rows go to which expert, built once per call, without a host sync.

Routing is the model's: it hands us ``top_k_index [T, K]``. The plan sorts the S = T*K (token, slot) rows by
expert id so every expert owns one contiguous block of rows; the up-projection, the down-projection and the
backward pass all walk the same plan. Expert-parallel sentinel rows (id == num_experts) sort to the tail and
are excluded from every block, so they cost no GEMM work and contribute nothing.

Everything is built on the device and nothing is read back: the host never waits for the router, so it keeps
queueing kernels ahead of the GPU (a sync here left the GPU idle while the host launched the next kernel, 5-15 %
of a step at 8k tokens; BENCHMARKS.md). So the host does not know how many rows are routed: buffers are sized for
all S rows, and the kernels read the per-expert counts (``tokens_per_expert``) on the device. ``num_routed``
(a sync) is there for the per-expert loops of the reference engine.

Out-of-range ids (outside [0, num_experts]) are a caller bug. On the CPU they raise at once. On a GPU the range
is checked on the device and read back without waiting (``RoutingCheck``): the error is raised by a later
moekit call (at most ``MAX_PENDING_CHECKS`` calls on) or by ``raise_pending_routing_errors()``. The call with
the bad ids treats them as sentinels (drops those rows), so no kernel reads out of bounds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields
from functools import cached_property

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class DispatchPlan:
    """Rows sorted by expert: S = T*K rows, the routed ones first (expert by expert), sentinel rows last.

    sorted_rows:       [S] int64  flat row index (token * K + slot) at each sorted position
    token_of_row:      [S] int64  token index at each sorted position (sorted_rows // K)
    expert_of_row:     [S] int64  expert id at each sorted position (ascending; sentinels, == E, last)
    tokens_per_expert: [E] int64  rows per expert
    offsets:           [E] int32  cumulative end of each expert's block (grouped_mm's ``offs``); offsets[-1] is the
                                  number of routed rows
    row_of_slot:       [T, K] int64  sorted position of each (token, slot); -1 for sentinel slots
    """

    num_tokens: int
    top_k: int
    num_experts: int
    sorted_rows: Tensor
    token_of_row: Tensor
    expert_of_row: Tensor
    tokens_per_expert: Tensor
    offsets: Tensor
    row_of_slot: Tensor

    @property
    def num_rows(self) -> int:
        """S = T*K, the rows every buffer is sized for (routed rows [0, num_routed), then sentinel rows)."""
        return self.num_tokens * self.top_k

    @cached_property
    def num_routed(self) -> int:
        """Rows that go to a real expert (one device sync, once per plan; the reference engine's loops)."""
        return int(self.offsets[-1]) if self.num_experts and self.num_rows else 0

    @cached_property
    def tokens_per_expert_list(self) -> list[int]:
        """Host copy of ``tokens_per_expert`` for per-expert loops (one device sync, once per plan)."""
        return self.tokens_per_expert.tolist()

    def for_backward(self) -> tuple[tuple, tuple[Tensor, ...]]:
        """(host part, tensors): what an autograd function keeps of the plan, the host part on its context and the
        tensors through ``save_for_backward``, so activation checkpointing frees and recomputes them like every
        saved tensor (a plan held on the context stays alive from forward to backward). ``restore`` rebuilds it."""
        tensors = tuple(getattr(self, f.name) for f in fields(self) if f.name not in _SIZES)
        cached = {name: value for name, value in vars(self).items() if name in _HOST_COPIES}  # no second sync
        return (self.num_tokens, self.top_k, self.num_experts, cached), tensors

    @staticmethod
    def restore(host: tuple, tensors) -> DispatchPlan:
        """The plan ``for_backward`` split, from its host part and its tensors (as saved)."""
        *sizes, cached = host
        plan = DispatchPlan(*sizes, *tensors)
        plan.__dict__.update(cached)
        return plan

    def expert_blocks(self) -> list[tuple[int, int, int]]:
        """(expert, start, end) for every expert that received rows."""
        blocks, start = [], 0
        for expert, count in enumerate(self.tokens_per_expert_list):
            if count:
                blocks.append((expert, start, start + count))
            start += count
        return blocks


_SIZES = ("num_tokens", "top_k", "num_experts")
_HOST_COPIES = ("num_routed", "tokens_per_expert_list")


def _range_error(low: int, high: int, num_experts: int, shape: tuple[int, ...], earlier: bool) -> ValueError | None:
    if 0 <= low and high <= num_experts:
        return None
    where = (
        f" — in an earlier moekit call (top_k_index of shape {list(shape)}; that call dropped the bad rows: "
        "the check runs on the GPU without stalling the host)"
        if earlier
        else ""
    )
    return ValueError(
        f"top_k_index holds expert id {low if low < 0 else high}, outside [0, {num_experts}] "
        f"(num_experts={num_experts}; {num_experts} itself marks an expert-parallel sentinel){where}"
    )


@dataclass
class RoutingCheck:
    """The (min, max) expert id of one call, on its way to the host without a sync."""

    low_high: Tensor  # [2] int64, pinned host memory, filled by a non-blocking copy
    done: torch.cuda.Event
    num_experts: int
    shape: tuple[int, ...]

    def error(self) -> ValueError | None:
        low, high = self.low_high.tolist()
        return _range_error(low, high, self.num_experts, self.shape, earlier=True)


# Range checks not yet read back, oldest first. A new call reads every finished one; past MAX_PENDING_CHECKS the
# oldest is waited for (a layer or more back: the GPU has almost always finished it, so this rarely stalls).
MAX_PENDING_CHECKS = 4
_pending: deque[RoutingCheck] = deque()


def raise_pending_routing_errors(wait: bool = True) -> None:
    """Raise the range error of any earlier GPU call that had out-of-range expert ids (waiting for the GPU to
    finish them when ``wait``; otherwise only those already finished, and at most MAX_PENDING_CHECKS left)."""
    while _pending:
        check = _pending[0]
        if not (wait or len(_pending) > MAX_PENDING_CHECKS or check.done.query()):
            break
        check.done.synchronize()
        _pending.popleft()
        error = check.error()
        if error is not None:
            _pending.clear()
            raise error


def _check_range(expert_ids: Tensor, num_experts: int, shape: tuple[int, ...]) -> None:
    """Range check of the ids [S]: at once on the CPU, read back without a sync on a GPU (module docstring)."""
    if expert_ids.device.type != "cuda":
        error = _range_error(int(expert_ids.min()), int(expert_ids.max()), num_experts, shape, earlier=False)
        if error is not None:
            raise error
        return
    low, high = torch.aminmax(expert_ids)
    low_high = torch.empty(2, dtype=torch.int64, pin_memory=True)
    low_high.copy_(torch.stack([low, high]), non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    _pending.append(RoutingCheck(low_high, done, num_experts, shape))
    raise_pending_routing_errors(wait=False)


def build_plan(top_k_index: Tensor, num_experts: int) -> DispatchPlan:
    """Sort the routed rows of ``top_k_index [T, K]`` by expert, on the device, with no host sync.

    Ids must lie in [0, num_experts]; ``num_experts`` itself is the expert-parallel sentinel ("not on this
    rank") and is skipped. Anything else is a caller bug and raises (see the module docstring for when).
    """
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must have shape [num_tokens, top_k], got {tuple(top_k_index.shape)}")
    if top_k_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"top_k_index must be an integer tensor, got dtype {top_k_index.dtype}")
    num_tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1).long()  # [S]
    if expert_ids.numel():
        _check_range(expert_ids, num_experts, tuple(top_k_index.shape))
        # Until the error is raised, bad ids become sentinels (dropped rows; no kernel reads out of bounds):
        # clamp to [-1, E], then -1 -> E (remainder takes the divisor's sign).
        expert_ids = expert_ids.clamp(-1, num_experts).remainder_(num_experts + 1)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_ids.device)  # rows per id 0..E
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
    # Stable sort: rows of one expert keep token order, so results are reproducible run to run.
    expert_of_row, sorted_rows = torch.sort(expert_ids, stable=True)
    tokens_per_expert = counts[:num_experts]
    offsets = torch.cumsum(tokens_per_expert, dim=0).to(torch.int32)
    token_of_row = sorted_rows // max(top_k, 1)
    positions = torch.arange(sorted_rows.numel(), device=sorted_rows.device)
    row_of_slot = torch.empty_like(sorted_rows)
    row_of_slot[sorted_rows] = positions.masked_fill_(expert_of_row == num_experts, -1)
    return DispatchPlan(
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
        sorted_rows=sorted_rows,
        token_of_row=token_of_row,
        expert_of_row=expert_of_row,
        tokens_per_expert=tokens_per_expert,
        offsets=offsets,
        row_of_slot=row_of_slot.view(num_tokens, top_k),
    )
