"""Every setting checked before any work starts: ranges, paths that must be loadable
folders (or hub ids), and settings that only make sense together. A bad one raises
``BadInput`` naming the key, its value and what to do. The command line turns it into one
line and exit status 2 (``cli.exit_status``)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from iterate import rewards
from iterate.checks import model_config, model_folder, need, reward_folder
from iterate.config import Config, plain
from iterate.errors import BadInput
from iterate.rewards.function import check_spec
from iterate.train.rules import rule, unread

log = logging.getLogger(__name__)

GE1 = (lambda v: v >= 1, "must be >= 1")
GE0 = (lambda v: v >= 0, "must be >= 0")
POS = (lambda v: v > 0, "must be > 0")
FINITE_POS = (lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
UNIT = (lambda v: 0 < v <= 1, "must be in (0, 1]")
OPEN_UNIT = (lambda v: 0 < v < 1, "must be in (0, 1)")
BELOW_HALF = (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")
UNIT_CLOSED = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
ALLOW_INF = {"handoff.max_kl"}  # inf: no KL budget

RANGES = {
    "iteration": (GE0[0], "must be >= 0 (0 trains the reward model only)"),
    "update.beta": POS,
    "update.epochs": GE1,
    "update.micro_batch_size": GE1,
    "update.max_tokens_per_micro_batch": GE0,
    "update.grad_accum": GE1,
    "update.lr": FINITE_POS,
    "update.label_smoothing": BELOW_HALF,
    "update.max_grad_norm": POS,
    "update.weight_decay": GE0,
    "update.lora.r": GE1,
    "update.lora.dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "update.ppo_epochs": GE1,
    "update.group_size": (lambda v: v >= 2, "must be >= 2: a group rule compares its samples"),
    "update.clip_low": (lambda v: 0 < v < 1, "must be in (0, 1): the ratio's floor is 1 - it"),
    "update.clip_high": POS,
    "update.num_iterations": GE1,
    "update.refill_rounds": GE0,
    "update.kl_loss_coef": GE0,
    "update.tis_cap": (lambda v: v > 1, "must be > 1: the largest trainer/sampler ratio kept"),
    "update.clip_range": POS,
    "update.kl_coef": GE0,
    "update.nll_coef": GE0,
    "update.reward_clip": POS,
    "update.value_clip": POS,
    "update.vf_coef": GE0,
    "update.gamma": UNIT_CLOSED,
    "update.lam": UNIT_CLOSED,
    "update.target_kl": POS,  # a divisor of the adaptive KL controller
    "update.kl_horizon": GE1,  # a divisor too
    "update.value_layers": GE1,
    "update.lora.alpha": POS,
    "pairs.length_penalty": GE0,
    "pairs.min_margin": GE0,
    "prompts.synthetic.examples": GE1,
    "prompts.synthetic.candidates": GE1,
    "prompts.synthetic.temperature": (GE0[0], "must be >= 0 (0: greedy)"),
    "prompts.synthetic.top_p": UNIT,
    "prompts.synthetic.max_tokens": GE1,
    "prompts.synthetic.min_words": GE1,
    "prompts.synthetic.max_overlap": UNIT,
    "prompts.synthetic.max_rounds": GE1,
    "update.sync_every": GE1,
    "update.num_processes": GE1,
    "prompts.per_iteration": GE1,
    "prompts.heldout": (GE1[0], "must be >= 1 (the KL gate and the win rate need them)"),
    "evaluate.samples": (GE1[0], "must be >= 1 (the KL gate needs samples)"),
    "evaluate.batch_size": GE1,
    "threads": GE0,
    "handoff.max_kl": (POS[0], "must be > 0 (nats per sequence)"),
    "handoff.kl_target": (lambda v: 0 < v <= 1, "must be in (0, 1] (a share of handoff.max_kl)"),
    "handoff.constrain_prompts": GE1,
    "handoff.max_length_ratio": (lambda v: v is None or v > 0, "must be > 0 (null: no gate)"),
    "handoff.min_lc_win_rate": (lambda v: v is None or 0 <= v <= 1, "must be in [0, 1] or null"),
    "handoff.reward_tolerance_se": (lambda v: v is None or v >= 0, "must be >= 0 or null"),
    "generate.n": GE1,
    "generate.temperature": (GE0[0], "must be >= 0 (0: greedy)"),
    "generate.top_p": UNIT,
    "generate.max_tokens": GE1,
    "generate.shard_size": GE1,
    "generate.batch_size": GE1,
    "generate.workers": GE1,
    "generate.threads": (GE0[0], "must be >= 0 (0: an equal share of the cores)"),
    "generate.tensor_parallel_size": GE1,
    "generate.sleep_level": (lambda v: v in (0, 1, 2), "must be 0, 1 or 2"),
    "generate.gpu_memory_utilization": UNIT,
    "generate.engine_stall_s": (GE0[0], "must be >= 0 (0: wait forever)"),
    "model.max_length": (lambda v: v >= 2, "must be >= 2"),
    "reward.epochs": GE1,
    "reward.batch_size": GE1,
    "reward.grad_accum": GE1,
    "reward.score_batch_size": GE1,
    "reward.function_timeout_s": (GE0[0], "must be >= 0 (0: no limit)"),
    "reward.lr": FINITE_POS,
    "reward.workers": GE1,
    "reward.threads": GE0,
    "reward.max_length": (lambda v: v >= 2, "must be >= 2"),
    "reward.heldout_fraction": OPEN_UNIT,
    "reward.label_noise": BELOW_HALF,
    "reward.ensemble": GE1,
    "reward.uncertainty_coef": GE0,
    "reward.refresh.pairs": (GE0[0], "must be >= 0 (0: no refresh)"),
    "reward.refresh.epochs": GE1,
    "reward.refresh.replay": GE0,
    "reward.refresh.lr": (lambda v: v is None or (math.isfinite(v) and v > 0), "must be > 0"),
    "track.samples": (GE0[0], "must be >= 0 (responses per side in the samples table)"),
}


def _get(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _numbers(obj, prefix: str = ""):
    """(key, value) of every number in the config, lists' items named ``key[i]``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{prefix[:-1]}[{i}].")
    elif isinstance(obj, float):
        yield prefix[:-1], obj


