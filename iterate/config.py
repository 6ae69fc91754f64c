"""Config schemas: the one source of truth for types and documentation.

YAML files under ``conf/`` hold values only. Hydra merges them into these dataclasses (the
``base_config`` entry at the top of ``conf/config.yaml``), so a misspelled key or a value of
the wrong type fails at start-up with Hydra's own message. Code receives the dataclasses
(``to_dataclass``), never a ``DictConfig``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


# Closed sets of choices are enums, so a misspelled value fails at start-up too.
class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class RewardSource(StrEnum):
    toy = "toy"  # pairs of the toy world's responses, labelled by its gold judge
    files = "files"  # preference files (iterate.preferences: HH-RLHF, conversational, ...)
    # the initial policy's own samples of reward.prompts, labelled by reward.label_function
    # (the seeds' pipeline: a reward model learned from the labels of a verifiable check)
    policy = "policy"


class Aggregate(StrEnum):
    """How an ensemble's member rewards become one (Coste et al. 2023)."""

    mean = "mean"
    mean_minus_std = "mean_minus_std"  # mean - uncertainty_coef * std: pessimistic
    min = "min"  # worst-case


class JudgeMode(StrEnum):
    compare = "compare"  # which of two responses is better (A, B or C for a tie), both orders
    score = "score"  # a number for one response


class Judge(StrEnum):
    gold = "gold"  # the toy world's gold judge
    model = "model"  # a judge model scored like a reward model (reward.refresh.judge_path)
    file = "file"  # labelled pairs the user supplies per iteration (reward.refresh.path)


class PromptSource(StrEnum):
    toy = "toy"
    file = "file"
    hub = "hub"


class Backend(StrEnum):
    vllm = "vllm"
    transformers = "transformers"


class PairRule(StrEnum):
    max_min = "max_min"
    max_random = "max_random"
    max_max = "max_max"
    random = "random"


class UpdateRule(StrEnum):
    dpo = "dpo"
    raft = "raft"
    ppo = "ppo"
    remax = "remax"
    grpo = "grpo"
    rloo = "rloo"
    reinforce_pp = "reinforce_pp"


class RolloutCorrection(StrEnum):
    """How the on-policy rules correct for the sampler's numerics (``losses.rollout_weights``)."""

    none = "none"
    tis = "tis"  # truncated importance sampling
    mask = "mask"  # tokens whose ratio is past the cap left out


class ScaleRewards(StrEnum):
    """How GRPO scales a group's centred rewards (``losses.group_advantages``)."""

    group = "group"  # by the group's std: the original GRPO
    batch = "batch"  # by the whole batch's std
    none = "none"  # not at all: Dr. GRPO


class KLEstimator(StrEnum):
    k1 = "k1"
    k3 = "k3"


class ValueHead(StrEnum):
    policy = "policy"  # a linear head on the policy's last hidden state
    reference_bottom = "reference_bottom"  # a head on the frozen reference's bottom layers


class LossAgg(StrEnum):
    token_mean = "token_mean"  # every response token in the batch weighs the same
    sequence_mean = "sequence_mean"  # mean over each sequence's tokens, then over sequences
    token_sum_norm = "token_sum_norm"  # each sequence's sum over generate.max_tokens (Dr. GRPO)


class DpoLoss(StrEnum):
    sigmoid = "sigmoid"
    ipo = "ipo"
    hinge = "hinge"


class OnReject(StrEnum):
    stop = "stop"
    keep_previous = "keep_previous"


class Reference(StrEnum):
    initial = "initial"
    previous = "previous"


class EvalReference(StrEnum):
    """What the evaluation's win rates compare the new policy's held-out samples with."""

    initial = "initial"  # the initial policy's samples of the same prompts
    previous = "previous"  # the samples of the policy the iteration started from
    file = "file"  # outputs in a file (evaluate.reference.path), matched by prompt text


class Strategy(StrEnum):
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed_zero2 = "deepspeed_zero2"
    deepspeed_zero3 = "deepspeed_zero3"


class Tracker(StrEnum):
    tensorboard = "tensorboard"  # event files in <run>/tensorboard/
    wandb = "wandb"  # Weights & Biases (WANDB_MODE=offline writes <run>/wandb/ only)
    trackio = "trackio"  # local-first (TRACKIO_DIR), or a Space with TRACKIO_SPACE_ID


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class LoraConfig:
    enabled: bool = True  # False: full fine-tuning
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # None lets peft pick the architecture's defaults (q_proj, v_proj for Llama).
    target_modules: list[str] | None = None


