"""HH-RLHF parsing: single and multi-turn, malformed rows named by file, row and field."""

import json

import pytest

from iterate.hh import MalformedRow, load_hh, parse_hh, parse_hh_row

from .conftest import ROOT


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
        parse_hh_row(row, "data.jsonl: row 7")
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
        parse_hh_row(row, "f: row 0")
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
