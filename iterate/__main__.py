"""Entry point: ``python -m iterate iteration=3`` (Hydra; see conf/config.yaml)."""

from pathlib import Path

import hydra

from iterate.config import register

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from iterate import loop
    from iterate.config import to_dataclass

    loop.run(to_dataclass(cfg), Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
