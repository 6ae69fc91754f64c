"""The evaluation's KL: hand-computed on built log-probs through ``losses.kl_penalty``, and on
a real policy; the win rate by hand."""

import json
import math
import statistics

import pyarrow as pa
import pytest
import torch

from iterate import rewards, winrate
from iterate.errors import BadInput
from iterate.run import validate
from iterate.sampling import samplers
from iterate.stages import evaluate, heldout
from iterate.stages.update import common
from iterate.store.paths import Paths
from iterate.store.shards import SCHEMAS, prompt_id, shard_path, write_shard
from iterate.train import models

from .conftest import ROOT, compose_cfg


def test_sequence_kl_by_hand():
    new = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kl = evaluate.sequence_kl(new, ref, mask)
    # k1 = log p - log q per token: 0.5 - 1.0; k3 = e^r - 1 - r with r = log q - log p
    assert kl["k1"] == pytest.approx([-0.5, 0.0])
    k3_row0 = (math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0)
    assert kl["k3"] == pytest.approx([k3_row0, 0.0])
    # tokens outside the mask do not count, whatever their values
    noisy = new.clone()
    noisy[0, 2] = -9.0
    assert evaluate.sequence_kl(noisy, ref, mask) == kl


def test_win_rate_by_hand():
    assert winrate.judged([1.0, 0.5, 0.0], [0.0, 0.5, 1.0]) == [1.0, 0.5, 0.0]
    assert winrate.figures([1.0, 0.5, 0.0], [3, 3, 3], [3, 3, 3])["win_rate"] == 0.5
    with pytest.raises(ValueError):
        winrate.judged([1.0], [0.0, 1.0])  # samples must be aligned


def test_the_main_figures_are_the_gold_judges_where_there_is_one(tmp_path):
    gold = winrate.figures([1.0, 1.0, 0.0, 0.5], [30, 40, 10, 20], [20, 20, 20, 20])
    reward = winrate.figures([0.0, 1.0], [30, 10], [20, 20])
    judged = {"reward": reward, "gold": gold, "chars": reward}
    cfg = compose_cfg(_JUDGE, tmp_path)
    assert evaluate.main_judge(cfg, judged) == "gold"
    got = evaluate.main_figures(judged, "gold")
    assert got["main_judge"] == "gold" and got["length_ratio"] == 1.25
    assert got["lc_win_rate"] == gold["lc_win_rate"] and got["win_ties"] == 0.25
    assert got["win_rate"] == gold["win_rate"] == 0.625
    # no gold judge: the first of evaluate.judges, else the run's reward
    assert evaluate.main_judge(cfg, {"reward": reward, "gold": {}, "chars": reward}) == "chars"
    assert evaluate.main_judge(compose_cfg([], tmp_path), {"reward": reward}) == "reward"
    assert evaluate.main_figures({"reward": reward}, "reward")["length_ratio"] == 1.0
    assert evaluate.main_figures({"reward": {}}, "reward") == {}


def chars(prompts, responses):
    """A judge that prefers the longer response and nothing else."""
    return [float(len(r)) for r in responses]


_JUDGE = ["evaluate.judges=[{kind: function, function: 'tests.test_evaluate:chars', name: chars}]"]


def _generate_rows(items, responses_of, samples: int) -> pa.Table:
    rows = [
        {
            "prompt_id": prompt_id(it.prompt),
            "sample_idx": k,
            "prompt": it.prompt,
            "response": responses_of(it, k),
            "prompt_tokens": 5,
            "response_tokens": 5,
            "finish_reason": "stop",
            "response_ids": [1, 2],
        }
        for it in items
        for k in range(samples)
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMAS["generate"])


