"""Model directories: ``config.json`` + ``model.safetensors`` (+ tokenizer files, component sub-folders).

Also: atomic file writes, strict state-dict loading with a readable report, and model-name resolution under
``$TUWEN_HOME`` (tuwen never downloads anything).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from .config import BaseConfig
from .errors import TuwenError
from .fileio import (atomic_dir, atomic_torch_save, atomic_write, atomic_write_text,  # noqa: F401  (re-exported)
                     verify_folder_checksums, write_folder_checksums)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# ----------------------------------------------------------------------------------------------- locations

def tuwen_home() -> Path:
    """``$TUWEN_HOME`` or ``~/.cache/tuwen``: where named models live (``$TUWEN_HOME/models/<name>``)."""
    return Path(os.environ.get("TUWEN_HOME") or Path.home() / ".cache" / "tuwen").expanduser()


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or os.sep in s and Path(s).exists()


def resolve_model_path(name_or_path: str | os.PathLike, what: str = "model",
                       expect: str = "config.json + model.safetensors (tuwen) or config.json + pytorch_model.bin "
                                     "+ vocab.txt (EasyNLP)") -> Path:
    """A local path, or a model-zoo name (``alibaba-pai/pai-painter-base-zh``) looked up under ``$TUWEN_HOME``.

    Raises TuwenError naming every place it looked and what the folder must contain.
    """
    s = os.fspath(name_or_path)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if s.startswith(("oss://", "http://", "https://", "hf://")):
        raise TuwenError(f"{what} {s!r}: tuwen does not download anything; copy it to a local folder and pass that path")
    home = tuwen_home()
    base = s.split("/")[-1]
    candidates = [home / "models" / s, home / s, home / "models" / base, home / base]
    for c in candidates:
        if c.exists():
            return c
    if _looks_like_path(s) or s.startswith(("/", "./", "../", "~")):
        raise TuwenError(f"{what} {s!r}: no such file or folder")
    looked = ", ".join(str(c) for c in candidates[:2])
    raise TuwenError(
        f"{what} {s!r} not found: it is not a local path and not under TUWEN_HOME (looked in {looked}). "
        f"tuwen downloads nothing: put the files in {home / 'models' / s} (set TUWEN_HOME to change the root); "
        f"the folder must contain {expect}"
    )


# ----------------------------------------------------------------------------------------------- model folders

def read_model_type(folder: str | os.PathLike) -> str | None:
    """The ``model_type`` in ``folder/config.json``; None when there is no readable config or no such field."""
    cfg = Path(folder) / CONFIG_NAME
    if not cfg.is_file():
        return None
    try:
        value = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------------------------- weights

def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors to safetensors atomically (contiguous CPU copies; shared storage de-duplicated)."""
    from safetensors.torch import save_file

    out, seen = {}, {}
    for k, v in state_dict.items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # tied tensor: store its own copy (safetensors refuses shared storage)
            t = t.clone()
        seen[key] = k
        out[k] = t
    md = {"format": "pt"}
    md.update(metadata or {})
    atomic_write(path, lambda t: save_file(out, t, metadata=md))


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``; a file that needs arbitrary unpickling gets a clear message."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TuwenError(f"{path}: file not found") from None
    except Exception as e:  # pickle.UnpicklingError and friends
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TuwenError(
            f"{path}: cannot be read safely with torch.load(weights_only=True) ({msg}). If you trust this file, "
            f"re-save just its state dict once: python -c \"import torch; c=torch.load('{path}', weights_only=False); "
            f"torch.save(c.get('state_dict', c), 'plain.bin')\" and pass plain.bin"
        ) from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a model dir (``model.safetensors``/``pytorch_model.bin``) or a weights file."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_NAME, "pytorch_model.bin"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise TuwenError(f"{path}: no {WEIGHTS_NAME} or pytorch_model.bin in this folder")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise TuwenError(f"{path}: not a readable safetensors file ({e})") from None
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise TuwenError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def load_state_dict_checked(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                            ignore: Iterable[str] = ()) -> None:
    """Load strictly; on any missing/unexpected key or shape mismatch raise one TuwenError that lists them.

    ``ignore``: key suffixes that may be present in the file but not in the model (e.g. ``attn.mask`` buffers).
    """
    ignore = tuple(ignore)
    own = module.state_dict()
    sd = {k: v for k, v in state_dict.items() if not (ignore and k.endswith(ignore) and k not in own)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def lst(xs, n=8):
            return ", ".join(xs[:n]) + (f", … ({len(xs)} in all)" if len(xs) > n else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {lst(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {lst(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {lst(shapes, 5)}")
        raise TuwenError(f"{source}: weights do not match the model architecture ({'; '.join(parts)}). "
                         f"Check that config.json describes these weights.")
    module.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------------------------- integrity

CHECKSUMS_NAME = "checksums.sha256"


def _file_ids(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Top-level regular files → (inode, mtime_ns, size): what changed between two listings was written."""
    out = {}
    for p in folder.iterdir():
        with contextlib.suppress(OSError):
            st = p.stat()
            if p.is_file():
                out[p.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def verify_model_folder(path: str | Path) -> None:
    """Check the files ``checksums.sha256`` lists (a folder without one — older tuwen, EasyNLP — is accepted)."""
    problems = verify_folder_checksums(path, CHECKSUMS_NAME)
    if problems:
        raise TuwenError(f"{path}: the model files are damaged or incomplete ({'; '.join(problems[:3])}"
                         f"{' …' if len(problems) > 3 else ''}); copy the folder again or re-save the model")


# ----------------------------------------------------------------------------------------------- base class

class PretrainedModel(nn.Module):
    """A model that lives in a folder: ``config.json`` + ``model.safetensors`` (+ what ``_save_extra`` adds).

    Subclasses set ``config_class`` and take the config as the first constructor argument.
    """

    config_class: ClassVar[type[BaseConfig]] = BaseConfig

    def __init__(self, config: BaseConfig):
        super().__init__()
        self.config = config

    # hooks for composite models (tokenizer files, component sub-folders)
    def _save_extra(self, path: Path) -> None:
        pass

    def _load_extra(self, path: Path) -> None:
        pass

    def _weights_for_save(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the model folder. Each file is replaced atomically; the config is written after the weights, and
        ``checksums.sha256`` (sha256 and size of every file written here) last, so that loading can tell a
        damaged or half-copied folder from a good one."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        before = _file_ids(path)
        with contextlib.suppress(FileNotFoundError):
            (path / CHECKSUMS_NAME).unlink()  # a writer that dies below leaves no stale list behind
        save_weights(self._weights_for_save(), path / WEIGHTS_NAME, {"model_type": self.config.model_type})
        self._save_extra(path)
        atomic_write_text(path / CONFIG_NAME, self.config.to_json())
        after = _file_ids(path)
        written = [n for n, fid in after.items() if before.get(n) != fid and n != CHECKSUMS_NAME]
        write_folder_checksums(path, written, CHECKSUMS_NAME)
        return path

    @classmethod
    def _read_config(cls, path: Path, **overrides) -> BaseConfig:
        cfg_path = path / CONFIG_NAME
        if not cfg_path.exists():
            raise TuwenError(f"{path}: not a model folder (no {CONFIG_NAME})")
        return cls.config_class.load(cfg_path, **overrides)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        **overrides):
        path = resolve_model_path(name_or_path, what=cls.__name__)
        verify_model_folder(path)
        config = cls._read_config(path, **overrides)
        model = cls(config)
        load_state_dict_checked(model, load_weights(path / WEIGHTS_NAME), str(path / WEIGHTS_NAME))
        model._load_extra(path)
        model.eval()
        if device is not None:
            model.to(device)
        return model

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")
