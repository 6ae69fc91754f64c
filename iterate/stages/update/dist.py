"""The update stage on several processes: torch.distributed through accelerate.

With ``update.num_processes = N > 1`` the loop's process does not train. ``launch`` writes
the config and the stage's arguments to ``<update stage>/launch.json`` and runs

    accelerate launch --config_file <iterate/stages/update/accelerate/STRATEGY.yaml>
        --num_processes N -m iterate.stages.update.launch <launch.json>

(``STRATEGY``: ``update.strategy``, one of ddp, fsdp, deepspeed_zero2, deepspeed_zero3).
Every rank runs the same update rule over the same seeded batch source; each optimiser
step's examples are dealt out ``examples[rank::N]``, each rank's loss is its share of the
step's sum divided by the step's size, and the gradients are summed across ranks, so N
processes take the very step one process takes with the same global batch. Rank 0 writes
the log, the adapter and ``_DONE.json``; the loop's process then reads ``_DONE.json``. A
killed multi-process update starts again from its beginning, like a single-process one.

On CPU the ranks build ``Accelerator(cpu=True)`` and talk over gloo: DDP only. accelerate
applies FSDP and DeepSpeed configs on an accelerator alone (on CPU it would quietly run
DDP), so those strategies are refused there; torch's own FSDP2 does run on CPU over gloo,
which is how FSDP could be tested without a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from iterate import workers
from iterate.config import Config, plain

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")

_ACC = None  # this rank's Accelerator, under a multi-process launch


def config_file(strategy: str) -> Path:
    """The accelerate config shipped for ``strategy``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"update.strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    return Path(__file__).parent / "accelerate" / f"{strategy}.yaml"


def init(cpu: bool):
    """Called once in each rank: join the process group (gloo on CPU)."""
    global _ACC
    from accelerate import Accelerator

    _ACC = Accelerator(cpu=cpu)
    return _ACC


def accelerator():
    return _ACC


def world() -> int:
    return _ACC.num_processes if _ACC is not None else 1


def rank() -> int:
    return _ACC.process_index if _ACC is not None else 0


def is_main() -> bool:
    return rank() == 0


def device(default: torch.device) -> torch.device:
    return _ACC.device if _ACC is not None else default


def prepare(model, opt):
    """Wrap the model and optimiser for the strategy (DDP, FSDP, DeepSpeed); unchanged in
    one process."""
    if _ACC is None:
        return model, opt
    return _ACC.prepare(model, opt)


def share(items: list) -> list:
    """This rank's share of ``items``: every ``world()``-th, from its rank."""
    return items[rank() :: world()]


def no_sync(model, last: bool):
    """Hold the gradient all-reduce for all but a step's last backward."""
    return _ACC.no_sync(model) if _ACC is not None and not last else nullcontext()


def backward(loss: torch.Tensor) -> None:
    """The rank's loss is its share of the step's mean; DDP averages the ranks' gradients,
    so it is scaled by the world size to sum them instead."""
    if _ACC is None:
        loss.backward()
    else:
        _ACC.backward(loss * world())


def clip(model, params, max_norm: float) -> float:
    if _ACC is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    params = [p for p in model.parameters() if p.requires_grad]  # the wrapped ones (FSDP)
    norm = _ACC.clip_grad_norm_(params, max_norm)
    if norm is None and hasattr(model, "get_global_grad_norm"):  # DeepSpeed clips itself
        norm = model.get_global_grad_norm()
    return float(norm) if norm is not None else 0.0


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (the step's loss and metrics, each a rank's share)."""
    if _ACC is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_ACC.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order (small Python objects)."""
    if _ACC is None:
        return items
    out = [None] * world()
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


def state_dict(model) -> dict | None:
    """The full state dict for rank 0's save (gathered under FSDP / ZeRO-3); None when
    nothing was wrapped."""
    if _ACC is None or not _ACC._models:
        return None
    return _ACC.get_state_dict(_ACC._models[0])


def barrier() -> None:
    if _ACC is not None:
        _ACC.wait_for_everyone()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(cfg: Config, spec: Path) -> list[str]:
    uc = cfg.update
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file(str(uc.strategy))),
        "--num_processes",
        str(uc.num_processes),
        "--main_process_port",
        str(_free_port()),
        "--module",
        "iterate.stages.update.launch",
        str(spec),
    ]


def launch(cfg: Config, paths, i: int, policy: str, reference: str, stage) -> dict:
    """Run the update of iteration i on ``update.num_processes`` ranks; return its
    ``_DONE.json`` (written by rank 0)."""
    uc = cfg.update
    spec = stage.path / "launch.json"
    stage.path.mkdir(parents=True, exist_ok=True)
    config = {**plain(cfg), "force": False}  # the loop's process already applied ``force``
    spec.write_text(
        json.dumps(
            {
                "config": config,
                "paths": {k: str(v) if v is not None else None for k, v in vars(paths).items()},
                "iteration": i,
                "policy": policy,
                "reference": reference,
            }
        )
    )
    log.info("update: %d processes (%s) via accelerate", uc.num_processes, uc.strategy)
    env = {**os.environ, "ACCELERATE_LOG_LEVEL": "error", "ITERATE_PGID": str(os.getpgid(0))}
    # the launcher dies with this process, and each rank with the launcher (launch.main)
    proc = subprocess.run(command(cfg, spec), env=env, preexec_fn=workers.kill_with_parent)
    if proc.returncode != 0 or not stage.is_done():
        raise RuntimeError(
            f"{stage.path}: the {uc.num_processes}-process update failed (exit status "
            f"{proc.returncode}); its ranks' output is above"
        )
    return stage.read_done()