@dataclass
class ToyConfig:
    """The embedded default world (iterate/toy): tokenizer, SFT policy, gold judge."""

    seed: int = 0
    cache_dir: str = ".cache/toy"  # built once per distinct config, then reused
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4  # head_dim = hidden_size / num_heads; vLLM's CPU kernels want >= 32
    max_position_embeddings: int = 256
    sft_examples: int = 6000
    sft_epochs: int = 2
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    heldout_fraction: float = 0.2  # share of each instruction family kept for evaluation
    # the prompt writer (prompts=self_instruct), built on first use with the policy's sizes
    writer_examples: int = 6000
    writer_epochs: int = 2


@dataclass
class ModelConfig:
    """The policy. ``path: null`` means the toy world's SFT policy."""

    name: str = MISSING  # short name used in model cards and summaries
    path: str | None = None  # local folder or hub id
    dtype: DType = DType.float32
    max_length: int = 256  # prompt + response tokens
    # overrides the tokenizer's chat template: a shipped one's name (iterate/templates: zephyr,
    # llama3, mistral_instruct, ultrarm, vicuna), a .jinja file, or the template itself
    chat_template: str | None = None


@dataclass
class PreferenceFile:
    """One source of preference pairs for reward-model training."""

    path: str = MISSING  # jsonl / json / parquet, or a folder saved with datasets' save_to_disk
    weight: float = 1.0  # times each usable pair is used: 0.25 a seeded quarter, 2 twice


@dataclass
class JudgeConfig:
    """A generative judge (``reward.kind: judge``; ``rewards.judge_model``): the model at
    ``reward.path`` (or trained here like a pairwise model, mode=compare) is shown a prompt in
    its chat template, sampled through the run's sampler, and its answer parsed. An answer
    the pattern does not find is sampled again (``retries``), then dropped and counted;
    every answer is kept in the label stage's ``judgements/`` shards."""

    mode: JudgeMode = JudgeMode.compare
    # what the judge is shown: a file or the text, with {context} and {a}, {b} (compare) or
    # {response} (score); null: iterate/templates/pairwise.txt or judge_score.txt
    template: str | None = None
    # a regular expression whose first group is the verdict (A, B or C) or the score; the
    # first match counts; null: the mode's default (iterate.rewards.judge_model.PATTERNS)
    pattern: str | None = None
    max_tokens: int = 8  # tokens the judge may write per answer
    temperature: float = 0.0  # 0: greedy; retries then sample at temperature 1
    retries: int = 2  # further samples of an answer the pattern does not find
    low: float = 1.0  # mode=score: the lowest score a judge may give (outside: unparsed)
    high: float = 10.0  # mode=score: the highest


@dataclass
class RewardSourceConfig:
    """One source of a mixture (``reward.kind: mixture``; its values are kept in a column of
    their own, ``source_<name>``, beside the weighted sum, the reward), or an evaluation judge
    (``evaluate.judges``): a reward of its kind with its own settings."""

    # a reward kind (iterate.rewards.kinds): a mixture's source scores responses one by one
    # (model or function); an evaluation judge may be of any kind but mixture
    kind: str = "function"
    function: str | None = None  # kind=function: as reward.function
    # kind=model: a reward model folder; null: the run's own (trained here, or reward.path;
    # the one the refresh updates). Scored with reward.max_length, dtype, chat_template
    path: str | None = None
    weight: float = 1.0
    name: str | None = None  # its column: source_<name>; null: the function's name, or the kind
    pairwise_template: str | None = None  # kind=pairwise (an evaluation judge): as reward's
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # kind=judge: as reward.judge


@dataclass
class RefreshConfig:
    """Reward-model refresh between iterations: pairs of the current policy's own samples,
    labelled by a judge, update the reward model before it labels them (off at pairs=0)."""

    pairs: int = 0  # the labelling budget: judged pairs per iteration
    judge: Judge = Judge.gold
    judge_path: str | None = None  # judge=model: a reward-model folder (or hub id)
    # judge=file: preference pairs per iteration, ``{iteration}`` in the path replaced
    path: str | None = None
    # which two of a prompt's n samples the judge sees, ranked by the current reward model
    rule: PairRule = PairRule.max_min
    replay: float = 1.0  # earlier pairs (initial data, earlier refreshes) per new pair
    epochs: int = 2
    lr: float | None = None  # null: reward.lr


