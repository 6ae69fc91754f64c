"""The prompts stage: deduplication, a held-out set disjoint from training, disjoint
per-iteration slices, and no leak when the source grows between invocations."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from iterate.stages import heldout, prompts
from iterate.store.paths import Paths

from .conftest import compose_cfg


def _write(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))


def _setup(tmp_path: Path, texts: list[str], per_iteration: int = 5, heldout: int = 6):
    source = tmp_path / "prompts.jsonl"
    _write(source, texts)
    cfg = compose_cfg(
        [
            "prompts=file",
            f"prompts.path={source}",
            f"prompts.per_iteration={per_iteration}",
            f"prompts.heldout={heldout}",
        ],
        tmp_path,
    )
    return cfg, Paths(run=tmp_path / "run", base_policy=""), source


def _ids(table) -> list[str]:
    return table["prompt_id"].to_pylist()


def test_dedupe_heldout_and_slices_are_disjoint(tmp_path):
    texts = [f"Question number {n}?" for n in range(30)]
    cfg, paths, _ = _setup(tmp_path, [*texts, texts[3], "  ", texts[7]])  # 2 duplicates, 1 empty
    held = heldout.prompts(cfg, paths)
    slices = [prompts.run(cfg, paths, i) for i in range(4)]
    assert held.num_rows == 6 and all(s.num_rows == 5 for s in slices)
    every = _ids(held) + [pid for s in slices for pid in _ids(s)]
    assert len(every) == len(set(every)) == 26, "held-out and slices never share a prompt"
    assert set(
        held["prompt"].to_pylist() + [t for s in slices for t in s["prompt"].to_pylist()]
    ) <= set(texts)
    done = json.loads((paths.stage(0, "prompts") / "_DONE.json").read_text())
    assert done["dropped"] == {"duplicate": 2, "empty": 1} and done["pool"] == 30
    # the order is the seeded shuffle: held out first, then slice after slice
    order = [
        prompts.prompt_id(t) for t in prompts._dedupe_shuffle(texts, cfg.seed, prompts.Counter())
    ]
    assert every == order[:26]


def test_too_few_prompts_names_what_is_used(tmp_path):
    cfg, paths, _ = _setup(tmp_path, [f"Q{n}?" for n in range(14)])
    heldout.prompts(cfg, paths)
    prompts.run(cfg, paths, 0)
    try:
        prompts.run(cfg, paths, 1)
    except ValueError as e:
        assert "iteration 1 needs 5" in str(e) and "has 3" in str(e)
    else:
        raise AssertionError("an iteration without enough unused prompts must fail")


def test_growing_the_source_never_leaks_heldout_or_repeats(tmp_path):
    """Append prompts to the file between invocations and resume with more iterations: the
    held-out set and the earlier iterations keep their prompts, and the new iterations
    draw only prompts the run has not used (the defect: the pool was re-shuffled and the
    next iteration trained on held-out prompts)."""
    first = [f"Old question {n}?" for n in range(20)]
    cfg, paths, source = _setup(tmp_path, first)
    held = _ids(heldout.prompts(cfg, paths))
    early = [_ids(prompts.run(cfg, paths, i)) for i in range(2)]
    shards = {i: (paths.stage(i, "prompts") / "shard_00000.parquet").read_bytes() for i in range(2)}

    _write(source, [*first, *(f"New question {n}?" for n in range(60))])
    later = [_ids(prompts.run(cfg, paths, i)) for i in range(2, 6)]

    assert _ids(heldout.prompts(cfg, paths)) == held, "the held-out set is drawn once"
    for i in range(2):
        assert (paths.stage(i, "prompts") / "shard_00000.parquet").read_bytes() == shards[i]
    used = held + [p for s in early + later for p in s]
    assert len(used) == len(set(used)) == 6 + 6 * 5, "no held-out or earlier prompt reappears"
    new_ids = {prompts.prompt_id(f"New question {n}?") for n in range(60)}
    assert new_ids & {p for s in later for p in s}, "the new prompts join later draws"
    hashes = [
        json.loads((paths.stage(i, "prompts") / "_DONE.json").read_text())["source_hash"]
        for i in (1, 2)
    ]
    assert hashes[0] != hashes[1], "the source's content is recorded"


def test_shrinking_the_source_keeps_what_was_used(tmp_path):
    texts = [f"Question {n}?" for n in range(30)]
    cfg, paths, source = _setup(tmp_path, texts)
    held = _ids(heldout.prompts(cfg, paths))
    first = _ids(prompts.run(cfg, paths, 0))
    kept = [
        t for t in texts if prompts.prompt_id(t) not in held[:3]
    ]  # three held-out prompts removed
    _write(source, kept)
    second = _ids(prompts.run(cfg, paths, 1))
    assert _ids(heldout.prompts(cfg, paths)) == held
    assert not set(second) & (set(held) | set(first))


def test_prompt_formats_hh_transcripts_messages_and_saved_datasets(tmp_path):
    import datasets
    import pandas as pd

    hh = "\n\nHuman: What is 2 plus 3?\n\nAssistant: 5.\n\nHuman: And 3 plus 4?\n\nAssistant: 7."
    texts = [hh, "\n\nHuman: Greet Anna.", "Count from 1 to 3."]  # a transcript may end either way
    _write(tmp_path / "hh.jsonl", texts)
    cfg = compose_cfg(["prompts=file", f"prompts.path={tmp_path / 'hh.jsonl'}"], tmp_path)
    pool, _, dropped, _ = prompts.load_pool(cfg)
    assert json.loads(pool[0]) == [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5."},
        {"role": "user", "content": "And 3 plus 4?"},
    ], "every turn before the final response"
    assert json.loads(pool[1]) == [{"role": "user", "content": "Greet Anna."}]
    assert pool[2] == "Count from 1 to 3." and not dropped
    # UltraFeedback-style message lists, in parquet and in a folder saved with save_to_disk
    messages = [[{"role": "user", "content": "Name 2 fruits."}]]
    pd.DataFrame({"context_messages": messages}).to_parquet(tmp_path / "uf.parquet")
    datasets.Dataset.from_dict({"context_messages": messages}).save_to_disk(str(tmp_path / "saved"))
    cfg.prompts.field = "context_messages"
    for path in (tmp_path / "uf.parquet", tmp_path / "saved"):
        cfg.prompts.path = str(path)
        assert json.loads(prompts.load_pool(cfg)[0][0]) == messages[0]


def test_the_held_out_draw_is_not_refused_for_a_share_it_does_not_read(tmp_path):
    """The held-out stage hashes what decides the draw: a run told to lower
    prompts.per_iteration (a shortfall's advice) keeps its held-out set; a stage recorded
    by an earlier version with the share in its config stands too (``stage.RETIRED``)."""
    from iterate.store.stage import DONE, Stage

    cfg, paths, _ = _setup(tmp_path, [f"Q{n}?" for n in range(30)])
    held = _ids(heldout.prompts(cfg, paths))
    before = (paths.heldout_dir / DONE).read_text()
    cfg.prompts.per_iteration = 3
    assert _ids(heldout.prompts(cfg, paths)) == held
    assert (paths.heldout_dir / DONE).read_text() == before, "not redone"
    old = tmp_path / "old_heldout"  # as an earlier version recorded it
    stage = Stage(old, "heldout", prompts.config(cfg))
    stage.check()
    stage.finish()
    cfg.prompts.per_iteration = 7
    assert Stage(old, "heldout", prompts.heldout_config(cfg)).check()
    cfg.prompts.heldout = 3  # what the draw reads still counts
    with pytest.raises(Exception, match="prompts.heldout"):
        Stage(old, "heldout", prompts.heldout_config(cfg)).check()


def test_prompt_row_fields_travel_with_their_prompts_to_a_reward_function(tmp_path):
    """``prompts.fields`` keeps named fields of each prompt row (a reference answer) in the
    held-out and per-iteration shards; a reward function that takes them by name gets one
    value per row, read back from the run folder, whatever order the rows come in."""
    from iterate import rewards

    source = tmp_path / "math.jsonl"
    rows = [{"prompt": f"What is {a} plus 1?", "answer": a + 1, "note": "x"} for a in range(12)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_cfg(
        [
            "prompts=file",
            f"prompts.path={source}",
            "prompts.fields=[answer]",
            "prompts.per_iteration=4",
            "prompts.heldout=4",
        ],
        tmp_path,
    )
    paths = Paths(run=tmp_path / "run", base_policy="")
    held, drawn = heldout.prompts(cfg, paths), prompts.run(cfg, paths, 0)
    for table in (held, drawn):
        for text, said in zip(table["prompt"].to_pylist(), table["fields"].to_pylist()):
            assert json.loads(said) == {"answer": int(text.split()[2]) + 1}
    seen = {}

    def fn(prompts_, responses, answer):
        seen.update(zip(prompts_, answer))
        return [float(r == str(a)) for r, a in zip(responses, answer)]

    (tmp_path / "f.py").write_text("")  # the function is given directly below
    reward = rewards.FunctionReward("x.py:fn", 3, ("answer",), str(paths.run))
    reward._fn, reward._source = fn, tmp_path / "f.py"
    texts = [*reversed(drawn["prompt"].to_pylist()), *held["prompt"].to_pylist(), "Unseen?"]
    answers = [str(int(t.split()[2]) + 1) if t != "Unseen?" else "?" for t in texts]
    assert reward.score(texts, answers) == [1.0] * 8 + [0.0]
    assert seen["Unseen?"] is None, "a prompt without a row gets None"
    assert reward.identity()["fields"] == ["answer"]
    # no fields named: the shards are as before (no column), and the identity too
    plain = compose_cfg(["prompts=file", f"prompts.path={source}"], tmp_path)
    assert "fields" not in prompts.table(["a"]).column_names
    assert "fields" not in prompts.config(plain)["prompts"]


def test_a_prompt_field_the_source_lacks_is_named(tmp_path):
    from iterate.errors import BadInput

    source = tmp_path / "p.jsonl"
    _write(source, ["What is 1 plus 2?"])
    cfg = compose_cfg(["prompts=file", f"prompts.path={source}", "prompts.fields=[answer]"])
    with pytest.raises(BadInput, match=r"p.jsonl: no field 'answer' \(prompts.fields; columns"):
        prompts.load_pool(cfg)
    toy = compose_cfg(["prompts.fields=[answer,family]"])
    fields = prompts.load_pool(toy)[3]
    assert fields[prompts.prompt_id("What is 3 plus 4?")] == {"answer": "7", "family": "arithmetic"}
    with pytest.raises(BadInput, match="the toy world's prompts have no field 'solution'"):
        prompts.load_pool(compose_cfg(["prompts.fields=[solution]"]))


def test_an_alpacaeval_file_is_a_prompt_source(tmp_path):
    """AlpacaEval's format (a JSON list of objects with instruction, output, generator,
    dataset) read with prompts.field=instruction: every instruction a prompt, the other
    fields kept with it when named."""
    rows = [
        {
            "instruction": f"Explain idea {n}.",
            "output": f"Idea {n} is ...",
            "generator": "gpt4_1106_preview",
            "dataset": "helpful_base",
        }
        for n in range(12)
    ]
    source = tmp_path / "alpaca_eval.json"
    source.write_text(json.dumps(rows, indent=2))
    cfg = compose_cfg(
        [
            "prompts=file",
            f"prompts.path={source}",
            "prompts.field=instruction",
            "prompts.per_iteration=4",
            "prompts.heldout=4",
            "prompts.fields=[dataset]",
        ],
        tmp_path,
    )
    train, held, dropped, fields = prompts.load_pool(cfg)
    assert sorted(train + held) == sorted(r["instruction"] for r in rows) and not dropped
    assert {f["dataset"] for f in fields.values()} == {"helpful_base"}
    paths = Paths(run=tmp_path / "run", base_policy="")
    assert heldout.prompts(cfg, paths).num_rows == 4
    assert set(prompts.run(cfg, paths, 0)["prompt"].to_pylist()) <= {r["instruction"] for r in rows}


def test_a_heldout_file_is_the_heldout_set_and_never_trained_on(tmp_path):
    """prompts.heldout_path: the held-out set comes from its own file (AlpacaEval's JSON,
    read with prompts.heldout_field=instruction), and a training prompt that is also in it
    is dropped from the pool and counted, so no iteration ever draws it."""
    evaluation = [f"Explain idea {n}." for n in range(6)]
    heldout_file = tmp_path / "alpaca_eval.json"
    heldout_file.write_text(json.dumps([{"instruction": t, "output": "..."} for t in evaluation]))
    train = [f"Train prompt {n}." for n in range(10)] + evaluation[:3]  # three leak in
    source = tmp_path / "train.jsonl"
    _write(source, train)
    cfg = compose_cfg(
        [
            "prompts=file",
            f"prompts.path={source}",
            f"prompts.heldout_path={heldout_file}",
            "prompts.heldout_field=instruction",
            "prompts.per_iteration=5",
            "prompts.heldout=4",
        ],
        tmp_path,
    )
    pool, held, dropped, _, _ = prompts.pools(cfg)
    assert set(held) <= set(evaluation) and len(held) == 4
    assert dropped["held_out"] == 3 and not set(pool) & set(evaluation)
    paths = Paths(run=tmp_path / "run", base_policy="")
    assert set(heldout.prompts(cfg, paths)["prompt"].to_pylist()) == set(held)
    drawn = [set(prompts.run(cfg, paths, i)["prompt"].to_pylist()) for i in range(2)]
    assert not (drawn[0] | drawn[1]) & set(evaluation) and not drawn[0] & drawn[1]
    unnamed = ["prompts=file", f"prompts.path={source}", f"prompts.heldout_path={heldout_file}"]
    with pytest.raises(prompts.BadInput, match=r"alpaca_eval.json: no field 'prompt' \(prompts"):
        prompts.pools(compose_cfg(unnamed, tmp_path))  # its field named as the training file's


@pytest.mark.parametrize("first_has_it", [True, False])
def test_rows_without_the_prompt_field_are_dropped_whatever_their_order(
    tmp_path, caplog, first_has_it
):
    """40 of 100 rows lack the prompt field: the same 60 prompts and the same count
    (``no_prompt``) whether the first row has the field or not, with a warning naming the
    file and the first such row; a file where no row has it is refused naming the field."""
    from iterate.errors import BadInput
    from iterate.stages import prompts as sources

    rows = [{"prompt": f"Question {k}?"} if k % 5 >= 2 else {"text": f"x{k}"} for k in range(100)]
    if first_has_it:
        rows = rows[2:] + rows[:2]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dropped = Counter()
    got = sources.read(str(path), str(path), "prompt", [], dropped)
    assert len(got) == 60 and dropped == {"no_prompt": 40}
    assert f"{path}: 40 rows have no field 'prompt'" in caplog.text
    path.write_text("".join(json.dumps({"text": "x"}) + "\n" for _ in range(3)))
    with pytest.raises(BadInput, match="field 'prompt'"):
        sources.read(str(path), str(path), "prompt", [], Counter())


def test_a_heldout_file_the_run_cannot_judge_or_that_is_short_is_said_at_once(tmp_path, caplog):
    """With the toy world's prompts, a held-out file of other prompts is refused when the
    held-out set is drawn (before any iteration), naming the setting and a prompt, not at
    evaluation blaming a gold judge the user never set; a held-out file with fewer prompts
    than ``prompts.heldout`` is drawn with a warning naming both counts."""
    from iterate.errors import BadInput
    from iterate.toy import world

    english = tmp_path / "english.jsonl"
    _write(english, ["Write a haiku about rain.", "Summarise the news."])
    paths = Paths(run=tmp_path / "run", base_policy="")
    cfg = compose_cfg([f"prompts.heldout_path={english}", "prompts.heldout=2"], tmp_path)
    with pytest.raises(
        BadInput,
        match=r"english.jsonl: 'Write a haiku about rain.' is not a "
        r"toy-world prompt.*leave prompts.heldout_path unset",
    ):
        heldout.prompts(cfg, paths)
    toy = tmp_path / "toy.jsonl"
    _write(toy, [i.prompt for i in world.split(0.1)[1][:3]])
    cfg = compose_cfg([f"prompts.heldout_path={toy}", "prompts.heldout=5"], tmp_path)
    with caplog.at_level("WARNING"):
        assert len(heldout.prompts(cfg, paths)) == 3
    assert any(
        "prompts.heldout=5, but" in m and "has 3 held-out prompts" in m for m in caplog.messages
    )