def check(cfg: Config) -> None:
    """Raise ``BadInput`` for the first bad setting found."""
    for key, value in _numbers(plain(cfg)):  # nan (or inf) passes every comparison's test
        need(not math.isnan(value), key, value, "must be a number")
        need(math.isfinite(value) or key in ALLOW_INF, key, value, "must be finite")
    runs, run = Path(cfg.runs_dir).resolve(), (Path(cfg.runs_dir) / cfg.run_name).resolve()
    need(
        run != runs and run.is_relative_to(runs),
        "run_name",
        cfg.run_name,
        "must name a folder inside runs_dir",
    )
    for key, (ok, says) in RANGES.items():
        value = _get(cfg, key)
        need(ok(value), key, value, says)
    uc, gc, sc = cfg.update, cfg.generate, cfg.prompts.synthetic
    need(
        sc.max_words >= sc.min_words,
        "prompts.synthetic.max_words",
        sc.max_words,
        f"must be >= prompts.synthetic.min_words ({sc.min_words})",
    )
    need(
        cfg.handoff.constrain or not cfg.handoff.extrapolate,
        "handoff.extrapolate",
        True,
        "needs handoff.constrain=true (the extrapolation is the KL constraint's search past 1)",
    )
    _sampling(cfg)
    need(
        gc.max_tokens < cfg.model.max_length,
        "generate.max_tokens",
        gc.max_tokens,
        f"must be < model.max_length ({cfg.model.max_length}), which holds prompt and response",
    )
    _together(cfg)
    if unused := unread(uc):  # a sweep over rules shares its overrides: said, not refused
        own = ", ".join(rule(uc.name).keys) or "none beyond the shared ones"
        log.warning(
            "update=%s does not read %s (another rule's); its own settings: %s",
            uc.name,
            ", ".join(f"update.{k}={getattr(uc, k)}" for k in unused),
            own,
        )
    _device(cfg)
    model_folder("model.path", cfg.model.path, "model")
    _positions("model.max_length", cfg.model.max_length, cfg.model.path, cfg)
    _memory(cfg)
    _reward(cfg)
    _refresh(cfg)
    _evaluation(cfg)
    _trackers(cfg)
    _files(cfg)


