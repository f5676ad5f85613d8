"""The README's examples are run: every `mmstory ...` command line in it is parsed by that command's real argument
parser (and stopped there, before any work), and its Python API block runs on the tiny random model."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest
from conftest import ROOT, make_photo

from mmstory import cli

README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    """`mmstory ...` lines of the README's bash blocks and `mmstory ...` code spans in its text, one command each:
    comments dropped, `a | b` split, optional `[...]` parts kept and `...` placeholders dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        lines += [line.split("  #")[0].split(" # ")[0].strip() for line in block.splitlines()]
    lines += re.findall(r"`(mmstory [a-z][^`]*)`", README)
    commands = []
    for line in lines:
        for part in line.split(" | "):
            part = part.strip()
            if part.startswith("mmstory ") and part not in commands:
                commands.append(part)
    return commands


def argv_of(command: str) -> list[str]:
    words = shlex.split(command.replace("[", " ").replace("]", " "))[1:]
    return [word for word in words if word != "..."]


class Parsed(Exception):
    """Raised once a real parser has parsed the command line: the command is valid and nothing has run."""


@pytest.fixture
def parse_only(monkeypatch):
    """Every argparse parser parses for real, then stops the command (train, eval, serve, ... build their own)."""
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        namespace = real(self, args, namespace)
        raise Parsed(self.prog, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)


def test_the_readme_has_the_commands_it_should():
    commands = readme_commands()
    assert 'mmstory answer photo.jpg "What is the dog doing?"' in commands
    assert {argv_of(c)[0] for c in commands} >= {"story", "answer", "caption", "train", "eval", "demo", "serve",
                                                  "bench", "fetch-weights"}


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_line_parses(parse_only, command, capsys):
    argv = argv_of(command)
    with pytest.raises(Parsed) as parsed:
        cli.main(argv)
    prog, namespace = parsed.value.args
    if argv[0] in cli.SUBMODULE_COMMANDS:  # parsed by the command's own parser, not only the dispatcher's
        assert prog == f"mmstory {argv[0]}"
    else:
        assert namespace.command == argv[0]
    assert "error" not in capsys.readouterr().err


def test_the_readme_answer_line_asks_its_question(parse_only):
    with pytest.raises(Parsed) as parsed:
        cli.main(argv_of('mmstory answer photo.jpg "What is the dog doing?"'))
    namespace = parsed.value.args[1]
    assert namespace.images == ["photo.jpg", "What is the dog doing?"] and namespace.question is None
    # cmd_answer takes the last word as the question (tests/test_input_limits.py runs it on the tiny model)


def test_the_readme_python_block_runs_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    """The block as written, with the packaged name swapped for a tiny model saved to a folder and the decode step
    left uncompiled (seconds instead of a compile); its photos are generated pictures under the names it uses."""
    import torch

    from mmstory import create_model

    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "StoryTeller" in b]
    torch.manual_seed(0)
    create_model("tiny").save_pretrained(tmp_path / "tiny")
    code = block.replace('"mmstory-small", device="auto"', f'{str(tmp_path / "tiny")!r}, device="auto", compile=False')
    assert code != block
    monkeypatch.chdir(tmp_path)
    names = ["beach.jpg", "1.jpg", "2.jpg", "3.jpg", "dog.jpg"]
    for seed, name in enumerate(names):
        make_photo(seed).save(tmp_path / name)
    exec(compile(code, "README.md", "exec"), {"list_of_500_paths": names})  # noqa: S102 - the README's own code
    out = capsys.readouterr().out
    assert out.strip()
