"""Where a run's files live: every path of the run folder that more than one module reads
is named here, so a reader finds the layout in one place (README "Outputs: the run
directory" draws it). Built once by the loop, handed to every stage; the run inspector
builds one from a run folder alone. A stage's own bookkeeping inside its folder
(``_DONE.json``, ``_PLAN.json``: ``iterate.store.stage``, ``iterate.store.shards``) and files that
only the stage writing them reads are named in that stage's module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The stage vocabulary, in the loop's order (``loop.iterate`` runs them; the report, the run
# inspector and the benchmarks name them). Which of them a rule reads: ``iterate.train.rules``.
STAGES = (
    "prompts",
    "generate",
    "reward",
    "label",
    "pairs",
    "update",
    "constrain",
    "evaluate",
    "handoff",
)

CONFIG = "config.yaml"  # the resolved config of a run's first invocation: marks a run folder
TRAIN_LOG = "train_log.jsonl"  # one line per optimiser step, in a stage folder that trains
CARD = "README.md"  # a model folder's card


@dataclass
class Paths:
    run: Path  # runs/<run_name>
    base_policy: str  # the initial policy: model.path, or the toy world's SFT policy
    toy: Path | None = None  # the toy world's folder when it is in use
    reward_model: str = ""  # the run's own reward model (trained here or loaded), set once

    # the run as a whole
    @property
    def config(self) -> Path:
        return self.run / CONFIG

    @property
    def finished(self) -> Path:
        """Written at the end of every full run: the config that made it, and how far."""
        return self.run / "_FINISHED.json"

    @property
    def stopped(self) -> Path:
        """Written when a run stops early (its exit status and why); removed when the next
        one starts: what the inspector says of a run that is neither running nor finished."""
        return self.run / "_STOPPED.json"

    @property
    def metrics(self) -> Path:
        return self.run / "metrics.jsonl"

    @property
    def plot(self) -> Path:
        return self.run / "metrics.png"

    # before iteration 0
    @property
    def reward_model_dir(self) -> Path:
        return self.run / "reward_model"

    @property
    def trained_reward_model(self) -> Path:
        """The reward model trained in the run (a model folder, or an ensemble's)."""
        return self.reward_model_dir / "model"

    @property
    def reward_model_prompts(self) -> Path:
        """The prompts the initial policy sampled for the reward model (source=policy)."""
        return self.reward_model_dir / "prompts"

    @property
    def reward_model_samples(self) -> Path:
        return self.reward_model_dir / "samples"

    @property
    def heldout_dir(self) -> Path:
        return self.run / "heldout"

    @property
    def initial_samples_dir(self) -> Path:
        """The initial policy's samples of the held-out prompts."""
        return self.heldout_dir / "initial_samples"

    def before(self, name: str) -> Path:
        """A stage before iteration 0 by its name (``plan.run_stages``)."""
        where = {
            "reward_model": "reward_model_dir",
            "heldout": "heldout_dir",
            "initial_samples": "initial_samples_dir",
        }
        return getattr(self, where[name])

    # per iteration
    def iteration(self, i: int) -> Path:
        return self.run / f"iter_{i:03d}"

    def stage(self, i: int, name: str) -> Path:
        return self.iteration(i) / name

    def previous(self, i: int) -> list[Path]:
        """The stage an iteration's starting policy comes from (none for iteration 0)."""
        return [self.stage(i - 1, "handoff")] if i > 0 else []

    def refreshed_reward_model(self, i: int) -> Path:
        return self.stage(i, "reward") / "model"

    def judged_pairs(self, i: int) -> Path:
        """The pairs the refresh of iteration i had judged (read by later refreshes)."""
        return self.stage(i, "reward") / "pairs.parquet"

    def update_output(self, i: int, adapter: bool) -> Path:
        """Where the update of iteration i writes what it trained: its LoRA adapter, or with
        full fine-tuning the whole model."""
        return self.stage(i, "update") / ("adapter" if adapter else "model")

    def constrained_policy(self, i: int, adapter: bool) -> Path:
        """Where iteration i's KL constraint writes the policy it chose when that is not the
        update's own (α ≠ 1): the scaled adapter, or the interpolated whole model."""
        return self.stage(i, "constrain") / ("adapter" if adapter else "model")

    def trained_policy(self, i: int) -> tuple[Path, bool]:
        """The policy iteration i hands on to its evaluation and handoff, and whether that is
        a LoRA adapter (to put on the iteration's starting policy) rather than a whole model:
        the KL constraint's where it chose one of its own (a whole model where it stepped
        towards the initial policy), else the update's."""
        adapter = self.update_output(i, adapter=True).exists()
        if self.constrained_policy(i, adapter=False).exists():  # (an adapter's, merged: a
            return self.constrained_policy(i, adapter=False), False  # step towards the initial)
        constrained = self.constrained_policy(i, adapter)
        return (constrained if constrained.exists() else self.update_output(i, adapter)), adapter

    def value_head(self, i: int) -> Path:
        """PPO's value head after the update of iteration i (carried to the next one)."""
        return self.stage(i, "update") / "value_head.pt"

    def evaluation_samples(self, i: int) -> Path:
        return self.stage(i, "evaluate") / "samples"

    def evaluation_scores(self, i: int) -> Path:
        return self.stage(i, "evaluate") / "scores"

    def handoff_policy(self, i: int) -> Path:
        """The merged policy iteration i hands to the next (when accepted)."""
        return self.stage(i, "handoff") / "policy"

    def handoff_adapter(self, i: int) -> Path:
        return self.stage(i, "handoff") / "adapter"


def run_config(run: Path) -> dict:
    """The resolved config of the run's first invocation (``<run>/config.yaml``)."""
    import yaml

    path = Path(run) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{run} is not a run folder: it has no config.yaml")
    return yaml.safe_load(path.read_text())
