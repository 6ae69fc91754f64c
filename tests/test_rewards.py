"""The reward seam (``iterate.rewards``): what each role gives, what a stage hashes of a
reward, what travels to a scoring process. No model is loaded here."""

from __future__ import annotations

import json
import math
import pickle
import re

import pytest

from iterate import rewards
from iterate.store.stage import DONE
from iterate.toy import world

from .conftest import compose_cfg


def test_the_reward_models_identity_is_what_the_label_stage_always_hashed(tmp_path):
    cfg = compose_cfg(["reward.max_length=77", "reward.chat_template=zephyr"])
    one = tmp_path / "rm"
    one.mkdir()
    got = rewards.of(cfg, path=str(one)).identity()
    assert got == {
        "reward_model": str(one),
        "max_length": 77,
        "dtype": str(cfg.reward.dtype),
        "chat_template": "zephyr",
        "reward_weights": rewards.weights_sum(one),
    }  # (a folder from outside the run: its files too)
    # an ensemble folder: how its members' rewards are combined counts too
    (one / "ensemble.json").write_text(json.dumps({"members": [], "offsets": []}))
    cfg.reward.aggregate, cfg.reward.uncertainty_coef = "mean_minus_std", 0.5
    assert rewards.of(cfg, path=str(one)).identity()["aggregate"] == ["mean_minus_std", 0.5]


def test_a_reward_names_the_stage_that_made_it_only_when_that_stage_finished(tmp_path):
    cfg = compose_cfg([])
    stage = tmp_path / "iter_000" / "reward"
    (stage / "model").mkdir(parents=True)
    reward = rewards.of(cfg, path=str(stage / "model"))
    assert reward.inputs() == []  # a loaded reward model, or a stage still running
    (stage / DONE).write_text("{}")
    assert reward.inputs() == [stage]


def test_the_gold_judge_is_the_toy_worlds_reward_function_and_only_for_its_prompts():
    gold = rewards.of(compose_cfg([]), "gold")
    prompts, responses = ["Greet Anna.", "Greet Anna."], ["Hello Anna!", "Ugh. Hello Rosa."]
    assert gold.score(prompts, responses) == [
        world.gold_score(p, r) for p, r in zip(prompts, responses)
    ]
    assert gold.score(prompts, responses)[0] > gold.score(prompts, responses)[1]
    scores, spread, parts, _ = gold.score(prompts, responses, detail=True)
    assert (
        spread == [None, None]
        and parts == {}
        and gold.identity()["reward_function"] == rewards.GOLD
    )
    assert gold.inputs() == [] and gold.on("cuda") is gold
    assert rewards.of(compose_cfg(["prompts=file", "prompts.path=x.jsonl"]), "gold") is None
    with pytest.raises(ValueError, match="prompts for"):  # never a silent truncation
        gold.score(prompts, responses[:1])


@pytest.mark.parametrize(
    "overrides, kind",
    [
        ([], rewards.FunctionReward),
        (["reward.refresh.judge=model", "reward.refresh.judge_path=judge"], rewards.ModelReward),
        (["reward.refresh.judge=file", "reward.refresh.path=p.jsonl"], type(None)),
    ],
)
def test_the_refresh_judge_is_the_configured_one(overrides, kind):
    judge = rewards.of(compose_cfg(overrides), "judge")
    assert isinstance(judge, kind)
    if kind is rewards.ModelReward:  # scored like a reward model: no template, no ensemble
        assert judge.path == "judge" and judge.chat_template is None
        assert judge.aggregate == "mean"


def test_a_reward_travels_to_a_scoring_process_without_its_loaded_model(tmp_path):
    reward = rewards.of(compose_cfg([]), path=str(tmp_path))
    reward._scorer = object()  # what a first score call leaves: never pickled
    copy = pickle.loads(pickle.dumps(reward))
    assert copy._scorer is None and copy.identity() == reward.identity()
    assert reward._scorer is not None, "the original keeps its model"
    moved = reward.on("cuda:1")
    assert moved.device == "cuda:1" and moved._scorer is None and reward.device == "cpu"
    assert reward.on("cpu") is reward


def test_an_unknown_role_is_an_error():
    with pytest.raises(ValueError, match="role"):
        rewards.of(compose_cfg([]), "oracle")


