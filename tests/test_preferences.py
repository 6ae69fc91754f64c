"""Preference data: HH-RLHF transcripts, conversational and prompt + completion rows, files
and saved datasets, weighted mixtures; malformed rows named by file, row and field."""

import json

import pytest

from iterate.preferences import MalformedRow, load, load_mixture, parse_hh, parse_row

from .conftest import ROOT


def load_hh(path):  # one source: (pairs, dropped by reason, first message per reason)
    pairs, stats, examples = load(path)
    return pairs, stats["dropped"], examples


def test_single_turn():
    msgs, resp = parse_hh("\n\nHuman: Hi there\n\nAssistant: Hello!")
    assert msgs == [{"role": "user", "content": "Hi there"}]
    assert resp == "Hello!"


def test_multi_turn_prompt_is_every_turn_before_the_last():
    text = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6."
    msgs, resp = parse_hh(text)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "4." and msgs[2]["content"] == "And 3+3?"
    assert resp == "6."


def test_response_may_contain_newlines_and_colons():
    msgs, resp = parse_hh("\n\nHuman: list\n\nAssistant: a: 1\nb: 2")
    assert resp == "a: 1\nb: 2"


def test_missing_assistant_turn_names_the_row_and_field():
    row = {
        "chosen": "\n\nHuman: What time is it?",
        "rejected": "\n\nHuman: What time is it?\n\nAssistant: Noon.",
    }
    with pytest.raises(
        MalformedRow, match=r"data\.jsonl: row 7: field 'chosen': no assistant turn"
    ) as e:
        parse_row(row, "data.jsonl: row 7")
    assert e.value.reason == "no_assistant_turn"


@pytest.mark.parametrize(
    ("row", "reason", "field"),
    [
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: b"},
            "empty_response",
            "chosen",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"},
            "identical_responses",
            "rejected",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"},
            "prompt_mismatch",
            "rejected",
        ),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "missing_field", "rejected"),
        (
            {
                "chosen": "preamble\n\nHuman: a\n\nAssistant: b",
                "rejected": "\n\nHuman: a\n\nAssistant: c",
            },
            "text_before_first_turn",
            "chosen",
        ),
        ({"chosen": "\n\nAssistant: b", "rejected": "\n\nAssistant: c"}, "no_human_turn", "chosen"),
    ],
)
def test_malformed_reasons(row, reason, field):
    with pytest.raises(MalformedRow) as e:
        parse_row(row, "f: row 0")
    assert e.value.reason == reason
    assert f"field '{field}'" in str(e.value)


def test_fixture_counts_malformed_rows_by_reason():
    pairs, dropped, examples = load_hh(str(ROOT / "data" / "hh_fixture.jsonl"))
    assert dict(dropped) == {"no_assistant_turn": 1, "empty_response": 1, "identical_responses": 1}
    assert len(pairs) == 24
    assert any(len(p.messages) == 3 for p in pairs), "the fixture has multi-turn rows"
    assert all("hh_fixture.jsonl: row " in m for m in examples)


def test_load_hh_parquet_and_missing_file(tmp_path):
    import pandas as pd

    rows = [
        {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"}
    ] * 3
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    pairs, dropped, _ = load_hh(str(tmp_path / "p.parquet"))
    assert len(pairs) == 3 and not dropped
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_hh(str(tmp_path / "nope.jsonl"))
    (tmp_path / "j.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert len(load_hh(str(tmp_path / "j.jsonl"))[0]) == 1


USER = [{"role": "user", "content": "Name a fruit."}]


def _a(text):
    return [{"role": "assistant", "content": text}]


def test_conversational_rows_with_and_without_a_prompt():
    whole = parse_row({"chosen": USER + _a("A pear."), "rejected": USER + _a("No.")}, "f: row 0")
    assert (whole.messages, whole.chosen, whole.rejected) == (USER, "A pear.", "No.")
    trl = parse_row({"prompt": USER, "chosen": _a("A pear."), "rejected": _a("No.")}, "f: row 1")
    assert (trl.messages, trl.chosen, trl.rejected) == (USER, "A pear.", "No.")
    text = parse_row(
        {"prompt": "Name a fruit.", "chosen": "A pear.", "rejected": "No."}, "f: row 2"
    )
    assert (text.messages, text.chosen, text.where) == (USER, "A pear.", "f: row 2")
    multi = USER + _a("Plum.") + [{"role": "user", "content": "Another?"}]
    pair = parse_row({"chosen": multi + _a("Fig."), "rejected": multi + _a("Plum.")}, "f: row 3")
    assert pair.messages == multi and pair.chosen == "Fig."


OTHER = [{"role": "user", "content": "?"}]
BAD_CONVERSATIONS = [
    ({"chosen": USER + _a("x"), "rejected": OTHER + _a("y")}, "prompt_mismatch", "rejected"),
    ({"chosen": USER, "rejected": USER + _a("y")}, "no_assistant_turn", "chosen"),
    ({"chosen": USER + _a("x"), "rejected": "text"}, "unknown_format", "chosen"),
    ({"chosen": [{"role": "user"}], "rejected": USER + _a("y")}, "not_messages", "chosen"),
    ({"chosen": _a("x"), "rejected": _a("y")}, "no_prompt", "chosen"),
    ({"prompt": USER, "chosen": _a("x"), "rejected": _a("x")}, "identical_responses", "rejected"),
]


@pytest.mark.parametrize(("row", "reason", "field"), BAD_CONVERSATIONS)
def test_malformed_conversational_rows(row, reason, field):
    with pytest.raises(MalformedRow) as e:
        parse_row(row, "conv.jsonl: row 4")
    assert e.value.reason == reason and f"conv.jsonl: row 4: field '{field}'" in str(e.value)


def test_saved_dataset_folder_and_weighted_mixture(tmp_path):
    import datasets

    conv = [{"prompt": USER, "chosen": _a(f"Fruit {i}."), "rejected": _a("No.")} for i in range(8)]
    datasets.Dataset.from_list(conv).save_to_disk(str(tmp_path / "saved"))
    pairs, stats, _ = load(str(tmp_path / "saved"))
    assert len(pairs) == 8 and stats == {"rows": 8, "usable": 8, "used": 8, "dropped": {}}

    class Src:
        def __init__(self, path, weight):
            self.path, self.weight = path, weight

    hh = str(ROOT / "data" / "hh_fixture.jsonl")
    mixed, per_source, examples = load_mixture(
        [Src(hh, 0.5), Src(str(tmp_path / "saved"), 2.0)], seed=3
    )
    assert per_source[hh]["usable"] == 24 and per_source[hh]["used"] == 12, "half the HH pairs"
    assert per_source[str(tmp_path / "saved")]["used"] == 16, "every saved pair twice"
    assert len(mixed) == 28 and examples
    again, _, _ = load_mixture([Src(hh, 0.5), Src(str(tmp_path / "saved"), 2.0)], seed=3)
    assert [p.chosen for p in again] == [p.chosen for p in mixed], "the sample is seeded"
