"""Read the weights of a TorchScript archive (OpenAI CLIP's ``ViT-B-32.pt`` …) without running anything from it.

``torch.jit.load`` is not safe on a file a user downloaded: it builds the archive's classes and runs their
TorchScript ``__setstate__`` code, which can call file-writing operators. This reader never does. A TorchScript
archive is a zip file::

    NAME/data.pkl          the module tree, pickled (classes ``__torch__.*``, tensors by persistent id)
    NAME/data/0, 1, ...    raw little-endian tensor storages, one file each
    NAME/code/__torch__/…  the TorchScript source of every class (read as text here, for the lists
                           ``__parameters__ = [...]`` and ``__buffers__ = [...]``)

``data.pkl`` is read by a restricted unpickler that builds only tensors, plain containers and inert records for the
``__torch__.*`` module classes (any other global is refused). The records are walked like ``nn.Module.state_dict``:
parameters and buffers by name, sub-modules with a ``.`` prefix; tensor attributes that are neither (e.g. a cached
mask) are left out, as ``torch.jit.load(path).state_dict()`` leaves them out.
"""
from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ..errors import TuwenError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_CLASS_RE = re.compile(r"^class\s+(\w+)\s*\([^)]*\)\s*:\s*$", re.MULTILINE)
_LIST_RE = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*\[([^\]]*)\]", re.MULTILINE)


def is_torchscript(path: str | Path) -> bool:
    """A zip file with a ``*/data.pkl`` and TorchScript ``code/`` or ``constants.pkl`` members."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


class ScriptRecord:
    """An inert stand-in for one ``__torch__.*`` object: it only keeps the state the pickle hands it."""

    qualname = "?"

    def __setstate__(self, state):  # called by pickle's BUILD: store, never interpret
        self.state = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_ignored) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *_ignored) -> torch.Tensor:
    return data


def _int_list(xs):
    return list(xs)


class _SafeUnpickler(pickle.Unpickler):
    """Builds tensors, containers and ``ScriptRecord`` objects; refuses every other class or function."""

    _FUNCS = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch.jit._pickle", "build_intlist"): _int_list,
        ("torch.jit._pickle", "build_doublelist"): _int_list,
        ("torch.jit._pickle", "build_boollist"): _int_list,
        ("torch.jit._pickle", "build_tensorlist"): _int_list,
        ("torch.jit._pickle", "restore_type_tag"): lambda value, _tag: value,
    }

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.source = archive, prefix, source
        self.records: dict[str, type] = {}
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in self._FUNCS:
            return self._FUNCS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            if qual not in self.records:
                self.records[qual] = type(name, (ScriptRecord,), {"qualname": qual})
            return self.records[qual]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only tensors and module records are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid[:5]
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected storage type {dtype!r}")
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) < int(numel) * itemsize:
                raise pickle.UnpicklingError(f"storage {key} is truncated ({len(raw)} bytes for {numel} elements)")
            buf = bytearray(raw[: int(numel) * itemsize])
            self.storages[key] = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return self.storages[key]


def _tensor_names(archive: zipfile.ZipFile, prefix: str) -> dict[str, tuple[list[str], list[str]]]:
    """Class qualname → (parameter names, buffer names), read as text from the archive's TorchScript sources."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    code = f"{prefix}/code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-3].replace("/", ".")
        text = archive.read(name).decode("utf-8", errors="replace")
        starts = [(m.start(), m.group(1)) for m in _CLASS_RE.finditer(text)] + [(len(text), "")]
        for (start, cls), (end, _) in zip(starts, starts[1:]):
            lists = {k: [s.strip().strip("'\"") for s in v.split(",") if s.strip()]
                     for k, v in _LIST_RE.findall(text[start:end])}
            out[f"{module}.{cls}"] = (lists.get("__parameters__", []), lists.get("__buffers__", []))
    return out


def _walk(obj, prefix: str, names: dict, out: dict[str, torch.Tensor]) -> None:
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        return  # a class with a custom __getstate__: its state is not a module's attributes
    declared = names.get(type(obj).qualname)
    for key, value in state.items():
        if isinstance(value, ScriptRecord):
            _walk(value, f"{prefix}{key}.", names, out)
        elif torch.is_tensor(value):
            if declared is None or key in declared[0] or key in declared[1]:
                out[f"{prefix}{key}"] = value


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict()`` that ``torch.jit.load(path)`` would give, read without executing the archive."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise TuwenError(f"{path}: not a readable TorchScript archive ({e})") from None
    with archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            raise TuwenError(f"{path}: a zip file without NAME/data.pkl: not a TorchScript or torch.save archive")
        prefix = pkls[0].split("/")[0]
        try:
            root = _SafeUnpickler(archive.read(pkls[0]), archive, prefix, str(path)).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise TuwenError(f"{path}: cannot read the TorchScript archive safely ({e})") from None
        if not isinstance(root, ScriptRecord):
            raise TuwenError(f"{path}: the archive does not hold a TorchScript module")
        out: dict[str, torch.Tensor] = {}
        _walk(root, "", _tensor_names(archive, prefix), out)
    if not out:
        raise TuwenError(f"{path}: the TorchScript archive holds no parameters that can be read without running "
                         f"its code (a module with a custom __setstate__ is not read)")
    return out
