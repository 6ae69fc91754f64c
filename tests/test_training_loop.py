"""The one training loop (``iterate.train.loop.optimise``) by hand: what a step does, a step
skipped for a non-finite loss, an empty step, the schedule and the rows; and that every
model this package trains is stepped by it."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from iterate.train.loop import optimise

ROOT = Path(__file__).resolve().parents[1] / "iterate"


def _run(batches: list[list[float]], schedule: bool = False):
    """y = w x with w from 1, loss (w x - 0)^2 / 2 averaged over a step's examples; plain SGD
    at lr 0.1 so each step can be worked out by hand."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s) if schedule else None

    def step_loss(xs: list[float]) -> tuple[float, dict]:
        x = torch.tensor(xs)[:, None]
        loss = (model(x) ** 2 / 2).mean()
        loss.backward()
        return loss.item(), {"mean_x": sum(xs) / len(xs)}

    rows: list[dict] = []

    def on_step(row: dict) -> dict:
        rows.append(dict(row, weight=model.weight.item()))
        return rows[-1]

    steps = ((0, b) for b in batches)
    out = optimise(
        model,
        opt,
        params,
        steps,
        step_loss,
        total=len(batches),
        desc="test",
        max_grad_norm=100.0,
        schedule=sched,
        on_step=on_step,
    )
    return model, out, rows


def test_a_step_is_the_gradient_step_worked_out_by_hand():
    # loss = w^2 x^2 / 2 averaged: d/dw = w * mean(x^2); x in {1, 3}: mean 5, w 1 -> 1 - 0.5
    model, out, rows = _run([[1.0, 3.0]])
    assert model.weight.item() == pytest.approx(0.5)
    assert out["steps"] == 1 and out["skipped_steps"] == 0 and out["empty_steps"] == 0
    (row,) = rows
    assert row["loss"] == pytest.approx(2.5) and row["grad_norm"] == pytest.approx(5.0)
    assert row["examples"] == 2 and row["mean_x"] == 2.0 and row["lr"] == 0.1
    assert row["skipped"] is False and out["final"] is rows[-1]
    assert not model.training  # left in eval mode


def test_a_non_finite_step_is_skipped_and_an_empty_one_takes_no_step():
    # step 1: x = 1 -> w 1 - 0.1 = 0.9; step 2: NaN -> skipped, w stays; step 3: no examples;
    # step 4: x = 1 -> 0.9 - 0.09 = 0.81 (the skipped step left no gradient behind)
    model, out, rows = _run([[1.0], [math.nan], [], [1.0]])
    assert [r["weight"] for r in rows] == pytest.approx([0.9, 0.9, 0.9, 0.81])
    assert out == {"steps": 4, "skipped_steps": 1, "empty_steps": 1, "final": rows[-1]}
    assert rows[1]["skipped"] is True and rows[2] == {
        "step": 3,
        "epoch": 0,
        "examples": 0,
        "empty": True,
        "weight": pytest.approx(0.9),
    }


def test_the_schedule_steps_after_each_step_and_the_row_has_the_rate_it_used():
    # lr 0.1, then 0.05: w 1 -> 0.9 -> 0.9 - 0.05 * 0.9 = 0.855
    model, _, rows = _run([[1.0], [1.0]], schedule=True)
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.05])
    assert model.weight.item() == pytest.approx(0.855)


def test_every_model_this_package_trains_is_stepped_by_the_one_loop():
    """A module that makes an optimiser (outside the benchmarks, which time single steps)
    also calls ``optimise``: no second training loop."""
    makers, loops = set(), set()
    for path in ROOT.rglob("*.py"):
        if "bench" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name.startswith("torch.optim.") and "lr_scheduler" not in name:
                    makers.add(path.relative_to(ROOT).as_posix())
                if name == "optimise":
                    loops.add(path.relative_to(ROOT).as_posix())
    assert makers == {"stages/update/training.py", "stages/reward_model.py", "toy/build.py"}
    assert makers <= loops


def test_shuffled_cuts_each_epoch_s_permutation_into_steps_and_draws_lazily():
    from iterate.train.loop import shuffled

    g = torch.Generator().manual_seed(0)
    steps = list(shuffled(5, 2, 2, g))
    assert [e for e, _ in steps] == [0, 0, 0, 1, 1, 1]
    assert [len(s) for _, s in steps] == [2, 2, 1] * 2
    for epoch in (0, 1):
        assert sorted(j for e, s in steps if e == epoch for j in s) == [0, 1, 2, 3, 4]
    want = torch.Generator().manual_seed(0)
    first = torch.randperm(5, generator=want).tolist()
    assert [j for e, s in steps if e == 0 for j in s] == first
    # lazy: a draw between the epochs' steps comes before the next epoch's shuffle
    g2, ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    it = shuffled(5, 5, 2, g2)
    next(it)
    between = torch.randperm(3, generator=g2).tolist()
    torch.randperm(5, generator=ref)
    assert between == torch.randperm(3, generator=ref).tolist()
    assert next(it)[1] == torch.randperm(5, generator=ref).tolist()
