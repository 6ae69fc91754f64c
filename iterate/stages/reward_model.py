"""Reward-model training (Bradley–Terry, or a pairwise preference model: also what a
comparing judge is trained as here), the stage before iteration 0, and the fitting the
reward refresh (``iterate.stages.reward``) reuses. Scoring is ``iterate.rewards.scorer`` (a
pairwise model's, ``iterate.rewards.pairwise_model``).

Training pairs come from the toy world (two responses of different styles to one prompt,
labelled by the gold judge, with label noise) or from preference files
(``iterate.preferences``). The model is ``AutoModelForSequenceClassification`` with one
label, trained with ``-logsigmoid(r_chosen - r_rejected)``, through a LoRA ``SEQ_CLS``
adapter (merged on save) or by full fine-tuning; ``reward.ensemble`` > 1 trains several,
each on its own bootstrap sample. Output: ``runs/<run>/reward_model/{model/,
train_log.jsonl, _DONE.json}`` with held-out pair accuracy, the loss curve, sizes and
dropped rows by reason. A toy-world reward model is kept in ``.cache/reward_models/`` and
reused by any run of the same config.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections import Counter
from functools import partial
from pathlib import Path

import torch

from iterate import faults, preferences, rewards
from iterate.config import Config, RewardConfig
from iterate.errors import BadInput
from iterate.preferences import Pair
from iterate.rewards import pairwise_model as pairwise
from iterate.rewards.scorer import ENSEMBLE, Scorer, aggregate, encode, forward_rewards, load_model
from iterate.store import cachekey
from iterate.store.paths import TRAIN_LOG, Paths
from iterate.store.shards import TEMPORARY, atomic_write_json, read_json, write_folder
from iterate.store.stage import DONE, DamagedStage, Stage, counted
from iterate.toy import world
from iterate.train import losses
from iterate.train.loop import optimise, rounded, shuffled
from iterate.train.models import for_training, load_policy, load_tokenizer, with_lora

log = logging.getLogger(__name__)


def toy_pairs(
    n: int, instructions: list[world.Instruction], noise: float, seed: int
) -> tuple[list[Pair], Counter]:
    """Pairs of differently styled responses, chosen by the gold judge, flipped with p=noise."""
    rng = random.Random(seed)
    pairs, dropped = [], Counter()
    while len(pairs) < n:
        ins = rng.choice(instructions)
        (_, a), (_, b) = world.sample_response(ins, rng), world.sample_response(ins, rng)
        ga, gb = world.gold_score(ins.prompt, a), world.gold_score(ins.prompt, b)
        if ga == gb:
            dropped["gold_tie"] += 1
            continue
        chosen, rejected = (a, b) if ga > gb else (b, a)
        if rng.random() < noise:
            chosen, rejected = rejected, chosen
        pairs.append(Pair([{"role": "user", "content": ins.prompt}], chosen, rejected))
    return pairs, dropped


def policy_pairs(cfg: Config, paths: Paths, base: str) -> tuple[list[Pair], Counter]:
    """The seeds' pipeline (``reward.source=policy``): the initial policy ``base`` samples
    ``reward.samples`` responses to each of the first ``reward.num_pairs`` prompts of
    ``reward.prompts`` (at ``generate``'s temperature, top-p and length, shards in
    ``reward_model/samples/``, resumable), ``reward.label_function`` scores them, and each
    prompt's best and worst response make a pair (``pairs.select``, ``max_min``); a prompt
    whose responses all score alike (a tie) or that cannot be scored is dropped and
    counted."""
    from iterate.sampling import samplers
    from iterate.stages import prompts as sources
    from iterate.stages.pairs import select
    from iterate.store import seeds
    from iterate.store.shards import read_shards, shard_path, write_shard
    from iterate.train import models

    rc, gc, dropped = cfg.reward, cfg.generate, Counter()
    names = list(cfg.prompts.fields)
    rows = sources.read(
        rc.prompts, rc.prompts, cfg.prompts.field, names, dropped, setting="reward.prompts"
    )[: rc.num_pairs]
    first = shard_path(paths.reward_model_prompts, 0)
    if not first.exists():  # (a finished stage's file is never written again: a refresh reads it)
        fields = {sources.prompt_id(t): f for t, f in rows} if names else None
        write_shard(sources.table([t for t, _ in rows], fields), first)
    tok = models.load_tokenizer(base, cfg.model.chat_template)
    table = read_shards(paths.reward_model_prompts)
    shards, too_long = samplers.plan(
        tok, table, cfg.model.max_length - gc.max_tokens, gc.shard_size
    )
    dropped += too_long
    params = samplers.Params(
        n=rc.samples, temperature=gc.temperature, top_p=gc.top_p, max_tokens=gc.max_tokens
    )
    out = paths.reward_model_samples
    if todo := samplers.missing(shards, out):
        with samplers.session(cfg) as sampler:
            sampler.load(base)
            samplers.write_shards(
                sampler,
                todo,
                params,
                lambda k: seeds.derive("rm", cfg.seed, k),
                out,
                (-1, "reward_model"),
                "reward-model samples",
            )
    samples = read_shards(out)
    label = labeller(cfg, paths)
    texts, responses = samples["prompt"].to_pylist(), samples["response"].to_pylist()
    scores = label.score(texts, responses, desc="reward-model labels")
    by_prompt: dict[str, list[tuple[float, str]]] = {}
    for t, r, s in zip(texts, responses, scores, strict=True):
        by_prompt.setdefault(t, []).append((s, r))
    pairs = []
    for t, scored in by_prompt.items():
        got = select([s for s, _ in scored], "max_min", random.Random(0))  # (no draw in max_min)
        if isinstance(got, str):
            dropped[got] += 1
            continue
        chosen, rejected = (scored[k][1] for k in got)
        pairs.append(Pair(models.as_messages(t), chosen, rejected, where=f"{rc.prompts}: {t}"))
    return pairs, dropped


def labeller(cfg: Config, paths: Paths) -> rewards.FunctionReward:
    """``reward.label_function``: what scores the initial policy's samples (``source=policy``)."""
    rc = cfg.reward
    return rewards.FunctionReward(
        rc.label_function,
        rc.score_batch_size,
        tuple(cfg.prompts.fields),
        str(paths.run),
        key="reward.label_function",
        timeout_s=rc.function_timeout_s,
    )


