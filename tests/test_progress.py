"""Progress where no bar can be drawn: log lines with the count, rate and time left."""

from __future__ import annotations

import logging

from iterate import progress


def test_long_work_without_a_terminal_speaks_in_log_lines(monkeypatch, caplog):
    """Quiet for its first 10 s; then a line per further tenth of the work (at most one
    each 5 s) or per minute, with the rate and the time left; a last line at the end."""
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="iterate.progress")
    bar = progress.bar(1000, "generate", "prompt")  # (pytest's stderr is no terminal)
    assert isinstance(bar, progress.Lines)
    for _ in range(50):  # 5 s: 50 prompts, quiet
        clock[0] += 0.1
        bar.update()
    assert not caplog.records
    bar.set_postfix(loss="0.123")
    for _ in range(150):  # to 20 s: 200 prompts, a line once past 10 s and 10 % more done
        clock[0] += 0.1
        bar.update()
    [said] = [r.getMessage() for r in caplog.records]
    assert said == "generate: 101/1000 prompt (10%), 10 prompt/s, 0m10s in, 1m29s left, loss 0.123"
    clock[0] += 300  # five quiet minutes, then one prompt: a line, since a minute passed
    bar.update()
    assert caplog.records[-1].getMessage().startswith("generate: 201/1000 prompt (20%)")
    bar.update(799)
    bar.close()
    assert caplog.records[-1].getMessage().startswith("generate: 1000/1000 prompt (100%)")
    assert "left" not in caplog.records[-1].getMessage()


def test_short_work_says_nothing(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="iterate.progress")
    bar = progress.bar(10, "score", "row")
    bar.update(10)
    bar.close()
    assert not caplog.records


def test_no_cuda_in_use_means_no_gpu_peak_and_a_stage_records_none(tmp_path):
    """Where this process has put nothing on a CUDA device (CI, a CPU run), a stage's
    record has no ``peak_gpu_mb`` and resetting the mark does nothing."""
    import torch

    from iterate.store.stage import Stage

    if torch.cuda.is_available():  # under the GPU check, test_cuda shows the other side
        return
    progress.reset_peak_gpu()
    assert progress.peak_gpu_mb() is None
    stage = Stage(tmp_path / "s", "s", {})
    stage.check(False)
    done = stage.finish()
    assert "peak_gpu_mb" not in done and done["peak_rss_mb"] > 0
