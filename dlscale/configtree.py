"""Typed configuration trees: dataclass defaults < YAML file < `--a.b=value` overrides, strict and validated once.

Generic on purpose: it imports nothing else of dlscale, so the simulator, training and the sweep each keep their
own schema beside their code and share this loader and override parser.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, values: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise, naming the dotted key.

    A section whose fields depend on one of its values (a variant section: the encoder's options on its `name`)
    has a classmethod `variant(values, where)` returning the dataclass to build, and a `VARIANT_KEY` naming that
    value (see `merge`)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    if hasattr(cls, "variant"):
        cls = cls.variant(values, where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key {where + unknown[0]!r}; valid keys here: {', '.join(sorted(names))}")
    built = {name: _coerce(hints[name], value, where + name) for name, value in values.items()}
    try:
        return cls(**built)
    except ValueError as err:
        raise rehomed(err, cls, where) from None


def rehomed(err: ValueError, cls: type, where: str) -> ValueError:
    """`err` of a section class whose own messages name its usual place (`CONFIG_KEY`, e.g. data.simulator), with
    that place replaced by where the section sits here (e.g. data.target.simulator.)."""
    home = getattr(cls, "CONFIG_KEY", "")
    if home and where and where != home + ".":
        return ValueError(str(err).replace(home + ".", where).replace(home + " ", where.rstrip(".") + " "))
    return err


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):   # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if origin is tuple and isinstance(value, (list, tuple)):   # YAML has no tuples: [low, high] -> (low, high)
        if len(value) != len(args):
            raise ValueError(f"config key {key!r}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if origin is list and isinstance(value, list) and args:
        return [_coerce(args[0], v, key) for v in value]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    expected = origin or tp
    if expected is Any or isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool)):
        return value
    raise ValueError(f"config key {key!r}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"config key {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def merge(base: dict, update: dict, cls: type | None = None) -> dict:
    """`update` over `base`, recursively for sections present in both. With `cls`, the dataclass both trees describe:
    where `update` switches a variant section to another variant (its `VARIANT_KEY`, e.g. model.encoder.name), only
    the keys its shared class declares carry over from `base` (another encoder's options mean nothing to this one)."""
    out = dict(base)
    sections = _section_types(cls)
    for key, value in update.items():
        old, section = out.get(key), sections.get(key)
        if not (isinstance(value, dict) and isinstance(old, dict)):
            out[key] = value
            continue
        switch = getattr(section, "VARIANT_KEY", None)
        if switch in value and value[switch] != old.get(switch):
            old = {k: v for k, v in old.items() if k in {f.name for f in dataclasses.fields(section)}}
        out[key] = merge(old, value, section)
    return out


def _section_types(cls: type | None) -> dict[str, type]:
    """{field: its dataclass type} of dataclass `cls` (fields typed `Section | None` included)."""
    if cls is None or not dataclasses.is_dataclass(cls):
        return {}
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        section = next((a for a in args if dataclasses.is_dataclass(a)), None)
        if section is not None:
            out[name] = section
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """`--a.b=value` (or `a.b=value`) -> ("a.b", value parsed as YAML)."""
    key, sep, raw = item.removeprefix("--").partition("=")
    if not sep or not key or key.startswith("-"):
        raise ValueError(f"override {item!r}: expected --section.key=value")
    return key, yaml.safe_load(raw)


def parse_with_overrides(parser: argparse.ArgumentParser,
                         argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """A command line: the parser's own arguments, and the `--section.key=value` overrides left over; anything else
    left over is a usage error (exit 2) naming it."""
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        parser.error(f"unrecognised arguments {bad}; config overrides look like --section.key=value")
    return args, rest


def overrides_tree(overrides: list[str] | None) -> dict:
    """Dotted overrides as one nested dict."""
    tree: dict = {}
    for item in overrides or []:
        set_dotted(tree, *parse_override(item))
    return tree


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return loaded


def merge_overrides(tree: dict, overrides: list[str] | None, cls: type | None = None,
                    translate: Any = None) -> dict:
    """Dotted overrides over `tree`, one at a time in their order (`merge` with `cls`: a later override switching a
    variant drops the options an earlier one set for the old variant); `translate` maps each override's tree first
    (older spellings)."""
    for item in overrides or []:
        update = overrides_tree([item])
        tree = merge(tree, translate(update) if translate else update, cls)
    return tree


def load_dataclass(defaults: Any, yaml_path: str | Path | None = None, overrides: list[str] | None = None,
                   **top: Any) -> Any:
    """Any typed config tree: `defaults` (an instance) < YAML file < dotted overrides (values parsed as YAML)
    < keyword arguments (None means "not given"); unknown keys and wrong types raise naming the dotted key."""
    tree = to_dict(defaults)
    if yaml_path:
        tree = merge(tree, read_yaml(yaml_path), type(defaults))
    tree = merge_overrides(tree, overrides, type(defaults))
    tree.update({k: v for k, v in top.items() if v is not None})
    return from_dict(type(defaults), tree)


def plain(tree: Any) -> Any:
    """Tuples as lists, recursively, so the tree dumps as plain YAML/JSON and loads back unchanged."""
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [plain(v) for v in tree]
    return tree


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(plain(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg), sort_keys=False)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def field_docs(cls: type) -> dict[str, str]:
    """{field: its documentation} of dataclass `cls` (and its dataclass bases): the attribute docstring under the
    field (the style of this code base), else a `# comment` on the field's line."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        body = ast.parse(textwrap.dedent(source)).body[0].body
        for i, node in enumerate(body):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
                continue
            comment = re.search(r"#\s*(.*)$", lines[node.end_lineno - 1])
            if comment and not comment.group(1).startswith(("noqa", "type:")):
                docs[node.target.id] = comment.group(1).strip()
    return docs


def _flow(value: Any) -> str:
    """A value as one line of YAML."""
    text = yaml.safe_dump([plain(value)], default_flow_style=True, width=float("inf"), sort_keys=False)
    return text.strip()[1:-1].strip()


def commented_yaml(cfg: Any, indent: int = 0, width: int = 118) -> str:
    """The config tree `cfg` (dataclass instances, also as values of mappings) as YAML that loads back to
    `plain(to_dict(cfg))`, with each field's documentation (`field_docs`) as a comment above it."""
    out: list[str] = []
    docs = field_docs(type(cfg))
    pad = " " * indent
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        doc = docs.get(f.name)
        if doc:
            words, line = doc.split(), ""
            for word in words:
                if line and len(pad) + 2 + len(line) + 1 + len(word) > width:
                    out.append(f"{pad}# {line}")
                    line = word
                else:
                    line = f"{line} {word}" if line else word
            out.append(f"{pad}# {line}")
        out.extend(_yaml_entry(f.name, value, indent, width))
    return "\n".join(out) + ("\n" if indent == 0 else "")


def _yaml_entry(name: Any, value: Any, indent: int, width: int) -> list[str]:
    pad = " " * indent
    key = _flow(name)
    if dataclasses.is_dataclass(value) and dataclasses.fields(value):
        return [f"{pad}{key}:", commented_yaml(value, indent + 2, width)]
    if isinstance(value, dict) and value and any(dataclasses.is_dataclass(v) or isinstance(v, dict)
                                                 for v in value.values()):
        lines = [f"{pad}{key}:"]
        for k, v in value.items():
            lines.extend(_yaml_entry(k, v, indent + 2, width))
        return lines
    return [f"{pad}{key}: {_flow(to_dict(value) if dataclasses.is_dataclass(value) else value)}"]
