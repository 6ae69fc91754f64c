"""Build the toy world once: tokenizer, small Llama policy, short SFT on mixed-quality data.

The result is cached under ``<cache_dir>/<key>/`` (``iterate.store.cachekey``: the ToyConfig, the
code that builds it, the libraries' versions) and reused, so the second
run is instant. The build is deterministic: the same config gives byte-identical tokenizer
and weights (``world.json`` records their hashes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path

import torch

from iterate.config import ToyConfig
from iterate.sampling import samplers
from iterate.store import cachekey
from iterate.toy import world
from iterate.train import models
from iterate.train.loop import optimise, shuffled

log = logging.getLogger(__name__)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
# transformers renders templates with trim_blocks: a newline right after a block tag is
# dropped, so newlines after tags are written as expressions.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def config_hash(cfg: ToyConfig) -> str:
    """The world's cache key: its config, the code that builds it and the libraries', so an
    edited recipe (or training loop, or library) rebuilds."""
    d = dataclasses.asdict(cfg)
    for key in ("cache_dir", "writer_examples", "writer_epochs"):  # the writer has its own folder
        d.pop(key)
    return cachekey.key(d, __name__)


def world_dir(cfg: ToyConfig) -> Path:
    return Path(cfg.cache_dir) / config_hash(cfg)


def ensure(cfg: ToyConfig) -> Path:
    """Return the folder of the built toy world, building it first if needed."""
    return cachekey.cached(world_dir(cfg), "the toy world", lambda tmp: build(cfg, tmp), _summary)


def _summary(info: dict) -> str:
    ev = info["eval"]
    return (
        f"{info['parameters'] / 1e6:.2f}M parameters, SFT loss {info['sft_final_loss']:.3f}, "
        f"held-out gold mean {ev['gold_mean']:.3f} "
        f"(best-of-{ev['n']} {ev['gold_best_of_n_mean']:.3f})"
    )


def train_tokenizer(cfg: ToyConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(world.corpus(random.Random(cfg.seed)), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def new_policy(cfg: ToyConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    mcfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(mcfg)


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS, and the number of prompt tokens."""
    p = models.prompt_ids(tokenizer, prompt)
    return p + models.response_ids(tokenizer, response), len(p)


def sft_data(cfg: ToyConfig, tokenizer) -> list[tuple[list[int], int]]:
    rng = random.Random(cfg.seed + 1)
    train, _ = world.split(cfg.heldout_fraction)
    out = []
    for _ in range(cfg.sft_examples):
        ins = rng.choice(train)
        _, resp = world.sample_response(ins, rng)
        ids, n_prompt = encode_example(tokenizer, ins.prompt, resp)
        out.append((ids[: cfg.max_position_embeddings], n_prompt))
    return out


def sft(cfg: ToyConfig, model, tokenizer, data) -> list[float]:
    """Next-token loss on response tokens only; AdamW with cosine decay, through the one loop
    (``train.loop.optimise``). Returns the losses."""
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(data) / cfg.sft_batch_size)
    total = steps_per_epoch * cfg.sft_epochs
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / total))
    )

    def step_loss(batch) -> tuple[float, dict]:
        ids, labels, mask = collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.item(), {}

    losses: list[float] = []

    def on_step(row: dict) -> dict:
        losses.append(round(row["loss"], 4))
        return row

    optimise(
        model,
        opt,
        params,
        (
            (e, [data[j] for j in idx])
            for e, idx in shuffled(len(data), cfg.sft_batch_size, cfg.sft_epochs, g)
        ),
        step_loss,
        total=total,
        desc="toy SFT",
        schedule=schedule,
        on_step=on_step,
    )
    return losses


def collate(batch, pad_id: int):
    """Right-padded ids, labels (-100 on prompt and padding) and attention mask."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (seq, n_prompt) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
        mask[row, : len(seq)] = 1
    return ids, labels, mask


def evaluate(
    model, tokenizer, cfg: ToyConfig, n: int = 8, prompts: int = 128, max_tokens: int = 48
) -> dict:
    """Gold mean of one sample vs the gold judge's pick of best-of-n, on held-out prompts."""
    _, heldout = world.split(cfg.heldout_fraction)
    rng = random.Random(cfg.seed + 2)
    chosen = rng.sample(heldout, min(prompts, len(heldout)))
    sampler = samplers.TransformersSampler(samplers.Spec(batch_size=32))
    sampler.sync(model, tokenizer, "")
    params = samplers.Params(n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens)
    samples = sampler.sample(
        [models.prompt_ids(tokenizer, i.prompt) for i in chosen], params, cfg.seed
    )
    texts = [[s.text for s in per_prompt] for per_prompt in samples]
    scores = [[world.gold_score(i.prompt, t) for t in ts] for i, ts in zip(chosen, texts)]
    return {
        "prompts": len(chosen),
        "n": n,
        "max_tokens": max_tokens,
        "gold_mean": round(sum(s for ss in scores for s in ss) / (n * len(chosen)), 4),
        "gold_best_of_n_mean": round(sum(max(ss) for ss in scores) / len(chosen), 4),
        "examples": [
            {"prompt": i.prompt, "response": ts[0]} for i, ts in zip(chosen[:4], texts[:4])
        ],
    }


def build(cfg: ToyConfig, out: Path) -> dict:
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(cfg)
    model = new_policy(cfg, tokenizer)
    losses = sft(cfg, model, tokenizer, sft_data(cfg, tokenizer))
    model.generation_config.do_sample = True
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ev = evaluate(model, tokenizer, cfg)
    return {
        "config": dataclasses.asdict(cfg),
        "config_hash": config_hash(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "sft_steps": len(losses),
        "sft_final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "sft_losses": losses[:: max(1, len(losses) // 50)],
        "eval": ev,
        "hashes": {
            "tokenizer.json": cachekey.file_hash(out / "tokenizer.json"),
            "model.safetensors": cachekey.file_hash(out / "model.safetensors"),
        },
    }
