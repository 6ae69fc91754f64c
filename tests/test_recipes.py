"""Each public recipe (conf/experiment) runs one iteration end to end on miniature
random-weight models of its own architectures, with tokenizers carrying the real chat
templates, on small local data in the real formats; and the reward model sees exactly the
conversation it should: the policy's sample re-rendered in the reward model's template,
one BOS."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from iterate import rewards
from iterate.run import loop
from iterate.toy import world
from iterate.train import models

from . import miniatures as mini
from .conftest import ROOT, compose_cfg

pytestmark = pytest.mark.slow

PROMPTS = [i.prompt for i in world.INSTRUCTIONS[::9]][:12]
HH = str(ROOT / "data" / "hh_fixture.jsonl")
# every recipe, shrunk to seconds: what stays is its models' architectures and templates,
# its update rule and its settings
SMALL = [
    "model.dtype=float32",
    "reward.dtype=float32",
    "model.max_length=192",
    "reward.max_length=192",
    "generate.max_tokens=8",
    "prompts.per_iteration=4",
    "prompts.heldout=4",
    "evaluate.samples=2",
    "update.epochs=1",
    "update.micro_batch_size=4",
    "update.grad_accum=1",
    "reward.batch_size=8",
]


@pytest.fixture(scope="module")
def minis(tmp_path_factory):
    out = tmp_path_factory.mktemp("minis")

    def build(name, family, template, arch):
        return mini.model(arch, mini.tokenizer(family, template, out / f"{name}_tok"), out / name)

    return {
        "zephyr": build("zephyr", "mistral", "zephyr", "MistralForCausalLM"),
        "mistral": build("mistral", "mistral", "mistral_instruct", "MistralForCausalLM"),
        "llama3_rm": build("llama3_rm", "llama3", "llama3", "LlamaForSequenceClassification"),
        "ultrarm": build("ultrarm", "llama2", "ultrarm", "LlamaForSequenceClassification"),
        "bloom": build("bloom", "bloom", "vicuna", "BloomForCausalLM"),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    # UltraFeedback-style prompts: context_messages, a list of messages per row
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    pd.DataFrame({"context_messages": messages}).to_parquet(out / "uf.parquet")
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    # conversational preferences, with rows Mistral's template refuses (a system turn; two
    # assistant turns in a row)
    def say(role, text):
        return {"role": role, "content": text}

    user, system = say("user", "Name a fruit."), say("system", "Be brief.")
    no = say("assistant", "No.")
    rows = [
        {"chosen": [user, say("assistant", f"Fruit {i}.")], "rejected": [user, no]}
        for i in range(12)
    ]
    two = [user, say("assistant", "A"), say("assistant", "B")]
    rows.append(
        {
            "chosen": [system, user, say("assistant", "Pear.")],
            "rejected": [system, user, say("assistant", "No.")],
        }
    )
    rows.append({"chosen": two, "rejected": [*two[:2], say("assistant", "C")]})
    pd.DataFrame(rows).to_parquet(out / "conversational.parquet")
    return out


def _run(name: str, tmp_path, overrides: list[str]):
    cfg = compose_cfg([f"experiment={name}", *SMALL, *overrides, f"runs_dir={tmp_path}"])
    rows = loop.run(cfg, tmp_path / name)
    return cfg, rows, tmp_path / name


def _reward_input(cfg, rm_path: str, run) -> tuple[str, str, str, int]:
    """(prompt, response, the reward model's decoded input, how many BOS it holds) for one
    held-out sample of the new policy."""
    samples = run / "iter_000" / "evaluate" / "samples" / "shard_00000.parquet"
    sample = pd.read_parquet(samples).iloc[0]
    scorer = rewards.of(cfg, path=rm_path).scorer()
    ids = scorer.encode(sample["prompt"], sample["response"])
    prompt = models.as_messages(sample["prompt"])[-1]["content"]
    seen = scorer.tokenizer.decode(ids)
    print(f"{cfg.run_name}: the reward model sees {seen!r}")  # shown with pytest -s
    return prompt, sample["response"], seen, ids.count(scorer.tokenizer.bos_token_id)


def _policy_prompt(cfg, policy: str, prompt: str) -> str:
    tok = models.load_tokenizer(policy, cfg.model.chat_template)
    text = tok.decode(models.prompt_ids(tok, prompt))
    print(f"{cfg.run_name}: the policy's prompt {text!r}")
    return text


def test_gshf_zephyr(minis, data, tmp_path):
    """Zephyr-format Mistral policy, a Llama-3-template Llama reward model, UltraFeedback
    context_messages, best-of-8, max-min pairs, DPO with full fine-tuning."""
    cfg, rows, run = _run(
        "gshf_zephyr",
        tmp_path,
        [
            f"model.path={minis['zephyr']}",
            f"reward.path={minis['llama3_rm']}",
            "prompts.source=file",
            f"prompts.path={data / 'uf.parquet'}",
            "iteration=1",
        ],
    )
    assert rows[0]["update"] == "dpo" and rows[0]["responses"] == 4 * 8 and rows[0]["pairs"] > 0
    prompt, response, seen, bos = _reward_input(cfg, minis["llama3_rm"], run)
    assert (
        _policy_prompt(cfg, minis["zephyr"], prompt)
        == f"<s><|user|>\n{prompt}</s>\n<|assistant|>\n"
    )
    assert seen == (
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{response.strip()}<|eot_id|>"
    )
    assert bos == 1 and "<|user|>" not in seen


def test_mistral_ppo_hh(minis, data, tmp_path):
    """One run: a LoRA reward model trained on HH-RLHF from the Mistral policy, then PPO."""
    cfg, rows, run = _run(
        "mistral_ppo_hh",
        tmp_path,
        [
            f"model.path={minis['mistral']}",
            f"reward.data=[{{path:{HH}}}]",
            f"prompts.path={data / 'prompts.jsonl'}",
            "update.ppo_epochs=1",
        ],
    )
    rm = json.loads((run / "reward_model" / "_DONE.json").read_text())
    assert (
        rm["train_pairs"] + rm["heldout_pairs"] == 24
        and rm["trainable_parameters"] < rm["parameters"]
    )
    assert (
        rows[0]["update"] == "ppo"
        and rows[0]["responses"] == 4
        and "generate" not in rows[0]["seconds"]
    )
    rm_path = str(run / "reward_model" / "model")
    prompt, response, seen, _ = _reward_input(cfg, rm_path, run)
    assert _policy_prompt(cfg, minis["mistral"], prompt) == f"<s>[INST] {prompt} [/INST]"
    assert seen == f"<s>[INST] {prompt} [/INST]{response.strip()}</s>"


def test_rm_mistral_trains_only_the_reward_model(minis, data, tmp_path):
    """Bradley-Terry training alone (iteration=0), full fine-tuning, accumulation to a global
    batch, on a weighted mixture of an HH file and a conversational file whose rows the
    Mistral template refuses are dropped and counted."""
    mixture = f"reward.data=[{{path:{HH},weight:0.5}},{{path:{data / 'conversational.parquet'}}}]"
    overrides = [
        f"reward.base={minis['mistral']}",
        f"model.path={minis['mistral']}",
        "reward.batch_size=4",
        "reward.grad_accum=2",
        mixture,
    ]
    cfg, rows, run = _run("rm_mistral", tmp_path, overrides)
    assert rows == [] and not (run / "iter_000").exists() and (run / "_FINISHED.json").exists()
    done = json.loads((run / "reward_model" / "_DONE.json").read_text())
    assert done["dropped"]["template_refused"] == 2, done["dropped"]
    assert done["sources"][HH]["used"] == 12 and done["trainable_parameters"] == done["parameters"]
    lines = (run / "reward_model" / "train_log.jsonl").read_text().splitlines()
    log = [json.loads(line) for line in lines]
    assert all(r["loss"] == r["loss"] for r in log) and len(log) == done["steps"] > 0
    scorer = rewards.of(cfg, path=str(run / "reward_model" / "model")).scorer()
    seen = scorer.tokenizer.decode(scorer.encode("Name a fruit.", "Pear."))
    assert seen == "<s>[INST] Name a fruit. [/INST]Pear.</s>"
    assert _run("rm_mistral", tmp_path, overrides)[1] == [], "a finished run does nothing"


def test_mistral_remax(minis, data, tmp_path):
    """ReMax from the Mistral-Instruct policy, scored by a Llama reward model in UltraRM's
    "Human: / Assistant:" format, sampling at temperature 0.7 and top-p 0.9."""
    cfg, rows, run = _run(
        "mistral_remax",
        tmp_path,
        [
            f"model.path={minis['mistral']}",
            f"reward.path={minis['ultrarm']}",
            f"prompts.path={data / 'prompts.jsonl'}",
        ],
    )
    assert rows[0]["update"] == "remax" and cfg.generate.temperature == 0.7
    prompt, response, seen, bos = _reward_input(cfg, minis["ultrarm"], run)
    assert seen == f"<s>Human: {prompt}\nAssistant: {response.strip()}"
    assert bos == 1, "the Llama tokenizer's own BOS, once"


def test_bloomz_rlhf(minis, data, tmp_path):
    """PPO on a Bloom policy in the Vicuna format, the value head on the frozen reference's
    bottom layers, after a reward model trained from the policy."""
    cfg, rows, run = _run(
        "bloomz_rlhf",
        tmp_path,
        [
            f"model.path={minis['bloom']}",
            f"reward.data=[{{path:{HH}}}]",
            f"prompts.path={data / 'prompts.jsonl'}",
            "update.ppo_epochs=1",
        ],
    )
    upd = json.loads((run / "iter_000" / "update" / "_DONE.json").read_text())
    assert (
        upd["config"]["update"]["value_head"] == "reference_bottom" and rows[0]["update"] == "ppo"
    )
    prompt, response, seen, _ = _reward_input(cfg, str(run / "reward_model" / "model"), run)
    system = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions."
    )
    assert _policy_prompt(cfg, minis["bloom"], prompt) == f"{system} USER: {prompt}\nASSISTANT:"
    assert seen == f"{system} USER: {prompt}\nASSISTANT: {response.strip()}</s>"