def _function(tmp_path, body: str, name: str = "reward.py") -> str:
    f = tmp_path / name
    f.write_text(body)
    return f"{f}:score"


def test_a_reward_function_scores_in_batches_and_drops_what_it_cannot_score(tmp_path):
    spec = _function(
        tmp_path,
        """
CALLS = []
def score(prompts, responses):
    CALLS.append(len(responses))
    return [None if r == "?" else float("nan") if r == "nan" else len(r) for r in responses]
""",
    )
    cfg = compose_cfg(["reward=gold", f"reward.function={spec}", "reward.score_batch_size=2"])
    reward = rewards.of(cfg)
    assert isinstance(reward, rewards.FunctionReward)
    got = reward.score(["Q?"] * 5, ["ab", "?", "abcd", "nan", "a"])
    assert got[0] == 2.0 and got[2] == 4.0 and got[4] == 1.0
    assert math.isnan(got[1]) and math.isnan(got[3]), "None and NaN: rows the label drops"
    assert reward._fn.__globals__["CALLS"] == [2, 2, 1]  # batches of score_batch_size
    # a conversation reaches the function as its messages, a one-turn prompt as its text
    seen = _function(
        tmp_path,
        "def score(p, r):\n    return [float(isinstance(x, list)) for x in p]\n",
        "seen.py",
    )
    turns = json.dumps(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    )
    assert rewards.FunctionReward(seen).score(["plain", turns], ["x", "y"]) == [0.0, 1.0]


def test_editing_a_reward_function_changes_its_identity_and_reformatting_does_not(tmp_path):
    spec = _function(tmp_path, "def score(p, r):\n    return [1.0 for _ in r]\n")
    before = rewards.FunctionReward(spec).identity()
    assert before["reward_function"] == "reward.py:score"
    assert len(before["source_tree_sha256"]) == 64
    # comments, blank lines, quotes and line breaks: the same syntax tree, the same identity
    _function(
        tmp_path,
        "# scores\n\ndef score(p, r):  # all one\n    return [\n        1.0\n"
        "        for _ in r\n    ]\n",
    )
    assert rewards.FunctionReward(spec).identity() == before
    _function(tmp_path, "def score(p, r):\n    return [2.0 for _ in r]\n")
    assert rewards.FunctionReward(spec).identity() != before


def test_the_toy_worlds_verifiable_reward_is_correctness_only():
    from iterate.toy.world import correctness_reward

    got = correctness_reward(["What is 2 plus 3?"] * 3, ["5.", "Sure! 2 plus 3 is 5.", "7."])
    assert got == [1.0, 1.0, 0.0]  # politeness earns nothing; the gold judge's would
    assert world.gold_score("What is 2 plus 3?", "Sure! 2 plus 3 is 5.") > 1.0


BAD_FUNCTIONS = [  # (body or None for a missing file, function name, what the message names)
    ("def score(p, r):\n    raise KeyError('answer')\n", "score", "raised KeyError: 'answer'"),
    ("def score(p, r):\n    return [1.0]\n", "score", "returned 1 values for 2 responses"),
    ("def score(p, r):\n    return 3.0\n", "score", "returned a float for 2 responses"),
    ("def score(p, r):\n    return ['good', 1.0]\n", "score", "row 0 ('a'): 'good' is not a"),
    ("def score(p, r):\n    return [True, 1.0]\n", "score", "True is not a number"),
    ("def other(p, r):\n    return [1.0, 1.0]\n", "score", "has no function 'score'"),
    ("import no_such_package_here\n", "score", "no module named 'no_such_package_here'"),
    ("def score(p, r) return\n", "score", "raised SyntaxError"),
    (None, "score", "no such file"),
]


@pytest.mark.parametrize(("body", "name", "said"), BAD_FUNCTIONS)
def test_a_bad_reward_function_is_bad_input_naming_it(tmp_path, body, name, said):
    from iterate.errors import BadInput

    f = tmp_path / "bad.py"
    if body is not None:
        f.write_text(body)
    spec = f"{f}:{name}"
    with pytest.raises(BadInput, match=re.escape(said)) as e:
        rewards.FunctionReward(spec).score(["Q?", "Q?"], ["a", "b"])
    assert spec in str(e.value)


