"""Every setting checked before any work starts: ranges, paths that must be loadable
folders (or hub ids), and settings that only make sense together. A bad one raises
``BadInput`` naming the key, its value and what to do. The command line turns it into one
line and exit status 2 (``iterate.__main__``)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from iterate import packaged, rewards
from iterate.config import Config, plain
from iterate.errors import BadInput
from iterate.rules import rule
from iterate.shards import read_json

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


def _need(ok: bool, key: str, value, says: str) -> None:
    if not ok:
        raise BadInput(f"{key}={value!r}: {says}")


def hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a hub repository id (``org/name``) and is no local path;
    else None."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")):
        return None
    return name if HUB_ID.match(name) else None


def _model_folder(key: str, path: str | None, what: str) -> None:
    """A local folder with a config.json, or something shaped like a hub id."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").exists() and not (p / "ensemble.json").exists():
            raise BadInput(
                f"{key}={path!r}: the folder has no config.json; point it at a saved {what} "
                "(save_pretrained) folder"
            )
        return
    if name := packaged.which(path):
        raise BadInput(f"{key}={path!r}: the folder of the packaged model {name} is not made "
                       f"yet: {packaged.command(name)}")  # fmt: skip
    if not hub_id(path):
        raise BadInput(
            f"{key}={path!r}: no such {what} folder (and not a hub id of the form org/name)"
        )


def reward_head(key: str, path: str, architectures: list[str] | None) -> None:
    """A checkpoint used as a reward model must have a score head: a causal LM (or any
    other head) loaded as one would get a random head, and its rewards would be noise that
    a run optimises without a word. (Training a reward model here starts from a causal LM
    on purpose: ``reward.base``.)"""
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise BadInput(
            f"{key}={path!r}: a {architectures[0]} checkpoint, not a reward model (it has no "
            "score head: its rewards would be random); point it at a sequence-classification "
            f"checkpoint, or train one here from it (reward.train=true reward.base={path})"
        )


def _model_config(path: str | None) -> dict:
    """A local model folder's config.json ({} for a hub id, or a damaged file, which the
    load names)."""
    if not path:
        return {}
    try:
        return read_json(Path(path) / "config.json") or {}
    except BadInput:
        return {}


