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
from dlscale.models import BACKBONES, EncoderConfig
from dlscale.train.config import Config
from dlscale.sim import SimulatorConfig
from dlscale.train.tasks import TASKS
from dlscale.train.weighting import WEIGHTINGS

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


# Typed sections keyed by a registry name: their fields are those of the named part's options dataclass.
KEYED = {"model.task_options.": lambda name: TASKS[name].Config if name in TASKS else None,
         "loss.options.": lambda name: WEIGHTINGS[name].Config if name in WEIGHTINGS else None}
SIMULATOR_KEYS = "data.simulator.overrides."


def has_key(cls: type, dotted: str) -> bool:
    if cls is Config:
        if dotted.startswith(SIMULATOR_KEYS) and dotted != SIMULATOR_KEYS:
            return has_key(SimulatorConfig, dotted[len(SIMULATOR_KEYS):])
        for prefix, options in KEYED.items():
            if dotted.startswith(prefix):
                name, _, rest = dotted[len(prefix):].partition(".")
                sub = options(name)
                return sub is not None and (not rest or has_key(sub, rest))
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if dict in (typing.get_origin(cls), *map(typing.get_origin, typing.get_args(cls))) and i and \
                parts[i - 1] == "weights":   # loss.fixed.weights.<task>
            return len(parts) == i + 1 and part in TASKS
        if not dataclasses.is_dataclass(cls):
            return False
        owner = next((c for c in variants(cls) if part in {f.name for f in dataclasses.fields(c)}), None)
        if owner is None:
            return False
        cls = typing.get_type_hints(owner)[part]
        cls = next((a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)), cls)
    return True


def variants(cls: type) -> list[type]:
    """The classes a section may be: the encoder's are the registered backbones' options (`model.encoder.width` of
    `small`, ...); other sections have one."""
    return [cls, *(backbone.Config for backbone in BACKBONES.values())] if cls is EncoderConfig else [cls]


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


def readme_dotted_keys() -> list[str]:
    """Full dotted keys of the typed option sections the README names in backticks (`model.task_options.mae.x`,
    `--data.simulator.overrides.lens.randomize=...`, `loss.options.<method>.<field>`)."""
    prefixes = "|".join(map(re.escape, [*KEYED, SIMULATOR_KEYS]))
    return sorted(set(re.findall(r"`(?:--)?((?:%s)[A-Za-z0-9_.]*[A-Za-z0-9_])" % prefixes, README.read_text())))


def test_readme_names_task_options_and_simulator_keys():
    keys = readme_dotted_keys()
    assert {"model.task_options.mae.mask_ratio", "model.task_options.contrastive.method"} <= set(keys)


@pytest.mark.parametrize("key", readme_dotted_keys())
def test_readme_option_keys_exist(key):
    assert has_key(Config, key), f"README names {key}, which is not a config key"


def test_has_key_covers_the_typed_sections():
    assert has_key(Config, "model.task_options.mae.mask_ratio")
    assert has_key(Config, "model.task_options.contrastive.views.max_shift")
    assert not has_key(Config, "model.task_options.mae.mask_ration")
    assert not has_key(Config, "model.task_options.regression.x")       # a task without options
    assert has_key(Config, "data.simulator.overrides.lens.randomize")
    assert not has_key(Config, "data.simulator.overrides.lens.randomise")
    assert not has_key(Config, "loss.options.nosuch.x")
    assert has_key(Config, "model.encoder.width") and has_key(Config, "model.encoder.patch_size")
    assert not has_key(Config, "model.encoder.depth")
