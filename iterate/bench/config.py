"""The benchmark's config schema (values in ``conf/bench.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from iterate.config import ToyConfig

RL_VARIANTS = {
    "ppo": ["update=ppo"],
    "remax": ["update=remax"],
    "grpo": ["update=grpo"],  # no KL term: no reference forward pass
    "grpo_kl": ["update=grpo", "update.kl_loss_coef=0.05"],
    "rloo": ["update=rloo"],
    "reinforce_pp": ["update=reinforce_pp"],
}
SECTIONS = ("generation", "labelling", "update", "backends", "sync", "iteration", "workers")
# run when named (sections=[scale,dedup,padding]): not by default
LONG = ("scale", "dedup", "padding", "ladder", "peers")


@dataclass
class GenerationBench:
    models: list[str] = field(default_factory=lambda: ["toy", "llama30m", "llama100m"])
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    backends: list[str] = field(default_factory=lambda: ["vllm", "transformers"])
    prompts: int = 32
    n: int = 8  # best-of-n
    new_tokens: int = 32  # every sample runs to exactly this many (EOS ignored)
    rounds: int = 3  # alternating vLLM / transformers / matmul rounds; medians reported
    gpu_memory_utilization: float = 0.25
    enforce_eager: bool = (
        True  # false: vLLM compiles the model (longer start, fused elementwise ops)
    )
    matmul_size: int = 2048  # square GEMM for the machine's matmul rate


@dataclass
class LabellingBench:
    models: list[str] = field(default_factory=lambda: ["toy", "llama30m"])
    responses: int = 512
    batch_size: int = 64
    rounds: int = 3


@dataclass
class UpdateBench:
    model: str = "llama30m"
    pairs: int = 16  # pairs per optimiser step
    micro_batch_size: int = 8
    prompt_tokens: int = 24
    response_tokens: int = 48
    steps: int = 4  # per round and variant
    rounds: int = 3
    rl_model: str = "llama30m"  # the on-policy rules' update stages, side by side
    rl_prompts: int = 16
    # the on-policy update stages measured: a name and its overrides of the main config; the
    # first is the baseline of the ratios
    rl_variants: dict[str, list[str]] = field(default_factory=lambda: dict(RL_VARIANTS))
    rl_warmup: bool = True  # the first variant once more first, not counted


@dataclass
class BackendsBench:
    """A PPO update (rollouts every step) and the held-out evaluation, vLLM vs transformers."""

    kinds: list[str] = field(default_factory=lambda: ["rollouts", "evaluation"])
    model: str = "llama30m"
    prompts: int = 32  # the iteration's prompts (rollouts) and the held-out ones (evaluation)
    micro_batch_size: int = 16  # prompts rolled out per PPO step
    max_tokens: int = 32
    samples: int = 4  # evaluate.samples
    rounds: int = 3


@dataclass
class SyncBench:
    """The policy under training into vLLM: merged weights in place vs a LoRA adapter by id."""

    model: str = "llama30m"
    syncs: int = 3
    prompts: int = 16
    n: int = 4
    new_tokens: int = 32
    gpu_memory_utilization: float = 0.25


@dataclass
class WorkersBench:
    """1 worker x T threads against T workers x 1 thread, for generation and the update."""

    model: str = "llama30m"
    threads: int = 2  # T: the cores shared out
    prompts: int = 32
    shards: int = 8
    n: int = 4
    new_tokens: int = 32
    pairs: int = 32  # DPO pairs, one epoch
    micro_batch_size: int = 8
    response_tokens: int = 48
    rounds: int = 3
    warmup: bool = True  # a round first that is not counted (engine starts, first launch)


@dataclass
class ScaleBench:
    """One toy iteration at each size, a run of the program each (``iterate.bench.scale``)."""

    sizes: list[int] = field(default_factory=lambda: [200, 2000, 20000])  # prompts
    n: int = 8  # samples per prompt
    heldout: int = 80
    overrides: list[str] = field(default_factory=list)  # of the main config, for every run
    warmup: bool = True  # the smallest size once first, not counted (toy world, reward model)
    # the near-duplicate filter of synthetic prompts: candidates checked per second with
    # this many known prompts
    known_prompts: list[int] = field(default_factory=lambda: [1000, 10000, 60000])


PADDING_VARIANTS = {  # name -> overrides of the main config; the first is the baseline
    "as before": [],
    "group_by_length": ["update.group_by_length=true"],
    "token budget": ["update.max_tokens_per_micro_batch=4096"],
    "both": ["update.group_by_length=true", "update.max_tokens_per_micro_batch=4096"],
    "both, checkpointing": [
        "update.group_by_length=true",
        "update.max_tokens_per_micro_batch=4096",
        "update.gradient_checkpointing=true",
    ],
}


@dataclass
class PaddingBench:
    """A DPO epoch over pairs of mixed lengths through the one training loop, as before and
    with the length-aware settings; each variant a process of its own (its peak RSS)."""

    model: str = "llama30m"
    pairs: int = 32
    # each sequence (prompt + response) drawn uniformly from this many tokens; a pair's
    # rejected response within 25% of its chosen one's length
    min_tokens: int = 50
    max_tokens: int = 1000
    micro_batch_size: int = 16  # rows per micro-batch, and per optimiser step (grad_accum 1)
    variants: dict[str, list[str]] = field(default_factory=lambda: dict(PADDING_VARIANTS))


@dataclass
class LadderBench:
    """One iteration per random-weight Llama size and variant, each a run of the program
    (``iterate.bench.ladder``); the GPU check runs it on CUDA with the transformers sampler."""

    sizes: list[str] = field(default_factory=lambda: ["llama100m", "llama500m"])
    variants: dict[str, list[str]] = field(
        default_factory=lambda: {
            "dpo_lora": ["update=dpo"],
            "dpo_full": ["update=dpo", "update.lora.enabled=false"],
        }
    )
    device: str = "auto"
    backend: str = "vllm"  # generate.backend
    dtype: str = "bfloat16"
    reward_model: str = "llama30m"  # its body under a fresh scalar head, for every size
    prompts: int = 32
    heldout: int = 8
    n: int = 4
    max_tokens: int = 32
    max_length: int = 256


@dataclass
class PeersDpo:
    pairs: int = 32  # per optimiser step
    micro_batch_size: int = 8
    prompt_tokens: int = 64
    response_tokens: int = 128  # chosen and rejected each


@dataclass
class PeersGrpo:
    prompts: int = 16  # per optimiser step (toy prompts)
    group_size: int = 8
    new_tokens: int = 32  # at most, per response
    micro_batch_size: int = 16  # responses per forward
    backends: list[str] = field(default_factory=lambda: ["vllm", "transformers"])  # ours


@dataclass
class PeersBench:
    """The engine's DPO and GRPO steps against TRL's trainers (``iterate.bench.peers``) on
    the same model, data, LoRA adapter (r 16 on q/v), batch, lengths and dtype; each engine
    and step a process of its own, ``rounds`` times alternating. TRL's side needs TRL (the
    ``peers`` extra); without it, ours alone, with a message."""

    models: list[str] = field(default_factory=lambda: ["toy", "llama30m"])
    # model.dtype: float32, or bfloat16 (frozen weights in bf16, the forward under autocast)
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    steps: list[str] = field(default_factory=lambda: ["dpo", "grpo"])
    warmup: int = 1  # optimiser steps first, not counted
    measured: int = 3  # optimiser steps timed (the median is reported)
    rounds: int = 1
    # ours under torch.profiler once more (first round): the top operators and the FLOP
    # rate reached against the fp32 matmul rate (a matmul_size square GEMM) measured then
    profile: bool = True
    top: int = 12
    matmul_size: int = 2048
    dpo: PeersDpo = field(default_factory=PeersDpo)
    grpo: PeersGrpo = field(default_factory=PeersGrpo)


@dataclass
class IterationBench:
    iterations: int = 2  # the breakdown is of the last one (iteration 0 also starts the engine)
    overrides: list[str] = field(
        default_factory=lambda: ["reward.num_pairs=600", "reward.epochs=1"]
    )
    compare_restart: bool = True  # also run with generate.keep_engine=false


@dataclass
class BenchConfig:
    name: str = "default"
    out_dir: str = "runs/bench"
    # --quick: tiny sizes, one round, each measurement in this process (harness smoke test,
    # not figures)
    quick: bool = False
    # the GPU check (make gpu-check): the ladder section alone, the transformers sampler, PPO
    # beside DPO; ~0.5B and ~1.5B parameters on CUDA, ~30M and ~100M elsewhere
    gpu_check: bool = False
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (all cores)
    seed: int = 0
    toy: ToyConfig = field(default_factory=ToyConfig)
    generation: GenerationBench = field(default_factory=GenerationBench)
    labelling: LabellingBench = field(default_factory=LabellingBench)
    update: UpdateBench = field(default_factory=UpdateBench)
    backends: BackendsBench = field(default_factory=BackendsBench)
    sync: SyncBench = field(default_factory=SyncBench)
    iteration: IterationBench = field(default_factory=IterationBench)
    workers: WorkersBench = field(default_factory=WorkersBench)
    scale: ScaleBench = field(default_factory=ScaleBench)
    padding: PaddingBench = field(default_factory=PaddingBench)
    ladder: LadderBench = field(default_factory=LadderBench)
    peers: PeersBench = field(default_factory=PeersBench)


def apply_quick(cfg: BenchConfig) -> BenchConfig:
    """The CI smoke sizes: the tiny toy world, one model and dtype, one round."""
    cfg.toy = ToyConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=2,
        sft_examples=600,
        sft_epochs=1,
        cache_dir=cfg.toy.cache_dir,
    )
    g = cfg.generation
    g.models, g.dtypes, g.prompts, g.n, g.new_tokens, g.rounds, g.matmul_size = (
        ["toy"],
        ["float32"],
        4,
        4,
        8,
        1,
        512,
    )
    la = cfg.labelling
    la.models, la.responses, la.batch_size, la.rounds = ["toy"], 32, 16, 1
    b = cfg.backends
    b.model, b.prompts, b.micro_batch_size, b.max_tokens, b.samples, b.rounds = "toy", 4, 4, 8, 2, 1
    b.kinds = ["rollouts"]  # the evaluation kind runs the same harness (the full run has both)
    sy = cfg.sync
    sy.model, sy.syncs, sy.prompts, sy.n, sy.new_tokens = "toy", 1, 2, 2, 8
    u = cfg.update
    u.model, u.rl_model, u.pairs, u.micro_batch_size, u.steps, u.rounds, u.rl_prompts = (
        "toy",
        "toy",
        4,
        4,
        1,
        1,
        4,
    )
    u.prompt_tokens, u.response_tokens = 8, 8
    u.rl_variants, u.rl_warmup = {k: RL_VARIANTS[k] for k in ("ppo", "grpo_kl")}, False
    w = cfg.workers
    w.model, w.prompts, w.shards, w.n, w.new_tokens, w.pairs, w.micro_batch_size = (
        "toy",
        4,
        2,
        2,
        8,
        4,
        2,
    )
    w.response_tokens, w.rounds, w.warmup = 8, 1, False
    it = cfg.iteration
    it.iterations, it.compare_restart = 1, False
    it.overrides = ["experiment=toy_tiny", "reward.num_pairs=100"]
    sc = cfg.scale
    sc.sizes, sc.n, sc.heldout, sc.known_prompts, sc.warmup = [8, 16], 2, 4, [100, 400], False
    sc.overrides = ["experiment=toy_tiny", "reward.num_pairs=100", "generate.shard_size=8"]
    pa = cfg.padding
    pa.model, pa.pairs, pa.min_tokens, pa.max_tokens, pa.micro_batch_size = "toy", 8, 8, 40, 4
    both = ["update.group_by_length=true", "update.max_tokens_per_micro_batch=64"]
    pa.variants = {"as before": [], "both": both}
    ld = cfg.ladder
    ld.sizes, ld.reward_model, ld.prompts, ld.heldout, ld.n, ld.max_tokens = (
        ["toy", "llama30m"],
        "toy",
        4,
        2,
        2,
        8,
    )
    pe = cfg.peers
    pe.models, pe.dtypes, pe.warmup, pe.measured, pe.top, pe.matmul_size = (
        ["toy"],
        ["float32"],
        0,
        1,
        5,
        256,
    )
    pe.dpo.pairs, pe.dpo.micro_batch_size, pe.dpo.prompt_tokens, pe.dpo.response_tokens = (
        4,
        2,
        8,
        8,
    )
    pe.grpo.prompts, pe.grpo.group_size, pe.grpo.new_tokens, pe.grpo.micro_batch_size = 4, 2, 8, 4
    pe.grpo.backends = ["transformers"]
    return cfg


def register() -> None:
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


def apply_gpu_check(cfg: BenchConfig) -> BenchConfig:
    """The GPU check's settings (``gpu_check/README.md``): no vLLM there, so the
    transformers sampler; on a CPU (``ladder.device=cpu``, or no CUDA) sizes small enough to
    run it end to end in minutes, with the same table."""
    import torch

    ld = cfg.ladder
    cuda = ld.device == "cuda" or (ld.device == "auto" and torch.cuda.is_available())
    cfg.sections = ["ladder"]
    ld.device, ld.backend = ("cuda" if cuda else "cpu"), "transformers"
    ld.sizes = ["llama500m", "llama1.5b"] if cuda else ["llama30m", "llama100m"]
    ld.variants = {**ld.variants, "ppo": ["update=ppo"]}
    return cfg


def main_config(overrides: list[str]):
    """The main ``iterate`` config composed with ``overrides``, exactly as ``python -m
    iterate`` would (inside or outside a running Hydra app), without the toy world's tuning
    (conf/tuning): the benchmarks time the mechanisms with the groups' own settings (LoRA)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from iterate import config

    config.register()
    overrides = ["~tuning", *overrides]
    if GlobalHydra.instance().is_initialized():
        return config.to_dataclass(compose("config", overrides=overrides))
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return config.to_dataclass(compose("config", overrides=overrides))