def test_a_reward_function_is_checked_at_start_up(tmp_path):
    from iterate.errors import BadInput
    from iterate.run import validate

    with pytest.raises(BadInput, match="no module named 'nowhere'"):
        validate.check(compose_cfg(["reward=gold", "reward.function=nowhere.mod:score"]))
    with pytest.raises(BadInput, match="reward.function is not set"):
        validate.check(compose_cfg(["reward=gold", "reward.function=null"]))
    validate.check(compose_cfg(["reward=gold"]))  # the tuning's refresh does not apply
    cfg = compose_cfg(["reward=gold"])
    assert cfg.reward.refresh.pairs > 0 and not rewards.refreshes(cfg)
    assert not rewards.trains_model(cfg) and rewards.trains_model(compose_cfg([]))


def _readme_rewards() -> str:
    from .conftest import ROOT

    text = (ROOT / "README.md").read_text()
    return text[text.index("## Rewards") :]


def readme_reward(folder) -> str:
    """The verifiable reward the README shows, taken from the README itself into a file in
    ``folder``: its ``reward.function``."""
    section = _readme_rewards()
    code = section[section.index("```python") + len("```python") : section.index("```\n\n")]
    (folder / "my_rewards.py").write_text(code)
    return f"{folder / 'my_rewards.py'}:exact_answer"


def test_the_readmes_reward_function_runs_as_it_says(tmp_path):
    section = _readme_rewards()
    fn, _ = rewards.load_function(readme_reward(tmp_path))
    said = ["Sure! 2 plus 3 is 5.", "7.", "I don't know."]
    assert fn(["What is 2 plus 3?"] * 3, said, answer=["5", 5, "5"]) == [1.0, 0.0, 0.0]
    cmd = section[
        section.index("```bash") + len("```bash") : section.index(
            "```", section.index("```bash") + 3
        )
    ]
    assert "reward.function=my_rewards.py:exact_answer 'prompts.fields=[answer]'" in cmd


def test_a_causal_lm_is_refused_as_a_reward_model(tmp_path):
    """Loaded as a reward model, a causal LM gets a random score head; its rewards would
    be noise a run optimises without a word. Refused at start-up and at load."""
    from iterate import checks
    from iterate.errors import BadInput
    from iterate.run import validate

    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    cfg = compose_cfg(["reward.train=false", f"reward.path={lm}"])
    with pytest.raises(BadInput, match="LlamaForCausalLM checkpoint, not a reward model"):
        validate.check(cfg)
    (lm / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForSequenceClassification"]})
    )
    checks.reward_folder("reward.path", str(lm))  # a score head: accepted
    with pytest.raises(BadInput, match="reward.base="):
        checks.reward_head("reward.path", "x", ["GPT2LMHeadModel"])


def test_a_reward_function_that_takes_a_row_field_needs_it_named(tmp_path):
    """A parameter beyond (prompts, responses) is a field of the prompt rows: refused at
    start-up unless prompts.fields names it (or it has a default)."""
    from iterate.errors import BadInput
    from iterate.run import validate

    f = tmp_path / "v.py"
    f.write_text(
        "def check(prompts, responses, answer, tests=None):\n    return [0.0] * len(responses)\n"
    )
    args = ["reward=gold", f"reward.function={f}:check"]
    with pytest.raises(BadInput, match="it takes 'answer', not a setting but a field of the"):
        validate.check(compose_cfg(args))
    validate.check(compose_cfg([*args, "prompts.fields=[answer]"]))
    assert rewards.takes(rewards.load_function(f"{f}:check")[0]) == (
        {"answer", "tests"},
        {"answer"},
        False,
    )


def _fn_file(tmp_path, name: str, body: str) -> str:
    f = tmp_path / f"{name}.py"
    f.write_text(f"def {name}(prompts, responses):\n    {body}\n")
    return f"{f}:{name}"


