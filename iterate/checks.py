"""Start-up checks that the run's validation (``iterate.run.validate``) and the reward kinds
(``iterate.rewards``) share: a setting's value must hold, a folder must be a saved model (or
a hub id), a reward model must have a score head, a model must be a causal LM. Each raises
``BadInput`` naming the setting, its value and what to do. Torch-free."""

from __future__ import annotations

import re
from pathlib import Path

from iterate import packaged
from iterate.errors import BadInput
from iterate.store.shards import read_json

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


def need(ok: bool, key: str, value, says: str) -> None:
    if not ok:
        raise BadInput(f"{key}={value!r}: {says}")


def hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a hub repository id (``org/name``) and is no local path;
    else None."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")):
        return None
    return name if HUB_ID.match(name) else None


def model_folder(key: str, path: str | None, what: str) -> None:
    """A local folder with a config.json, or something shaped like a hub id."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").exists() and not (p / "ensemble.json").exists():
            raise BadInput(
                f"{key}={path!r}: the folder has no config.json; point it at a saved {what} "
                "(save_pretrained) folder"
            )
        return
    if name := packaged.which(path):
        raise BadInput(
            f"{key}={path!r}: the folder of the packaged model {name} is not made "
            f"yet: {packaged.command(name)}"
        )
    if not hub_id(path):
        raise BadInput(
            f"{key}={path!r}: no such {what} folder (and not a hub id of the form org/name)"
        )


def reward_head(key: str, path: str, architectures: list[str] | None) -> None:
    """A checkpoint used as a reward model must have a score head: a causal LM (or any
    other head) loaded as one would get a random head, and its rewards would be noise that
    a run optimises without a word. (Training a reward model here starts from a causal LM
    on purpose: ``reward.base``.)"""
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise BadInput(
            f"{key}={path!r}: a {architectures[0]} checkpoint, not a reward model (it has no "
            "score head: its rewards would be random); point it at a sequence-classification "
            f"checkpoint, or train one here from it (reward.train=true reward.base={path})"
        )


def model_config(path: str | None) -> dict:
    """A local model folder's config.json ({} for a hub id, or a damaged file, which the
    load names)."""
    if not path:
        return {}
    try:
        return read_json(Path(path) / "config.json") or {}
    except BadInput:
        return {}


def reward_folder(key: str, path: str | None) -> None:
    """A reward model's folder: loadable, and with a score head when its config says."""
    model_folder(key, path, "reward model")
    if path:
        reward_head(key, path, model_config(path).get("architectures"))


def causal_lm(key: str, path: str | None, says: str) -> None:
    """A model at ``path`` that must be a causal LM (a pairwise model, a judge) is one."""
    arch = model_config(path).get("architectures") or []
    need(
        not arch or any(a.endswith("ForCausalLM") for a in arch),
        key,
        path,
        f"a {arch[0] if arch else '?'} checkpoint: {says}",
    )
