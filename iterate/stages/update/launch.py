"""One rank of a multi-process update (``iterate.stages.update.dist.launch`` starts N of these
through ``accelerate launch``): join the process group, run the iteration's update rule,
rank 0 writes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from iterate import progress, workers
from iterate.config import to_dataclass
from iterate.stages.update import dist
from iterate.store.paths import Paths
from iterate.store.shards import read_json
from iterate.train import models
from iterate.train.rules import rule


def main(spec_path: str) -> None:
    workers.kill_with_parent()  # ranks run in sessions of their own: die with the launcher
    spec = read_json(spec_path, must_exist=True)
    cfg = to_dataclass(OmegaConf.create(spec["config"]))
    p = spec["paths"]
    paths = Paths(
        run=Path(p["run"]),
        base_policy=p["base_policy"],
        toy=Path(p["toy"]) if p["toy"] else None,
        reward_model=p["reward_model"],
    )
    cpu = models.device(str(cfg.device)).type == "cpu"
    acc = dist.init(cpu=cpu)
    if cpu:  # the ranks share the cores out
        torch.set_num_threads(workers.share(acc.num_processes))
    logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING)
    if not acc.is_main_process:
        progress.disable()
    rule(cfg.update.name).run(cfg, paths, spec["iteration"], spec["policy"], spec["reference"])
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
