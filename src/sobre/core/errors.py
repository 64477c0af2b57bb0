"""Errors sobre raises on bad input: each message names the problem and the fix."""

from __future__ import annotations


class SobreError(Exception):
    """Base class of every error sobre raises on purpose."""


class ConfigError(SobreError, ValueError):
    """A recipe, an override or an argument is wrong (unknown key, wrong type, bad value)."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup failed; the message lists the closest known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataNotFoundError(SobreError, FileNotFoundError):
    """A dataset folder or file is missing; the message says how to obtain it."""


class CheckpointError(SobreError):
    """A checkpoint is missing, corrupted, or does not match the model."""
