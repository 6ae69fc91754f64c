"""The one scorer of the loop, and reward-model training (Bradley–Terry), the stage before
iteration 0.

``Scorer.score(prompts, responses)`` is how every stage scores responses (labelling, the
held-out evaluation, PPO / ReMax rollouts, the benchmark): each conversation is rendered in
the reward model's own chat template (the policy's may differ; never a double BOS) and
scored in length-sorted batches.

Training pairs come from the toy world (two responses of different styles to one prompt,
labelled by the gold judge, with label noise) or from an HH-RLHF-format file (``iterate.hh``).
The model is ``AutoModelForSequenceClassification`` with one label, trained with
``-logsigmoid(r_chosen - r_rejected)``, through a LoRA ``SEQ_CLS`` adapter (merged on save)
or by full fine-tuning. Output: ``runs/<run>/reward_model/{model/, train_log.jsonl,
_DONE.json}`` with held-out pair accuracy, the loss curve, sizes and dropped rows by reason.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from collections import Counter
from functools import partial
from pathlib import Path

import torch

from iterate import faults, losses, preferences, progress, workers
from iterate.config import Config, RewardConfig, plain
from iterate.models import DTYPES, as_messages, load_tokenizer, named, pad
from iterate.paths import Paths
from iterate.preferences import Messages, Pair
from iterate.shards import (
    DONE,
    TEMPORARY,
    DamagedStage,
    Stage,
    atomic_write_json,
    config_hash,
)
from iterate.toy import world

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


def encode(tokenizer, messages: Messages, response: str, max_length: int) -> list[int]:
    """Token ids of a conversation in the reward model's own chat template.

    The text is rendered with the template, then tokenized without adding special tokens
    when the template already starts with BOS: never a double BOS.
    """
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
    else:  # HH-style plain transcript
        names = {"user": "Human", "assistant": "Assistant", "system": "System"}
        text = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)
        text += f"\n\nAssistant: {response}"
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special, truncation=True, max_length=max_length)[
        "input_ids"
    ]


def forward_rewards(model, seqs: list[list[int]], pad_id: int, dev=None) -> torch.Tensor:
    ids, mask = pad(seqs, pad_id)
    if dev is not None:
        ids, mask = ids.to(dev), mask.to(dev)
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def load_model(
    path: str, dtype: str = "float32", new_head: bool = False, template: str | None = None
):
    """A reward model and its tokenizer, ready to score (pad token set; ``template``
    replaces its chat template). ``new_head``: the path is a causal LM whose body gets a
    fresh scalar head (its LM head is dropped), so transformers' load report of exactly
    that is not shown."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    tokenizer = load_tokenizer(path, template)
    report = hf_logging.get_logger("transformers.modeling_utils")  # its load report
    level = report.level
    if new_head:
        report.setLevel(hf_logging.ERROR)
    try:
        with named(path, "reward model"):
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=DTYPES[str(dtype)]
            )
    finally:
        report.setLevel(level)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


ENSEMBLE = "ensemble.json"  # in a reward-model folder that holds an ensemble's members


def members(path: str) -> tuple[list[str], list[float]]:
    """The model folders of a reward model and the offset subtracted from each member's
    reward: ``[path], [0.0]`` for one model; an ensemble folder lists its members and
    centres each on its mean reward over its held-out pairs, so their spread is
    disagreement, not the arbitrary offset each Bradley–Terry model learns."""
    index = Path(path) / ENSEMBLE
    if not index.exists():
        return [path], [0.0]
    e = json.loads(index.read_text())
    return [str(Path(path) / m) for m in e["members"]], [float(o) for o in e["offsets"]]


