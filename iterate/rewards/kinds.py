"""The reward-kind table: one row (``base.Kind``) per kind, in its own module. Adding a kind
is a module with its reward class and its row, and one line here; the loop, the start-up
checks, the run inspector and the model cards ask the table, never a kind's name. (The
table's dict, ``base.KINDS``, sits below the kinds' modules, so a mixture reads its
sources' rows from it without importing this module.)"""

from __future__ import annotations

from iterate.rewards import function, judge, mixture, model, pairwise
from iterate.rewards.base import KINDS, kind

__all__ = ["KINDS", "kind"]

KINDS.update({k.name: k for k in (
    model.KIND,  # a Bradley–Terry reward model (or an ensemble), trained here or loaded
    function.KIND,  # a Python function of (prompts, responses)
    mixture.KIND,  # a weighted sum of sources
    pairwise.KIND,  # a pairwise preference model answering "A" or "B"
    judge.KIND,  # a generative judge, compare or score
)})  # fmt: skip