def _sampling(cfg: Config) -> None:
    """What the rule needs of the sampling: n >= 2 and a temperature for pairs, a
    temperature and room for DAPO's overlong buffer for groups."""
    uc, gc = cfg.update, cfg.generate
    if not rule(uc.name).on_policy:
        need(
            gc.n >= 2, "generate.n", gc.n, f"update={uc.name} needs >= 2 samples per prompt to pair"
        )
        need(
            gc.temperature > 0,
            "generate.temperature",
            gc.temperature,
            f"must be > 0 for update={uc.name}: greedy sampling gives the n samples of a "
            "prompt all alike, so no pair (and vLLM refuses n > 1 at temperature 0)",
        )
    if rule(uc.name).groups:
        room = f"must be in [0, generate.max_tokens={gc.max_tokens})"
        need(
            0 <= uc.overlong_buffer < gc.max_tokens,
            "update.overlong_buffer",
            uc.overlong_buffer,
            room,
        )
        need(
            gc.temperature > 0,
            "generate.temperature",
            gc.temperature,
            f"must be > 0 for update={uc.name}: greedy sampling gives a group's samples all "
            "alike, so every advantage is 0",
        )


def _files(cfg: Config) -> None:
    """The prompt and preference files the config names exist (their contents are read,
    and checked row by row, by the stages that load them)."""
    pc, rc = cfg.prompts, cfg.reward
    if pc.heldout_path and not Path(pc.heldout_path).exists():
        raise BadInput(f"prompts.heldout_path={pc.heldout_path!r}: no such file or folder")
    if str(pc.source) == "file":
        if not pc.path:
            raise BadInput("prompts.path is not set but prompts.source is file")
        if not Path(pc.path).exists():
            raise BadInput(f"prompts.path={pc.path!r}: no such file or folder")
    if rewards.trains_model(cfg) and str(rc.source) == "files":
        for k, d in enumerate(rc.data):
            if not Path(d.path).exists():
                raise BadInput(f"reward.data[{k}].path={d.path!r}: no such file or folder")
            need(d.weight > 0, f"reward.data[{k}].weight", d.weight, "must be > 0")
    if rewards.trains_model(cfg) and str(rc.source) == "policy":
        if not rc.prompts or not Path(rc.prompts).exists():
            raise BadInput(
                f"reward.prompts={rc.prompts!r}: no such file or folder (the "
                "initial policy's prompts for reward.source=policy)"
            )
        check_spec(cfg, "reward.label_function", rc.label_function)
        need(rc.samples >= 2, "reward.samples", rc.samples, "must be >= 2 (a pair per prompt)")


def _together(cfg: Config) -> None:
    """Settings that only make sense together, found at start-up rather than when their
    stage is reached."""
    uc, gc = cfg.update, cfg.generate
    if str(gc.backend) != "vllm" and gc.workers > 1:
        raise BadInput(
            f"generate.workers={gc.workers} needs generate.backend=vllm (engine processes); "
            "the transformers backend samples in the stage's own process"
        )
    if uc.num_processes > 1 and rule(uc.name).on_policy:
        raise BadInput(
            f"update.num_processes={uc.num_processes}: several processes run the pair rules; "
            f"update={uc.name} rolls out inside its update and runs in one process (set "
            "update.num_processes=1)"
        )
    if uc.num_processes > 1 and str(uc.strategy) != "ddp" and not _cuda(cfg):
        raise BadInput(
            f"update.strategy={uc.strategy} needs CUDA: accelerate applies FSDP and DeepSpeed "
            "on an accelerator only; on CPU use update.strategy=ddp"
        )


