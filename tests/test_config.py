"""Composition of every option of every group, every experiment, and start-up failures."""

import json
import subprocess

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from iterate.config import Config

from .conftest import CONF, cli, compose_cfg

# tuning/ holds settings for a (model, rule) pair, picked by interpolation: tested on its own
GROUPS = sorted(
    p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "hydra", "tuning")
)
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml"))


def test_groups_are_the_documented_ones():
    assert GROUPS == ["generate", "handoff", "model", "pairs", "prompts", "reward", "update"]
    assert len(OPTIONS) >= 2 * len(GROUPS) - 1


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    assert isinstance(cfg, Config)
    section = getattr(cfg, group)
    assert not hasattr(section, "keys"), "code must receive dataclasses, not DictConfig"
    if group == "update":
        assert section.name == option
    if group == "pairs":
        assert section.rule == option


# what a recipe leaves to the user (its ??? values), supplied as a user would
USER_PATHS = {
    "reward.data": "reward.data=[{path:hh.jsonl},{path:uf.parquet,weight:0.5}]",
    "prompts.path": "prompts.path=prompts.jsonl",
}
NEEDS = {
    "mistral_ppo_hh": ["reward.data", "prompts.path"],
    "rm_mistral": ["reward.data"],
    "mistral_remax": ["prompts.path"],
    "bloomz_rlhf": ["reward.data", "prompts.path"],
}


def _user_paths(experiment: str) -> list[str]:
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.count("???") == len(NEEDS.get(experiment, [])), "NEEDS lists every ??? value"
    return [USER_PATHS[k] for k in NEEDS.get(experiment, [])]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_cfg([f"experiment={experiment}", *_user_paths(experiment)])
    assert cfg.run_name.startswith(experiment)  # (instruct: instruct_<rule>)
    if cfg.reward.source == "files":
        assert [d.path for d in cfg.reward.data] == ["hh.jsonl", "uf.parquet"]
        assert cfg.reward.data[1].weight == 0.5


@pytest.mark.parametrize("experiment", ["mistral_ppo_hh", "rm_mistral", "bloomz_rlhf"])
def test_a_recipe_without_its_data_fails_naming_the_key(experiment):
    with pytest.raises(Exception, match=r"reward\.data\[0\]\.path"):
        compose_cfg([f"experiment={experiment}"])


def test_recipe_values_and_templates():
    from iterate.train import models

    ppo = compose_cfg(["experiment=mistral_ppo_hh", *_user_paths("mistral_ppo_hh")])
    assert ppo.reward.train and ppo.update.name == "ppo" and ppo.update.kl_coef == 0.05
    assert (ppo.update.lr, ppo.generate.max_tokens, ppo.update.lora.r) == (1e-6, 128, 16)
    rm = compose_cfg(["experiment=rm_mistral", *_user_paths("rm_mistral")])
    assert rm.iteration == 0 and rm.reward.batch_size * rm.reward.grad_accum == 512
    assert (rm.reward.lr, rm.reward.epochs, rm.reward.lora.enabled) == (5e-6, 1, False)
    remax = compose_cfg(["experiment=mistral_remax", *_user_paths("mistral_remax")])
    assert (remax.update.kl_coef, remax.update.reward_clip) == (0.1, 1.0)
    assert (remax.generate.temperature, remax.generate.top_p) == (0.7, 0.9)
    assert remax.reward.chat_template == "ultrarm"
    bloom = compose_cfg(["experiment=bloomz_rlhf", *_user_paths("bloomz_rlhf")])
    assert bloom.update.value_head == "reference_bottom" and bloom.model.chat_template == "vicuna"
    for name in ("zephyr", "llama3", "mistral_instruct", "ultrarm", "vicuna"):
        assert "{%" in models.chat_template(name)
    with pytest.raises(FileNotFoundError, match="zephir"):
        models.chat_template("zephir")


def test_gshf_experiment_values():
    cfg = compose_cfg(["experiment=gshf_zephyr"])
    assert cfg.model.path == "HuggingFaceH4/mistral-7b-sft-beta"
    assert cfg.reward.train is False and cfg.reward.path
    assert (cfg.generate.n, cfg.pairs.rule, cfg.update.name, cfg.update.beta) == (
        8,
        "max_min",
        "dpo",
        0.1,
    )
    assert cfg.handoff.reference == "previous"
    assert cfg.model.max_length > cfg.generate.max_tokens, "prompts must fit beside the response"
    assert cfg.update.lora.enabled is False