def test_a_mixture_is_the_weighted_sum_of_its_sources_each_kept(tmp_path):
    """Hand-computed: a mixture's reward is sum(weight * source); a row one source cannot
    score (None, NaN) is dropped, counted under that source's name; each source's rewards
    are kept in a column of its own beside the sum."""
    from iterate.stages.label import label_table, source_stats

    a = rewards.FunctionReward(_fn_file(tmp_path, "a", "return [1.0, 2.0, None, 4.0]"))
    b = rewards.FunctionReward(_fn_file(tmp_path, "b", "return [10.0, 20.0, 30.0, float('nan')]"))
    mix = rewards.MixtureReward([("a", a, 2.0), ("b", b, -0.5)])
    prompts, responses = ["p"] * 4, ["r1", "r2", "r3", "r4"]
    total, spread, parts, _ = mix.score(prompts, responses, detail=True)
    assert total[:2] == [2 * 1 - 0.5 * 10, 2 * 2 - 0.5 * 20]
    assert (
        math.isnan(total[2])
        and math.isnan(total[3])
        and parts["a"][:2] == [1.0, 2.0]
        and parts["b"][2] == 30.0
    )
    assert mix.score(prompts, responses)[:2] == total[:2] and spread == [None] * 4
    ident = mix.identity()["mixture"]
    assert [(p["name"], p["weight"], p["reward_function"]) for p in ident] == [
        ("a", 2.0, "a.py:a"),
        ("b", -0.5, "b.py:b"),
    ]
    import pyarrow as pa

    gen = pa.table({"prompt_id": ["x"] * 4, "sample_idx": [0, 1, 2, 3]})
    table, dropped = label_table(gen, total, [0.1, 0.2, 0.3, 0.4], spread, parts)
    assert table["reward"].to_pylist() == total[:2]
    assert table["source_a"].to_pylist() == [1.0, 2.0] and table["source_b"].to_pylist() == [10, 20]
    assert dropped == {"non_finite_reward_a": 1, "non_finite_reward_b": 1}
    stats = source_stats(table, {"a": 2.0, "b": -0.5})
    assert stats["a"] == {"weight": 2.0, "mean": 1.5, "std": 0.5, "gold_agreement": 1.0}
    assert stats["b"]["mean"] == 15.0 and stats["reward"]["gold_agreement"] == 0.0  # -3 < -6


def test_a_mixture_is_composed_from_config_and_checked_at_start_up(tmp_path):
    from iterate.errors import BadInput
    from iterate.run import validate

    cfg = compose_cfg(["reward=toy_length"])
    assert rewards.has_model(cfg) and rewards.trains_model(cfg) and rewards.refreshes(cfg)
    mix = rewards.of(cfg, path=str(tmp_path))
    assert [(n, type(r).__name__, w) for n, r, w in mix.parts] == [
        ("model", "ModelReward", 1.0),
        ("words", "FunctionReward", -0.02),
    ]
    assert rewards.of(cfg, "model", path="rm").path == "rm", "the refresh ranks by the model"
    validate.check(cfg)
    fn = _fn_file(tmp_path, "f", "return [0.0] * len(responses)")
    only = ["reward.kind=mixture", "reward.train=false"]
    assert not rewards.has_model(compose_cfg([*only, f"reward.sources=[{{function: '{fn}'}}]"]))
    bad = [
        ("reward.sources=[]", "reward.kind=mixture needs sources"),
        (f"reward.sources=[{{function: '{fn}'}}, {{function: '{fn}'}}]", "that no other source"),
        (f"reward.sources=[{{function: '{fn}', name: 'a b'}}]", "must be a word"),
        ("reward.sources=[{function: 'nowhere.py:f'}]", "no such file"),
        ("reward.sources=[{kind: mixture}]", "must be model or function"),
        (f"reward.sources=[{{function: '{fn}', name: reward}}]", "not 'reward'"),
        (
            f"reward.sources=[{{function: '{fn}', weight: 0}}, {{function: '{fn}', name: g, "
            "weight: 0}]",
            r"reward.sources\[\*\].weight=\[0.0, 0.0\]: at least one must not be 0",
        ),
    ]
    for override, said in bad:
        with pytest.raises(BadInput, match=said):
            validate.check(compose_cfg([*only, override]))
    cfg = compose_cfg([*only, f"reward.sources=[{{function: '{fn}'}}]"])
    cfg.reward.sources[0].weight = float("inf")  # (Hydra refuses inf in a list's dict itself)
    with pytest.raises(BadInput, match=r"reward.sources\[0\].weight=inf: must be finite"):
        validate.check(cfg)


