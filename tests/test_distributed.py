"""The update stage on several processes (torch.distributed through accelerate, gloo on
this CPU): the same adapter as one process with the same global batch; rank 0 writes."""

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from iterate.stages.update import dist
from iterate.store.paths import Paths
from iterate.store.shards import SCHEMAS, shard_path, write_shard
from iterate.store.stage import Stage
from iterate.train import models
from iterate.train.rules import rule

from .conftest import TINY, compose_cfg

# 9 pairs in optimiser steps of 4: the last step has one example, so rank 1 has no share
# of it and backs a zero-weighted one
PAIRS = [
    (f"What is {a} plus {b}?", f"Sure! {a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + 1}.")
    for a, b in [(1, 2), (2, 3), (3, 4), (4, 1), (5, 2), (6, 1), (2, 2), (7, 1), (3, 3)]
]


def _pairs_stage(run: Path, tok) -> None:
    rows = [
        {
            "prompt_id": f"p{k}",
            "prompt": p,
            "chosen": c,
            "rejected": r,
            "chosen_idx": 0,
            "rejected_idx": 1,
            "chosen_reward": 1.0,
            "rejected_reward": 0.0,
            "chosen_ids": models.response_ids(tok, c),
            "rejected_ids": models.response_ids(tok, r),
        }
        for k, (p, c, r) in enumerate(PAIRS)
    ]
    stage = Stage(run / "iter_000" / "pairs", "pairs", {})
    write_shard(pa.Table.from_pylist(rows, schema=SCHEMAS["pairs"]), shard_path(stage.path, 0))
    stage.finish(rows_out=len(rows))


def _update(tiny_cfg, tiny_world, tmp_path, name: str, overrides: dict) -> tuple[dict, dict]:
    cfg = tiny_cfg
    cfg.update.lora.dropout = 0.0  # the ranks' dropout masks would differ
    cfg.update.micro_batch_size, cfg.update.grad_accum, cfg.update.epochs = 2, 2, 2
    for k, v in overrides.items():
        setattr(cfg.update, k, v)
    run = tmp_path / name
    _pairs_stage(run, models.load_tokenizer(str(tiny_world)))
    paths = Paths(run=run, base_policy=str(tiny_world))
    done = rule(cfg.update.name).run(cfg, paths, 0, str(tiny_world), str(tiny_world))
    return done, load_file(run / "iter_000" / "update" / "adapter" / "adapter_model.safetensors")


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


@pytest.mark.parametrize("rule", ["dpo", "raft"])
def test_two_processes_make_the_adapter_of_one(tiny_cfg, tiny_world, tmp_path, rule):
    tiny_cfg.update = compose_cfg([*TINY, f"update={rule}"]).update  # LoRA, untuned
    one, a1 = _update(tiny_cfg, tiny_world, tmp_path, "one", {"num_processes": 1})
    two, a2 = _update(tiny_cfg, tiny_world, tmp_path, "two", {"num_processes": 2})
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["steps"] == two["steps"] == 6  # 2 epochs of ceil(9 / 4) steps
    assert _rel(a2, a1) <= 1e-5
    assert any(v.abs().sum() > 0 for k, v in a1.items() if "lora_B" in k)  # it did train
    log = [json.loads(x) for x in (tmp_path / "two/iter_000/update/train_log.jsonl").open()]
    ref = [json.loads(x) for x in (tmp_path / "one/iter_000/update/train_log.jsonl").open()]
    assert len(log) == len(ref) == 6  # rank 0 alone wrote the log
    for a, b in zip(log, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("strategy", dist.STRATEGIES)
def test_every_strategy_composes_to_a_shipped_accelerate_config(strategy):
    import yaml

    cfg = compose_cfg([f"update.strategy={strategy}", "update.num_processes=8"])
    cmd = dist.command(cfg, Path("launch.json"))
    f = Path(cmd[cmd.index("--config_file") + 1])
    conf = yaml.safe_load(f.read_text())
    assert conf["distributed_type"] == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(
        strategy, "DEEPSPEED"
    )
    if strategy.startswith("deepspeed"):
        assert conf["deepspeed_config"]["zero_stage"] == int(strategy[-1])
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    assert torch.distributed.is_available()
