"""YAML recipes: load, override, expand short names and validate before anything trains.

A recipe is a YAML mapping with the sections ``name``, ``seed``, ``data``, ``model``,
``trainer``, ``methods``, ``stages``, ``evaluate`` and ``meta``.
``data: {name: mnist5k, batch_size: 64}`` is short for
``data: {class_path: <the registered datamodule>, init_args: {batch_size: 64}}``; ``model``
defaults to :class:`~sobre.engine.routine.ClassificationRoutine`. Overrides are dotted keys
(``trainer.max_epochs=3``, ``model.lr=0.01``; ``init_args`` may be left out). Unknown keys, wrong
types and missing files are reported with the key path and the closest valid name.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sobre.core.errors import ConfigError
from sobre.core.registry import suggest

SECTIONS = ("name", "seed", "data", "model", "trainer", "methods", "stages", "evaluate", "meta")
DEFAULT_ROUTINE = "sobre.engine.routine.ClassificationRoutine"
STAGE_KEYS = ("name", "max_epochs", "lr", "transforms", "methods", "trainer", "repeat", "data")
EVALUATE_KEYS = ("test", "measure", "report", "checkpoint", "monitor")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file; a missing file or bad YAML raises :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        here = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        hint = suggest(path.name, here) or (f" Recipes there: {', '.join(here)}." if here else "")
        raise ConfigError(
            f"recipe {str(path)!r} does not exist{hint} List recipes with `sobre recipes`."
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a recipe is a YAML mapping of sections ({', '.join(SECTIONS)}), "
            f"not a {type(data).__name__}"
        )
    data.setdefault("name", path.stem)
    return data


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["--trainer.max_epochs", "3", "--model.lr=0.1"]`` -> ``{"trainer.max_epochs": 3, ...}``."""
    out: dict[str, Any] = {}
    items = list(args)
    while items:
        arg = items.pop(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like "
                "--trainer.max_epochs 3 or --model.lr=0.01"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not items or items[0].startswith("--"):
                raise ConfigError(f"override --{key} needs a value, e.g. --{key} 3")
            value = items.pop(0)
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
    return out


def apply_overrides(recipe: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``recipe`` with dotted ``overrides`` set; ``init_args`` may be omitted in keys."""
    out = copy.deepcopy(dict(recipe))
    for dotted, value in overrides.items():
        node: Any = out
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"override {dotted!r}: {'.'.join(parts[:i])} is a list of "
                        f"{len(node)} items; use an index 0..{len(node) - 1}"
                    )
                node = node[int(part)]
                continue
            if i and "class_path" in node and part not in ("class_path", "init_args"):
                node = node.setdefault("init_args", {})
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict | list):
                raise ConfigError(
                    f"override {dotted!r}: {'.'.join(parts[: i + 1])} is a value "
                    f"({nxt!r}), not a section"
                )
            node = nxt
        last = parts[-1]
        if (
            isinstance(node, dict)
            and "class_path" in node
            and last not in ("class_path", "init_args")
        ):
            node = node.setdefault("init_args", {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return out


def import_class(path: str, *, where: str) -> type:
    """Import ``package.module.Class``; errors name the recipe key and the closest names."""
    module_name, _, cls_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else None
    except ImportError as err:
        raise ConfigError(
            f"{where}: cannot import {module_name!r} for class_path {path!r} "
            f"({err}); write the full dotted path, e.g. {DEFAULT_ROUTINE}"
        ) from None
    if module is None or not hasattr(module, cls_name):
        names = [n for n in dir(module) if n[:1].isupper()] if module else []
        raise ConfigError(f"{where}: class_path {path!r} not found{suggest(cls_name, names)}")
    return getattr(module, cls_name)


def _expand_name(node: dict[str, Any], where: str) -> dict[str, Any]:
    """``{name: mnist5k, a: 1}`` in ``data`` -> ``{class_path: ..., init_args: {a: 1}}``."""
    if "name" not in node or "class_path" in node:
        return node
    from sobre.data import DATASETS

    cls = DATASETS.get(node["name"])
    args = {k: v for k, v in node.items() if k != "name"}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}


def _signature_keys(cls: type) -> tuple[list[str], bool]:
    """Argument names of ``cls``; ``**kwargs`` forwarded to base classes are followed up the MRO.

    Returns the names and whether arbitrary keywords remain accepted.
    """
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [
            p.name
            for p in params
            if p.name != "self"
            and p.name not in names
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names, False
    return names, True


def _check_keys(
    keys: Sequence[str], valid: Sequence[str], where: str, skip: Sequence[str] = ()
) -> None:
    for key in keys:
        if key not in valid and key not in skip:
            raise ConfigError(
                f"unknown key {where}.{key}{suggest(key, list(valid))} "
                f"Valid keys: {', '.join(valid)}."
            )


def _check_class_node(node: Any, where: str, linked: Sequence[str] = ()) -> None:
    """Validate a ``{class_path, init_args}`` node recursively against the class signature."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_class_node(item, f"{where}.{i}")
        return
    if not isinstance(node, dict) or "class_path" not in node:
        return
    _check_keys(list(node), ["class_path", "init_args", "dict_kwargs"], where)
    cls = import_class(node["class_path"], where=f"{where}.class_path")
    init_args = node.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ConfigError(f"{where}.init_args must be a mapping of argument names to values")
    names, var_kw = _signature_keys(cls)
    if not var_kw:
        _check_keys(list(init_args), names, f"{where}.init_args")
    for key in linked:
        if key in init_args:
            raise ConfigError(
                f"{where}.init_args.{key} is set from the data section; remove it from the recipe"
            )
    for key, value in init_args.items():
        _check_class_node(value, f"{where}.init_args.{key}")


def normalize(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Expand short names and check every key; returns the recipe as the parser reads it.

    Raises:
        ConfigError: unknown section or key (with the closest valid name), bad class path.
    """
    import lightning.pytorch as pl

    out = copy.deepcopy(dict(recipe))
    _check_keys(list(out), SECTIONS, "recipe")
    if "data" not in out:
        raise ConfigError("the recipe has no data section; add e.g. `data: {name: mnist5k}`")
    if not isinstance(out["data"], dict):
        raise ConfigError("data must be a mapping, e.g. `data: {name: mnist5k, batch_size: 128}`")
    out["data"] = _expand_name(out["data"], "data")
    model = out.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError("model must be a mapping, e.g. `model: {arch: small_cnn, lr: 0.001}`")
    if "class_path" not in model:
        model = {"class_path": DEFAULT_ROUTINE, "init_args": model}
    out["model"] = model
    trainer = out.get("trainer") or {}
    if not isinstance(trainer, dict):
        raise ConfigError("trainer must be a mapping of Trainer arguments, e.g. `max_epochs: 5`")
    names, _ = _signature_keys(pl.Trainer)
    _check_keys(list(trainer), names, "trainer")
    for key, value in trainer.items():
        _check_class_node(value, f"trainer.{key}")
    _check_class_node(out["data"], "data")
    _check_class_node(out["model"], "model", linked=("num_classes", "in_channels"))
    _check_class_node(out.get("methods") or [], "methods")
    evaluate = out.get("evaluate") or {}
    if not isinstance(evaluate, dict):
        raise ConfigError("evaluate must be a mapping, e.g. `evaluate: {measure: false}`")
    _check_keys(list(evaluate), EVALUATE_KEYS, "evaluate")
    if evaluate.get("checkpoint", "best") not in ("best", "final"):
        raise ConfigError(
            f"evaluate.checkpoint is 'best' (best evaluate.monitor, val/acc by default, of the "
            f"last stage) or 'final' (its last weights, e.g. when a method prunes during the "
            f"stage), got {evaluate['checkpoint']!r}"
        )
    monitor = evaluate.get("monitor", "val/acc")
    if not isinstance(monitor, str) or not monitor.startswith("val/"):
        raise ConfigError(
            f"evaluate.monitor names the validation metric selecting the best checkpoint (the "
            f"model-selection rule), e.g. val/acc or val/unbiased; got {monitor!r}"
        )
    for i, stage in enumerate(out.get("stages") or []):
        if not isinstance(stage, dict):
            raise ConfigError(f"stages.{i} must be a mapping with keys {', '.join(STAGE_KEYS)}")
        _check_keys(list(stage), STAGE_KEYS, f"stages.{i}")
        _check_keys(list(stage.get("trainer") or {}), names, f"stages.{i}.trainer")
        _check_class_node(stage.get("transforms") or [], f"stages.{i}.transforms")
        _check_class_node(stage.get("methods") or [], f"stages.{i}.methods")
    return out


_KEY = re.compile(r'Parser key "([^"]+)"')
_REASON = re.compile(
    r"(Expected a [^\n]*|Given value: [^\n]*|does not correspond[^\n]*|not accepted[^\n]*|"
    r"required[^\n]*)"
)
_CLASS = re.compile(r"<class '([\w.]+)'>")
_LITERAL = re.compile(r"typing\.Literal\[([^\]]*)\]")
_GOT = re.compile(r"(?:Got value|Given value): ([^\n;]*)")


def tidy_parser_error(err: BaseException, source: str) -> ConfigError:
    """Turn a jsonargparse error (usage lines and nested unions) into one line with the fix."""
    text = str(err)
    path = ".".join(dict.fromkeys(_KEY.findall(text)))
    got = _GOT.search(text)
    reasons = [
        _LITERAL.sub(r"one of \1", _CLASS.sub(r"\1", m.strip())).split(". Got value")[0]
        for m in _REASON.findall(text)
        if "NoneType" not in m and not m.startswith("Given value")
    ]
    reason = "; ".join(dict.fromkeys(reasons)).replace("Expected a ", "expected ")
    reason = reason or text.strip().splitlines()[0]
    hint = ""
    literal = _LITERAL.search(text)
    if literal and got:
        hint = suggest(got.group(1).strip(), re.findall(r"'([^']*)'", literal.group(1)))
    shown = f" (got {got.group(1).strip()!r})" if got else ""
    return ConfigError(f"{source}: invalid value for {path or 'the recipe'}: {reason}{shown}{hint}")