def _device(cfg: Config) -> None:
    if str(cfg.device) == "cuda" and not _cuda_visible():
        raise BadInput(
            f"device={cfg.device}: no CUDA device is visible here (torch.cuda.is_available() is "
            "false); use device=cpu, or device=auto to take a GPU when there is one"
        )


def _cuda(cfg: Config) -> bool:
    """Whether the run will use CUDA."""
    return str(cfg.device) == "cuda" or (str(cfg.device) == "auto" and _cuda_visible())


def _cuda_visible() -> bool:
    import torch  # here, not at import: validation is read without torch

    return torch.cuda.is_available()


POSITIONS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _positions(key: str, max_length: int, path: str | None, cfg: Config) -> None:
    """``max_length`` within the positions the model at ``path`` (the toy world's when
    ``None``) has: vLLM refuses a longer ``max_model_len`` when its engine starts, and a
    model with learned positions fails on the first longer sequence."""
    if path is None:
        have, name = cfg.toy.max_position_embeddings, "the toy world's model"
    else:
        config = model_config(path)
        config = {**config.get("text_config", {}), **config}
        have = next((config[k] for k in POSITIONS if isinstance(config.get(k), int)), None)
        name = path
    need(
        have is None or max_length <= have,
        key,
        max_length,
        f"{name} has {have} positions: at most {have} tokens of prompt and response (lower {key})",
    )


# what one row (a response and its prompt) of a shard costs in memory, per token, held in
# Python lists and strings: ids (a list of ints: ~36 bytes each), text and the Arrow copy
BYTES_PER_TOKEN = 64


def _total_memory() -> int:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _memory(cfg: Config) -> None:
    """Upper bounds sized to the machine: the rows a stage holds at once (a shard of
    ``generate.shard_size`` prompts × ``generate.n`` samples; the held-out prompts ×
    ``evaluate.samples``), each up to ``model.max_length`` tokens, must fit in half of its
    memory, or the run would be killed for memory, maybe hours in."""
    total = _total_memory()
    if not total:
        return
    tokens, gc = cfg.model.max_length * BYTES_PER_TOKEN, cfg.generate
    for key, rows, what in (
        ("generate.n", gc.shard_size * gc.n, f"a shard of {gc.shard_size} prompts"),
        (
            "evaluate.samples",
            cfg.prompts.heldout * cfg.evaluate.samples,
            f"{cfg.prompts.heldout} held-out prompts",
        ),
    ):
        held, gib = rows * tokens, 2**30
        need(
            held <= total // 2,
            key,
            _get(cfg, key),
            f"{what} with this many samples each, of up to {cfg.model.max_length} tokens, "
            f"hold ~{held / gib:.0f} GiB at once; this machine has {total / gib:.0f} GiB "
            "(fewer samples, or a smaller generate.shard_size)",
        )


def _trackers(cfg: Config) -> None:
    """Each tracker of ``report_to`` importable: found at start-up, not at the first step."""
    import importlib.util

    for name in map(str, cfg.report_to):
        if importlib.util.find_spec(name) is None:
            raise BadInput(
                f"report_to=[{name}]: the {name} package is not installed; "
                'pip install -e ".[trackers]" installs every tracker'
            )


