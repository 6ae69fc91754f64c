"""The reward-kind table: one row (``base.Kind``) per kind, in its own module. Adding a kind
is a module with its reward class and its row, and one line here; the loop, the start-up
checks, the run inspector and the model cards ask the table, never a kind's name."""

from __future__ import annotations

from iterate.errors import BadInput
from iterate.rewards import function, judge, mixture, model, pairwise
from iterate.rewards.base import Kind

KINDS: dict[str, Kind] = {k.name: k for k in (
    model.KIND,  # a Bradley–Terry reward model (or an ensemble), trained here or loaded
    function.KIND,  # a Python function of (prompts, responses)
    mixture.KIND,  # a weighted sum of sources
    pairwise.KIND,  # a pairwise preference model answering "A" or "B"
    judge.KIND,  # a generative judge, compare or score
)}  # fmt: skip


def kind(name: object, key: str = "reward.kind") -> Kind:
    """The row of a kind's name (an enum member or its string); ``BadInput`` naming the
    setting ``key`` and the kinds there are for any other."""
    row = KINDS.get(str(name))
    if row is None:
        raise BadInput(f"{key}={name!r}: not a reward kind (the kinds: {', '.join(KINDS)})")
    return row