def test_tuning_is_picked_by_model_and_rule_and_the_command_line_wins():
    dpo, raft, ppo = (compose_cfg([f"update={u}"]) for u in ("dpo", "raft", "ppo"))
    assert (dpo.update.lora.enabled, dpo.update.lr, dpo.update.nll_coef) == (False, 2e-4, 1.0)
    assert (raft.update.lora.enabled, raft.update.lr) == (False, 1e-3)
    assert dpo.reward.refresh.pairs == raft.reward.refresh.pairs == 60
    assert str(dpo.reward.refresh.judge) == "gold"
    # no tuning file for these pairs: the groups' own values
    assert (ppo.update.lora.enabled, ppo.reward.refresh.pairs) == (True, 0)
    for untuned in (["experiment=toy_tiny"], ["model=zephyr_sft"]):
        cfg = compose_cfg(untuned)
        assert (cfg.update.lora.enabled, cfg.update.lr, cfg.reward.refresh.pairs) == (
            True,
            1e-3,
            0,
        )
    assert compose_cfg(["update.lr=5e-4", "reward.refresh.pairs=0"]).update.lr == 5e-4


def test_the_first_real_run_of_the_readme_composes_on_the_toy_default(tmp_path):
    """`python -m iterate run_name=mine prompts=file prompts.path=<file>` on the toy
    default: the toy tuning's gold-judged refresh is off for prompts that are not the toy
    world's (the gold judge knows only those), so the run passes validation; asked for
    explicitly, the refresh is refused, saying how to turn it off."""
    from iterate.errors import BadInput
    from iterate.run import validate

    prompts = tmp_path / "mine.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in ("owls", "rain", "tea")
        )
    )
    first = ["run_name=mine", "prompts=file", f"prompts.path={prompts}"]
    for rule in ("dpo", "raft"):
        cfg = compose_cfg([*first, f"update={rule}"], tmp_path)
        assert cfg.reward.refresh.pairs == 0 and cfg.update.lora.enabled is False
        validate.check(cfg)
    asked = compose_cfg([*first, "reward.refresh.pairs=60"], tmp_path)
    with pytest.raises(BadInput, match="turn the refresh off with reward.refresh.pairs=0"):
        validate.check(asked)


def test_defaults():
    cfg = compose_cfg()
    assert cfg.model.path is None and cfg.reward.source == "toy"
    assert (
        cfg.update.lora.r == 16 and cfg.update.lora.alpha == 32 and cfg.update.lora.dropout == 0.05
    )
    assert cfg.reward.lora.r == 16 and cfg.reward.lora.alpha == 32


@pytest.mark.parametrize(
    "override",
    [
        "update.bta=0.1",
        "generate.max_token=5",
        "modle.path=x",
        "toy.hiden_size=3",
        "+update.bta=0.1",
    ],
)
def test_misspelled_key_rejected(override):
    key = override.lstrip("+").split("=")[0].split(".")[-1]
    with pytest.raises(
        (ConfigCompositionException, ConfigKeyError),
        match=f"Could not (override|append to).*{key}|Key '{key}' not in",
    ):
        compose_cfg([override])


def test_misspelled_key_in_a_yaml_file_rejected(tmp_path):
    bad = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF, bad)
    (bad / "update" / "typo.yaml").write_text("name: dpo\nbetta: 0.2\n")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(bad), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as e:
            compose("config", overrides=["update=typo"])
    assert "betta" in str(e.value.__cause__ or e.value)