def test_every_judge_against_a_reference_file_by_hand(tmp_path):
    """A reference outputs file in AlpacaEval's format, matched to the held-out prompts by
    text: the reward (here the gold judge as a function), the gold judge and a judge of
    evaluate.judges each give figures against it that equal ``winrate.figures`` of the
    preferences worked out here; a prompt without a reference is counted and left out; the
    win rates against the initial samples stay what they were."""
    from iterate.toy import world

    items = world.split(0.1)[1][:5]
    init = _generate_rows(items, lambda it, k: world.best_response(it) + " Sorry.", 2)
    new = _generate_rows(items, lambda it, k: world.best_response(it) + " thanks" * k, 2)
    outputs = [
        {
            "instruction": it.prompt,
            "output": "nope " * (n + 1),
            "generator": "gpt4",
            "dataset": "toy",
        }
        for n, it in enumerate(items[:4])
    ]
    ref_file = tmp_path / "alpaca_eval_outputs.json"
    ref_file.write_text(json.dumps(outputs))
    cfg = compose_cfg(
        [
            "reward=gold",
            "evaluate.samples=2",
            "evaluate.reference.kind=file",
            f"evaluate.reference.path={ref_file}",
            *_JUDGE,
        ],
        tmp_path,
    )
    validate._evaluation(cfg)
    paths = Paths(run=tmp_path / "run", base_policy="")
    write_shard(init, shard_path(paths.initial_samples_dir, 0))
    ref = heldout.reference(cfg, paths, 0, new)
    assert ref.info == {"kind": "file", "prompts": 4, "unreferenced": 1}
    assert ref.index[-2:] == [None, None] and ref.table.num_rows == 4
    got, each = evaluate.scores(cfg, paths, new, rewards.of(cfg, run=paths.run), ref)
    prompts, responses = new["prompt"].to_pylist(), new["response"].to_pylist()
    by_prompt = {o["instruction"]: o["output"] for o in outputs}
    referenced = [(p, r, by_prompt[p]) for p, r in zip(prompts, responses) if p in by_prompt]
    gold = lambda p, r: world.gold_score(p, r)  # noqa: E731
    for name, score in (("gold", gold), ("reward", gold), ("chars", lambda p, r: len(r))):
        prefs = [winrate.preference(score(p, r), score(p, o)) for p, r, o in referenced]
        lengths = [len(r) for _, r, _ in referenced], [len(o) for *_, o in referenced]
        by = [p for p, *_ in referenced]  # a prompt's two samples: one cluster
        assert got["judges"][name] == winrate.figures(prefs, *lengths, by), name
        assert got["judges"][name]["prompts"] == 4
    assert got["main_judge"] == "gold" and got["win_rate"] == got["judges"]["gold"]["win_rate"]
    assert got["reference"] == ref.info
    # against the initial samples, sample by sample, as before
    before = init["response"].to_pylist()
    vs_init = winrate.judged(
        [gold(p, r) for p, r in zip(prompts, responses)],
        [gold(p, r) for p, r in zip(prompts, before)],
    )
    assert got["win_rate_vs_initial"] == got["proxy_win_rate"] == round(sum(vs_init) / 10, 4)
    assert 0 < got["win_rate_vs_initial"] < 1  # (the responses differ both ways)
    assert each.column("gold").to_pylist() == [gold(p, r) for p, r in zip(prompts, responses)]