def _reward_folder(key: str, path: str | None) -> None:
    """A reward model's folder: loadable, and with a score head when its config says."""
    _model_folder(key, path, "reward model")
    if path:
        reward_head(key, path, _model_config(path).get("architectures"))


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
        _need(not math.isnan(value), key, value, "must be a number")
        _need(math.isfinite(value) or key in ALLOW_INF, key, value, "must be finite")
    runs, run = Path(cfg.runs_dir).resolve(), (Path(cfg.runs_dir) / cfg.run_name).resolve()
    _need(run != runs and run.is_relative_to(runs), "run_name", cfg.run_name,
          "must name a folder inside runs_dir")  # fmt: skip
    for key, (ok, says) in RANGES.items():
        value = _get(cfg, key)
        _need(ok(value), key, value, says)
    uc, gc, pc, rc = cfg.update, cfg.generate, cfg.prompts, cfg.reward
    sc = pc.synthetic
    _need(sc.max_words >= sc.min_words, "prompts.synthetic.max_words", sc.max_words,
          f"must be >= prompts.synthetic.min_words ({sc.min_words})")  # fmt: skip
    if not rule(uc.name).on_policy:
        _need(
            gc.n >= 2, "generate.n", gc.n, f"update={uc.name} needs >= 2 samples per prompt to pair"
        )
        _need(gc.temperature > 0, "generate.temperature", gc.temperature,
              f"must be > 0 for update={uc.name}: greedy sampling gives the n samples of a "
              "prompt all alike, so no pair (and vLLM refuses n > 1 at temperature 0)")  # fmt: skip
    if rule(uc.name).groups:
        room = f"must be in [0, generate.max_tokens={gc.max_tokens})"
        _need(0 <= uc.overlong_buffer < gc.max_tokens, "update.overlong_buffer",
              uc.overlong_buffer, room)  # fmt: skip
        _need(gc.temperature > 0, "generate.temperature", gc.temperature,
              f"must be > 0 for update={uc.name}: greedy sampling gives a group's samples all "
              "alike, so every advantage is 0")  # fmt: skip
    _need(
        gc.max_tokens < cfg.model.max_length,
        "generate.max_tokens",
        gc.max_tokens,
        f"must be < model.max_length ({cfg.model.max_length}), which holds prompt and response",
    )
    _together(cfg)
    _device(cfg)
    _model_folder("model.path", cfg.model.path, "model")
    _positions("model.max_length", cfg.model.max_length, cfg.model.path, cfg)
    _memory(cfg)
    _reward(cfg)
    _refresh(cfg)
    _evaluation(cfg)
    _trackers(cfg)
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
            _need(d.weight > 0, f"reward.data[{k}].weight", d.weight, "must be > 0")
    if rewards.trains_model(cfg) and str(rc.source) == "policy":
        if not rc.prompts or not Path(rc.prompts).exists():
            raise BadInput(f"reward.prompts={rc.prompts!r}: no such file or folder (the "
                           "initial policy's prompts for reward.source=policy)")  # fmt: skip
        _function("reward.label_function", rc.label_function, cfg)
        _need(rc.samples >= 2, "reward.samples", rc.samples, "must be >= 2 (a pair per prompt)")


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
        config = _model_config(path)
        config = {**config.get("text_config", {}), **config}
        have = next((config[k] for k in POSITIONS if isinstance(config.get(k), int)), None)
        name = path
    _need(have is None or max_length <= have, key, max_length,
          f"{name} has {have} positions: at most {have} tokens of prompt and response "
          f"(lower {key})")  # fmt: skip


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
        ("evaluate.samples", cfg.prompts.heldout * cfg.evaluate.samples,
         f"{cfg.prompts.heldout} held-out prompts"),
    ):  # fmt: skip
        need, gib = rows * tokens, 2**30
        _need(need <= total // 2, key, _get(cfg, key),
              f"{what} with this many samples each, of up to {cfg.model.max_length} tokens, "
              f"hold ~{need / gib:.0f} GiB at once; this machine has {total / gib:.0f} GiB "
              "(fewer samples, or a smaller generate.shard_size)")  # fmt: skip


def _trackers(cfg: Config) -> None:
    """Each tracker of ``report_to`` importable: found at start-up, not at the first step."""
    import importlib.util

    for name in map(str, cfg.report_to):
        if importlib.util.find_spec(name) is None:
            raise BadInput(
                f"report_to=[{name}]: the {name} package is not installed; "
                'pip install -e ".[trackers]" installs every tracker'
            )


def _function(key: str, spec: str | None, cfg: Config) -> None:
    """A reward function importable (its module loads and has the function), and every
    prompt-row field it needs named in ``prompts.fields``."""
    if not spec:
        raise BadInput(f"{key} is not set: package.module:function or path/to/file.py:function")
    fn, _ = rewards.load_function(spec, key)
    _, needed, _ = rewards.takes(fn)
    if missing := sorted(needed - set(cfg.prompts.fields)):
        raise BadInput(
            f"{key}={spec}: it takes {', '.join(map(repr, missing))}, not a setting but a "
            f"field of the prompt rows: name it in prompts.fields (prompts.fields="
            f"[{','.join(sorted(needed))}]; the prompts' source needs that column), or give "
            "the parameter a default"
        )