def _evaluation(cfg: Config) -> None:
    """The evaluation's reference file and its judges: found at start-up, each judge of a
    kind that can be one (``Kind.evaluator``) with its own settings checked by its kind, a
    model named by its path, each named once."""
    ref = cfg.evaluate.reference
    need(
        (str(ref.kind) == "file") == bool(ref.path),
        "evaluate.reference.path",
        ref.path,
        "is the reference outputs file of evaluate.reference.kind=file, and only of it",
    )
    if ref.path and not Path(ref.path).exists():
        raise BadInput(f"evaluate.reference.path={ref.path!r}: no such file or folder")
    if ref.path:  # its fields and outputs, now rather than after an iteration
        from iterate.stages import heldout

        heldout.outputs(str(ref.path), ref.prompt_field, ref.output_field)
    names = [rewards.source_name(p) for p in cfg.evaluate.judges]
    can = [k.name for k in rewards.KINDS.values() if k.evaluator]
    for k, (part, name) in enumerate(zip(cfg.evaluate.judges, names, strict=True)):
        key = f"evaluate.judges[{k}]"
        row = rewards.kind(part.kind, f"{key}.kind")
        need(row.evaluator, f"{key}.kind", str(part.kind), f"must be {', '.join(can)}")
        need(
            re.fullmatch(r"[\w-]+", name) is not None
            and names.count(name) == 1
            and name not in ("reward", "gold"),
            f"{key}.name",
            name,
            "must be a word "
            "that no other judge has, not 'reward' nor 'gold' (the run's own judges)",
        )
        if row.folder:
            need(bool(part.path), f"{key}.path", part.path, "must name the judge's model")
            _folder(row, f"{key}.path", part.path)
        row.check(cfg, part, key)


def _folder(row, key: str, path: str) -> None:
    """A model of a kind's: a reward model's folder with a score head, another a model's."""
    if row.folder == "reward model":
        reward_folder(key, path)
    else:
        model_folder(key, path, row.folder)


def _reward(cfg: Config) -> None:
    """The run's reward, checked by its kind (a function importable, a mixture's sources, a
    pairwise model's or a judge's settings), and its model's folders: found at start-up,
    not after generation."""
    rc = cfg.reward
    row = rewards.kind(rc.kind)
    row.check(cfg, rc, "reward")
    if not rewards.has_model(cfg):
        return
    if not rc.train:
        if not rc.path:
            raise BadInput("reward.path is not set but reward.train is false: set one or the other")
        _folder(rewards.model_row(cfg), "reward.path", rc.path)
    base = (rc.base or cfg.model.path) if rc.train else rc.path
    _positions("reward.max_length", rc.max_length, base, cfg)
    if rc.base:
        model_folder("reward.base", rc.base, "model")


def _refresh(cfg: Config) -> None:
    fc = cfg.reward.refresh
    if not rewards.refreshes(cfg):
        return
    if rule(cfg.update.name).on_policy:
        raise BadInput(
            f"reward.refresh.pairs={fc.pairs}: the refresh learns from best-of-n samples, which "
            f"update={cfg.update.name} does not draw (its rollouts are inside its update)"
        )
    need(
        fc.pairs >= 2 or str(fc.judge) == "file",
        "reward.refresh.pairs",
        fc.pairs,
        "must be >= 2 (a fifth of the judged pairs measures the refreshed model)",
    )
    judge = str(fc.judge)
    if judge == "gold" and str(cfg.prompts.source) != "toy":
        raise BadInput(
            "reward.refresh.judge=gold: the gold judge knows only the toy world's prompts; "
            "use judge=model with judge_path, or judge=file with path, or turn the refresh "
            "off with reward.refresh.pairs=0"
        )
    if judge == "model":
        if not fc.judge_path:
            raise BadInput("reward.refresh.judge=model needs reward.refresh.judge_path")
        reward_folder("reward.refresh.judge_path", fc.judge_path)
    if judge == "file" and (not fc.path or "{iteration}" not in fc.path):
        raise BadInput(
            f"reward.refresh.path={fc.path!r}: judge=file needs a path with {{iteration}} "
            "in it, e.g. labels/iter_{iteration}.jsonl"
        )