def split(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """Pairs split into (train, held out) by a hash of each pair's conversation and chosen
    response (copies stay together); at least one pair on each side."""
    key = [json.dumps(p.messages) + p.chosen for p in pairs]
    held = [world.is_heldout(k, fraction) for k in key]
    if all(held) or not any(held):  # tiny files: keep at least one pair on each side
        every = max(2, round(1 / max(fraction, 1e-3)))
        held = [i % every == 0 for i in range(len(pairs))]
    return [p for p, h in zip(pairs, held) if not h], [p for p, h in zip(pairs, held) if h]


def build_pairs(cfg: Config, paths: Paths, base: str) -> tuple[list[Pair], list[Pair], dict]:
    rc = cfg.reward
    info: dict = {"source": rc.source}
    if rc.source == "policy":
        pairs, dropped = policy_pairs(cfg, paths, base)
        info.update(dropped=dict(dropped), pairs=len(pairs))
        if len(pairs) < 2:
            raise BadInput(
                f"reward.source=policy: {len(pairs)} pairs from {rc.prompts} after "
                f"dropping {dict(dropped)}: sample more (reward.num_pairs, "
                "reward.samples)"
            )
        return (*split(pairs, rc.heldout_fraction), info)
    if rc.source == "toy":
        train_ins, heldout_ins = world.split(cfg.toy.heldout_fraction)
        n_held = max(1, int(rc.num_pairs * rc.heldout_fraction))
        train, d1 = toy_pairs(rc.num_pairs - n_held, train_ins, rc.label_noise, cfg.seed)
        heldout, d2 = toy_pairs(n_held, heldout_ins, 0.0, cfg.seed + 1)  # gold labels, no noise
        info["dropped"] = dict(d1 + d2)
        return train, heldout, info
    if not rc.data:
        raise BadInput("reward.source=files needs reward.data: a list of {path, weight}")
    pairs, sources, examples = preferences.load_mixture(rc.data, cfg.seed)
    for msg in examples:
        log.warning("dropped: %s", msg)
    dropped = sum((Counter(s["dropped"]) for s in sources.values()), Counter())
    rows = sum(s["rows"] for s in sources.values())
    info.update(sources=sources, dropped=dict(dropped), dropped_examples=examples, rows=rows)
    if len(pairs) < 2:
        names = ", ".join(sources)
        raise BadInput(f"{names}: {len(pairs)} usable pairs after dropping {dict(dropped)}")
    return (*split(pairs, rc.heldout_fraction), info)


def _new_model(rc: RewardConfig, start: str, seed: int, new_head: bool = True, pair=None):
    """A reward model to train: ``start`` (a causal LM given a fresh scalar head, or with
    ``new_head=False`` a reward model to go on training) with a fresh LoRA adapter; with
    ``pair`` (a comparison template), ``start`` as the causal LM of a pairwise model."""
    torch.manual_seed(seed)
    if pair is not None:
        model = with_lora(load_policy(start, str(rc.dtype)).train(), rc.lora)
        tokenizer = load_tokenizer(start, rc.chat_template)
    else:
        model, tokenizer = load_model(start, rc.dtype, new_head=new_head, template=rc.chat_template)
        model = with_lora(model, rc.lora, "SEQ_CLS")
    # what it trains in float32 (a bf16 head or whole model would not move at a small lr)
    return for_training(model, str(rc.dtype), next(model.parameters()).device), tokenizer


def pairwise_accuracy(scorer: pairwise.PairwiseScorer, pairs: list[Pair]) -> dict:
    """A pairwise model on pairs: the share it prefers the chosen response (both orders
    averaged), the mean cross-entropy of that preference, and the preferences."""
    scorer.model.eval()
    p = scorer.prefer(
        [x.messages for x in pairs],
        [x.chosen for x in pairs],
        [x.rejected for x in pairs],
        "pairwise eval",
    )
    loss = [-math.log(max(v, 1e-12)) for v in p]
    return {
        "accuracy": sum(v > 0.5 for v in p) / len(p),
        "loss": sum(loss) / len(p),
        "mean": 0.0,
        "rewards": p,
    }


def accuracy(scorer: Scorer, pairs: list[Pair]) -> dict:
    """Share of pairs where r(chosen) > r(rejected), the mean BT loss, the mean reward over
    both responses (an ensemble member's offset), and the rewards (chosen, rejected, ...)."""
    for m in scorer.models:
        m.eval()
    r = torch.tensor(
        scorer.score(
            [p.messages for p in pairs for _ in (0, 1)],
            [r for p in pairs for r in (p.chosen, p.rejected)],
            desc="RM eval",
        )
    )
    rc, rr = r[0::2], r[1::2]
    return {
        "accuracy": (rc > rr).float().mean().item(),
        "loss": losses.bradley_terry(rc, rr).mean().item(),
        "mean": r.mean().item(),
        "rewards": r.tolist(),
    }


def encode_pairs(
    tokenizer, pairs: list[Pair], max_length: int, pair: str | None = None
) -> tuple[list, list[Pair], Counter, list[str]]:
    """Token ids of each pair's two conversations (with ``pair``, a comparison template:
    the pairwise model's two comparisons, the chosen response first and second); a pair
    whose conversation the chat template refuses (roles that do not alternate, a system
    turn it has no place for) is dropped and counted, and the first one reported with its
    file and row."""
    from jinja2.exceptions import TemplateError

    enc, kept, dropped, examples = [], [], Counter(), []
    for p in pairs:
        try:
            if pair is not None:
                c, r = p.chosen, p.rejected
                enc.append(
                    tuple(
                        pairwise.encode(tokenizer, pair, p.messages, max_length, a=x, b=y)
                        for x, y in ((c, r), (r, c))
                    )
                )
            else:
                enc.append(
                    tuple(
                        encode(tokenizer, p.messages, r, max_length) for r in (p.chosen, p.rejected)
                    )
                )
            kept.append(p)
        except TemplateError as e:
            dropped["template_refused"] += 1
            if not examples:
                examples.append(f"{p.where or 'a pair'}: the chat template refused it: {e}")
    return enc, kept, dropped, examples


def warmup_cosine(s: int, steps: int) -> float:
    """The learning-rate factor at optimiser step ``s`` (from 0) of ``steps``: a linear
    warm-up over the first twentieth of the steps (at least one), then a cosine decay that
    reaches 0 at ``steps``."""
    warmup = max(1, steps // 20)
    return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def bradley_terry(model, batch: list, pad_id: int):
    """Per pair ``-logsigmoid(r_chosen - r_rejected)`` and whether r_chosen > r_rejected;
    ``batch``: (chosen ids, rejected ids)."""
    n = len(batch)
    r = forward_rewards(model, [c for c, _ in batch] + [j for _, j in batch], pad_id)
    return losses.bradley_terry(r[:n], r[n:]), (r[:n] > r[n:]).float()


def fit(
    model,
    pad_id: int,
    enc: list,
    rc: RewardConfig,
    epochs: int,
    lr: float,
    seed: int,
    desc: str = "reward model",
    objective=bradley_terry,
) -> list[dict]:
    """The reward model's training over encoded pairs ``enc``, through the one loop
    (``train.loop.optimise``: each step clipped to norm 1, skipped and counted when its
    loss or gradient is not finite): the Bradley–Terry loss (``-logsigmoid(r_chosen -
    r_rejected)``; or ``objective(model, batch, pad_id)`` -> (per pair, correct per pair):
    a pairwise model's ``pairwise.pair_loss``), AdamW, linear warm-up then cosine decay
    (``warmup_cosine``), the pairs shuffled each epoch, ``rc.batch_size`` pairs per forward
    pass, ``rc.grad_accum`` passes per step. Returns the per-step log rows.

    Each member trains in one call, redone whole after a crash (no resume points inside:
    ``fit_members`` keeps the members already saved)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    per_step = rc.batch_size * rc.grad_accum
    steps = epochs * -(-len(enc) // per_step)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps))

    def step_loss(idx: list[int]) -> tuple[float, dict]:
        loss_sum, correct = 0.0, 0.0
        for m in range(0, len(idx), rc.batch_size):  # gradient accumulation
            batch = [enc[i] for i in idx[m : m + rc.batch_size]]
            per_pair, right = objective(model, batch, pad_id)
            (per_pair.sum() / len(idx)).backward()
            loss_sum += per_pair.sum().item()
            correct += right.sum().item()
        return loss_sum / len(idx), {"accuracy": correct / len(idx)}

    rows: list[dict] = []

    def on_step(row: dict) -> dict:
        rows.append(rounded(row))
        return rows[-1]

    optimise(
        model,
        opt,
        params,
        shuffled(len(enc), per_step, epochs, g),
        step_loss,
        total=steps,
        desc=desc,
        schedule=schedule,
        on_step=on_step,
    )
    return rows


def bootstrap(n: int, seed: int) -> list[int]:
    """n indices drawn with replacement: an ensemble member's sample of the pairs."""
    rng = random.Random(seed)
    return [rng.randrange(n) for _ in range(n)]


def _fit_member(
    rc: RewardConfig,
    start: str,
    folder: Path,
    enc: list,
    heldout: list[Pair],
    seed: int,
    epochs: int,
    lr: float,
    new_head: bool,
    name: str,
    pair: str | None = None,
) -> dict:
    """Train one reward model (with ``pair``, a pairwise model) from ``start`` on ``enc``,
    measure it on ``heldout``, save it (merged) as ``folder`` with its report in
    ``member.json``, written before the rename into place: a folder with it is complete.
    Returns the report."""
    model, tok = _new_model(rc, start, seed, new_head, pair)
    if pair is not None:
        scorer = pairwise.PairwiseScorer(model, tok, rc.max_length, rc.score_batch_size, pair)
        objective = partial(
            pairwise.pair_loss,
            answers=scorer.answers,
            whole_vocab=rewards.kind(rc.kind).whole_vocab,
        )
        rows = fit(model, tok.pad_token_id, enc, rc, epochs, lr, seed, name, objective)
        held = pairwise_accuracy(scorer, heldout)
    else:
        rows = fit(model, tok.pad_token_id, enc, rc, epochs, lr, seed, name)
        held = accuracy(Scorer(model, tok, rc.max_length, rc.score_batch_size), heldout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rc.lora.enabled:
        model = model.merge_and_unload()
    if skipped := sum(r["skipped"] for r in rows):
        log.warning(
            "%s: %d of %d steps skipped (a loss or gradient not finite)", name, skipped, len(rows)
        )
    report = {
        "steps": len(rows),
        "skipped_steps": skipped,
        "heldout_accuracy": round(held["accuracy"], 4),
        "heldout_loss": round(held["loss"], 4),
        "offset": held["mean"],
        "heldout_rewards": held["rewards"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": trainable,
        "log": rows,
    }

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "member.json", report)

    write_folder(folder, save, replace=True)
    return report


def fit_members(
    rc: RewardConfig,
    starts: list[str],
    out: Path,
    pairs: list[Pair],
    heldout: list[Pair],
    seed: int,
    epochs: int,
    lr: float,
    new_head: bool,
    stage: tuple[int, str] = (-1, "reward_model"),
    pair: str | None = None,
) -> dict:
    """Train one reward model per start into ``out``: member j from ``starts[j]``, on a
    bootstrap sample of ``pairs`` (all of them for one model), with its own seed. One model
    is saved as ``out`` itself; an ensemble as ``out/member_j`` and ``out/ensemble.json``
    (members and offsets). A member already saved (a resumed stage) is not trained again.
    Returns the training report: held-out accuracy (the ensemble's), members, steps, dropped
    pairs, and the loss curve."""
    k = len(starts)
    tokenizer = load_tokenizer(starts[0], rc.chat_template)
    enc, pairs, refused, examples = encode_pairs(tokenizer, pairs, rc.max_length, pair)
    _, heldout, refused_held, more = encode_pairs(tokenizer, heldout, rc.max_length, pair)
    for msg in (examples + more)[:1]:
        log.warning("dropped: %s", msg)
    if not enc or not heldout:
        raise BadInput(f"reward model: no pairs left to train or evaluate on ({refused})")
    reports = []
    for j in range(k):
        folder = out if k == 1 else out / f"member_{j}"
        if (folder / "member.json").exists():  # saved before an interruption
            reports.append(read_json(folder / "member.json", must_exist=True))
            continue
        data = enc if k == 1 else [enc[i] for i in bootstrap(len(enc), seed * 1000 + j)]
        name = "reward model" if k == 1 else f"reward model {j + 1}/{k}"
        reports.append(
            _fit_member(
                rc, starts[j], folder, data, heldout, seed + j, epochs, lr, new_head, name, pair
            )
        )
        faults.point(*stage, j + 1)  # (iteration, stage name): -1 before iteration 0
    held = reports[0]["heldout_accuracy"]
    if k > 1:
        offsets = [r["offset"] for r in reports]
        index = {"members": [f"member_{j}" for j in range(k)], "offsets": offsets}
        atomic_write_json(out / ENSEMBLE, index)
        # the ensemble's own accuracy: the mean of its members' centred held-out rewards
        r = torch.tensor([r["heldout_rewards"] for r in reports]) - torch.tensor(offsets)[:, None]
        mean = aggregate(r, "mean")
        held = round((mean[0::2] > mean[1::2]).float().mean().item(), 4)
    drop = ("log", "heldout_rewards")
    summaries = [
        {"member": j, **{n: v for n, v in r.items() if n not in drop}}
        for j, r in enumerate(reports)
    ]
    return {
        "heldout_accuracy": held,
        "members": summaries if k > 1 else [],
        "heldout_loss": reports[0]["heldout_loss"],
        "steps": sum(r["steps"] for r in reports),
        "parameters": reports[0]["parameters"],
        "trainable_parameters": reports[0]["trainable_parameters"],
        "train_pairs": len(pairs),
        "heldout_pairs": len(heldout),
        "refused": dict(refused + refused_held),
        "log": [{"member": j, **row} for j, r in enumerate(reports) for row in r["log"]],
    }


def train(cfg: Config, paths: Paths) -> dict:
    """Train the reward model into ``paths.reward_model_dir``; returns the ``_DONE`` info."""
    rc = cfg.reward
    base = rc.base or paths.base_policy
    conf = {"reward": counted(cfg, "reward"), "seed": cfg.seed, "base": base}
    if rc.source == "policy":  # what labels its pairs: editing the function redoes the stage
        conf["label_identity"] = labeller(cfg, paths).identity()
    pair = rewards.comparison(cfg)
    if pair is not None:  # a model answering A or B: what it is shown (a Bradley-Terry one: none)
        conf["pairwise_template"] = pair
        if rewards.kind(rc.kind).whole_vocab:  # trained to write its answer (``pair_loss``)
            conf["objective"] = "whole_vocab"
    stage = Stage(paths.reward_model_dir, "reward_model", conf)
    if stage.check(cfg.force):
        log.info("reward model: done already (%s)", stage.done_path)
        return stage.read_done()
    cache = cache_dir(cfg, paths, stage)
    if cache is not None and _cached(cache):
        _copy(cache, stage.path)
        log.info("reward model: trained before with this very config, reused: %s", cache)
        return stage.read_done()
    train_pairs, heldout, info = build_pairs(cfg, paths, base)
    out = paths.trained_reward_model
    fitted = fit_members(
        rc,
        [base] * rc.ensemble,
        out,
        train_pairs,
        heldout,
        cfg.seed,
        rc.epochs,
        rc.lr,
        True,
        pair=pair,
    )
    info["dropped"] = dict(Counter(info.get("dropped", {})) + Counter(fitted.pop("refused")))
    rows = fitted.pop("log")
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (paths.reward_model_dir / TRAIN_LOG).write_text(lines)
    last = [r["loss"] for r in rows[-10:]]
    done = stage.finish(
        **info,
        base=str(base),
        **fitted,
        loss_curve=[r["loss"] for r in rows[:: max(1, len(rows) // 50)]],
        final_train_loss=round(sum(last) / max(1, len(last)), 4),
    )
    log.info(
        "reward model: %d train / %d held-out pairs, held-out accuracy %.3f, %.0fs",
        done["train_pairs"],
        done["heldout_pairs"],
        done["heldout_accuracy"],
        done["seconds"],
    )
    if cache is not None and not cache.exists():  # for the next run with this config
        write_folder(cache, lambda tmp: _copy(stage.path, tmp))  # another run's is kept
    return done


def cache_dir(cfg: Config, paths: Paths, stage: Stage) -> Path | None:
    """Where a toy-world reward model of this config is kept for other runs (a sweep's jobs
    with the same seed train the same one): beside the toy world's cache, named by the stage
    config, the code that trains it and the libraries' versions (``cachekey.key``), verified
    (checksums) before each reuse. Only for the toy world, whose pairs are a function of the
    config; a preference file can change under its name."""
    if not cfg.reward.cache or str(cfg.reward.source) != "toy" or paths.toy is None:
        return None
    key = cachekey.key(stage.config, __name__)
    return Path(cfg.toy.cache_dir).parent / "reward_models" / key


def _cached(cache: Path) -> bool:
    """The cache holds a finished reward model whose files are intact (a damaged one is
    removed, to be trained again)."""
    if not (cache / DONE).exists():
        return False
    try:
        Stage(cache, "reward_model", {}).verify()
        return True
    except DamagedStage as e:
        log.warning("%s: the cached reward model is trained again", e)
        shutil.rmtree(cache)
        return False


def _copy(src: Path, dst: Path) -> None:
    """Copies, not links: a toy reward model is a few MB, and a run's files must not share
    bytes with the cache or another run (a file rewritten in place would change them all)."""
    ignore = lambda _, names: [n for n in names if TEMPORARY.search(n)]  # noqa: E731
    shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)
