"""Bad input is caught up front and named: a table of bad settings and paths (each: exit
status 2, a message naming the key or file), one writer per run folder, temporary files of
dead writers cleaned, a failed start that does not block the corrected command, and the
command line's exit statuses (2 bad input, 130 Ctrl-C) with the traceback in the log file."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from iterate.errors import BadInput
from iterate.run import cli, loop
from iterate.store.runlock import RunLock, RunLocked
from iterate.store.shards import write_plan
from iterate.store.stage import Stage

from .conftest import ROOT, TINY, compose_cfg

MISSING = "/nowhere/at/all"
BAD = [  # (overrides, what the message must name)
    (["iteration=-1"], "iteration=-1"),
    (["update.beta=0"], "update.beta"),
    (["update.epochs=0"], "update.epochs"),
    (["update.micro_batch_size=0"], "update.micro_batch_size"),
    (["update.grad_accum=0"], "update.grad_accum"),
    (["update.lr=nan"], "update.lr"),
    (["update.nll_coef=nan"], "update.nll_coef=nan: must be a number"),  # skipped every step
    (["update.kl_coef=inf"], "update.kl_coef=inf: must be finite"),
    (["update.target_kl=0"], "update.target_kl"),  # divisors
    (["update.kl_horizon=0"], "update.kl_horizon"),
    (["update.gamma=1.5"], "update.gamma"),
    (["update.reward_clip=0"], "update.reward_clip"),
    (["pairs.min_margin=-1"], "pairs.min_margin"),
    (["pairs.length_penalty=nan"], "pairs.length_penalty"),
    (["prompts.synthetic.max_overlap=0"], "prompts.synthetic.max_overlap"),
    (["prompts.synthetic.min_words=5", "prompts.synthetic.max_words=4"], "max_words"),
    (["run_name=.."], "run_name='..': must name a folder inside runs_dir"),
    (["run_name=''"], "run_name=''"),
    (["update.lr=-1e-3"], "update.lr"),
    (["update.label_smoothing=0.5"], "update.label_smoothing"),
    (["update.lora.dropout=1.0"], "update.lora.dropout"),
    (["update.num_processes=0"], "update.num_processes"),
    (["generate.temperature=0"], "greedy sampling gives the n samples of a prompt all alike"),
    # a pool too small for the iterations asked for: before the toy world and reward model
    (["prompts.per_iteration=1000"], "lower prompts.per_iteration to"),
    (["iteration=1000"], "ask for iteration="),
    # settings that only make sense together: refused at start-up, not when the stage comes
    (["update=ppo", "update.num_processes=2"], "update=ppo rolls out inside its update"),
    (["device=cpu", "update.num_processes=2", "update.strategy=fsdp"], "fsdp needs CUDA"),
    (["generate.backend=transformers", "generate.workers=2"], "needs generate.backend=vllm"),
    (["prompts.per_iteration=0"], "prompts.per_iteration"),
    (["prompts.heldout=0"], "prompts.heldout"),
    (["evaluate.samples=0"], "evaluate.samples"),
    (["track.samples=-1"], "track.samples"),
    (["evaluate.batch_size=0"], "evaluate.batch_size"),
    (["handoff.max_kl=-1"], "handoff.max_kl"),
    (["handoff.extrapolate=true", "handoff.constrain=false"], "handoff.extrapolate"),
    (["generate.n=1"], "generate.n"),  # dpo pairs need two samples
    (["generate.max_tokens=300"], "model.max_length"),  # longer than the model holds
    # longer than the model's positions (vLLM refuses such a max_model_len)
    (["model.max_length=1000"], "model.max_length=1000: the toy world's model has 256 positions"),
    (["reward.max_length=1000"], "reward.max_length=1000: the toy world's model has 256"),
    # more rows at once than the machine's memory holds
    (["generate.n=100000000"], "generate.n=100000000: a shard of"),
    (["evaluate.samples=100000000"], "evaluate.samples=100000000:"),
    (["generate.top_p=0"], "generate.top_p"),
    (["generate.temperature=-1"], "generate.temperature"),
    (["generate.workers=0"], "generate.workers"),
    (["generate.shard_size=0"], "generate.shard_size"),
    (["generate.sleep_level=3"], "generate.sleep_level"),
    (["reward.lr=inf"], "reward.lr"),
    (["reward.train=false"], "reward.path"),
    (["reward.train=false", f"reward.path={MISSING}"], MISSING),
    ([f"model.path={MISSING}"], MISSING),
    (["prompts=file", f"prompts.path={MISSING}.jsonl"], f"{MISSING}.jsonl"),
    (["reward.source=files", f"reward.data=[{{path:{MISSING}.jsonl}}]"], "reward.data[0].path"),
    (["reward.ensemble=0"], "reward.ensemble"),
    (["reward.uncertainty_coef=-1"], "reward.uncertainty_coef"),
    (["reward.refresh.pairs=-1"], "reward.refresh.pairs"),
    (["reward.refresh.pairs=1"], "reward.refresh.pairs"),
    (["reward.refresh.pairs=8", "reward.refresh.epochs=0"], "reward.refresh.epochs"),
    (["reward.refresh.pairs=8", "update=ppo"], "update=ppo does not draw"),
    (["reward.refresh.pairs=8", "reward.refresh.judge=model"], "judge_path"),
    (
        [
            "reward.refresh.pairs=8",
            "reward.refresh.judge=model",
            f"reward.refresh.judge_path={MISSING}",
        ],
        MISSING,
    ),
    (
        ["reward.refresh.pairs=8", "reward.refresh.judge=file", "reward.refresh.path=labels.jsonl"],
        "{iteration}",
    ),
    (
        [
            "reward.refresh.pairs=8",
            "prompts=file",
            f"prompts.path={ROOT / 'data' / 'prompts.jsonl'}",
        ],
        "gold judge knows only",
    ),
]


def _status(cfg, run: Path, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="iterate"):
        status = cli.exit_status(lambda: loop.run(cfg, run))
    return status, caplog.text


@pytest.mark.parametrize(("overrides", "named"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_exits_2_naming_it_before_any_work(overrides, named, tmp_path, caplog):
    cfg = compose_cfg([*TINY, *overrides], tmp_path)
    status, said = _status(cfg, tmp_path / "run", caplog)
    assert status == 2, said
    assert named in said and "bad input" in said
    assert not (tmp_path / "toy").exists(), "nothing was built before the check"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_asked_for_without_one_is_bad_input(tmp_path, caplog):
    status, said = _status(compose_cfg([*TINY, "device=cuda"], tmp_path), tmp_path / "r", caplog)
    assert status == 2 and "device=cuda: no CUDA device is visible" in said


def test_bad_input_is_a_type_and_an_internal_value_error_is_a_failure(caplog):
    from iterate.store.stage import DamagedStage, StageConfigChanged

    def raise_(e):
        raise e

    with caplog.at_level(logging.ERROR, logger="iterate"):
        assert cli.exit_status(lambda: raise_(BadInput("prompts.path: no rows"))) == 2
        assert cli.exit_status(lambda: raise_(StageConfigChanged("changed"))) == 2
        assert cli.exit_status(lambda: raise_(DamagedStage("damaged"))) == 2
        assert cli.exit_status(lambda: raise_(ValueError("a bug of ours"))) == 1
        # a run folder (or a file in it) the run may not write: the same on every rerun
        assert cli.exit_status(lambda: raise_(PermissionError(13, "denied", "runs/x"))) == 2
    assert "failed: ValueError: a bug of ours" in caplog.text
    assert "bad input: [Errno 13] denied: 'runs/x'" in caplog.text


def test_a_stop_is_recorded_and_the_inspector_says_what_a_rerun_does(tmp_path, caplog, capsys):
    """A run stopped by bad input found under the lock (here: a pool too small) records why;
    the inspector says a rerun stops the same way, not that it resumes; a damaged
    metrics.jsonl is named by the inspector (exit 2), without a traceback."""
    from iterate.report import show

    run, cfg = tmp_path / "run", compose_cfg([*TINY, "iteration=1000"], tmp_path)
    status, said = _status(cfg, run, caplog)
    assert status == 2 and "ask for iteration=" in said
    stopped = json.loads((run / "_STOPPED.json").read_text())
    assert stopped["status"] == 2 and "ask for iteration=" in stopped["error"]
    assert show.main([str(run)]) == 0
    shown = capsys.readouterr().out
    assert "bad input (exit 2)" in shown and "stops the same way until the input is fixed" in shown
    assert "the same command resumes" not in shown
    from iterate.config import plain

    (run / "config.yaml").write_text(yaml.safe_dump(plain(cfg)))
    (run / "metrics.jsonl").write_text('{"iteration": 0, "reward_m')
    assert show.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "line 1" in err and "Traceback" not in err


def test_a_tracker_not_installed_is_named_with_its_install(tmp_path, caplog, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    cfg = compose_cfg([*TINY, "report_to=[tensorboard,wandb]"], tmp_path)
    status, said = _status(cfg, tmp_path / "run", caplog)
    assert status == 2 and "report_to=[wandb]" in said and ".[trackers]" in said


def test_a_model_folder_without_a_config_is_named(tmp_path, caplog):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    cfg = compose_cfg([*TINY, f"model.path={empty}"], tmp_path)
    status, said = _status(cfg, tmp_path / "r", caplog)
    assert status == 2 and str(empty) in said and "config.json" in said


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, caplog):
    run = tmp_path / "run"
    with RunLock(run):
        status, said = _status(compose_cfg(TINY, tmp_path), run, caplog)
        assert status == 2 and f"pid {os.getpid()}" in said and "in use by" in said
        with pytest.raises(RunLocked):
            RunLock(run).__enter__()
    with RunLock(run):  # released on exit: the next writer gets it
        pass


def test_a_lock_file_deleted_under_a_live_run_does_not_let_a_second_writer_in(tmp_path, caplog):
    """The folder is what is locked: deleting ``.lock`` under a live holder (another
    process) does not sidestep it."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from iterate.store.runlock import RunLock\n"
            f"with RunLock({str(run)!r}):\n print('held', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (run / ".lock").unlink()
        status, said = _status(compose_cfg(TINY, tmp_path), run, caplog)
        assert status == 2 and "in use by another process" in said, said
        assert not (run / "config.yaml").exists(), "the second writer wrote nothing"
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run):  # its holder gone, the folder is free
        pass