def test_a_bad_reference_file_is_named_by_file_row_and_field(tmp_path):
    bad = tmp_path / "outputs.jsonl"
    bad.write_text(
        json.dumps({"instruction": "Hi.", "output": "Hello."})
        + "\n"
        + json.dumps({"instruction": "Bye.", "output": 3})
        + "\n"
    )
    with pytest.raises(BadInput, match=r"outputs.jsonl: row 1: field 'output': int, where row 0"):
        heldout.outputs(str(bad), "instruction", "output")
    bad.write_text(json.dumps({"instruction": "Bye.", "output": 3}) + "\n")
    with pytest.raises(BadInput, match=r"outputs.jsonl: row 0: field 'output': expected the"):
        heldout.outputs(str(bad), "instruction", "output")
    with pytest.raises(BadInput, match=r"no field 'answer' \(evaluate.reference.output_field"):
        heldout.outputs(str(bad), "instruction", "answer")
    rows = [("Hi.", "Hello."), ("Bye.", "Ciao."), ("Hi.", "Hello."), ("Bye.", "See you.")]
    bad.write_text("".join(json.dumps({"instruction": p, "output": o}) + "\n" for p, o in rows))
    with pytest.raises(BadInput, match=r"outputs.jsonl: rows 1 and 3 give different outputs"):
        heldout.outputs(str(bad), "instruction", "output")  # (the same one twice is fine)
    bad.write_text(json.dumps({"instruction": "Hi."}) + "\n")
    with pytest.raises(BadInput, match="evaluate.reference.path=None: is the reference outputs"):
        validate._evaluation(compose_cfg(["evaluate.reference.kind=file"], tmp_path))
    lacking = ["evaluate.reference.kind=file", f"evaluate.reference.path={bad}"]
    with pytest.raises(BadInput, match=r"no field 'output' \(evaluate.reference.output_field"):
        validate._evaluation(compose_cfg(lacking, tmp_path))  # at start-up
    twice = "{kind: function, function: 'tests.test_evaluate:chars', name: chars}"
    named_twice = [f"evaluate.judges=[{twice}, {twice}]"]
    with pytest.raises(BadInput, match=r"judges\[0\].name='chars': must be a word that no other"):
        validate._evaluation(compose_cfg(named_twice, tmp_path))


def _samples(tok, policy_model, n=2):
    prompts = ["Greet Anna.", "What is 2 plus 3?", "Count from 1 to 4."]
    sampler = samplers.make("transformers", samplers.Spec())
    sampler.sync(policy_model, tok, "")
    planned = [(f"p{i}", p, models.prompt_ids(tok, p)) for i, p in enumerate(prompts)]
    samples = sampler.sample(
        [ids for *_, ids in planned], samplers.Params(n=n, max_tokens=10), seed=0
    )
    return pa.Table.from_pylist(samplers.shard_rows(planned, samples), schema=SCHEMAS["generate"])


def test_kl_of_a_real_policy(tiny_cfg, tiny_world, tmp_path):
    """A fresh LoRA adapter (B = 0) is the reference itself: KL exactly 0 with the adapter
    disabled. Against another reference model, k3 > 0 and k1's mean is the KL estimate."""
    tiny_cfg.update.lora.dropout = 0.0
    tok = models.load_tokenizer(str(tiny_world))
    model = common.policy_model(tiny_cfg, str(tiny_world), torch.device("cpu")).eval()
    samples = _samples(tok, model)
    same = evaluate.kl(tiny_cfg, tok, model, str(tiny_world), str(tiny_world), samples)
    assert same["k1"] == [0.0] * samples.num_rows and same["k3"] == [0.0] * samples.num_rows
    other = tmp_path / "other"
    ref = models.load_policy(str(tiny_world))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(other)
    tok.save_pretrained(other)
    apart = evaluate.kl(tiny_cfg, tok, model, str(other), str(tiny_world), samples)
    assert all(k > 0 for k in apart["k3"]) and len(apart["k1"]) == samples.num_rows
    # the same numbers by hand from the two models' log-probs, each prompt+response run whole
    prompts = [models.prompt_ids(tok, p) for p in samples["prompt"].to_pylist()]
    responses = samples["response_ids"].to_pylist()
    ids, mask, resp = models.sequence_batch(tok, prompts, responses, torch.device("cpu"))
    with torch.no_grad():
        new = (models.token_logps(model, ids, mask) * resp).sum(-1)
        theirs = (models.token_logps(ref, ids, mask) * resp).sum(-1)
    assert apart["k1"] == pytest.approx((new - theirs).tolist(), abs=1e-4)


