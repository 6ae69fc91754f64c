"""Entry point: ``python -m iterate iteration=3`` (Hydra; see conf/config.yaml), and
``python -m iterate show runs/<run>`` (the run inspector)."""

import sys
from pathlib import Path

import hydra

from iterate.config import register

register()


# an absolute path: the same from `python -m iterate` and from the `iterate` console script
CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg) -> None:
    from iterate.run import cli

    cli.started()  # an exit from here on is the run's own status
    from hydra.core.hydra_config import HydraConfig
    from transformers.utils import logging as hf_logging

    from iterate.config import to_dataclass
    from iterate.run import loop

    hf_logging.disable_progress_bar()  # ours show progress; per-file loading bars are noise
    from hydra.types import RunMode

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    status = cli.exit_status(lambda: loop.run(to_dataclass(cfg), run_dir))
    if status and HydraConfig.get().mode == RunMode.MULTIRUN and status in (1, 2):
        # a sweep's job that failed or was refused: the other jobs still run, and the sweep
        # ends with its status and names it (``cli.SweepSummary``); a stop that the
        # user asked for (Ctrl-C, SIGTERM) ends the sweep here
        cli.STOPPED_JOBS.append((run_dir.name, status))
    elif status:
        sys.exit(status)


def console() -> None:
    """The ``iterate`` console script, as ``python -m iterate``."""
    from iterate.run import cli

    cli.main(main)


if __name__ == "__main__":
    console()