def test_a_dead_holders_lock_is_taken_over_and_its_temporaries_cleaned(tmp_path, caplog):
    run = tmp_path / "run"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": int(dead), "host": "h", "since": "then"}))
    stage = run / "iter_000" / "handoff"
    (stage / f".policy.tmp{dead}").mkdir(parents=True)  # a handoff save cut short
    (stage / f".kl.json.tmp{dead}").write_text("{")
    (stage / f".kl.json.tmp{os.getpid()}").write_text("{")  # a live writer's: kept
    with caplog.at_level(logging.WARNING), RunLock(run):
        pass
    assert f"lock of pid {dead}" in caplog.text and "no longer running" in caplog.text
    assert sorted(p.name for p in stage.iterdir()) == [f".kl.json.tmp{os.getpid()}"]


def test_a_failed_start_does_not_block_the_corrected_command(tmp_path):
    folder = tmp_path / "iter_000" / "label"
    assert not Stage(folder, "label", {"reward_model": "typo"}).check()  # then it failed
    assert not Stage(folder, "label", {"reward_model": "right"}).check()  # the fix runs
    assert json.loads((folder / "_CONFIG.json").read_text())["reward_model"] == "right"
    write_plan(folder / "samples", "shards", 4)  # a plan is not output (a subfolder's neither)
    assert not Stage(folder, "label", {"reward_model": "again"}).check()
    (folder / "shard_00000.parquet").write_bytes(b"x")  # once it wrote something: refused
    with pytest.raises(Exception, match="reward_model"):
        Stage(folder, "label", {"reward_model": "other"}).check()