def test_the_length_gates_reject_beside_the_kl_budget_naming_each_failure():
    from iterate.errors import BadInput
    from iterate.run import validate
    from iterate.stages import handoff

    from .conftest import compose_cfg

    before = {"iteration": None, "win_rate": 0.47, "win_rate_se": 0.04}
    ev = {
        "kl": {"k1": 2.0, "k3": 1.9, "k1_se": 0.5},
        "length_ratio": 1.6,
        "lc_win_rate": 0.48,
        "vs_previous": before,
    }
    plain = compose_cfg([])
    got = handoff.gate(plain, ev)  # no length gate asked: the KL and the reward's
    assert got["accepted"] and got["k1_upper"] == 2.98  # 2 + 1.96 x 0.5
    assert got["min_win_rate_vs_previous"] == 0.42  # 1/2 - 2 x 0.04: 0.47 passes
    # a policy that loses to the one it would replace by more than a standard error does not
    lost = handoff.gate(plain, {**ev, "vs_previous": {**before, "iteration": 1, "win_rate": 0.4}})
    assert lost["failed"] == [
        "reward's win rate against the iteration 1's policy 0.4 < 0.42 (1/2 - 2 se)"
    ]
    nothing = handoff.gate(plain, {**ev, "vs_previous": {}})  # not measured: not passed
    assert nothing["failed"] == [
        "reward's win rate against the initial policy none (not measured) (1/2 - 2 se)"
    ]
    off = compose_cfg(["handoff.reward_tolerance_se=null"])
    assert handoff.gate(off, {**ev, "vs_previous": {}})["accepted"]
    strict = compose_cfg(["handoff.reward_tolerance_se=0"])  # (the policy must not lose at all)
    assert handoff.gate(strict, ev)["failed"][0].endswith("0.47 < 0.5 (1/2 - 0 se)")
    cfg = compose_cfg(["handoff.max_length_ratio=1.5", "handoff.min_lc_win_rate=0.5"])
    got = handoff.gate(cfg, ev)
    assert not got["accepted"] and got["failed"] == [
        "length ratio 1.6 > 1.5",
        "LC win rate 0.48 < 0.5",
    ]
    assert got["decision"].startswith("reject (stop): length ratio")
    ok = handoff.gate(cfg, {**ev, "length_ratio": 1.2, "lc_win_rate": 0.55})
    assert ok["accepted"] and ok["decision"] == "accept" and ok["length_ratio"] == 1.2
    unfitted = handoff.gate(cfg, {**ev, "length_ratio": 1.2, "lc_win_rate": None})
    assert unfitted["failed"] == ["LC win rate none (not fitted) < 0.5"]
    # a gate asked for whose figure is missing does not pass, the length ratio's as the LC's
    unmeasured = handoff.gate(cfg, {**ev, "length_ratio": None, "lc_win_rate": 0.55})
    assert unmeasured["failed"] == ["length ratio none (not measured) > 1.5"]
    both = handoff.gate(cfg, {**ev, "kl": {"k1": 12.0, "k3": 11.0}})
    assert both["failed"][0] == "KL 12 > 10" and len(both["failed"]) == 3
    for bad in (
        "handoff.max_length_ratio=0",
        "handoff.min_lc_win_rate=1.5",
        "handoff.reward_tolerance_se=-1",
    ):
        with pytest.raises(BadInput, match=bad.split("=")[0]):
            validate.check(compose_cfg([bad]))


