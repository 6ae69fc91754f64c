"""Where a run's files live. Built once by the loop, handed to every stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The stage vocabulary, in the loop's order (``loop.iterate`` runs them; the report, the run
# inspector and the benchmarks name them). Which of them a rule reads: ``iterate.rules``.
STAGES = ("prompts", "generate", "reward", "label", "pairs", "update", "evaluate", "handoff")


@dataclass
class Paths:
    run: Path  # runs/<run_name>
    base_policy: str  # the initial policy: model.path, or the toy world's SFT policy
    toy: Path | None = None  # the toy world's folder when it is in use
    reward_model: str = ""  # the reward model the loop uses (trained here or loaded)

    @property
    def reward_model_dir(self) -> Path:
        return self.run / "reward_model"

    @property
    def heldout_dir(self) -> Path:
        return self.run / "heldout"

    @property
    def initial_samples_dir(self) -> Path:
        """The initial policy's samples of the held-out prompts."""
        return self.heldout_dir / "initial_samples"

    def iteration(self, i: int) -> Path:
        return self.run / f"iter_{i:03d}"

    def stage(self, i: int, name: str) -> Path:
        return self.iteration(i) / name

    def previous(self, i: int) -> list[Path]:
        """The stage an iteration's starting policy comes from (none for iteration 0)."""
        return [self.stage(i - 1, "handoff")] if i > 0 else []