@dataclass
class RewardConfig:
    """The reward the loop optimises: a reward model, trained here before iteration 0
    (``train: true``) or loaded, a Python function (``kind: function``), a mixture of them,
    a pairwise preference model or a generative judge."""

    name: str = MISSING
    # a row of the reward-kind table (iterate.rewards.kinds): model, function, mixture,
    # pairwise (a pairwise preference model answering A or B, trained here or loaded) or
    # judge (a generative judge: a causal LM prompted to compare or score, its answer parsed)
    kind: str = "model"
    # kind=function: package.module:function or path/to/file.py:function, called as
    # f(prompts, responses) -> one float per response (None or NaN: that row is dropped)
    function: str | None = None
    # kind=mixture: the reward is the weighted sum of these sources' rewards
    sources: list[RewardSourceConfig] = field(default_factory=list)
    # kind=pairwise: what the model is shown, with {context}, {a} and {b} (a file or the
    # text; null: iterate/templates/pairwise.txt)
    pairwise_template: str | None = None
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # kind=judge: how it is asked
    path: str | None = None  # a trained reward model to load when ``train: false``
    train: bool = True
    source: RewardSource = RewardSource.toy  # where the preference pairs come from
    data: list[PreferenceFile] = field(default_factory=list)  # source=files: a weighted mixture
    # source=policy: the prompts file the initial policy samples (read like prompts.path, its
    # prompts.fields kept for the label function), reward.samples responses each at
    # generate's temperature and length; each prompt's best and worst response by
    # label_function (a reward function, as reward.function) make a pair, ties dropped
    prompts: str | None = None
    label_function: str | None = None
    samples: int = 4
    base: str | None = None  # model to start from; null: the policy
    # the reward model's chat template, when its tokenizer's is not the one it was trained
    # with: a shipped template's name (see ModelConfig.chat_template), a .jinja file, or text
    chat_template: str | None = None
    num_pairs: int = 4000  # toy source: pairs to build
    label_noise: float = 0.1  # toy source: chance a gold label is flipped
    heldout_fraction: float = 0.1
    lora: LoraConfig = field(default_factory=LoraConfig)
    epochs: int = 3
    batch_size: int = 32  # pairs per forward pass
    grad_accum: int = 1  # forward passes per optimiser step (global batch = batch_size x this)
    lr: float = 3e-3
    max_length: int = 256
    dtype: DType = DType.float32
    # train: an ensemble of this many members (seeds, bootstrap samples of the pairs); its
    # reward is the members' aggregate, and their disagreement (std) is recorded per row
    # (a loaded ensemble folder, with its ensemble.json, is used as it is)
    ensemble: int = 1
    aggregate: Aggregate = Aggregate.mean
    uncertainty_coef: float = 1.0  # aggregate=mean_minus_std: the std's weight
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    # toy world: keep a copy of a trained reward model beside the toy world's cache and reuse
    # it in any run of the same reward config and seed (a sweep's jobs, a new run_name)
    cache: bool = True
    score_batch_size: int = 64  # sequences per forward pass when scoring (label, evaluate, ...)
    # label and evaluate: shards scored by this many processes (one per GPU, or CPU threads)
    workers: int = 1
    threads: int = 0  # CPU: threads per scoring worker (0: an equal share)
    # a reward function's call on one batch (score_batch_size rows) may take this long before
    # the run stops naming it (a line says it is still running every 30 s); 0: no limit
    function_timeout_s: float = 600.0


@dataclass
class SyntheticConfig:
    """Synthetic prompts (``prompts=self_instruct``): a generator writes each iteration's
    prompts from seed examples of the source; filtered (see iterate/synthetic.py)."""

    enabled: bool = False
    # null: the iteration's policy; toy_writer: the toy world's prompt writer; or a model
    generator: str | None = None
    examples: int = 3  # seed prompts shown per request
    candidates: int = 8  # samples per request
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 32
    min_words: int = 2
    max_words: int = 60
    max_overlap: float = 0.7  # word 3-gram Jaccard above which a candidate is a near-duplicate
    max_rounds: int = 10  # rounds of requests before the stage gives up


