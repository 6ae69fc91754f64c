"""Generation backends write valid shards; labelling converts chat templates and drops
non-finite rewards."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from iterate import generate, label, models, reward_model
from iterate.prompts import SCHEMA, prompt_id
from iterate.shards import SCHEMAS

PROMPTS = ["Greet Anna.", "What is 2 plus 3?", "Count from 1 to 4.", "Name 2 fruits.", "Say hi to Leo."]


def _prompts(extra: list[str] = ()) -> pa.Table:
    texts = [*PROMPTS, *extra]
    return pa.table({"prompt_id": [prompt_id(t) for t in texts], "prompt": texts}, schema=SCHEMA)


def _job(world, out, shards, backend_n=3):
    return generate.Job(
        policy=str(world), out=str(out), iteration=0, shards=shards, n=backend_n, temperature=1.0, top_p=1.0,
        max_tokens=12, max_length=64, seed=0, dtype="float32", batch_size=2, gpu_memory_utilization=0.1,
        enforce_eager=True,
    )  # fmt: skip


def _check_shards(out, n_prompts, n):
    paths = sorted(out.glob("shard_*.parquet"))
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet"]
    t = pa.concat_tables([pq.read_table(p) for p in paths])
    assert t.schema.equals(SCHEMAS["generate"])
    assert t.num_rows == n_prompts * n
    keys = list(zip(t["prompt_id"].to_pylist(), t["sample_idx"].to_pylist()))
    assert len(set(keys)) == len(keys)
    for row in t.to_pylist():
        assert row["finish_reason"] in ("stop", "length")
        assert 1 <= row["response_tokens"] <= 12 and row["response_tokens"] == len(row["response_ids"])
        assert (row["finish_reason"] == "stop") == (row["response_ids"][-1] == 2)  # EOS id of the toy tokenizer
        assert row["prompt_tokens"] > 0
    return t


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_backends_write_valid_shards_and_drop_long_prompts(backend, tiny_world, tmp_path):
    tok = models.load_tokenizer(str(tiny_world))
    long = "Greet " + "Anna " * 80 + "."
    shards, dropped = generate.plan(tok, _prompts([long]), max_prompt=64 - 12, shard_size=3)
    assert dict(dropped) == {"prompt_too_long": 1}
    assert [len(s) for s in shards] == [3, 2]
    out = tmp_path / backend
    out.mkdir()
    generate.launch(_job(tiny_world, out, dict(enumerate(shards))), backend)
    t = _check_shards(out, len(PROMPTS), 3)
    assert set(t["prompt"].to_pylist()) == set(PROMPTS)


def test_transformers_shards_are_reproducible(tiny_world, tmp_path):
    tok = models.load_tokenizer(str(tiny_world))
    shards, _ = generate.plan(tok, _prompts(), 52, 3)
    tables = []
    for name, todo in (("all", {0: shards[0], 1: shards[1]}), ("only1", {1: shards[1]})):
        (tmp_path / name).mkdir()
        generate.run_transformers(_job(tiny_world, tmp_path / name, todo))
        tables.append(pq.read_table(tmp_path / name / "shard_00001.parquet"))
    assert tables[0].equals(tables[1]), "a shard regenerated alone (after a crash) is identical"


RM_TEMPLATE = "{% for m in messages %}{{ bos_token }}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_templates_differ_rm_template_is_applied_without_double_bos(tiny_world, tmp_path):
    policy_tok = models.load_tokenizer(str(tiny_world))
    rm_tok = models.load_tokenizer(str(tiny_world), chat_template=RM_TEMPLATE)
    messages = [{"role": "user", "content": "Greet Anna."}]
    ids = reward_model.encode(rm_tok, messages, "Hello Anna!", 128)
    text = rm_tok.decode(ids)
    assert text.startswith("<s>### user: Greet Anna.")
    assert "### assistant: Hello Anna!" in text and "<|assistant|>" not in text
    policy_text = policy_tok.decode(reward_model.encode(policy_tok, messages, "Hello Anna!", 128))
    assert policy_text != text and "<|assistant|>" in policy_text
    assert ids[0] == rm_tok.bos_token_id and ids.count(rm_tok.bos_token_id) == 2  # one per turn, as the RM template says
    # a tokenizer with no template gets the HH transcript
    rm_tok.chat_template = None
    hh = rm_tok.decode(reward_model.encode(rm_tok, messages, "Hello Anna!", 128), skip_special_tokens=True)
    assert hh == "\n\nHuman: Greet Anna.\n\nAssistant: Hello Anna!"


def _gen_table(responses):
    return pa.table(
        {
            "prompt_id": [f"p{i}" for i in range(len(responses))], "sample_idx": [0] * len(responses),
            "prompt": ["Greet Anna."] * len(responses), "response": responses,
            "prompt_tokens": [5] * len(responses), "response_tokens": [3] * len(responses),
            "finish_reason": ["stop"] * len(responses), "response_ids": [[1]] * len(responses),
        },
        schema=SCHEMAS["generate"],
    )  # fmt: skip


def test_non_finite_rewards_are_dropped_and_counted(tiny_world):
    model, tok = reward_model.load_model(str(tiny_world))
    poison = tok("Rosa", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # a real model whose reward is NaN for any sequence holding this token
        model.get_input_embeddings().weight[poison[0]] = float("nan")
    gen = _gen_table(["Hello Anna!", "Hello Rosa!", "Sure! Hello Anna!"])
    table, dropped = label.label_table(gen, model, tok, 128, 64, gold=label.gold_scorer_for("toy"))
    assert dict(dropped) == {"non_finite_reward": 1}
    assert table["prompt_id"].to_pylist() == ["p0", "p2"]
    assert all(r == r for r in table["reward"].to_pylist())  # no NaN kept, none turned into 0
    assert table["gold"].to_pylist() == [1.0, 1.25]


def test_kept_engine_loads_a_new_policy_in_place(tiny_world, tmp_path):
    """A kept engine given another policy of the same shape samples exactly what a fresh
    engine started on that policy does for the same shard: the weights are replaced in
    place, and each shard is seeded from (seed, shard) alone, so a shard regenerated after
    a crash (here: only shard 1, by a new engine) equals the uninterrupted run's."""
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_world)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(other)
    models.load_tokenizer(str(tiny_world)).save_pretrained(other)
    tok = models.load_tokenizer(str(tiny_world))
    shards, _ = generate.plan(tok, _prompts(), max_prompt=64 - 12, shard_size=3)
    assert len(shards) == 2

    def job(policy, name, which=(0, 1)):
        (tmp_path / name).mkdir()
        return _job(policy, tmp_path / name, {k: shards[k] for k in which}, backend_n=3)

    def shard1(name):
        t = pq.read_table(tmp_path / name / "shard_00001.parquet")
        return t["response"].to_pylist(), t["response_ids"].to_pylist()

    engine = generate.Engine()
    try:
        first = engine.run(job(tiny_world, "a"))
        pid = engine.proc.pid
        second = engine.run(job(other, "b"))
        assert engine.proc.pid == pid, "the same engine process served both policies"
    finally:
        engine.close()
    assert "engine_start_s" in first and "weights_load_s" in second and "engine_start_s" not in second
    fresh = generate.launch(job(other, "c", which=(1,)), "vllm")  # not kept: its own engine, closed after
    assert "engine_start_s" in fresh
    assert shard1("b") == shard1("c")
    assert shard1("a") != shard1("b"), "the perturbed policy must sample differently for the check to mean anything"


def test_engine_key_reads_the_architecture_and_accepts_hub_ids(tiny_world, tmp_path):
    import json
    import shutil

    local = generate.engine_key(_job(tiny_world, tmp_path, {}))
    assert local["arch"]["hidden_size"] > 0 and "dtype" not in local["arch"]
    # a policy saved in another dtype has the same shape: the running engine can take it
    copy = tmp_path / "copy"
    shutil.copytree(tiny_world, copy)
    conf = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**conf, "dtype": "bfloat16", "_name_or_path": "x"}))
    assert generate.engine_key(_job(copy, tmp_path, {})) == local
    # a hub id is not a folder here: it is its own key (vLLM resolves it)
    hub = generate.engine_key(_job("HuggingFaceH4/mistral-7b-sft-beta", tmp_path, {}))
    assert hub["arch"] == {"policy": "HuggingFaceH4/mistral-7b-sft-beta"}