def aggregate(r: torch.Tensor, how: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """One reward per column of the members' rewards ``r`` (k, B): their mean, the mean
    minus ``coef`` times their standard deviation, or their minimum."""
    if how == "mean":
        return r.mean(0)
    if how == "mean_minus_std":
        return r.mean(0) - coef * r.std(0, unbiased=False)
    if how == "min":
        return r.min(0).values
    raise ValueError(f"unknown aggregate {how!r}")


class Scorer:
    """Rewards for (prompt, response) pairs from one reward model or an ensemble of them:
    ``score(prompts, responses)``. A prompt is a stored prompt (text, or a JSON list of
    messages) or a list of messages; the template switch happens here, in ``encode``. An
    ensemble's members (``model`` a list; one tokenizer) give (reward - offset) each, and
    ``aggregate`` makes them one."""

    def __init__(
        self, model, tokenizer, max_length: int, batch_size: int = 64,
        offsets: list[float] | None = None, how: str = "mean", coef: float = 1.0,
    ):  # fmt: skip
        self.models = model if isinstance(model, list) else [model]
        self.model = self.models[0]
        self.tokenizer = tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.offsets = torch.tensor(offsets or [0.0] * len(self.models))
        self.how, self.coef = how, coef

    @classmethod
    def load(
        cls, path: str, dtype: str, max_length: int, batch_size: int, device=None, template=None,
        how: str = "mean", coef: float = 1.0,
    ) -> Scorer:  # fmt: skip
        folders, offsets = members(path)
        models = []
        for folder in folders:
            model, tokenizer = load_model(folder, dtype, template=template)
            for p in model.parameters():
                p.requires_grad_(False)
            models.append(model.to(device or "cpu"))
        return cls(models, tokenizer, max_length, batch_size, offsets, how, coef)

    @classmethod
    def of(cls, rc: RewardConfig, path: str, device=None) -> Scorer:
        """The run's scorer: the reward model at ``path`` with the settings of ``reward``."""
        return cls.load(
            path, str(rc.dtype), rc.max_length, rc.score_batch_size, device, rc.chat_template,
            str(rc.aggregate), rc.uncertainty_coef,
        )  # fmt: skip

    def encode(self, prompt: str | Messages, response: str) -> list[int]:
        messages = as_messages(prompt) if isinstance(prompt, str) else prompt
        return encode(self.tokenizer, messages, response, self.max_length)

    @torch.no_grad()
    def score(
        self, prompts: list, responses: list[str], desc: str = "score", refusals: bool = False,
        spread: bool = False,
    ):  # fmt: skip
        """Rewards in the order given. With ``refusals``, a conversation the reward model's
        chat template refuses (e.g. turns that do not alternate) scores ``None`` instead of
        raising, for the caller to count and drop. With ``spread``, also the ensemble
        members' standard deviation per conversation (``None`` for one model):
        ``(rewards, spreads)``."""
        from jinja2.exceptions import TemplateError

        seqs: dict[int, list[int]] = {}
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            try:
                seqs[i] = self.encode(p, r)
            except TemplateError:
                if not refusals:
                    raise
        order = sorted(seqs, key=lambda i: len(seqs[i]))  # little padding
        out: list[float | None] = [None] * len(prompts)
        std: list[float | None] = [None] * len(prompts)
        dev = next(self.model.parameters()).device
        bar = progress.bar(len(seqs), desc, "seq")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [seqs[i] for i in idx]
            r = (
                torch.stack(
                    [
                        forward_rewards(m, batch, self.tokenizer.pad_token_id, dev)
                        for m in self.models
                    ]
                ).cpu()
                - self.offsets[:, None]
            )
            for i, v in zip(idx, aggregate(r, self.how, self.coef).tolist()):
                out[i] = v
            if len(self.models) > 1:
                for i, v in zip(idx, r.std(0, unbiased=False).tolist()):
                    std[i] = v
            bar.update(len(idx))
        bar.close()
        return (out, std) if spread else out


_WORKER_SCORER: Scorer | None = None  # in a scoring worker process


def _start_worker(rc: RewardConfig, path: str, device: str, threads: int) -> None:
    global _WORKER_SCORER
    if threads:
        torch.set_num_threads(threads)
    _WORKER_SCORER = Scorer.of(rc, path, torch.device(device))


def _score_in_worker(prompts: list, responses: list[str], desc: str, spread: bool):
    return _WORKER_SCORER.score(prompts, responses, desc=desc, refusals=True, spread=spread)


class ScorerPool:
    """Rewards for many shards at once: ``score_each(keys, texts, done)`` scores each job (a
    shard's prompts and responses, ``texts(key)``, read when its turn comes) in one
    ``Scorer.score`` call and hands the rewards to ``done(key, rewards)`` as each finishes
    (``None`` for a conversation the reward model's chat template refuses). With
    ``reward.workers`` = 1 it scores in this process; with N > 1 the jobs are dealt out
    among N processes (one per GPU, or each with ``reward.threads`` CPU threads), each
    holding its own copy of the reward model. A job's rewards are the same whichever worker
    scores it."""

    def __init__(self, rc: RewardConfig, path: str, device: torch.device):
        self.rc, self.path, self.device = rc, path, device
        self.pools: list = []
        self.scorer: Scorer | None = None

    def _open(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if self.rc.workers == 1:
            self.scorer = self.scorer or Scorer.of(self.rc, self.path, self.device)
            return
        if self.pools:
            return
        n_gpu = torch.cuda.device_count() if self.device.type == "cuda" else 0
        threads = workers.share(self.rc.workers, self.rc.threads)
        for w in range(self.rc.workers):
            device = f"cuda:{w % n_gpu}" if n_gpu else "cpu"
            self.pools.append(
                ProcessPoolExecutor(
                    1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=(self.rc, self.path, device, 0 if n_gpu else threads),
                )
            )

    def score_each(self, keys, texts, done, desc: str = "score", spread: bool = False) -> None:
        """``texts(key)`` -> (prompts, responses); ``done(key, rewards)`` per finished job
        (``rewards`` is ``(rewards, spreads)`` with ``spread``, see ``Scorer.score``).
        Each worker holds one job's texts at a time."""
        self._open()

        def work(w: int, mine: list) -> None:
            for k in mine:
                if self.scorer is not None:
                    got = self.scorer.score(*texts(k), desc=desc, refusals=True, spread=spread)
                else:
                    job = self.pools[w].submit(_score_in_worker, *texts(k), desc, spread)
                    got = job.result()
                done(k, got)

        groups = workers.deal(keys, max(1, len(self.pools)))
        workers.run_each([partial(work, w, mine) for w, mine in enumerate(groups)])

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown()
        self.pools, self.scorer = [], None

    def __enter__(self) -> ScorerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_pairs(cfg: Config, paths: Paths) -> tuple[list[Pair], list[Pair], dict]:
    rc = cfg.reward
    info: dict = {"source": rc.source}
    if rc.source == "toy":
        train_ins, heldout_ins = world.split(cfg.toy.heldout_fraction)
        n_held = max(1, int(rc.num_pairs * rc.heldout_fraction))
        train, d1 = toy_pairs(rc.num_pairs - n_held, train_ins, rc.label_noise, cfg.seed)
        heldout, d2 = toy_pairs(n_held, heldout_ins, 0.0, cfg.seed + 1)  # gold labels, no noise
        info["dropped"] = dict(d1 + d2)
        return train, heldout, info
    if not rc.data:
        raise ValueError("reward.source=files needs reward.data: a list of {path, weight}")
    pairs, sources, examples = preferences.load_mixture(rc.data, cfg.seed)
    for msg in examples:
        log.warning("dropped: %s", msg)
    dropped = sum((Counter(s["dropped"]) for s in sources.values()), Counter())
    rows = sum(s["rows"] for s in sources.values())
    info.update(sources=sources, dropped=dict(dropped), dropped_examples=examples, rows=rows)
    if len(pairs) < 2:
        names = ", ".join(sources)
        raise ValueError(f"{names}: {len(pairs)} usable pairs after dropping {dict(dropped)}")
    key = [json.dumps(p.messages) + p.chosen for p in pairs]  # copies of a pair stay together
    held = [world.is_heldout(k, rc.heldout_fraction) for k in key]
    if all(held) or not any(held):  # tiny files: keep at least one pair on each side
        every = max(2, round(1 / max(rc.heldout_fraction, 1e-3)))
        held = [i % every == 0 for i in range(len(pairs))]
    train = [p for p, h in zip(pairs, held) if not h]
    return train, [p for p, h in zip(pairs, held) if h], info


def _new_model(rc: RewardConfig, start: str, seed: int, new_head: bool = True):
    """A reward model to train: ``start`` (a causal LM given a fresh scalar head, or with
    ``new_head=False`` a reward model to go on training) with a fresh LoRA adapter."""
    torch.manual_seed(seed)
    model, tokenizer = load_model(start, rc.dtype, new_head=new_head, template=rc.chat_template)
    if rc.lora.enabled:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=rc.lora.r,
                lora_alpha=rc.lora.alpha,
                lora_dropout=rc.lora.dropout,
                target_modules=rc.lora.target_modules,
            ),
        )
    return model, tokenizer


