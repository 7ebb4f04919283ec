"""Every dlscale command in the README names a real subcommand and only options / config keys it accepts.

The commands themselves are run, in small form, by the other tests and by `make demo`; this keeps the README from
drifting away from the CLI (renamed flags, removed config keys).
"""
import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest

from dlscale.cli import COMMANDS, main
from dlscale.train.config import Config
from dlscale.sim import SimulatorConfig

README = Path(__file__).resolve().parents[1] / "README.md"
STARTS = ("dlscale ", "deepspeed ", "torchrun ", "DS_ACCELERATOR=", "sbatch ")


def readme_commands() -> list[str]:
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [line.split(" #")[0].strip() for line in block.splitlines()]
    commands += re.findall(r"`((?:%s)[^`]*)`" % "|".join(map(re.escape, STARTS)), text)
    return [c for c in commands if c.startswith(STARTS)]


def dlscale_part(command: str) -> list[str] | None:
    """The dlscale arguments of a command: `dlscale SUB ...`, a launcher running launch/train.py (= train) or
    `-m dlscale.cli SUB ...`."""
    tokens = [t for t in shlex.split(command) if t != "..."]
    if "launch/train.py" in tokens:
        return ["train", *tokens[tokens.index("launch/train.py") + 1:]]
    if "launch/slurm.sbatch" in tokens:
        return ["train", *[t for t in tokens[tokens.index("launch/slurm.sbatch") + 1:] if t.startswith("--")]]
    if tokens and tokens[0] == "dlscale":
        return tokens[1:]
    if "dlscale.cli" in tokens:       # a launcher running the console script's module (torchrun -m dlscale.cli ...)
        return tokens[tokens.index("dlscale.cli") + 1:]
    return None


def has_key(cls: type, dotted: str) -> bool:
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return False
        cls = typing.get_type_hints(cls)[part]
        cls = next((a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)), cls)
    return True


def help_text(sub: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([sub, "--help"])
    return capsys.readouterr().out


def test_readme_has_the_commands_this_test_checks():
    subs = {dlscale_part(c)[0] for c in readme_commands() if dlscale_part(c)}
    assert {"pack", "shards", "train", "eval", "tune", "simulate"} <= subs


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_uses_only_known_options(command, capsys):
    args = dlscale_part(command)
    if args is None:
        pytest.skip("not a dlscale command")
    sub, rest = args[0], args[1:]
    assert sub in COMMANDS, f"{command}: no subcommand {sub!r}"
    if sub == "shards":
        assert rest[0] in ("verify", "info")
        return
    known = set(re.findall(r"(--[a-z][a-z0-9_-]*)", help_text(sub, capsys)))
    tree = SimulatorConfig if sub == "simulate" else Config
    for token in rest:
        if not token.startswith("--"):
            continue
        name = token.split("=")[0]
        if "." in name:
            assert has_key(tree, name[2:]), f"{command}: {name} is not a {tree.__name__} key"
        else:
            assert name in known, f"{command}: {sub} has no option {name}"