@pytest.mark.parametrize(
    "override",
    [
        "update.beta=abc",
        "generate.n=eight",
        "generate.backend=vlm",
        "pairs.rule=maxmin",
        "handoff.on_reject=ignore",
        "update.loss_agg=sum",
        "generate.keep_engine=maybe",
    ],
)
def test_wrong_type_or_value_rejected(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg([override])


def test_unknown_group_option_rejected():
    with pytest.raises(ConfigCompositionException, match="update"):
        compose_cfg(["update=sft"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return cli(list(args), timeout=120)


def test_cli_help_and_cfg_job():
    out = _cli("--help")
    assert (
        out.returncode == 0
        and "Configuration groups" in out.stdout
        and "update: dpo, grpo, ppo, raft, reinforce_pp, remax, rloo" in out.stdout
    )
    out = _cli("--cfg", "job", "update=raft", "generate.n=4")
    assert out.returncode == 0
    assert "name: raft" in out.stdout and "'n': 4" in out.stdout


def test_cli_typo_fails_at_startup():
    out = _cli("update.bta=0.1")
    assert out.returncode != 0
    assert "Could not override 'update.bta'" in out.stderr


def test_run_folders_are_deterministic():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["run_name=abc"], return_hydra_config=True)
    from omegaconf import OmegaConf

    hydra = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert hydra["run"]["dir"] == "${runs_dir}/${run_name}"
    assert hydra["sweep"]["dir"] == "${runs_dir}/${run_name}"
    assert (
        hydra["sweep"]["subdir"] == "${job_dirname:${hydra:job.override_dirname}}"
    )  # named by overrides
    from iterate.config import job_dirname

    assert job_dirname("model.path=/data/m,update=dpo") == "model.path=_data_m,update=dpo"
    assert (
        job_dirname("lora.target_modules=[q_proj,v_proj]") == "lora.target_modules=(q_proj,v_proj)"
    )
    long = job_dirname("reward.path=" + "/deep" * 100)
    assert len(long.encode()) <= 200 and "/" not in long
    # iteration is not part of a job's name, so `iteration=3` after `iteration=2` resumes it
    assert "iteration" in hydra["job"]["config"]["override_dirname"]["exclude_keys"]


def test_on_policy_loss_aggregation_and_engine_options():
    assert compose_cfg(["update=ppo"]).update.loss_agg == "sequence_mean"
    assert compose_cfg(["update=remax"]).update.loss_agg == "token_mean"
    assert (
        compose_cfg(["update=remax", "update.loss_agg=sequence_mean"]).update.loss_agg
        == "sequence_mean"
    )
    assert compose_cfg().generate.keep_engine is True
    assert compose_cfg(["generate.keep_engine=false"]).generate.keep_engine is False


def test_bench_config_composes_with_every_option():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from iterate.bench.config import SECTIONS, BenchConfig, apply_quick, register

    register()
    overrides = [
        "name=x",
        "sections=[generation,update]",
        "threads=2",
        "generation.models=[toy,llama30m]",
        "generation.dtypes=[bfloat16]",
        "generation.backends=[vllm]",
        "generation.prompts=3",
        "generation.n=2",
        "generation.new_tokens=4",
        "generation.rounds=1",
        "generation.matmul_size=64",
        "generation.gpu_memory_utilization=0.1",
        "generation.enforce_eager=false",
        "labelling.models=[llama100m]",
        "labelling.responses=8",
        "labelling.batch_size=2",
        "labelling.rounds=1",
        "update.model=toy",
        "update.pairs=2",
        "update.micro_batch_size=1",
        "update.prompt_tokens=3",
        "update.response_tokens=3",
        "update.steps=1",
        "update.rounds=1",
        "update.rl_model=toy",
        "update.rl_prompts=2",
        "iteration.iterations=1",
        "iteration.overrides=['experiment=toy_tiny']",
        "iteration.compare_restart=false",
        "workers.warmup=false",
        "toy.hidden_size=64",
        "out_dir=elsewhere",
        "seed=3",
        "quick=false",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("bench", overrides=overrides))
        default = OmegaConf.to_object(compose("bench"))
        with pytest.raises(ConfigCompositionException):
            compose("bench", overrides=["generation.modles=[toy]"])
    assert isinstance(cfg, BenchConfig) and cfg.sections == ["generation", "update"]
    assert (cfg.generation.models, cfg.labelling.models, cfg.update.rl_model) == (
        ["toy", "llama30m"],
        ["llama100m"],
        "toy",
    )
    assert cfg.iteration.overrides == ["experiment=toy_tiny"] and cfg.toy.hidden_size == 64
    assert not cfg.workers.warmup and default.workers.warmup
    assert default.sections == list(SECTIONS) and default.generation.models == [
        "toy",
        "llama30m",
        "llama100m",
    ]
    quick = apply_quick(default)
    assert (
        quick.generation.models == ["toy"]
        and quick.generation.rounds == 1
        and quick.toy.hidden_size == 64
    )


def _yaml(group: str, option: str) -> dict:
    from omegaconf import OmegaConf  # reads 3e-3 as a number, as Hydra does

    return OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml")) or {}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_yaml_values_agree_with_the_dataclass_defaults(group, option):
    """The dataclasses are the one source of defaults: a group's default YAML restates
    them (never contradicts them), and every other option holds only what differs."""
    import dataclasses

    import yaml

    from iterate import config as c

    schema = {
        "model": c.ModelConfig,
        "reward": c.RewardConfig,
        "prompts": c.PromptsConfig,
        "generate": c.GenerateConfig,
        "pairs": c.PairsConfig,
        "update": c.UpdateConfig,
        "handoff": c.HandoffConfig,
    }[group]
    defaults = _flat(json.loads(json.dumps(dataclasses.asdict(schema()), default=str)))
    chosen = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    default_option = next(d[group] for d in chosen if isinstance(d, dict) and group in d)
    for key, value in _flat(_yaml(group, option)).items():
        if defaults.get(key) == "???":  # MISSING: every option sets it (the update rule's name)
            continue
        if option == default_option:
            assert value == defaults[key], (
                f"{group}/{option}.yaml: {key}={value!r} but the dataclass says {defaults[key]!r}"
            )
        else:
            assert value != defaults.get(key), (
                f"{group}/{option}.yaml restates the default {key}={value!r}"
            )


def test_new_options_compose():
    cfg = compose_cfg(
        [
            "evaluate.samples=2",
            "evaluate.batch_size=8",
            "reward.score_batch_size=16",
            "update=ppo",
            "update.sync_every=4",
        ]
    )
    assert (cfg.evaluate.samples, cfg.evaluate.batch_size, cfg.reward.score_batch_size) == (
        2,
        8,
        16,
    )
    assert cfg.update.sync_every == 4 and compose_cfg().update.sync_every == 1
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg(["handoff.kl_samples=4"])  # moved to evaluate.samples


def test_tracking_options_compose():
    cfg = compose_cfg(
        ["report_to=[tensorboard,wandb,trackio]", "track.project=p", "track.samples=5"]
    )
    assert [str(t) for t in cfg.report_to] == ["tensorboard", "wandb", "trackio"]
    assert (cfg.track.project, cfg.track.samples) == ("p", 5)
    assert compose_cfg().report_to == []  # none by default
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg(["report_to=[tensorbord]"])


def test_the_shipped_slurm_launcher_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.max_num_timeout) == ("gpu", 8, 3)


def test_scale_out_options_compose():
    cfg = compose_cfg(
        [
            "generate.workers=2",
            "generate.threads=1",
            "generate.tensor_parallel_size=2",
            "reward.workers=2",
            "reward.threads=1",
            "update.num_processes=4",
            "update.strategy=deepspeed_zero3",
        ]
    )
    assert (cfg.generate.workers, cfg.generate.threads, cfg.generate.tensor_parallel_size) == (
        2,
        1,
        2,
    )
    assert (cfg.reward.workers, cfg.reward.threads) == (2, 1)
    assert (cfg.update.num_processes, cfg.update.strategy) == (4, "deepspeed_zero3")
    with pytest.raises(ConfigCompositionException, match="update.strategy=zero9"):
        compose_cfg(["update.strategy=zero9"])


def test_the_length_aware_training_settings_compose_and_are_checked():
    """update.group_by_length, update.max_tokens_per_micro_batch and
    update.gradient_checkpointing from the command line, for a pair rule and an on-policy
    one; a negative token budget is refused, naming the key."""
    from iterate.errors import BadInput
    from iterate.run import validate

    on = [
        "update.group_by_length=true",
        "update.max_tokens_per_micro_batch=4096",
        "update.gradient_checkpointing=true",
    ]
    for rule in ("dpo", "grpo"):
        uc = compose_cfg([f"update={rule}", *on]).update
        assert (uc.group_by_length, uc.max_tokens_per_micro_batch, uc.gradient_checkpointing) == (
            True,
            4096,
            True,
        )
    off = compose_cfg(["update=raft"]).update
    assert (off.group_by_length, off.max_tokens_per_micro_batch, off.gradient_checkpointing) == (
        False,
        0,
        False,
    )
    with pytest.raises(BadInput, match="update.max_tokens_per_micro_batch"):
        validate.check(compose_cfg(["update.max_tokens_per_micro_batch=-1"]))
