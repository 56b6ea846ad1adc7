"""The README and docs/ say what the code does: their commands run, their option lists
and field table match the code, and their links lead somewhere."""

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lstm_lm.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
runner = CliRunner()


def _console_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, the output lines the page shows) for each `$ lstm-lm ...` in console blocks."""
    found = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, *output = chunk.rstrip("\n").split("\n")
            found.append((command, output))
    return found


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert "bash scripts/setup.sh && .venv/bin/lstm-lm train" in text  # the main job, set-up included
    assert "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q" in text  # the tests, likewise
    assert "](docs/serve-page.png)" in text  # a screenshot of the web page
    pages = ["results", "speed", "why-lstm", "use", "reference", "checkpoints", "distributed", "development"]
    for page in [*pages, "keyboard"]:
        assert f"](docs/{page}.md)" in text, page


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
        if not re.match(r"[a-z]+://", target):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_the_readme_console_commands_give_what_it_shows(demo_workdir, monkeypatch):
    """The quickstart's `complete --next` and `eval`, run on the quickstart's demo model."""
    monkeypatch.chdir(demo_workdir)
    commands = _console_commands(README.read_text(encoding="utf-8"))
    assert [c.split()[:2] for c, _ in commands] == [["lstm-lm", "complete"], ["lstm-lm", "eval"]]
    for command, shown in commands:
        result = runner.invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 0, (command, result.output)
        got = result.stdout.strip().splitlines()
        if command.split()[1] == "eval":
            measured, expected = json.loads(got[0]), json.loads(shown[0])
            assert measured.keys() == expected.keys()
            assert measured["perplexity"] == pytest.approx(expected["perplexity"], rel=0.02)
            assert measured["tokens"] == expected["tokens"]
        else:
            assert len(got) == len(shown)
            (word, p), (shown_word, shown_p) = got[0].split("\t"), shown[0].split("\t")
            assert word == shown_word and float(p) == pytest.approx(float(shown_p), abs=0.02)


def _commands() -> dict[str, set[str]]:
    """Each command's long options, as its --help lists them."""
    options = {}

    def walk(group, prefix):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, f"{prefix}{name} ")
                continue
            options[f"{prefix}{name}"] = {
                opt
                for p in command.params
                if p.param_type_name == "option"
                for opt in [*p.opts, *p.secondary_opts]
                if opt.startswith("--")
            }

    walk(typer.main.get_command(app), "")
    return options


@pytest.mark.parametrize("command", sorted(_commands()))
def test_each_command_synopsis_in_the_reference_lists_its_options(command):
    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    section = re.search(rf"### `lstm-lm {command}`\n\n```\n(.*?)```", text, re.S)
    assert section, f"docs/reference.md has no synopsis for lstm-lm {command}"
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", section.group(1)))
    assert listed == _commands()[command]


def test_the_reference_field_table_is_the_generated_one():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.PAGE.read_text(encoding="utf-8")
    assert gen.render(text) == text, "run: python scripts/gen_reference.py"