@dataclass
class PromptsConfig:
    # (declared before ``field``, the column name, which hides dataclasses.field below it)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # fields of each prompt row kept with the prompt (a reference answer, a test) and passed
    # to a reward function that takes them by name: f(prompts, responses, answer=[...])
    fields: list[str] = field(default_factory=list)
    source: PromptSource = PromptSource.toy
    path: str | None = None  # file: jsonl / json / parquet or a saved dataset; hub: dataset id
    split: str = "train"
    field: str = "prompt"  # column holding the prompt: text, messages, or an HH transcript
    per_iteration: int = 120  # prompts per iteration (disjoint slices, or written anew)
    heldout: int = 80  # prompts kept apart for evaluation (win rate, KL)
    # a fixed held-out set instead of a slice of the pool: a file read like prompts.path
    # (AlpacaEval's JSON list with heldout_field=instruction, say); its first prompts.heldout
    # prompts (shuffled) are held out, and none of its prompts is ever drawn for training
    heldout_path: str | None = None
    heldout_field: str | None = None  # its prompt column; null: prompts.field


@dataclass
class GenerateConfig:
    backend: Backend = Backend.vllm
    n: int = 8  # samples per prompt (best-of-n)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 48
    batch_size: int = 64  # transformers backend: prompts per generate() call
    shard_size: int = 128  # prompts per Parquet shard
    gpu_memory_utilization: float = 0.25  # on CPU this is a share of host memory
    enforce_eager: bool = True  # skip torch.compile warm-up (start-up time on CPU)
    # CPU: keep the vLLM engine alive across iterations and load each new policy into it
    # (on CUDA, sleep_level says what happens between stages)
    keep_engine: bool = True
    # shards split among this many vLLM engine processes (one per GPU slice, or CPU cores)
    workers: int = 1
    threads: int = 0  # CPU: cores per worker (0: an equal share; 1 worker left to vLLM)
    tensor_parallel_size: int = 1  # CUDA: GPUs per engine worker
    # CUDA: keep the engines for the whole run, asleep between stages so the update has the
    # GPU memory (1: weights offloaded to CPU memory; 2: dropped and reloaded on waking;
    # 0: a new engine per stage)
    sleep_level: int = 2
    # an engine that uses no CPU for this long while a request waits on it (stopped, hung)
    # is killed and the stage fails, naming it, rather than waiting forever (0: forever)
    engine_stall_s: float = 600


@dataclass
class PairsConfig:
    rule: PairRule = PairRule.max_min
    length_penalty: float = 0.0  # reward - length_penalty * response_tokens
    min_margin: float = 0.0  # drop pairs whose reward gap is smaller


