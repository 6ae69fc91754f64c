"""The reward-kind table: one row (``base.Kind``) per kind, in its own module. Adding a kind
is a module with its reward class and its row, and one line here; the loop, the start-up
checks, the run inspector and the model cards ask the table, never a kind's name. (The
table's dict, ``base.KINDS``, sits below the kinds' modules, so a mixture reads its
sources' rows from it without importing this module.)"""

from __future__ import annotations

from iterate.rewards.base import KINDS, kind
from iterate.rewards.function import KIND as FUNCTION
from iterate.rewards.judge import KIND as JUDGE
from iterate.rewards.mixture import KIND as MIXTURE
from iterate.rewards.model import KIND as MODEL
from iterate.rewards.pairwise import KIND as PAIRWISE

__all__ = ["KINDS", "kind"]

KINDS.update(
    {
        k.name: k
        for k in (
            MODEL,  # a Bradley–Terry reward model (or an ensemble), trained here or loaded
            FUNCTION,  # a Python function of (prompts, responses)
            MIXTURE,  # a weighted sum of sources
            PAIRWISE,  # a pairwise preference model answering "A" or "B"
            JUDGE,  # a generative judge, compare or score
        )
    }
)
