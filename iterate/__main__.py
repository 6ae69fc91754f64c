"""Entry point: ``python -m iterate iteration=3`` (Hydra; see conf/config.yaml)."""

from pathlib import Path

import hydra

from iterate.config import register

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from transformers.utils import logging as hf_logging

    from iterate import loop
    from iterate.config import to_dataclass

    hf_logging.disable_progress_bar()  # ours show progress; per-file loading bars are noise

    loop.run(to_dataclass(cfg), Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