@dataclass
class UpdateConfig:
    name: UpdateRule = MISSING  # a row of iterate.train.rules.RULES
    loss: DpoLoss = DpoLoss.sigmoid  # dpo only
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO
    nll_coef: float = 0.0  # weight of an NLL term on the chosen response
    lr: float = 1e-3
    epochs: int = 3
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    lora: LoraConfig = field(default_factory=LoraConfig)
    # how a step's examples are cut into micro-batches (the update is the same however they
    # are cut): rows of like length together, at most micro_batch_size rows and at most this
    # many tokens fed, padding included (0: no token cap); long sequences then come fewer at
    # a time and short ones many
    max_tokens_per_micro_batch: int = 0
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    # pair rules: each window of 50 steps' pairs sorted by length before it is cut into steps
    # (less padding; a step's pairs are then of like length, not a uniform draw)
    group_by_length: bool = False
    # on-policy rules (ppo, remax): per-token KL penalty against the reference
    kl_coef: float = 0.05
    kl_estimator: KLEstimator = KLEstimator.k1
    reward_clip: float = 10.0  # rewards clipped to [-reward_clip, reward_clip]
    # how per-token losses become one: token_mean is unbiased in length; sequence_mean turns
    # an advantage A into A / length (toy: best for PPO, which whitens its advantages, and a
    # pull to long responses for ReMax, whose advantages are mostly negative)
    loss_agg: LossAgg = LossAgg.token_mean
    # ppo
    ppo_epochs: int = 4  # optimisation passes over each rollout batch
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    adaptive_kl: bool = False  # Ziegler et al. 2019 controller towards target_kl
    target_kl: float = 6.0
    kl_horizon: int = 10000
    value_head: ValueHead = ValueHead.policy
    value_layers: int = 2  # reference_bottom: how many bottom layers feed the head
    # group rules (grpo, rloo, reinforce_pp): group_size samples per prompt in each rollout
    # (one request with n), their rewards compared within the group; the clipped ratio
    # objective with its own lower and upper ranges (clip_high > clip_low: DAPO's
    # clip-higher), num_iterations optimiser passes per rollout (GRPO's mu)
    group_size: int = 4
    clip_low: float = 0.2
    clip_high: float = 0.2
    num_iterations: int = 1
    scale_rewards: ScaleRewards = ScaleRewards.group  # grpo
    # grpo: a k3 KL to the reference in the loss with this coefficient (0: no reference
    # forward pass at all); rloo and reinforce_pp fold kl_coef's KL into the reward instead
    kl_loss_coef: float = 0.0
    # grpo (DAPO's guards): drop the groups whose rewards are all equal (no signal; counted),
    # and leave responses cut at generate.max_tokens out of the loss
    drop_equal_groups: bool = False
    # up to this many further rollouts per step, of as many of the iteration's prompts (drawn
    # at random) as groups were left out (equal ones with drop_equal_groups, or unscored), to
    # fill the step again
    refill_rounds: int = 0
    mask_truncated: bool = False
    # group rules: DAPO's soft over-length penalty added to each reward, falling from 0 at
    # generate.max_tokens - overlong_buffer tokens to -1 at max_tokens (0: off)
    overlong_buffer: int = 0
    # on-policy rules: the sampler's log-probs of its own tokens against the trainer's (the
    # mismatch, logged per step: mismatch_k3, mismatch_max_ratio, mismatch_past_cap, the
    # share of tokens whose ratio is beyond tis_cap either way); tis weighs each token's
    # policy-gradient term by their ratio capped at tis_cap, mask leaves out the tokens whose
    # ratio is beyond tis_cap either way; none logs the mismatch only
    rollout_correction: RolloutCorrection = RolloutCorrection.none
    tis_cap: float = 2.0
    # ppo, remax with generate.backend=vllm: the policy under training is put into the engine
    # (its weights, a LoRA adapter merged into a copy, loaded in place: Sampler.sync) before a
    # rollout once this many optimiser steps passed since the last sync; 1 samples every
    # rollout on-policy
    sync_every: int = 1
    # several processes (torch.distributed through accelerate; the pair rules): each rank
    # takes its share of every optimiser step; the strategy names a shipped accelerate config
    num_processes: int = 1
    strategy: Strategy = Strategy.ddp


@dataclass
class HandoffConfig:
    max_kl: float = 10.0  # reject a policy whose KL(new || reference) exceeds this (nats/seq)
    # before the evaluation, keep the KL under kl_target x max_kl: of the policies between
    # the iteration's start and the update's, the nearest the update's that stays under it
    # (iterate.stages.constrain), measured on the update's samples of this many held-out
    # prompts; false: the update's policy as it is, accepted or rejected whole
    constrain: bool = True
    kl_target: float = 0.8
    constrain_prompts: int = 32
    # with the constraint: when the update's whole policy is under half the KL target, try
    # further along its direction, alpha in (1, 2] under the target, and keep it only if the
    # run's reward of its samples rises over the update's by more than 2 standard errors
    # (paired by prompt) and its length-controlled win rate against them is at least 1/2
    extrapolate: bool = False
    # optional length gates, beside the KL budget (the evaluation's main judge: the gold judge,
    # else the run's reward): reject a policy whose held-out responses are longer than this
    # many times the reference's (characters), or whose length-controlled win rate is below
    # this (or cannot be fitted)
    max_length_ratio: float | None = None
    min_lc_win_rate: float | None = None
    # reject a policy that loses to the one it would replace: its held-out win rate against
    # the starting policy's samples, judged by the run's reward, below 1/2 less this many
    # standard errors (clustered by prompt; at 2, an unchanged policy is rejected about one
    # time in 40, at 1 one in 6); null: not asked
    reward_tolerance_se: float | None = 2.0
    on_reject: OnReject = OnReject.stop
    reference: Reference = Reference.initial  # the next iteration's reference policy