def _mixture(cfg: Config) -> None:
    """Each source of a mixture: a function or a model, named once."""
    sources = cfg.reward.sources
    _need(bool(sources), "reward.sources", [], "reward.kind=mixture needs sources: "
          "[{kind: model, weight: 1}, {kind: function, function: ..., weight: -0.01}]")  # fmt: skip
    names = [rewards.source_name(p) for p in sources]
    for k, (part, name) in enumerate(zip(sources, names, strict=True)):
        key = f"reward.sources[{k}]"
        _need(str(part.kind) in ("model", "function"), f"{key}.kind", str(part.kind),
              "must be model or function")  # fmt: skip
        _need(re.fullmatch(r"\w+", name) is not None and names.count(name) == 1
              and name != "reward", f"{key}.name", name, "must be a word (letters, digits, _) "
              "that no other source has, not 'reward' (the sum's): it names the source's "
              "column, source_<name>")  # fmt: skip
        if str(part.kind) == "function":
            _function(f"{key}.function", part.function, cfg)
        elif part.path:
            _reward_folder(f"{key}.path", part.path)
    weights = [p.weight for p in sources]
    _need(
        any(weights),
        "reward.sources[*].weight",
        weights,
        "at least one must not be 0 "
        "(every weight 0: a reward of 0 for every response, nothing to learn from)",
    )


