"""The benchmark's models: the toy policy, random-weight Llamas of about 30M and 100M
parameters built locally with the toy tokenizer (speed does not depend on the weights), and
the real models ``iterate.packaged`` converts (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from iterate.config import ToyConfig
from iterate.store.shards import read_json

# name -> LlamaConfig fields; head_dim 64 (vLLM's CPU attention wants >= 32)
SPECS = {
    "llama30m": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 9,
        "num_attention_heads": 8,
    },
    "llama100m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 14,
        "num_attention_heads": 12,
    },
    # the model-size ladder and the GPU check (``iterate.bench.ladder``)
    "llama500m": {
        "hidden_size": 1536,
        "intermediate_size": 4096,
        "num_hidden_layers": 16,
        "num_attention_heads": 12,
    },
    "llama1.5b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
    },
}


def policy_path(name: str, toy: ToyConfig) -> str:
    """A causal LM folder for ``name``: the toy SFT policy, a real model from the package
    index (``iterate.packaged``: ``smollm2``), or a random Llama built once."""
    from iterate import packaged
    from iterate.toy import build

    if name in packaged.MODELS:
        return str(packaged.ensure(name))
    if name != "toy" and name not in SPECS:
        known = ", ".join(["toy", *packaged.MODELS, *SPECS])
        raise ValueError(f"bench: unknown model {name!r} (known: {known})")
    world = build.ensure(toy)
    if name == "toy":
        return str(world)
    spec = {**SPECS[name], "world": world.name}
    out = (
        Path(toy.cache_dir).parent
        / "bench"
        / f"{name}-{hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]}"
    )
    if (out / "config.json").exists():
        return str(out)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(world)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=SPECS[name]["num_attention_heads"],
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **SPECS[name],
    )
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(cfg), tok, out)


def _save(model, tok, out: Path) -> str:
    """Save under a temporary name, then rename: a folder with config.json is complete."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return str(out)


def reward_path(name: str, toy: ToyConfig) -> str:
    """A sequence-classification (reward) model on ``name``'s body with a fresh scalar head."""
    src = Path(policy_path(name, toy))
    out = src.with_name(src.name + "-rm")
    if (out / "config.json").exists():
        return str(out)
    from iterate.rewards import scorer as scoring

    torch.manual_seed(0)
    model, tok = scoring.load_model(str(src), new_head=True)
    return _save(model, tok, out)


def max_length(path: str) -> int:
    """The longest sequence the model at ``path`` takes (its position embeddings)."""
    return read_json(Path(path) / "config.json", must_exist=True)["max_position_embeddings"]


def matmul_parameters(model) -> int:
    """Parameters that take part in a matmul per token (every Linear, the LM head included;
    not the embedding lookup): the N in ``2 N`` FLOPs per token."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def matmul_rate(dtype: torch.dtype, size: int, reps: int = 5) -> float:
    """The best FLOP/s of a square ``size`` GEMM over ``reps`` tries, in this process."""
    import time

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def rss_mb() -> float:
    """This process's resident memory now, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