@dataclass
class EvalReferenceConfig:
    """The reference of the evaluation's win rates (``iterate.stages.heldout.reference``)."""

    kind: EvalReference = EvalReference.initial
    # kind=file: AlpacaEval's format (a JSON list of objects with instruction, output,
    # generator, dataset), a jsonl or parquet file, or a saved dataset; one output per prompt
    path: str | None = None
    prompt_field: str = "instruction"  # the prompt of each row, matched to held-out prompts
    output_field: str = "output"  # the reference response


@dataclass
class EvaluateConfig:
    """The held-out evaluation of each iteration's new policy (KL, reward, gold, win rate)."""

    reference: EvalReferenceConfig = field(default_factory=EvalReferenceConfig)
    # judges besides the run's reward (and the toy world's gold judge): reward sources as in
    # reward.sources (kind function or model; a model folder at path, or pairwise: a pairwise
    # model at path, asked in both orders); each gives its own figures. The main figures
    # (win_rate, lc_win_rate, length_ratio: what the handoff's gates read) are the gold
    # judge's where the prompts have one, else the first judge's here, else the reward's
    judges: list[RewardSourceConfig] = field(default_factory=list)

    samples: int = (
        4  # samples per held-out prompt, at temperature 1 and top-p 1 (the KL needs them)
    )
    batch_size: int = 32  # sequences per forward pass of the KL's log-probs


@dataclass
class TrackConfig:
    """What the trackers named in ``report_to`` get besides the scalars."""

    project: str = "iterate"  # wandb / trackio project; the tracker run is named after the run
    samples: int = 3  # best and worst held-out responses per iteration in the samples table


@dataclass
class Config:
    run_name: str = "toy"
    runs_dir: str = "runs"
    iteration: int = 1  # make iterations 0..iteration-1 exist
    seed: int = 0
    force: bool = False  # re-run stages whose config changed instead of refusing
    device: Device = Device.auto
    # CPU: threads of the main process's torch (the update, the KL, scoring done there), set
    # once at start; 0: torch's default (every core). Below the cores when other work shares
    # the machine: its threads then wait on each other (generate.threads: the engine's)
    threads: int = 0
    # experiment trackers: per optimiser step and per iteration (iterate/track.py); a
    # resumed run continues the same tracker run (its id in <run>/tracker.json)
    report_to: list[Tracker] = field(default_factory=list)
    track: TrackConfig = field(default_factory=TrackConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    model: ModelConfig = MISSING
    reward: RewardConfig = MISSING
    prompts: PromptsConfig = MISSING
    generate: GenerateConfig = MISSING
    pairs: PairsConfig = MISSING
    update: UpdateConfig = MISSING
    handoff: HandoffConfig = MISSING
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def plain(obj) -> dict:
    """A dataclass as plain JSON/YAML-safe types (enums become their string values)."""
    import json

    return json.loads(json.dumps(asdict(obj)))


def job_dirname(overrides: str) -> str:
    """A sweep job's folder name from its overrides: one path component, at most 200 bytes,
    without glob characters (libraries find weight files by globbing the folder: a job
    folder ``lora.target_modules=[q_proj,v_proj]`` would match no file)."""
    name = overrides.translate(str.maketrans("/[]*?", "_()__")) or "default"
    if len(name.encode()) > 200:
        import hashlib

        name = (
            name.encode()[:180].decode(errors="ignore")
            + "-"
            + hashlib.sha1(name.encode()).hexdigest()[:10]
        )
    return name


def on_toy_prompts(source: str, value):
    """``${on_toy_prompts:${prompts.source},60}``: the value where the prompts are the toy
    world's, else 0 (what a toy tuning's gold-judged refresh is on other prompts: the gold
    judge knows only the toy world's; set explicitly, such a refresh is refused by name)."""
    return value if str(source) == "toy" else 0


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, fn in (("job_dirname", job_dirname), ("on_toy_prompts", on_toy_prompts)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def to_dataclass(cfg) -> Config:
    """Turn a composed DictConfig into the typed ``Config`` (interpolations resolved).

    Merging into a fresh schema also rejects keys added with ``+key=value``, which Hydra
    lets through struct mode.
    """
    values = OmegaConf.to_container(cfg, resolve=True)
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), values))
    assert isinstance(obj, Config), type(obj)
    return obj