def accuracy(scorer: Scorer, pairs: list[Pair]) -> dict:
    """Share of pairs where r(chosen) > r(rejected), the mean BT loss, and the mean reward
    over both responses (an ensemble member's offset)."""
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
    }


def encode_pairs(
    tokenizer, pairs: list[Pair], max_length: int
) -> tuple[list, list[Pair], Counter, list[str]]:
    """Token ids of each pair's two conversations; a pair whose conversation the chat
    template refuses (roles that do not alternate, a system turn it has no place for) is
    dropped and counted, and the first one reported with its file and row."""
    from jinja2.exceptions import TemplateError

    enc, kept, dropped, examples = [], [], Counter(), []
    for p in pairs:
        try:
            enc.append(
                tuple(encode(tokenizer, p.messages, r, max_length) for r in (p.chosen, p.rejected))
            )
            kept.append(p)
        except TemplateError as e:
            dropped["template_refused"] += 1
            if not examples:
                examples.append(f"{p.where or 'a pair'}: the chat template refused it: {e}")
    return enc, kept, dropped, examples


def fit(model, pad_id: int, enc: list, rc: RewardConfig, epochs: int, lr: float, seed: int,
        desc: str = "reward model") -> list[dict]:  # fmt: skip
    """The Bradley–Terry training loop (``-logsigmoid(r_chosen - r_rejected)``) over encoded
    pairs ``enc`` [(chosen ids, rejected ids)]: AdamW, linear warm-up then cosine decay,
    ``rc.batch_size`` pairs per forward pass, ``rc.grad_accum`` passes per step. Returns
    the per-step log rows."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    per_step = rc.batch_size * rc.grad_accum
    steps = epochs * -(-len(enc) // per_step)
    warmup = max(1, steps // 20)

    def lr_at(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    bar = progress.bar(steps, desc, "step")
    log_rows, step = [], 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(enc), generator=g).tolist()
        for start in range(0, len(order), per_step):
            idx = order[start : start + per_step]
            opt.zero_grad(set_to_none=True)
            loss_sum, correct = 0.0, 0.0
            for m in range(0, len(idx), rc.batch_size):  # gradient accumulation
                batch = [enc[i] for i in idx[m : m + rc.batch_size]]
                seqs = [c for c, _ in batch] + [j for _, j in batch]
                r = forward_rewards(model, seqs, pad_id)
                per_pair = losses.bradley_terry(r[: len(batch)], r[len(batch) :])
                (per_pair.sum() / len(idx)).backward()
                loss_sum += per_pair.sum().item()
                correct += (r[: len(batch)] > r[len(batch) :]).float().sum().item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            loss, acc = loss_sum / len(idx), correct / len(idx)
            log_rows.append(
                {"step": step, "epoch": epoch, "loss": round(loss, 5), "accuracy": round(acc, 4)}
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    return log_rows


def bootstrap(n: int, seed: int) -> list[int]:
    """n indices drawn with replacement: an ensemble member's sample of the pairs."""
    rng = random.Random(seed)
    return [rng.randrange(n) for _ in range(n)]


