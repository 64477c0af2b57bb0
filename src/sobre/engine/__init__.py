"""The Lightning engine (the only Lightning-heavy package): the classification routine with a
composable loss, the generic method callback, safetensors checkpoints, the trainer factory,
recipes, the run orchestration (stages, test, measure, report) and the ``sobre`` CLI."""

from sobre.engine.callbacks import EpochSummary, MethodCallback, RngState
from sobre.engine.checkpoint import SafeModelCheckpoint, SafetensorsCheckpointIO
from sobre.engine.report import PLOTS, report
from sobre.engine.routine import ClassificationRoutine
from sobre.engine.run import RunResult, Stage, fit, load, retest
from sobre.engine.trainer import make_trainer

__all__ = [
    "PLOTS",
    "ClassificationRoutine",
    "EpochSummary",
    "MethodCallback",
    "RngState",
    "RunResult",
    "SafeModelCheckpoint",
    "SafetensorsCheckpointIO",
    "Stage",
    "fit",
    "load",
    "make_trainer",
    "report",
    "retest",
]