def test_the_previous_reference_is_the_policy_the_iteration_started_from(tmp_path):
    """evaluate.reference.kind=previous: iteration 2 is compared with the samples of the
    last accepted iteration before it (here 0, since 1 was rejected), sample by sample; an
    iteration that started from the initial policy with the initial samples (no table)."""
    from iterate.toy import world

    items = world.split(0.2)[1][:3]
    cfg = compose_cfg(["evaluate.reference.kind=previous"], tmp_path)
    paths = Paths(run=tmp_path / "run", base_policy="")
    for i, accepted in ((0, True), (1, False)):
        folder = paths.stage(i, "handoff")
        folder.mkdir(parents=True)
        (folder / "_DONE.json").write_text(json.dumps({"kl": {"accepted": accepted}}))
        rows = _generate_rows(items, lambda it, k, i=i: f"iteration {i} sample {k}", 2)
        write_shard(rows, shard_path(paths.evaluation_samples(i), 0))
    new = _generate_rows(items[::-1], lambda it, k: "new", 2)  # another order
    ref = heldout.reference(cfg, paths, 2, new)
    assert ref.info == {"kind": "previous", "iteration": 0}
    old = ref.table["response"].to_pylist()
    assert [old[j] for j in ref.index] == [f"iteration 0 sample {k}" for _ in items for k in (0, 1)]
    assert ref.table["prompt_id"].to_pylist()[ref.index[0]] == new["prompt_id"][0].as_py()
    assert heldout.reference_conf(cfg, paths, 2) == (
        {"kind": "previous"},
        [paths.stage(0, "evaluate")],
    )
    first = heldout.reference(cfg, paths, 0, new)
    assert first.table is None and first.info == {"kind": "previous", "iteration": None}


def test_the_toy_reference_file_is_what_the_toy_world_writes():
    """data/toy_alpaca_eval.json: the toy world's held-out prompts with a reference
    system's outputs in AlpacaEval's format (``world.reference_outputs``), unchanged."""
    from iterate.toy import world

    shipped = json.loads((ROOT / "data" / "toy_alpaca_eval.json").read_text())
    assert shipped == world.reference_outputs()
    assert {r["instruction"] for r in shipped} == {i.prompt for i in world.split(0.2)[1]}


def test_a_judges_means_and_its_gain_paired_by_prompt_by_hand():
    """Two prompts, two samples each: each side's mean with its error clustered by prompt,
    and the gain as the mean over prompts of the per-prompt differences (a NaN: unscored,
    left out), its error the spread of those differences over sqrt(prompts)."""
    new_t = pa.table({"prompt_id": ["a", "a", "b", "b"]})
    init_t = pa.table({"prompt_id": ["a", "a", "b", "b"]})
    got = evaluate.means([1.0, 1.0, 0.0, 1.0], new_t, [0.0, 1.0, 0.0, float("nan")], init_t)
    assert got["mean"] == 0.75 and got["initial_mean"] == round(1 / 3, 4)
    assert got["mean_se"] == round(winrate.clustered_se([1, 1, 0, 1], ["a", "a", "b", "b"]), 4)
    diffs = [1.0 - 0.5, 0.5 - 0.0]  # prompt a: 1 vs 0.5; prompt b: 0.5 vs 0 (one scored)
    assert got["gain"] == 0.5 and got["gain_se"] == round(statistics.stdev(diffs) / math.sqrt(2), 4)


def test_a_reference_file_is_matched_to_the_heldout_prompts_before_any_iteration(tmp_path, caplog):
    """Once the held-out set is drawn: a reference file with none of its prompts stops the
    run (naming the file and the counts), one with some of them says how many it has."""
    from iterate.stages import prompts

    paths = Paths(run=tmp_path / "run", base_policy="")
    write_shard(prompts.table(["Hi.", "Bye.", "Why?"]), shard_path(paths.heldout_dir, 0))
    ref_file = tmp_path / "outputs.json"
    cfg = compose_cfg(
        ["evaluate.reference.kind=file", f"evaluate.reference.path={ref_file}"], tmp_path
    )
    ref_file.write_text(json.dumps([{"instruction": "Other.", "output": "o"}]))
    with pytest.raises(
        BadInput,
        match=r"outputs.json: none of its 1 prompts \('instruction'\) "
        r"is one of the 3 held-out prompts",
    ):
        heldout.check_reference(cfg, paths)
    ref_file.write_text(json.dumps([{"instruction": "Hi.", "output": "o"}]))
    with caplog.at_level("WARNING"):
        heldout.check_reference(cfg, paths)
    assert any("has outputs for 1 of the 3 held-out prompts" in m for m in caplog.messages)
