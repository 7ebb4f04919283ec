"""Every dlscale command in the README and in every page under docs/ names a real subcommand and only options /
config keys it accepts, and every config key the pages name in backticks exists.

The commands themselves are run, in small form, by the other tests and by `make demo`; this keeps the docs from
drifting away from the CLI (renamed flags, removed config keys). Each command's `--section.key=value` is checked
against the config tree its subcommand reads: `dlscale train` (and a launcher running launch/train.py) the training
`Config`, `dlscale transfer` the `TransferConfig`, `dlscale simulate` the `SimulatorConfig`, `dlscale tune` the
training `Config` plus its `sweep.` settings.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path
from typing import Callable

import pytest

from dlscale.cli import COMMANDS, main
from dlscale.models import BACKBONES, EncoderConfig
from dlscale.recipes import train_recipes
from dlscale.sim import SimulatorConfig
from dlscale.sweep import SweepSettings
from dlscale.train.config import Config
from dlscale.train.tasks import TASKS
from dlscale.train.weighting import WEIGHTINGS
from dlscale.transfer.config import TransferConfig
from dlscale.transfer.tasks import DOWNSTREAM

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
STARTS = ("dlscale ", "deepspeed ", "torchrun ", "DS_ACCELERATOR=", "sbatch ")


@dataclasses.dataclass(frozen=True)
class Tree:
    """The keys one command reads: a root dataclass, sections typed by a registered part's options dataclass
    (prefix -> the named part's `Config`, None for an unknown name) and whole subtrees under a prefix."""
    root: type
    keyed: dict[str, Callable[[str], type | None]] = dataclasses.field(default_factory=dict)
    nested: dict[str, "Tree"] = dataclasses.field(default_factory=dict)


def options_of(registry) -> Callable[[str], type | None]:
    return lambda name: registry[name].Config if name in registry else None


SIMULATOR = Tree(SimulatorConfig)
TRAIN = Tree(Config, keyed={"model.task_options.": options_of(TASKS), "loss.options.": options_of(WEIGHTINGS)},
             nested={"data.simulator.overrides.": SIMULATOR, "data.target.simulator.overrides.": SIMULATOR})
TRANSFER = Tree(TransferConfig, keyed={"task_options.": options_of(DOWNSTREAM)})
TUNE = Tree(Config, keyed=TRAIN.keyed, nested={**TRAIN.nested, "sweep.": Tree(SweepSettings)})
TREES = {"train": TRAIN, "eval": TRAIN, "simulate": SIMULATOR, "transfer": TRANSFER, "tune": TUNE}


def page_name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def page_commands(page: Path) -> list[str]:
    text = page.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = re.sub(r"\\\n\s*", " ", block)          # a command continued over lines with backslashes
        commands += [line.split(" #")[0].strip() for line in block.splitlines()]
    commands += re.findall(r"`((?:%s)[^`]*)`" % "|".join(map(re.escape, STARTS)), text)
    return [c for c in commands if c.startswith(STARTS)]


def dlscale_part(command: str) -> list[str] | None:
    """The dlscale arguments of a command: `dlscale SUB ...`, a launcher running launch/train.py (= train) or
    `-m dlscale.cli SUB ...`."""
    tokens = [t for t in shlex.split(command) if t != "..."]
    if "launch/train.py" in tokens:
        return ["train", *tokens[tokens.index("launch/train.py") + 1:]]
    if "launch/slurm.sbatch" in tokens:     # sbatch launch/slurm.sbatch DATA_DIR RUN_DIR [train args]
        return ["train", *tokens[tokens.index("launch/slurm.sbatch") + 3:]]
    if tokens and tokens[0] == "dlscale":
        return tokens[1:]
    if "dlscale.cli" in tokens:       # a launcher running the console script's module (torchrun -m dlscale.cli ...)
        return tokens[tokens.index("dlscale.cli") + 1:]
    return None


def has_key(tree: Tree | type, dotted: str) -> bool:
    """Whether `dotted` (section.key...) is a key of `tree` (a Tree or a plain dataclass)."""
    tree = tree if isinstance(tree, Tree) else Tree(tree)
    for prefix, sub in tree.nested.items():
        if dotted.startswith(prefix) and dotted != prefix:
            return has_key(sub, dotted[len(prefix):])
    for prefix, options in tree.keyed.items():
        if dotted.startswith(prefix):
            name, _, rest = dotted[len(prefix):].partition(".")
            sub = options(name)
            return sub is not None and (not rest or has_key(sub, rest))
    cls = tree.root
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


def all_commands() -> list:
    return [pytest.param(command, id=f"{page_name(page)}: {command}")
            for page in PAGES for command in page_commands(page)]


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_page_is_mapped_from_the_readme_its_links_resolve_and_its_code_blocks_close(page):
    fences = re.findall(r"^```", page.read_text(), re.M)
    assert len(fences) % 2 == 0, f"{page_name(page)}: a code block is not closed"
    if page != README:
        assert f"]({page_name(page)})" in README.read_text(), f"README's map does not link {page_name(page)}"
    for link in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
        if not link.startswith(("http://", "https://")):
            assert (page.parent / link).exists(), f"{page_name(page)} links {link}, which does not exist"


def test_pages_have_the_commands_this_test_checks():
    subs = {dlscale_part(c)[0] for page in PAGES for c in page_commands(page) if dlscale_part(c)}
    assert {"pack", "shards", "train", "eval", "tune", "simulate", "transfer", "predict"} <= subs
    assert README in PAGES and len(PAGES) > 10


@pytest.mark.parametrize("command", all_commands())
def test_command_uses_only_known_options(command, capsys):
    args = dlscale_part(command)
    if args is None:
        pytest.skip("not a dlscale command")
    sub, rest = args[0], args[1:]
    assert sub in COMMANDS, f"{command}: no subcommand {sub!r}"
    if sub == "shards":
        assert rest[0] in ("verify", "info")
        return
    known = set(re.findall(r"(--[a-z][a-z0-9_-]*)", help_text(sub, capsys)))
    for token in rest:
        if not token.startswith("--"):
            continue
        name = token.split("=")[0]
        if "." in name:
            assert sub in TREES, f"{command}: {sub} reads no config keys, got {name}"
            tree = TREES[sub]
            assert has_key(tree, name[2:]), f"{command}: {name} is not a {tree.root.__name__} key"
        else:
            assert name in known, f"{command}: {sub} has no option {name}"


def loadable(args: list[str]) -> list[str]:
    """A command's arguments without a shell redirection or --print-config; `--config FILE` reads the repository's
    file (launch/gpu.yaml) or a packaged recipe (full), and is left out where the file is one the user makes (a
    sweep's best_config.yaml)."""
    out, rest = [], iter(args)
    for arg in rest:
        if arg == ">":
            next(rest)
        elif arg == "--config":
            name = next(rest)
            path = ROOT / name
            out += ["--config", str(path)] if path.exists() else ["--config", name] if name in train_recipes() else []
        elif arg != "--print-config":
            out.append(arg)
    return out


@pytest.mark.parametrize("command", all_commands())
def test_command_loads_its_config(command, capsys):
    """Values too: the command's arguments, with --print-config added, load into a checked config (a value of the
    wrong type or out of range fails here; inputs such as directories are not looked at)."""
    args = dlscale_part(command)
    if args is None or len(args) == 1:
        pytest.skip("not a dlscale command line (a subcommand named in the text)")
    if "--print-config" not in help_text(args[0], capsys):
        pytest.skip(f"dlscale {args[0]} has no config to print")
    if "--resume" in args:
        pytest.skip("it resumes what an earlier command made (its recorded config)")
    code = main([*loadable(args), "--print-config"])
    printed = capsys.readouterr()
    assert code == 0, f"{command}: {printed.err[-2000:]}"
    assert printed.out.strip()


# A backticked config key in the text: `--section.key=value` or `section.key`, whose first part is a section (a
# dataclass or mapping field) of one of the trees; file names (`model.pt`) are not keys.
def sections(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {name for name, hint in hints.items() if dataclasses.is_dataclass(hint) or typing.get_origin(hint) is dict}


SECTIONS = sorted(set().union(*(sections(tree.root) for tree in TREES.values()),
                              *({prefix.split(".")[0] for prefix in tree.nested} for tree in TREES.values())))
FILE_SUFFIXES = {"pt", "json", "yaml", "md", "png", "npy", "npz", "csv", "txt", "tar", "safetensors", "py", "ipynb"}


def named_keys(page: Path) -> list[str]:
    keys = re.findall(r"`(?:--)?((?:%s)\.[A-Za-z0-9_.]*[A-Za-z0-9_])(?:=[^`]*)?`" % "|".join(SECTIONS),
                      page.read_text())
    return sorted({k for k in keys if k.rsplit(".", 1)[-1] not in FILE_SUFFIXES})


def all_named_keys() -> list:
    return [pytest.param(key, id=f"{page_name(page)}: {key}") for page in PAGES for key in named_keys(page)]


def test_pages_name_task_options_and_simulator_keys():
    keys = {k for page in PAGES for k in named_keys(page)}
    assert {"model.task_options.mae.mask_ratio", "model.task_options.contrastive.method", "lens.randomize",
            "task_options.superres.steps", "budget.min_batches_per_epoch", "sweep.scheduler"} <= keys


@pytest.mark.parametrize("key", all_named_keys())
def test_named_config_keys_exist(key):
    assert any(has_key(tree, key) for tree in TREES.values()), f"{key} is not a key of any command's config"


# Each registry of parts that users extend, as `module:NAME`; read in a fresh interpreter, since test modules register
# parts of their own (a `toy` stage, a `brightness` task) when they are imported.
REGISTRIES = {"stage": "dlscale.train.stages:STAGES", "task": "dlscale.train.tasks:TASKS",
              "loss weighting": "dlscale.train.weighting:WEIGHTINGS", "backbone": "dlscale.models.backbone:BACKBONES",
              "data source": "dlscale.train.sources:SOURCES", "downstream task": "dlscale.transfer.tasks:DOWNSTREAM"}


@pytest.fixture(scope="module")
def shipped_parts() -> dict[str, list[str]]:
    """kind -> names of the parts that ship with dlscale."""
    script = ("import importlib, json\n"
              f"registries = {REGISTRIES!r}\n"
              "print(json.dumps({kind: list(getattr(importlib.import_module(where.split(':')[0]), "
              "where.split(':')[1])) for kind, where in registries.items()}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", REGISTRIES)
def test_every_shipped_part_is_named_in_the_docs(kind, shipped_parts):
    """A stage, task, weighting, backbone, data source or downstream task that ships with dlscale is findable in the
    docs, named in backticks as configs name it."""
    text = "\n".join(page.read_text() for page in PAGES)
    missing = [name for name in shipped_parts[kind] if f"`{name}`" not in text]
    assert shipped_parts[kind] and not missing, f"no docs page names the {kind}(s) {', '.join(missing)}"


def test_has_key_covers_the_typed_sections():
    assert has_key(TRAIN, "model.task_options.mae.mask_ratio")
    assert has_key(TRAIN, "model.task_options.contrastive.views.max_shift")
    assert not has_key(TRAIN, "model.task_options.mae.mask_ration")
    assert not has_key(TRAIN, "model.task_options.regression.x")       # a task without options
    assert has_key(TRAIN, "data.simulator.overrides.lens.randomize")
    assert not has_key(TRAIN, "data.simulator.overrides.lens.randomise")
    assert not has_key(TRAIN, "loss.options.nosuch.x")
    assert has_key(TRAIN, "loss.fixed.weights.recon") and not has_key(TRAIN, "loss.fixed.weights.nosuch")


def test_has_key_checks_transfer_keys_against_the_downstream_tasks_options():
    assert has_key(TRANSFER, "task_options.classification.targets")
    assert has_key(TRANSFER, "task_options.superres.eval_images")
    assert not has_key(TRANSFER, "task_options.superres.eval_image")
    assert not has_key(TRANSFER, "task_options.anomaly.steps")         # a downstream task without options
    assert not has_key(TRANSFER, "task_options.nosuch.steps")
    assert has_key(TRANSFER, "budget.finetune_encoder_lr_scale") and has_key(TRANSFER, "data.resize")
    assert not has_key(TRANSFER, "superres_steps") and not has_key(TRANSFER, "model.encoder.name")
    assert has_key(TUNE, "sweep.scheduler") and not has_key(TRAIN, "sweep.scheduler")
    assert has_key(TRAIN, "model.encoder.width") and has_key(TRAIN, "model.encoder.patch_size")
    assert not has_key(TRAIN, "model.encoder.depth")
