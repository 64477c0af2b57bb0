"""Run a recipe: one new run folder, fit stage after fit stage, then test, measure and report.

Structure edits (``transforms`` of a stage) happen between stages, never inside a fit; inside a
stage, methods use masks. A run folder is never overwritten: ``--resume RUN_DIR`` continues it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import inspect
import json
import logging
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser
from torch import nn

from sobre.core.edits import edit_log, replay
from sobre.core.errors import CheckpointError, ConfigError, SobreError
from sobre.core.masks import restore_masks
from sobre.core.measure import measure
from sobre.core.methods import DatasetTransform, NeedsStageModel, Regularizer
from sobre.core.serialization import atomic_write_text, load_tree, read_info, save_tree
from sobre.data.base import check_keywords, datamodule_parameters
from sobre.engine.callbacks import MethodCallback
from sobre.engine.recipes import (
    apply_overrides,
    load_yaml,
    normalize,
    parse_overrides,
    tidy_parser_error,
)
from sobre.engine.trainer import make_trainer

log = logging.getLogger(__name__)

MEASURE_BATCH = 2  # batch norm needs more than one value per channel in training mode


@dataclass
class Stage:
    """One fit of a recipe. ``transforms`` (ModelTransform or DatasetTransform objects) run
    before it starts; a DatasetTransform's training set is used by this stage and the later ones.

    A transform whose ``apply`` takes a ``loader`` argument receives the training loader (e.g. to
    measure activation entropy); one with a ``report()`` method has it stored with the stage's
    metrics. ``methods`` are active in this stage only, on top of the recipe's ``methods`` (e.g.
    distillation during the pruning rounds, not while the teacher trains); a method that is a
    Lightning callback is used as it is (e.g. a budgeted update only while fine-tuning).
    ``repeat: k`` runs the stage k times, named ``<name>_1`` ... ``<name>_k``.
    """

    name: str = "train"
    max_epochs: int | None = None
    lr: float | None = None
    transforms: list[Any] = field(default_factory=list)
    methods: list[Any] = field(default_factory=list)
    trainer: dict[str, Any] = field(default_factory=dict)
    repeat: int = 1
    data: dict[str, Any] = field(default_factory=dict)


def expand_stages(stages: Sequence[Stage]) -> list[Stage]:
    """Stages with ``repeat`` unrolled; names must be unique."""
    out: list[Stage] = []
    for stage in stages:
        if stage.repeat < 1:
            raise ConfigError(f"stage {stage.name!r}: repeat must be >= 1, got {stage.repeat}")
        if stage.repeat == 1:
            out.append(stage)
            continue
        out += [
            dataclasses.replace(stage, name=f"{stage.name}_{i}", repeat=1)
            for i in range(1, stage.repeat + 1)
        ]
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique, got {names}")
    return out


@dataclass
class RunResult:
    """What :func:`fit` returns: the run folder, its final metrics and the trained objects."""

    run_dir: Path
    metrics: dict[str, Any]
    routine: pl.LightningModule
    datamodule: pl.LightningDataModule


def build_parser() -> LightningArgumentParser:
    """The typed parser of a (normalised) recipe; types come from the classes' signatures."""
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--name", type=str, default="run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_lightning_class_args(pl.Trainer, "trainer")
    parser.add_lightning_class_args(pl.LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(pl.LightningDataModule, "data", subclass_mode=True)
    parser.add_argument("--methods", type=list[Any] | None, default=None)
    parser.add_argument("--stages", type=list[Stage] | None, default=None)
    parser.add_argument("--evaluate", type=dict[str, bool | str], default={})
    parser.add_argument("--meta", type=dict[str, Any], default={})
    parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
    parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")
    return parser


def _instantiate(recipe: Mapping[str, Any], source: str) -> tuple[Any, Any]:
    parser = build_parser()
    try:
        cfg = parser.parse_object(copy.deepcopy(dict(recipe)))  # it mutates its input
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        return cfg, parser.instantiate(cfg)
    except argparse.ArgumentError as err:
        raise tidy_parser_error(err, source) from None
    except ValueError as err:  # jsonargparse wraps what a class raised in its __init__
        raise _own_error(err) from None


def _own_error(err: BaseException) -> BaseException:
    """The SobreError (e.g. a missing data folder) that caused ``err``, if any."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, SobreError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Versions, git hash and device of this process (written as ``env.json``)."""
    import lightning

    import sobre

    return {
        "sobre": sobre.__version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": _git_hash(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }


def new_run_dir(runs_dir: str | Path | None, name: str) -> Path:
    """A fresh ``<runs_dir>/<name>/<timestamp>[-n]`` folder; never an existing one.

    ``SOBRE_RUN_DIR`` (set for the other ranks of a distributed run) names the folder exactly.
    """
    exact = os.environ.get("SOBRE_RUN_DIR")
    if exact:
        path = Path(exact)
        state = path / "run.json"
        if state.is_file() and json.loads(state.read_text()).get("status") == "done":
            raise ConfigError(
                f"SOBRE_RUN_DIR={exact} holds a finished run, which is never overwritten; "
                "point SOBRE_RUN_DIR to a new folder or unset it"
            )
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = Path(runs_dir or os.environ.get("SOBRE_RUNS_DIR") or "runs") / name
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = base / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"cannot create a new run folder under {base}")


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` strictly, re-attaching the masks it holds first."""
    restore_masks(model, state_dict)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"the checkpoint does not fit this model: {err}".splitlines()[0]
            + " (was the structure changed outside sobre.core.edits?)"
        ) from None


def restore(routine: pl.LightningModule, path: str | Path) -> dict[str, Any]:
    """Replay the checkpoint's structure edits on ``routine.net``, then load its weights."""
    tree, info = load_tree(path)
    if "state_dict" not in tree:
        raise CheckpointError(
            f"{str(path)!r} holds no weights: it was not written by a sobre run; load plain "
            "weights with safetensors.torch.load_file"
        )
    routine.net = replay(routine.net, info.get("edits", []))
    load_weights(routine, tree["state_dict"])
    return info


def _check_stage_models(methods: Sequence[Any], stages: Sequence[Stage]) -> None:
    """Every ``from_stage`` names a stage that ends before the method's first stage."""
    for i, stage in enumerate([Stage(name="<recipe methods>", methods=list(methods)), *stages]):
        for method in stage.methods:
            name = getattr(method, "from_stage", None)
            if not isinstance(method, NeedsStageModel) or name is None:
                continue
            earlier = [s.name for s in stages[: max(0, i - 1)]]
            if name not in earlier:
                where = "the recipe's methods" if i == 0 else f"stage {stage.name!r}"
                raise ConfigError(
                    f"{type(method).__name__}(from_stage={name!r}) in {where}: from_stage must "
                    f"name an earlier stage (earlier: {earlier or 'none'}); list the method "
                    "under the methods of a stage after it"
                )


def _as_callback(method: Any) -> Callback:
    """A Lightning callback as it is (e.g. a stage's ``BudgetCallback``); any other method
    object adapted by :class:`MethodCallback`."""
    return method if isinstance(method, Callback) else MethodCallback(method)


class _Run:
    """State of one run; the files it writes are written by rank zero only."""

    def __init__(self, run_dir: Path, recipe: dict[str, Any], cfg: Any, objs: Any) -> None:
        self.dir, self.recipe, self.cfg = run_dir, recipe, cfg
        self.datamodule, self.routine = objs.data, objs.model
        self.methods = [_as_callback(m) for m in objs.methods or []]
        self.stages = expand_stages(objs.stages or [Stage()])
        self.teachers: dict[str, nn.Module] = {}  # stage name -> its final model, loaded once
        _check_stage_models(list(objs.methods or []), self.stages)
        given = recipe.get("trainer") or {}  # the parser also fills every Trainer default
        self.trainer_kwargs = {k: v for k, v in dict(objs.trainer).items() if k in given}
        self.trainer: pl.Trainer | None = None
        self.state_file = run_dir / "run.json"
        self.state: dict[str, Any] = (
            json.loads(self.state_file.read_text())
            if self.state_file.is_file()
            else {"stages_done": []}
        )
        self.metrics: dict[str, Any] = {"stages": dict(self.state.get("stages", {}))}
        self.stage_metrics: dict[str, float] = {}
        self.transform_reports: list[dict[str, Any]] = self.state.get("transform_reports", [])
        self.in_memory: str | None = None  # the stage whose final weights the routine holds
        self.datasets_applied: set[tuple[str, int]] = set()  # (stage, transform index) applied
        self.env = environment()
        self.data_args = dict(recipe["data"].get("init_args") or {})
        self.stage_data = {repr(sorted(self.data_args.items())): self.datamodule}
        for i in range(len(self.stages)):
            self.use_stage_data(i)

    def use_stage_data(self, index: int) -> None:
        """Make ``self.datamodule`` the one stage ``index`` trains on: the recipe's, changed by
        the ``data`` of every stage up to ``index`` (built once per distinct set of arguments;
        every stage's is built and checked when the run starts, before any training)."""
        args = dict(self.data_args)
        for stage in self.stages[: index + 1]:
            args.update(stage.data)
        key = repr(sorted(args.items()))
        if key not in self.stage_data:
            cls = type(self.datamodule)
            what = f"stage {self.stages[index].name!r} data"
            check_keywords(what, datamodule_parameters(cls), args, "data: {{{key}: ...}}")
            dm = cls(**args)
            first = self.stage_data[next(iter(self.stage_data))]
            if (dm.num_classes, dm.in_channels) != (first.num_classes, first.in_channels):
                raise ConfigError(
                    f"stage {self.stages[index].name!r} changes data to {dm.num_classes} classes "
                    f"and {dm.in_channels} input channels, but the model was built for "
                    f"{first.num_classes} and {first.in_channels}; keep both (e.g. as many "
                    "classes in data.classes as the first stage has)"
                )
            self.stage_data[key] = dm
        self.datamodule = self.stage_data[key]

    @property
    def is_zero(self) -> bool:
        return (
            self.trainer.is_global_zero
            if self.trainer is not None
            else (int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0)
        )

    def write(self, name: str, text: str) -> None:
        if self.is_zero:
            atomic_write_text(self.dir / name, text)

    def save_state(self, **update: Any) -> None:
        self.state.update(update)
        self.write("run.json", json.dumps(self.state, indent=1))

    def info(self) -> dict[str, Any]:
        metrics = self.trainer.callback_metrics if self.trainer is not None else {}
        dm = self.datamodule
        return {
            "recipe": self.recipe,
            "num_classes": dm.num_classes,
            "in_channels": dm.in_channels,
            "input_shape": list(dm.input_shape),
            "environment": self.env,
            "metrics": {k: float(v) for k, v in metrics.items() if v.numel() == 1},
            "edits": edit_log(self.routine.net),
        }

    def fit_stage(self, index: int, stage: Stage, extra: Sequence[Callback]) -> None:
        self.use_stage_data(index)
        ckpt_dir = self.dir / "checkpoints" / stage.name
        last = ckpt_dir / "last.safetensors"
        if last.is_file():  # resuming this stage: rebuild its structure, Lightning loads the rest
            self.routine.net = replay(self.routine.net, read_info(last).get("edits", []))
            self.restore_datasets(index)
        else:
            if index > 0 and self.in_memory != self.stages[index - 1].name:
                # resumed in a new process: start from the previous stage's final weights
                restore(
                    self.routine,
                    ckpt_dir.parent / self.stages[index - 1].name / "final.safetensors",
                )
            self.restore_datasets(index - 1)
            self.transform_reports = [
                self.apply_transform(stage.name, i, t) for i, t in enumerate(stage.transforms)
            ]
            self.save_state(transform_reports=self.transform_reports)  # kept for a resume
        if stage.lr is not None:
            self.routine.lr = stage.lr
        kwargs = {**self.trainer_kwargs, **stage.trainer}
        if stage.max_epochs is not None:
            kwargs["max_epochs"] = stage.max_epochs
        for method in stage.methods:
            self.bind_stage_model(method)
        own = [_as_callback(m) for m in stage.methods]
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), *self.methods, *own, *extra]
        monitor = self.cfg.evaluate.get("monitor", "val/acc")
        self.trainer = make_trainer(
            self.dir,
            stage=stage.name,
            info=self.info,
            monitor=monitor,
            mode="min" if monitor.endswith("loss") else "max",
            **kwargs,
        )
        self.trainer.fit(
            self.routine,
            datamodule=self.datamodule,
            weights_only=True,
            ckpt_path=str(last) if last.is_file() else None,
        )
        self.routine.remove_regularizers([m for m in stage.methods if isinstance(m, Regularizer)])
        self.trainer.save_checkpoint(ckpt_dir / "final.safetensors")
        self.stage_metrics = {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1
        }
        record: dict[str, Any] = dict(self.stage_metrics)
        if self.is_zero:  # per-stage size and depth, for accuracy-vs-sparsity/depth curves
            example = self.datamodule.example_input(MEASURE_BATCH).to(self.routine.device)
            record["measure"] = measure(self.routine.net, example, latency=False).to_dict()
        if any(self.transform_reports):
            record["transforms"] = self.transform_reports
        self.metrics["stages"][stage.name] = record
        self.save_state(
            stages_done=[*self.state["stages_done"], stage.name], stages=self.metrics["stages"]
        )
        self.in_memory = stage.name

    def bind_stage_model(self, method: Any) -> None:
        """Hand a :class:`NeedsStageModel` method the final model of the stage it names."""
        name = getattr(method, "from_stage", None)
        if not isinstance(method, NeedsStageModel) or name is None:
            return
        if name not in self.teachers:
            self.teachers[name] = load(self.dir / "checkpoints" / name / "final.safetensors").net
        method.bind_stage_model(self.teachers[name])

    def dataset_state(self, stage: str, i: int) -> Path:
        return self.dir / "checkpoints" / stage / f"dataset_transform_{i}.safetensors"

    def restore_datasets(self, index: int) -> None:
        """Rebuild the training sets the dataset transforms of stages ``0..index`` made, from
        their saved tensors, unless this process already holds them."""
        for stage in self.stages[: index + 1]:
            for i, transform in enumerate(stage.transforms):
                key = (stage.name, i)
                path = self.dataset_state(*key)
                if not isinstance(transform, DatasetTransform) or key in self.datasets_applied:
                    continue
                if path.is_file():
                    state, _ = load_tree(path)
                    self.datamodule.replace_train_dataset(
                        transform.restore_dataset(self.datamodule.train_dataset, state)
                    )
                    self.datasets_applied.add(key)

    def apply_transform(self, stage: str, i: int, transform: Any) -> dict[str, Any]:
        """Apply a stage transform (with the training loader if it asks for one); a
        ``DatasetTransform`` replaces the training set and its tensors are saved for a resume."""
        if isinstance(transform, DatasetTransform):
            self.datamodule.setup("fit")
            dataset, state = transform.apply_dataset(
                self.routine.net, self.datamodule.train_dataset
            )
            self.datamodule.replace_train_dataset(dataset)
            self.datasets_applied.add((stage, i))
            if self.is_zero:
                path = self.dataset_state(stage, i)
                path.parent.mkdir(parents=True, exist_ok=True)
                save_tree(state, path, info={"stage": stage, "transform": type(transform).__name__})
            report = getattr(transform, "report", None)
            extra = report() if callable(report) else {}
            return {"transform": type(transform).__name__, **extra}
        if getattr(type(transform), "apply", None) in (None, nn.Module.apply):
            raise ConfigError(
                f"{type(transform).__name__} is not a ModelTransform: it needs "
                "apply(model) -> model (or apply_dataset(model, dataset) for a DatasetTransform)"
            )
        kwargs = {}
        if "loader" in inspect.signature(transform.apply).parameters:
            self.datamodule.setup("fit")
            kwargs["loader"] = self.datamodule.train_dataloader()
        self.routine.net = transform.apply(self.routine.net, **kwargs)
        report = getattr(transform, "report", None)
        return {"transform": type(transform).__name__, **report()} if callable(report) else {}

    def evaluate(self) -> None:
        self.use_stage_data(len(self.stages) - 1)
        last = self.stages[-1].name
        if self.trainer is None:  # resumed after the last stage had finished
            restore(self.routine, self.dir / "checkpoints" / last / "final.safetensors")
            self.trainer = make_trainer(
                self.dir, stage=last, info=self.info, logger=False, **self.trainer_kwargs
            )
        best = self.dir / "checkpoints" / last / "best.safetensors"
        use_best = self.cfg.evaluate.get("checkpoint", "best") == "best" and best.is_file()
        if use_best and read_info(best).get("edits", []) != edit_log(self.routine.net):
            # an in-fit edit (e.g. a pruning callback) came after the best epoch: test the best
            # weights in their own structure, rebuilt from the recipe by replaying their log
            self.routine.net = load(best).net
            use_best = False
        if self.cfg.evaluate.get("test", True):
            out = self.trainer.test(
                self.routine,
                datamodule=self.datamodule,
                ckpt_path=str(best) if use_best else None,
                weights_only=True,
                verbose=False,
            )
            self.metrics.update({k: float(v) for k, v in (out[0] if out else {}).items()})
        for key in ("val/acc", "val/loss", "train/acc", "train/loss_epoch"):
            if key in self.stage_metrics:
                self.metrics[key.removesuffix("_epoch")] = self.stage_metrics[key]
        if self.is_zero and self.cfg.evaluate.get("measure", True):
            example = self.datamodule.example_input(MEASURE_BATCH).to(self.routine.device)
            result = measure(self.routine.net, example)
            self.write("measure.json", json.dumps(result.to_dict(), indent=1))
            log.info("measurement (batch of %d):\n%s", MEASURE_BATCH, result.table())
        self.write("metrics.json", json.dumps(self.metrics, indent=1))  # stages in run order
        if self.is_zero and self.cfg.evaluate.get("report", True):
            from sobre.engine.report import report

            report(self.dir)


def fit(
    recipe: str | Path | Mapping[str, Any] | None = None,
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    runs_dir: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Train and evaluate a recipe; writes a new run folder (or continues ``resume``).

    Args:
        recipe: a YAML path or a dict with the recipe sections (see :mod:`sobre.engine.recipes`).
        overrides: dotted keys, as a dict (``{"trainer.max_epochs": 3}``) or CLI-style strings.
        runs_dir: parent of run folders (default ``$SOBRE_RUNS_DIR`` or ``./runs``).
        resume: a run folder to continue from its last checkpoint (its ``config.yaml`` is used).
        callbacks: extra Lightning callbacks for every fit stage.

    Returns:
        A :class:`RunResult`: the run folder and ``metrics`` (``test/acc``, ``val/acc``, ...).
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(
                f"{str(run_dir)!r} is not a sobre run folder (no config.yaml); pass "
                "the folder printed when the run started, e.g. runs/quickstart/<time>"
            )
        raw, source = yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir)
    elif recipe is None:
        raise ConfigError(
            "no recipe given: pass a YAML path or a dict (see recipes/quickstart.yaml)"
        )
    elif isinstance(recipe, Mapping):
        raw, source = dict(recipe), "recipe"
    else:
        raw, source = load_yaml(recipe), str(recipe)
    if overrides:
        parsed = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
        raw = apply_overrides(raw, parsed)
    norm = normalize(raw)
    cfg, objs = _instantiate(norm, source)
    if resume is None:
        run_dir = new_run_dir(runs_dir, cfg.name)
    os.environ.setdefault("SOBRE_RUN_DIR", str(run_dir))  # the other ranks of a DDP run use it
    try:
        run = _Run(run_dir, norm, cfg, objs)
        run.write("config.yaml", yaml.safe_dump(norm, sort_keys=False))
        run.write("env.json", json.dumps(run.env, indent=1))
        log.info("run folder: %s", run_dir)
        run.save_state(status="running")
        try:
            for i, stage in enumerate(run.stages):
                if stage.name in run.state["stages_done"]:
                    continue
                run.fit_stage(i, stage, callbacks)
            run.evaluate()
        except BaseException as err:
            run.save_state(status="failed", error=f"{type(err).__name__}: {err}"[:500])
            raise
        run.save_state(status="done", error=None)
    finally:
        if os.environ.get("SOBRE_RUN_DIR") == str(run_dir) and resume is None:
            os.environ.pop("SOBRE_RUN_DIR", None)
    return RunResult(run_dir, run.metrics, run.routine, run.datamodule)


def load(path: str | Path) -> pl.LightningModule:
    """Rebuild the routine of a checkpoint from its recipe and load its weights (no unpickling).

    Args:
        path: a ``.safetensors`` checkpoint written by a sobre run.
    """
    info = read_info(path)  # restore() below checks the file's sha256
    if "recipe" not in info:
        raise CheckpointError(
            f"{str(path)!r} holds no recipe: it was not written by a sobre run; load plain "
            "weights with safetensors.torch.load_file"
        )
    model_node = dict(info["recipe"]["model"])
    init_args = {
        **model_node.get("init_args", {}),
        "num_classes": info["num_classes"],
        "in_channels": info["in_channels"],
    }
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(pl.LightningModule, "model", subclass_mode=True)
    try:
        cfg = parser.parse_object({"model": {**model_node, "init_args": init_args}})
        routine = parser.instantiate(cfg).model
    except argparse.ArgumentError as err:
        raise tidy_parser_error(err, str(path)) from None
    routine.checkpoint_info = restore(routine, path)
    return routine.eval()


def retest(
    checkpoint: str | Path,
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, float]:
    """Test a checkpoint again with its recipe's data and trainer callbacks; returns the metrics.

    A recipe that lists ``sobre.uncertainty.callbacks.UncertaintyEvaluation`` under
    ``trainer.callbacks`` gets its whole uncertainty table; ``overrides`` change the recipe first
    (e.g. ``{"data.batch_size": 512}``), ``callbacks`` add Lightning callbacks.
    """
    routine = load(checkpoint)  # checks the file and rebuilds the structure
    recipe = dict(routine.checkpoint_info["recipe"])
    if overrides:
        parsed = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
        recipe = apply_overrides(recipe, parsed)
    stage = Path(checkpoint).parent.name  # test on the data the checkpoint's stage trained on
    data = recipe["data"] = copy.deepcopy(recipe["data"])
    for raw in recipe.get("stages") or []:
        data.setdefault("init_args", {}).update(raw.get("data") or {})
        if stage == raw.get("name") or stage.rsplit("_", 1)[0] == raw.get("name"):
            break
    recipe.pop("stages", None)  # nothing is trained here: stages and methods are not needed
    recipe.pop("methods", None)
    _, objs = _instantiate(normalize(recipe), str(checkpoint))
    given = recipe.get("trainer") or {}
    kwargs = {k: v for k, v in dict(objs.trainer).items() if k in given and k != "max_epochs"}
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), *callbacks]
    kwargs.update(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer = pl.Trainer(default_root_dir=Path(checkpoint).parent, **kwargs)
    out = trainer.test(routine, datamodule=objs.data, verbose=False)
    return {k: float(v) for k, v in (out[0] if out else {}).items()}