def _cli(args: list[str], tmp_path: Path, cache: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iterate",
            *TINY,
            f"runs_dir={tmp_path}",
            f"toy.cache_dir={cache or tmp_path / 'toy'}",
            *args,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _engine_of(pid: int) -> bool:
    """Whether the process ``pid`` has a vLLM engine process (``iterate.sampling.engine``)
    as a child."""
    found = subprocess.run(
        ["pgrep", "-P", str(pid), "-f", "iterate.sampling.engine --serve"],
        capture_output=True,
        text=True,
    )
    return bool(found.stdout.strip())


@pytest.mark.slow
def test_command_line_statuses_and_the_traceback_in_the_log(tmp_path, tiny_cache, tiny_rm):
    proc = _cli(["update=nosuchrule"], tmp_path)  # Hydra's own error: bad input too
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "nosuchrule" in out + err
    (tmp_path / "afile").write_text("")  # a run folder Hydra cannot make: one line, no traceback
    proc = _cli([f"runs_dir={tmp_path / 'afile'}"], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in out + err, err
    assert err.startswith("bad input: NotADirectoryError") and "afile" in err, err
    proc = _cli(["update.beta=0"], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "update.beta=0.0: must be > 0" in out + err and "Traceback" not in out + err
    assert "Traceback" in (tmp_path / "toy_tiny" / "__main__.log").read_text()
    given = ["reward.train=false", f"reward.path={tiny_rm}"]  # (the session's tiny world)
    proc = _cli(given, tmp_path, tiny_cache)  # a real run, interrupted while its engine works
    deadline = time.time() + 300
    while not _engine_of(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert _engine_of(proc.pid), "the run started no engine"
    time.sleep(3)  # loading its weights, or sampling
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, engine too
    out, err = proc.communicate(timeout=120)
    # 130, or death by SIGINT, which a shell reports as 130 too: CPython marks a Ctrl-C
    # that lands in code a C extension runs (PyRun_*) as unhandled even once it is caught,
    # and then ends the process by SIGINT after a clean shutdown
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err[-2000:])
    assert "interrupted (Ctrl-C)" in out + err and "Traceback" not in out + err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_at_the_next_stage(tmp_path, caplog):
    """Python ignores an exception raised in ``__del__`` ("Exception ignored"): a Ctrl-C
    landing there would let the run finish with status 0. The next stage boundary stops it."""
    from iterate import faults

    class Finalizer:
        def __del__(self):  # Ctrl-C arrives while this runs
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs between these bytecodes
                pass

    def run() -> None:
        obj = Finalizer()
        del obj  # the interrupt is swallowed here
        assert Stage(tmp_path / "stage", "stage", {}).check() is False  # raises first

    try:
        with caplog.at_level(logging.ERROR, logger="iterate"):
            assert cli.exit_status(run) == 130
        assert "interrupted (Ctrl-C)" in caplog.text
        assert not (tmp_path / "stage").exists(), "the stage did not start"
        assert cli.exit_status(lambda: None) == 0, "the next command starts clean"
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    faults.stop_if_interrupted()  # cleared


DATA_FILES = [  # (file contents, what the message must say)
    (b"", "has no rows"),
    (b'{"prompt": "Greet Anna."}\n{"prompt": "Greet\n', "line 2: not valid JSON"),
    (b'{"prompt": "Greet Anna."}\n{"prompt": "caf\xe9"}\n', "line 2: not UTF-8"),
    (b'["Greet Anna."]', "one JSON object per line"),
]


@pytest.mark.parametrize(("content", "said"), DATA_FILES, ids=["empty", "json", "utf8", "shape"])
def test_a_bad_prompts_file_is_named_with_its_line(content, said, tmp_path, caplog):
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(content)
    cfg = compose_cfg([*TINY, "prompts=file", f"prompts.path={f}"], tmp_path)
    from iterate.stages import prompts

    with pytest.raises(BadInput, match=said) as e:
        prompts.load_pool(cfg)
    assert str(f) in str(e.value)


def test_stage_identity_is_its_content_and_a_changed_byte_is_caught(tmp_path):
    from iterate.store.stage import DamagedStage, done_id

    folder = tmp_path / "label"
    ids = []
    for _ in range(2):  # the stage done twice with the same output: the same identity
        stage = Stage(folder, "label", {"k": 1})
        stage.check(force=True)
        (folder / "shard_00000.parquet").write_bytes(b"same bytes")
        stage.finish(rows_out=1)
        ids.append(done_id(folder))
        (folder / "_DONE.json").unlink()
    assert ids[0] == ids[1]
    stage.finish(rows_out=1)
    (folder / "shard_00000.parquet").write_bytes(b"same bytez")  # same size, one byte off
    with pytest.raises(DamagedStage, match="shard_00000.parquet differs"):
        Stage(folder, "label", {"k": 1}).check()
    assert not Stage(folder, "label", {"k": 1}).check(force=True)  # force: redone


def test_conversations_a_template_refuses_are_counted_drops(tiny_world):
    """Turns that do not alternate (real HH-RLHF has them) under a strict template: counted
    and dropped in generation's plan and in labelling, never a crash and never trained on."""
    import pyarrow as pa

    from iterate.rewards import scorer as scoring
    from iterate.sampling import samplers
    from iterate.stages import label
    from iterate.stages.prompts import SCHEMA, prompt_id
    from iterate.train import models

    tok = models.load_tokenizer(str(tiny_world), "mistral_instruct")
    twice = json.dumps([{"role": "user", "content": "Hi."}, {"role": "user", "content": "Hi?"}])
    texts = ["Greet Anna.", twice, "Name 2 fruits."]
    table = pa.table({"prompt_id": [prompt_id(t) for t in texts], "prompt": texts}, schema=SCHEMA)
    shards, dropped = samplers.plan(tok, table, max_prompt=200, shard_size=8)
    assert dict(dropped) == {"template_refused": 1}
    assert [pid for pid, _, _ in shards[0]] == [prompt_id(texts[0]), prompt_id(texts[2])]

    model, _ = scoring.load_model(str(tiny_world), "float32", new_head=True)
    scorer = scoring.Scorer(model, tok, 128)
    with pytest.raises(Exception, match="alternate"):
        scorer.score(texts, ["Hello!"] * 3)  # the rollouts' default: a refusal is an error
    rewards = scorer.score(texts, ["Hello!"] * 3, refusals=True)
    assert rewards[1] is None and all(isinstance(r, float) for r in rewards[::2])
    from iterate.store.shards import SCHEMAS

    gen = pa.Table.from_pylist(
        [
            {
                "prompt_id": prompt_id(t),
                "sample_idx": 0,
                "prompt": t,
                "response": "Hello!",
                "prompt_tokens": 3,
                "response_tokens": 2,
                "finish_reason": "stop",
                "response_ids": [5, 2],
            }
            for t in texts
        ],
        schema=SCHEMAS["generate"],
    )
    labels, dropped = label.label_table(gen, rewards)
    assert dict(dropped) == {"template_refused": 1} and labels.num_rows == 2


def test_a_truncated_checkpoint_is_named(tiny_world, tmp_path):
    import shutil

    from iterate.train import models

    broken = tmp_path / "policy"
    shutil.copytree(tiny_world, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BadInput, match=f"{broken}: cannot load the model"):
        models.load_policy(str(broken))


def test_an_unlimited_kl_budget_and_a_nested_run_name_are_accepted(tmp_path):
    from iterate.run import validate

    cfg = compose_cfg([*TINY, "handoff.max_kl=inf", "run_name=group/one"], tmp_path)
    assert cfg.handoff.max_kl == float("inf")
    validate.check(cfg)  # raises BadInput on a refused setting
    cfg.handoff.max_kl = float("nan")
    with pytest.raises(validate.BadInput, match="handoff.max_kl=nan"):
        validate.check(cfg)


def test_files_that_are_not_what_their_names_say_are_named_with_their_setting(tmp_path, caplog):
    """A ``.parquet`` holding JSON text, a folder that is no saved dataset (each named with
    the config key that gave it), and a run whose ``.lock`` is a folder: bad input (status
    2) naming the file and what to do, not "the same command resumes"."""
    from iterate.preferences import read_rows
    from iterate.stages import prompts

    fake = tmp_path / "prompts.parquet"
    fake.write_text('{"prompt": "Hi."}\n')
    with pytest.raises(BadInput, match=r"^prompts.path=.*prompts.parquet: not a Parquet file"):
        prompts.read(str(fake), str(fake), "prompt", [], Counter())
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match=r"^reward.data\[0\].path=.*empty: a folder, but not a "):
        read_rows(str(tmp_path / "empty"), "reward.data[0].path")
    run = tmp_path / "run"
    (run / ".lock").mkdir(parents=True)
    status, said = _status(compose_cfg(TINY, tmp_path), run, caplog)
    assert status == 2 and ".lock: the run's lock file cannot be opened" in said, said


def test_a_conversation_cut_to_the_reward_models_length_is_said(tiny_world, caplog):
    """A reference answer (or any response) longer than ``reward.max_length`` is scored on its
    first tokens: a warning counts those cut, naming the setting; none when all fit."""
    from iterate.rewards import scorer as scoring
    from iterate.train import models

    tok = models.load_tokenizer(str(tiny_world), "mistral_instruct")
    model, _ = scoring.load_model(str(tiny_world), "float32", new_head=True)
    scorer = scoring.Scorer(model, tok, 64)
    with caplog.at_level(logging.WARNING, logger="iterate.rewards.scorer"):
        scorer.score(["Greet Anna."] * 2, ["Hello!", "Hello Anna, " * 20], desc="reference")
        assert "reference: 1 of 2 conversations reach reward.max_length=64 tokens" in caplog.text
        caplog.clear()
        scorer.score(["Greet Anna."], ["Hello!"], desc="reference")
    assert "reward.max_length" not in caplog.text