@pytest.mark.slow
def test_a_run_with_a_mixture_keeps_each_sources_rewards(full_run):
    """The full run's reward is the toy reward model (an ensemble, refreshed) plus 0.02 a
    word: its label shards keep both sources beside their sum, the stage and the metrics
    report each source, and the inspector prints them."""
    from iterate.report import show
    from iterate.store.shards import read_shards

    for i in (0, 1):
        labels = read_shards(full_run / f"iter_{i:03d}" / "label").to_pylist()
        assert labels and all(
            r["reward"] == pytest.approx(r["source_model"] + 0.02 * r["source_words"])
            for r in labels
        )
        done = json.loads((full_run / f"iter_{i:03d}" / "label" / "_DONE.json").read_text())
        assert done["sources"]["words"]["weight"] == 0.02
        assert 0 <= done["sources"]["model"]["gold_agreement"] <= 1
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r["source_means"]) == {"model", "words"} for r in rows)
    assert all(0 <= r["reward_gold_agreement"] <= 1 for r in rows)
    assert "words x 0.02: mean" in show.status(full_run)
    card = (full_run / "iter_001" / "handoff" / "policy" / "README.md").read_text()
    assert "the sum of 1 x model, mean" in card and "0.02 x words (`iterate.reward_fun" in card


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["reward=gold", "reward.function=iterate.reward_functions:nope"], "reward.function"),
        (
            ["reward=toy_length", "reward.sources.1.function=iterate.reward_functions:nope"],
            r"reward.sources\[1\].function",
        ),
        (
            [
                "reward=gold",
                "evaluate.judges=[{kind: function, function: "
                "'iterate.reward_functions:words'}, {kind: function, function: "
                "'iterate.reward_functions:nope'}]",
            ],
            r"evaluate.judges\[1\].function",
        ),
    ],
)
def test_a_missing_function_is_named_by_the_setting_that_names_it(tmp_path, overrides, key):
    """At start-up and when scoring: the key of the reward, the mixture source or the
    evaluation judge that names the function, not reward.function for every one."""
    from iterate.errors import BadInput
    from iterate.run import validate

    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(BadInput, match=rf"^{key}='iterate.reward_functions:nope'.* no function"):
        validate.check(cfg)
    reward = rewards.of(cfg)
    if cfg.evaluate.judges:
        reward = rewards.of(cfg, "evaluator", part=cfg.evaluate.judges[1])
    elif str(cfg.reward.kind) == "mixture":
        reward = reward.parts[1][1]  # the function source (its model has no path here)
    with pytest.raises(BadInput, match=rf"^{key}='iterate.reward_functions:nope'"):
        reward.score(["Q?"], ["a"])


def test_a_blocking_reward_function_says_so_and_stops_at_its_limit(tmp_path, caplog):
    """A reward function that blocks says every interval that it is still running, naming
    itself and the rows; past ``reward.function_timeout_s`` the run stops (``BadInput``)
    naming the setting, the function and the rows, even inside a blocking call. A quick
    function under a limit scores as before."""
    import time

    from iterate import progress
    from iterate.errors import BadInput

    (tmp_path / "slow.py").write_text(
        "import time\ndef f(prompts, responses):\n    time.sleep(30)\n    return [1.0]\n"
    )
    with caplog.at_level("INFO", logger="iterate.progress"):
        with pytest.raises(progress.Overdue, match="blocked: still running after"):
            with progress.watch("blocked", timeout_s=0.6, every_s=0.25):
                time.sleep(30)
    assert sum("blocked: still running after" in m for m in caplog.messages) >= 2
    slow = rewards.FunctionReward(f"{tmp_path}/slow.py:f", timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(
        BadInput,
        match=r"reward.function=.*slow.py:f took longer than "
        r"reward.function_timeout_s=0.5 on rows 0..0",
    ):
        slow.score(["p"], ["r"])
    assert time.monotonic() - t0 < 10
    with progress.watch("quick", timeout_s=5):  # a finished call leaves nothing behind
        pass
    time.sleep(0.1)
    (tmp_path / "quick.py").write_text("def f(prompts, responses):\n    return [2.0]\n")
    quick = rewards.FunctionReward(f"{tmp_path}/quick.py:f", timeout_s=5)
    assert quick.score(["p"], ["r"]) == [2.0]
    cfg = compose_cfg(
        [
            "reward.kind=function",
            f"reward.function={tmp_path}/quick.py:f",
            "reward.function_timeout_s=7",
        ],
        tmp_path,
    )
    assert rewards.of(cfg).timeout_s == 7
