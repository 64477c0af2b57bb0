"""Safetensors + JSON files: any nested tree of tensors and plain values, written atomically.

A tree (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) is split in two:
every tensor goes into a ``.safetensors`` file under a generated key, and the rest of the tree
(the *skeleton*) becomes JSON in which tensors are ``{"__tensor__": key}`` placeholders. What JSON
cannot hold is tagged (tuples, dicts with non-str keys, numpy arrays, bytes), so optimizer states
round-trip exactly (plain JSON would turn Adam's int state keys into strings and silently lose the
moments on load). The skeleton is also kept in the safetensors header, so the tensor file alone is
complete; the ``.json`` sidecar is a readable copy that records the tensor file's sha256.

Writes go to a temporary file in the same folder, are fsynced and renamed into place, tensors first
and the sidecar last. Loading never unpickles anything.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from sobre.core.errors import CheckpointError

FORMAT = "sobre-tree/1"
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__", "__bytes__")


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of a tensor file: ``x.safetensors`` -> ``x.json``."""
    return Path(path).with_suffix(".json")


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write via ``write(file)`` to a temp file, fsync, rename over ``path``, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically (temp file + fsync + rename)."""
    _atomic_write(Path(path), lambda f: f.write(text), mode="w")


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], seen: dict[tuple, str]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        ident = (
            (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                tuple(t.stride()),
                t.dtype,
            )
            if t.numel()
            else None
        )
        if ident in seen:  # tied weights and other aliases are stored once
            return {"__tensor__": seen[ident]}
        key = path or "root"
        tensors[key] = t.contiguous().clone()
        if ident is not None:
            seen[ident] = key
        return {"__tensor__": key}
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            key = path or "root"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
            return {"__ndarray__": key}
        if isinstance(obj, np.generic):
            return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode()}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {
                k: _encode(v, f"{path}/{k}" if path else k, tensors, seen) for k, v in obj.items()
            }
        return {
            "__items__": [
                [
                    _encode(k, f"{path}/#k{i}", tensors, seen),
                    _encode(v, f"{path}/#{i}", tensors, seen),
                ]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]
    raise CheckpointError(
        f"cannot store {type(obj).__name__} at {path or 'the root'!r} in a checkpoint: only "
        "tensors, "
        "numbers, strings, lists, tuples and dicts are allowed. Keep objects out of saved state "
        "(e.g. save_hyperparameters(ignore=[...]))."
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]].clone()
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().copy()
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_freeze(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _freeze(key: Any) -> Any:
    return tuple(_freeze(k) for k in key) if isinstance(key, list | tuple) else key


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_tree(
    tree: Any, path: str | os.PathLike[str], *, info: Mapping[str, Any] | None = None
) -> Path:
    """Save ``tree`` as ``path`` (safetensors) + its JSON sidecar, atomically.

    Args:
        tree: nested dicts/lists/tuples of tensors, numpy arrays and JSON-able values.
        path: the tensor file; the sidecar is ``path`` with a ``.json`` suffix.
        info: extra JSON-able metadata stored beside the skeleton (recipe, metrics, versions).

    Returns:
        The path of the tensor file.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "info": dict(info or {}), "tree": _encode(tree, "", tensors, {})}
    try:
        text = json.dumps(doc, sort_keys=False)
    except TypeError as err:
        raise CheckpointError(f"checkpoint info is not JSON-serialisable: {err}") from err
    blob = save(tensors, metadata={"skeleton": text})
    _atomic_write(path, lambda f: f.write(blob))
    sidecar = {**doc, "tensors": {"file": path.name, "sha256": hashlib.sha256(blob).hexdigest()}}
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=1))
    return path


def read_info(path: str | os.PathLike[str], *, check: bool = False) -> dict[str, Any]:
    """The ``info`` metadata of a saved tree, read from the tensor file's header only.

    Args:
        path: the ``.safetensors`` file.
        check: first verify the whole file against the sha256 recorded in the sidecar.
    """
    return _read_doc(Path(path), check=check, tensors=False)[0]["info"]


def _read_doc(path: Path, *, check: bool, tensors: bool = True) -> tuple[dict[str, Any], Any]:
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; pass the path of a "
            "'.safetensors' file written by sobre (e.g. RUN/checkpoints/last.safetensors)"
        )
    sidecar = sidecar_path(path)
    if check and sidecar.is_file():
        try:
            expected = json.loads(sidecar.read_text())["tensors"]["sha256"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"sidecar {str(sidecar)!r} is unreadable ({err}); delete it to load "
                "from the tensor file alone"
            ) from err
        if _sha256(path) != expected:
            raise CheckpointError(
                f"{str(path)!r} does not match the sha256 recorded in {sidecar.name}: the file is "
                "corrupted or was replaced; restore it or load an earlier checkpoint"
            )
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({err}); it is "
            "corrupted or truncated: load an earlier checkpoint"
        ) from err
    with handle as f:
        meta = f.metadata() or {}
        if "skeleton" not in meta:
            raise CheckpointError(
                f"{str(path)!r} is a safetensors file but not a sobre checkpoint "
                "(no skeleton in its header); load it with safetensors.torch.load_file"
            )
        doc = json.loads(meta["skeleton"])
        if doc.get("format") != FORMAT:
            raise CheckpointError(
                f"{str(path)!r} has format {doc.get('format')!r}; this sobre reads {FORMAT!r}"
            )
        loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118
    return doc, loaded


def load_tree(path: str | os.PathLike[str], *, check: bool = True) -> tuple[Any, dict[str, Any]]:
    """Load a tree saved by :func:`save_tree`; returns ``(tree, info)``.

    Args:
        path: the ``.safetensors`` file.
        check: verify the tensor file against the sha256 recorded in the sidecar (when present).

    Raises:
        CheckpointError: missing, truncated or corrupted file, or a sha256 mismatch.
    """
    doc, tensors = _read_doc(Path(path), check=check)
    return _decode(doc["tree"], tensors), doc["info"]