def fit_members(
    rc: RewardConfig, starts: list[str], out: Path, pairs: list[Pair], heldout: list[Pair],
    seed: int, epochs: int, lr: float, new_head: bool,
    stage: tuple[int, str] = (-1, "reward_model"),
) -> dict:  # fmt: skip
    """Train one reward model per start into ``out``: member j from ``starts[j]``, on a
    bootstrap sample of ``pairs`` (all of them for one model), with its own seed. One model
    is saved as ``out`` itself; an ensemble as ``out/member_j`` and ``out/ensemble.json``
    (members and offsets). A member already saved (a resumed stage) is not trained again.
    Returns the training report: held-out accuracy (the ensemble's), members, steps, dropped
    pairs, and the loss curve."""
    k = len(starts)
    tokenizer = load_tokenizer(starts[0], rc.chat_template)
    enc, pairs, refused, examples = encode_pairs(tokenizer, pairs, rc.max_length)
    _, heldout, refused_held, more = encode_pairs(tokenizer, heldout, rc.max_length)
    for msg in (examples + more)[:1]:
        log.warning("dropped: %s", msg)
    if not enc or not heldout:
        raise ValueError(f"reward model: no pairs left to train or evaluate on ({refused})")
    reports = []
    for j in range(k):
        folder = out if k == 1 else out / f"member_{j}"
        marker = folder / "member.json"
        if marker.exists():  # saved before an interruption
            reports.append(json.loads(marker.read_text()))
            continue
        model, tok = _new_model(rc, starts[j], seed + j, new_head)
        data = enc if k == 1 else [enc[i] for i in bootstrap(len(enc), seed * 1000 + j)]
        name = "reward model" if k == 1 else f"reward model {j + 1}/{k}"
        rows = fit(model, tok.pad_token_id, data, rc, epochs, lr, seed + j, name)
        held = accuracy(Scorer(model, tok, rc.max_length, rc.score_batch_size), heldout)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if rc.lora.enabled:
            model = model.merge_and_unload()
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        report = {
            "member": j, "steps": len(rows), "heldout_accuracy": round(held["accuracy"], 4),
            "heldout_loss": round(held["loss"], 4), "offset": held["mean"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": trainable, "log": rows,
        }  # fmt: skip
        atomic_write_json(tmp / "member.json", report)
        if k == 1:
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        reports.append(report)
        faults.point(*stage, j + 1)  # (iteration, stage name): -1 before iteration 0
    if k > 1:
        atomic_write_json(
            out / ENSEMBLE,
            {
                "members": [f"member_{j}" for j in range(k)],
                "offsets": [r["offset"] for r in reports],
            },
        )
    held = reports[0]["heldout_accuracy"]
    if k > 1:  # the ensemble's own: the mean of its members' centred rewards
        ensemble = Scorer.load(str(out), str(rc.dtype), rc.max_length, rc.score_batch_size)
        held = round(accuracy(ensemble, heldout)["accuracy"], 4)
    logs = [{"member": r["member"], **row} for r in reports for row in r["log"]]
    summaries = [{n: v for n, v in r.items() if n != "log"} for r in reports]
    return {
        "heldout_accuracy": held,
        "members": summaries if k > 1 else [],
        "heldout_loss": reports[0]["heldout_loss"],
        "steps": sum(r["steps"] for r in reports),
        "parameters": reports[0]["parameters"],
        "trainable_parameters": reports[0]["trainable_parameters"],
        "train_pairs": len(pairs), "heldout_pairs": len(heldout),
        "refused": dict(refused + refused_held),
        "log": logs,
    }  # fmt: skip


def train(cfg: Config, paths: Paths) -> dict:
    """Train the reward model into ``paths.reward_model_dir``; returns the ``_DONE`` info."""
    rc = cfg.reward
    # how scoring runs and how an ensemble's rewards are combined: the stages that score
    # record those; the refresh is a later stage's
    how = ("workers", "threads", "aggregate", "uncertainty_coef", "refresh", "cache")
    reward = {k: v for k, v in plain(rc).items() if k not in how}
    conf = {"reward": reward, "seed": cfg.seed, "base": rc.base or paths.base_policy}
    stage = Stage(paths.reward_model_dir, "reward_model", conf)
    if stage.check(cfg.force):
        log.info("reward model: done already (%s)", stage.done_path)
        return stage.read_done()
    cache = cache_dir(cfg, paths, stage)
    if cache is not None and (cache / DONE).exists():
        try:
            Stage(cache, "reward_model", {}).verify()
        except DamagedStage as e:
            log.warning("%s: the cached reward model is trained again", e)
            shutil.rmtree(cache)
    if cache is not None and (cache / DONE).exists():
        copy_tree(cache, stage.path)
        log.info("reward model: trained before with this very config, reused: %s", cache)
        return stage.read_done()
    train_pairs, heldout, info = build_pairs(cfg, paths)
    base = rc.base or paths.base_policy
    out = paths.reward_model_dir / "model"
    fitted = fit_members(
        rc, [base] * rc.ensemble, out, train_pairs, heldout, cfg.seed, rc.epochs, rc.lr, True
    )
    info["dropped"] = dict(Counter(info.get("dropped", {})) + Counter(fitted.pop("refused")))
    rows = fitted.pop("log")
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (paths.reward_model_dir / "train_log.jsonl").write_text(lines)
    last = [r["loss"] for r in rows[-10:]]
    done = stage.finish(
        **info, base=str(base), **fitted,
        loss_curve=[r["loss"] for r in rows[:: max(1, len(rows) // 50)]],
        final_train_loss=round(sum(last) / max(1, len(last)), 4),
    )  # fmt: skip
    log.info(
        "reward model: %d train / %d held-out pairs, held-out accuracy %.3f, %.0fs",
        done["train_pairs"], done["heldout_pairs"], done["heldout_accuracy"], done["seconds"],
    )  # fmt: skip
    if cache is not None and not cache.exists():  # for the next run with this config
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        copy_tree(stage.path, tmp)
        if not cache.exists():
            os.replace(tmp, cache)
        shutil.rmtree(tmp, ignore_errors=True)
    return done


def cache_dir(cfg: Config, paths: Paths, stage: Stage) -> Path | None:
    """Where a toy-world reward model of this config is kept for other runs (a sweep's jobs
    with the same seed train the same one): beside the toy world's cache, named by the
    stage config's hash, verified (checksums) before each reuse. Only for the toy world,
    whose pairs are a function of the config; a preference file can change under its name."""
    if not cfg.reward.cache or str(cfg.reward.source) != "toy" or paths.toy is None:
        return None
    return Path(cfg.toy.cache_dir).parent / "reward_models" / config_hash(stage.config)


def copy_tree(src: Path, dst: Path) -> None:
    """``src``'s files at the same places under ``dst``. Copies, not links: a toy reward
    model is a few MB, and a run's files must not share bytes with the cache or another
    run (a file rewritten in place would change them all)."""
    for f in sorted(src.rglob("*")):
        if f.is_dir() or TEMPORARY.search(f.name):
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        shutil.copy2(f, target)