def _evaluation(cfg: Config) -> None:
    """The evaluation's reference file and its judges: found at start-up, each judge a
    function, a reward model or a pairwise model, named once."""
    ref = cfg.evaluate.reference
    _need(
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
    for k, (part, name) in enumerate(zip(cfg.evaluate.judges, names, strict=True)):
        key = f"evaluate.judges[{k}]"
        _need(str(part.kind) in ("function", "model", "pairwise"), f"{key}.kind",
              str(part.kind), "must be function, model or pairwise")  # fmt: skip
        _need(
            re.fullmatch(r"[\w-]+", name) is not None
            and names.count(name) == 1
            and name not in ("reward", "gold"),
            f"{key}.name",
            name,
            "must be a word "
            "that no other judge has, not 'reward' nor 'gold' (the run's own judges)",
        )
        if str(part.kind) == "function":
            _function(f"{key}.function", part.function, cfg)
        else:
            _need(bool(part.path), f"{key}.path", part.path, "must name the judge's model")
            if str(part.kind) == "pairwise":
                _model_folder(f"{key}.path", part.path, "pairwise model")
            else:
                _reward_folder(f"{key}.path", part.path)


def _pairwise(cfg: Config) -> None:
    """A pairwise model compares the responses to a prompt: for the pair rules' best-of-n
    samples, one model (not an ensemble), a template it can be shown."""
    from iterate import pairwise

    rc = cfg.reward
    if rule(cfg.update.name).on_policy and not rule(cfg.update.name).groups:
        raise BadInput(
            f"reward.kind=pairwise: a pairwise model compares responses to a prompt, and "
            f"update={cfg.update.name} rolls out one per prompt; use a pair rule (dpo, raft), "
            "a group rule (grpo, rloo, reinforce_pp) or a pointwise reward"
        )
    _need(rc.ensemble == 1, "reward.ensemble", rc.ensemble,
          "must be 1 for reward.kind=pairwise (one pairwise model)")  # fmt: skip
    pairwise.template(rc.pairwise_template)  # names what the template lacks
    _causal_lm(rc, "a pairwise model is a causal LM that answers A or B")


def _judge(cfg: Config) -> None:
    """A generative judge: a template and a parser it can use, room for its answer, one
    model; a comparing judge only for the pair rules, a scoring one only loaded."""
    from iterate import judge

    rc, js = cfg.reward, cfg.reward.judge
    mode = str(js.mode)
    if mode == "compare" and rule(cfg.update.name).on_policy and not rule(cfg.update.name).groups:
        raise BadInput(
            f"reward.judge.mode=compare: a comparing judge compares responses to a prompt, "
            f"and update={cfg.update.name} rolls out one per prompt; use a pair rule (dpo, "
            "raft), a group rule (grpo, rloo, reinforce_pp) or reward.judge.mode=score"
        )
    if mode == "score" and rc.train:
        raise BadInput("reward.kind=judge with reward.judge.mode=score: a scoring judge is "
                       "not trained here; set reward.path to the judge model and "
                       "reward.train=false")  # fmt: skip
    _need(rc.ensemble == 1, "reward.ensemble", rc.ensemble,
          "must be 1 for reward.kind=judge (one judge model)")  # fmt: skip
    _need(rc.workers == 1, "reward.workers", rc.workers, "must be 1 for reward.kind=judge: "
          "the judge samples on the run's engines (generate.workers)")  # fmt: skip
    judge.template(mode, js.template)  # names what the template lacks
    judge.pattern(mode, js.pattern)  # names a parser that is no regular expression
    _need(0 < js.max_tokens < rc.max_length // 2, "reward.judge.max_tokens", js.max_tokens,
          f"must be above 0 and leave reward.max_length={rc.max_length} room for what the "
          "judge is shown (at most half of it)")  # fmt: skip
    _need(js.retries >= 0, "reward.judge.retries", js.retries, "must be 0 or more")
    _need(js.temperature >= 0, "reward.judge.temperature", js.temperature, "must be 0 or more")
    _need(js.low < js.high, "reward.judge.low", js.low, f"must be below reward.judge.high="
          f"{js.high}")  # fmt: skip
    _causal_lm(rc, "a judge is a causal LM that writes its answer")


def _causal_lm(rc, says: str) -> None:
    """A loaded reward.path that must be a causal LM (a pairwise model, a judge) is one."""
    if rc.path and not rc.train:
        arch = _model_config(rc.path).get("architectures") or []
        _need(not arch or any(a.endswith("ForCausalLM") for a in arch), "reward.path", rc.path,
              f"a {arch[0] if arch else '?'} checkpoint: {says}")  # fmt: skip


def _reward(cfg: Config) -> None:
    """The reward model's folders, the reward function importable, or a mixture's sources:
    found at start-up, not after generation."""
    rc = cfg.reward
    if str(rc.kind) == "function":
        _function("reward.function", rc.function, cfg)
    if str(rc.kind) == "mixture":
        _mixture(cfg)
    if str(rc.kind) == "pairwise":
        _pairwise(cfg)
    if str(rc.kind) == "judge":
        _judge(cfg)
    if not rewards.has_model(cfg):
        return
    if not rc.train:
        if not rc.path:
            raise BadInput("reward.path is not set but reward.train is false: set one or the other")
        if str(rc.kind) in ("pairwise", "judge"):
            _model_folder("reward.path", rc.path, f"{rc.kind} model")
        else:
            _reward_folder("reward.path", rc.path)
    base = (rc.base or cfg.model.path) if rc.train else rc.path
    _positions("reward.max_length", rc.max_length, base, cfg)
    if rc.base:
        _model_folder("reward.base", rc.base, "model")


def _refresh(cfg: Config) -> None:
    fc = cfg.reward.refresh
    if not rewards.refreshes(cfg):
        return
    if rule(cfg.update.name).on_policy:
        raise BadInput(
            f"reward.refresh.pairs={fc.pairs}: the refresh learns from best-of-n samples, which "
            f"update={cfg.update.name} does not draw (its rollouts are inside its update)"
        )
    _need(fc.pairs >= 2 or str(fc.judge) == "file", "reward.refresh.pairs", fc.pairs,
          "must be >= 2 (a fifth of the judged pairs measures the refreshed model)")  # fmt: skip
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
        _reward_folder("reward.refresh.judge_path", fc.judge_path)
    if judge == "file" and (not fc.path or "{iteration}" not in fc.path):
        raise BadInput(
            f"reward.refresh.path={fc.path!r}: judge=file needs a path with {{iteration}} "
            "in it, e.g. labels/iter_{iteration}.jsonl"
        )
