"""Every `minillama ...` command that README.md shows exists as shown: its sub-command and every --flag are in the
CLI's parser, its `--help` works, and the cheap ones run for real on tiny inputs.

Commands are taken from README's fenced code blocks (segments of a line joined by &&) and from its inline code
spans (the table rows and the prose). `[--flag X]` is an optional part, shown and so checked; `a/b` stands for
two sub-commands; `...` for more arguments. A command runs for real when its sub-command is in RUN: each
placeholder (an upper-case word such as DIR, N or FILE.jsonl) takes the value listed for the flag before it, or
for a positional, the next of POSITIONALS. Sub-commands too slow to run here are in HELP_ONLY with the test that
does run them; one in neither list fails the test, so nothing README shows goes unchecked.
"""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from minillama.cli import build_parser, main
from minillama.tasks import TASK_DIR

README = Path(__file__).resolve().parents[1] / "README.md"

RUN = {("presets",), ("tokenizer", "train"), ("tokenizer", "encode"), ("tokenizer", "decode"), ("data", "prepare"),
       ("data", "inspect"), ("eval",), ("generate",), ("plan",), ("export", "gguf"), ("quantize",)}
HELP_ONLY = {
    ("train",): "minutes of training; tests/test_train.py trains through the CLI on a tiny config",
    ("convert", "meta"): "needs a Meta-format checkpoint; tests/test_meta.py writes sharded ones and converts "
                         "them through the CLI",
    ("serve",): "a long-running server; tests/test_serve.py starts it in subprocesses and talks to it with the "
                "openai client",
    ("lm-eval",): "lm_eval's own CLI (its flags are checked against `lm-eval run --help`); "
                  "tests/test_lm_eval.py runs `minillama lm-eval --model minillama` in a subprocess",
}
# A placeholder after one of these flags takes this value ({name}: a fixture below).
FLAG_VALUES = {"--input": "{text}", "--vocab-size": "300", "--out": "{out}", "--tokenizer": "{tokenizer}",
               "--checkpoint": "{checkpoint}", "--data": "{text}", "--task": "{task}", "--shots": "1",
               "--step": "0", "--model": "tiny", "--tokens": "1B", "--prompt": "ROMEO:", "--dp": "2",
               "--activation-checkpointing": "selective", "--draft": "{checkpoint}", "--draft-tokens": "2",
               "--prompt-lookup": "2", "--prompt-file": "{prompts}"}
# Positional arguments, for the placeholders (or the `...`) that stand for them.
POSITIONALS = {("data", "inspect"): ["{data}"], ("export", "gguf"): ["{checkpoint}"], ("quantize",): ["{checkpoint}"],
               ("tokenizer", "encode"): ["hello world"], ("tokenizer", "decode"): ["1", "2", "3"]}
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(\.[a-z]+)?\.*")


def readme_commands() -> list[str]:
    """Every `minillama ...` command in README.md, in order, each once."""
    text = README.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        block = block.replace("\\\n", " ")  # a line continued with a backslash is one command
        found += [part.strip() for line in block.splitlines() for part in line.split("&&")]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found += re.findall(r"`([^`\n]+)`", prose)
    commands = [c for c in found if c == "minillama" or c.startswith("minillama ")]
    return list(dict.fromkeys(commands))


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices if actions else {}


def expand(command: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """(sub-command path, the words after it) for each command `command` stands for; brackets and `...` removed
    from the words."""
    words = [w.strip("[]") for w in shlex.split(command)[1:]]
    if len(words) >= 2 and words[-2] == ">":  # the shell's redirection of the output, not the command's
        words = words[:-2]
    words = [w for w in words if w and w != "..."]
    results = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...], rest: list[str]) -> None:
        choices = subparsers(parser)
        if rest and choices and all(alt in choices for alt in rest[0].split("/")):
            for alt in rest[0].split("/"):
                walk(choices[alt], path + (alt,), rest[1:])
        else:
            results.append((path, rest))

    walk(build_parser(), (), words)
    return results


CASES = [(command, path, rest) for command in readme_commands() for path, rest in expand(command)]


def test_readme_shows_every_command_group():
    shown = {path[0] for _, path, _ in CASES if path}
    assert shown == set(subparsers(build_parser())), "README's table should list every minillama command"


def parser_of(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        parser = subparsers(parser)[name]
    return parser


@pytest.fixture(scope="module")
def fixtures(cli_inputs, tmp_path_factory) -> dict[str, str]:
    """conftest's `cli_inputs`, a shipped task file, and a working directory holding README's data.toml."""
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "data.toml").write_text(f'[data]\n[[data.sources]]\nname = "text"\npath = "{cli_inputs["text"]}"\n')
    (cwd / "prompts.txt").write_text("ROMEO:\nJULIET:\n", encoding="utf-8")  # one prompt a line
    return {**{k: str(v) for k, v in cli_inputs.items()}, "cwd": str(cwd), "task": str(TASK_DIR / "arithmetic.jsonl"),
            "prompts": str(cwd / "prompts.txt")}


@pytest.mark.parametrize("command, path, rest", CASES, ids=[f"{c} [{' '.join(p)}]" for c, p, _ in CASES])
def test_readme_command(command, path, rest, fixtures, tmp_path, monkeypatch, capsys):
    assert not subparsers(parser_of(path)), \
        f"README shows `{command}`: {rest[:1]} is not a sub-command of `{' '.join(('minillama',) + path)}`"
    assert path in RUN or path in HELP_ONLY, f"`{command}`: add {path} to RUN or HELP_ONLY"
    if path == ("lm-eval",):
        with pytest.raises(SystemExit) as done:  # lm_eval's parser exits itself
            main(["lm-eval", "run", "--help"])
        assert done.value.code in (0, None)
        options = capsys.readouterr().out
    else:
        assert main([*path, "--help"]) == 0
        options = parser_of(path)._option_string_actions
        capsys.readouterr()
    for flag in (w.split("=")[0] for w in rest if w.startswith("-")):
        shown = re.search(rf"^\s+{re.escape(flag)}\b", options, re.M) if isinstance(options, str) else flag in options
        assert shown, f"README shows `{command}`, but `minillama {' '.join(path)}` has no {flag}"
    if path not in RUN:
        return

    monkeypatch.setenv("MINILLAMA_CACHE", fixtures["cache"])
    monkeypatch.chdir(fixtures["cwd"])  # where data.toml is
    values = dict(fixtures, out=str(tmp_path / "out"))
    positionals = list(POSITIONALS.get(path, []))
    argv = []
    for i, word in enumerate(rest):
        if PLACEHOLDER.fullmatch(word):
            follows = rest[i - 1] if i else ""
            word = FLAG_VALUES[follows] if follows in FLAG_VALUES else positionals.pop(0)
        argv.append(word.format(**values))
    argv += [p.format(**values) for p in positionals]  # what a trailing `...` stood for
    if "--seed" in parser_of(path)._option_string_actions and "--seed" not in argv:
        # Sampling with a fresh seed: a tiny model from an empty prompt may draw EOS first and print nothing
        # (it did once in CI, for `generate --prompt-lookup N`); a fixed seed makes the run repeatable.
        argv += ["--seed", "0"]
    code = main([*path, *argv])
    out, err = capsys.readouterr()
    assert code == 0, f"`minillama {' '.join(path + tuple(argv))}` (README: `{command}`): {err}"
    assert out.strip()
