"""The reward-kind table (``iterate.rewards.kinds``): a kind is one module and one row, and
nothing outside ``iterate/rewards/`` asks for a kind by its name."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from iterate import rewards
from iterate.errors import BadInput
from iterate.report import cards
from iterate.run import validate
from iterate.stages import plan

from .conftest import ROOT, compose_cfg

# a kind written from outside the package: its reward class, its checks, its card line, its
# row. Registering the row is the one line adding it to the table takes.
SCRATCH = '''
from dataclasses import dataclass

from iterate.errors import BadInput
from iterate.rewards.base import Build, Kind, Scored


@dataclass
class Brevity:
    """-len(response) / scale: the shorter the better."""

    scale: float

    def identity(self):
        return {"brevity": self.scale}

    def inputs(self):
        return []

    def on(self, device):
        return self

    def score(self, prompts, responses, desc="score", refusals=False, detail=False):
        got = [-len(r) / self.scale for r in responses]
        return Scored(got, [None] * len(got), {}, []) if detail else got


def make(b: Build) -> Brevity:
    return Brevity(float(b.settings.function or 10))


def check(cfg, settings, key):
    if settings.function and not settings.function.isdigit():
        raise BadInput(f"{key}.function={settings.function!r}: brevity's scale, a number")


def card(cfg, row):
    return f"- **Reward:** {cfg.reward.name}, brevity"


KIND = Kind("brevity", make, check, card, source=True)
'''


@pytest.fixture
def brevity(tmp_path, monkeypatch):
    path = tmp_path / "brevity.py"
    path.write_text(SCRATCH)
    spec = importlib.util.spec_from_file_location("brevity_kind", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(rewards.KINDS, "brevity", module.KIND)  # the one row
    return module


def test_a_new_kind_is_one_module_and_one_row(brevity, tmp_path):
    """Registered in the table, a kind written elsewhere is checked at start-up, makes the
    run's reward, a mixture's source and an evaluation judge, gets its card line, and the
    stages follow from its row (no reward model to train, nothing to refresh)."""
    cfg = compose_cfg(["reward.kind=brevity", "reward.function=4", "reward.refresh.pairs=16"])
    validate.check(cfg)
    assert rewards.of(cfg).score(["Greet Anna."], ["Hi Anna."]) == [-2.0]
    before, each = plan.run_stages(cfg)
    assert "reward_model" not in before and "reward" not in each
    assert not rewards.has_model(cfg) and not rewards.refreshes(cfg)
    assert cards._reward_line(cfg, {}) == f"- **Reward:** {cfg.reward.name}, brevity"
    with pytest.raises(BadInput, match=r"reward.function='x': brevity's scale"):
        validate.check(compose_cfg(["reward.kind=brevity", "reward.function=x"]))
    two = "[{kind: model}, {kind: brevity, name: brevity, function: '2', weight: 0.5}]"
    mixed = compose_cfg(["reward=toy_length", f"reward.sources={two}"])
    validate.check(mixed)
    got = rewards.of(mixed, path="unused").parts[1]
    assert got[0] == "brevity" and got[1].scale == 2.0 and got[2] == 0.5
    judged = compose_cfg(["+evaluate.judges=[{kind: brevity, name: short}]"])
    validate.check(judged)
    part = judged.evaluate.judges[0]
    assert rewards.of(judged, "evaluator", part=part).score(["a"], ["abcde"]) == [-0.5]


def test_an_unknown_kind_is_named_with_the_kinds_there_are():
    with pytest.raises(
        BadInput,
        match=r"reward.kind='nope': not a reward kind \(the kinds: "
        r"model, function, mixture, pairwise, judge\)",
    ):
        validate.check(compose_cfg(["reward.kind=nope"]))
    with pytest.raises(
        BadInput,
        match=r"evaluate.judges\[0\].kind='mixture': must be model, "
        "function, pairwise, judge",
    ):
        validate.check(compose_cfg(["+evaluate.judges=[{kind: mixture}]"]))


def test_a_generative_judge_can_be_an_evaluation_judge(tmp_path):
    """Any kind but a mixture judges the evaluation with its own settings: a scoring judge
    here, checked at start-up as the run's reward would be (its folder a causal LM, its
    section's ranges named under its key)."""
    lm = tmp_path / "judge"
    lm.mkdir()
    (lm / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    part = f"{{kind: judge, path: {lm}, name: critic, judge: {{mode: score, max_tokens: 4}}}}"
    cfg = compose_cfg([f"+evaluate.judges=[{part}]"])
    validate.check(cfg)
    judge = rewards.of(cfg, "evaluator", part=cfg.evaluate.judges[0])
    assert isinstance(judge, rewards.JudgeReward) and not judge.compares
    assert judge.path == str(lm) and judge.settings.max_tokens == 4
    assert judge.chat_template is None  # (the run's reward model's template is not its own)
    bad = part.replace("max_tokens: 4", "max_tokens: 0")
    with pytest.raises(BadInput, match=r"evaluate.judges\[0\].judge.max_tokens=0"):
        validate.check(compose_cfg([f"+evaluate.judges=[{bad}]"]))
    (lm / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"]}')
    with pytest.raises(BadInput, match=r"evaluate.judges\[0\].path=.*a judge is a causal LM"):
        validate.check(cfg)


def _kind_comparisons(path: Path) -> list[str]:
    """Comparisons in a module of a string that names a reward kind with an expression that
    mentions ``kind``: ``str(rc.kind) == "judge"``, ``part.kind in ("model", "function")``."""
    names = set(rewards.KINDS)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        consts = [
            c.value
            for s in sides
            for c in (s.elts if isinstance(s, (ast.Tuple, ast.List, ast.Set)) else [s])
            if isinstance(c, ast.Constant) and isinstance(c.value, str)
        ]
        if set(consts) & names and "kind" in ast.unparse(node):
            out.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_module_outside_the_rewards_package_compares_a_kind_by_name(tmp_path):
    package = ROOT / "iterate"
    outside = [p for p in package.rglob("*.py") if "rewards" not in p.relative_to(package).parts]
    found = [hit for p in outside for hit in _kind_comparisons(p)]
    assert not found, "ask the kind table (iterate.rewards.kinds) instead:\n" + "\n".join(found)
    probe = tmp_path / "probe.py"  # the check finds what it looks for
    probe.write_text(
        'a = str(rc.kind) == "judge"\nb = part.kind in ("model", "x")\nc = mode == "judge"\n'
    )
    assert [h.split(": ")[1] for h in _kind_comparisons(probe)] == [
        "str(rc.kind) == 'judge'",
        "part.kind in ('model', 'x')",
    ]
