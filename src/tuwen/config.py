"""Typed dataclass configs (``config.json`` of every model dir) and EasyNLP ``user_defined_parameters`` parsing."""
from __future__ import annotations

import dataclasses
import json
import shlex
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

from .errors import TuwenError
from .fileio import atomic_write_text

FORMAT_VERSION = 2   # 2: composite configs nest typed sub-configs (gpt, vit); version 1 folders still load

_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}


def parse_bool(value: Any, what: str = "value") -> bool:
    """``True``/``"true"``/``"1"``… → True; ``"False"`` is false (unlike EasyNLP's ``bool("False")``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise TuwenError(f"{what}: expected a boolean (true/false), got {value!r}")


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp, what: str) -> Any:
    """Convert ``value`` (often a string from a flag or JSON) to the annotated type ``tp`` or raise TuwenError."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional or tp is Any:
            return None
        raise TuwenError(f"{what}: a value is required")
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            return parse_bool(value, what)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
        if origin in (list, tuple):
            (elem,) = typing.get_args(tp)[:1] or (Any,)
            if isinstance(value, str):
                s = value.strip()
                if s.startswith("["):
                    value = json.loads(s)
                else:
                    value = [v for v in s.replace(";", ",").split(",") if v.strip() != ""]
            out = [coerce(v, elem, what) for v in value]
            return out if origin is list else tuple(out)
        if origin is dict or tp is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                return value
            if isinstance(value, dict):
                return tp.from_dict(value) if hasattr(tp, "from_dict") else tp(**value)
            raise ValueError
    except TuwenError:
        raise
    except (ValueError, TypeError, json.JSONDecodeError):
        tname = getattr(tp, "__name__", str(tp))
        raise TuwenError(f"{what}: expected {tname}, got {value!r}") from None
    return value


@dataclasses.dataclass
class BaseConfig:
    """Base of every model config. Subclasses set ``model_type`` and declare typed fields.

    ``to_dict`` adds ``model_type`` and ``format_version``; ``from_dict`` checks them, rejects unknown keys
    and converts values to the annotated types, so a hand-edited config.json fails with a clear message.
    """

    model_type: ClassVar[str] = "base"

    def to_dict(self) -> dict:
        d = {"model_type": self.model_type, "format_version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config", **overrides):
        d = dict(d)
        d.update({k: v for k, v in overrides.items()})
        mt = d.pop("model_type", cls.model_type)
        if mt != cls.model_type:
            raise TuwenError(f"{source}: model_type is {mt!r}, expected {cls.model_type!r}")
        fv = d.pop("format_version", FORMAT_VERSION)
        if not isinstance(fv, int) or fv > FORMAT_VERSION:
            raise TuwenError(
                f"{source}: format_version {fv!r} is newer than this tuwen understands ({FORMAT_VERSION}); upgrade tuwen"
            )
        if fv < FORMAT_VERSION:
            d = cls.upgrade(d, fv, source)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TuwenError(
                f"{source}: unknown key(s) {', '.join(unknown)} for model_type {cls.model_type!r}; "
                f"known keys: {', '.join(sorted(names))}"
            )
        kwargs = {k: coerce(v, hints[k], f"{source}: {k}") for k, v in d.items()}
        try:
            obj = cls(**kwargs)
        except TypeError as e:
            raise TuwenError(f"{source}: {e}") from None
        if hasattr(obj, "validate"):
            obj.validate()
        return obj

    @classmethod
    def upgrade(cls, d: dict, version: int, source: str) -> dict:
        """Turn the fields of a config written with an older ``format_version`` into this version's fields.

        The default keeps them as they are; composite configs whose layout changed override it.
        """
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path, **overrides):
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TuwenError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise TuwenError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path), **overrides)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------------------
# EasyNLP user_defined_parameters
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Param:
    """One typed ``user_defined_parameters`` key."""

    type: Any
    default: Any = None
    help: str = ""


def parse_user_defined_parameters(text: str | None, spec: dict[str, Param], app: str,
                                  flag: str = "--user_defined_parameters") -> dict[str, Any]:
    """Parse EasyNLP's free-form ``k=v k2=v2`` string into typed values.

    Items are separated by whitespace (newlines too); a value may contain ``=`` (split on the first one) and may be
    quoted to hold spaces. Unknown keys and bad values raise TuwenError naming the key. Missing keys take the
    spec's default.
    """
    out = {k: p.default for k, p in spec.items()}
    if not text:
        return out
    try:
        items = shlex.split(text, posix=True)
    except ValueError as e:
        raise TuwenError(f"{flag}: cannot split {text!r}: {e}") from None
    for item in items:
        if "=" not in item:
            raise TuwenError(f"{flag}: item {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in spec:
            raise TuwenError(
                f"{flag}: unknown key {key!r} for app {app!r}{did_you_mean(key, spec)}; known keys: "
                f"{', '.join(sorted(spec))}"
            )
        out[key] = coerce(value, spec[key].type, f"{flag}: {key}")
    return out


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``word``, else ``''``."""
    import difflib

    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def describe_params(spec: dict[str, Param]) -> str:
    """The keys of a ``user_defined_parameters`` spec, one a line: ``key (type, default X): help``."""
    lines = []
    for k, p in spec.items():
        t = getattr(p.type, "__name__", str(p.type))
        d = "" if p.default is None else f", default {p.default}"
        lines.append(f"  {k} ({t}{d}): {p.help}" if p.help else f"  {k} ({t}{d})")
    return "\n".join(lines)


def typed_kwargs(kwargs: dict[str, Any], spec: dict[str, Param], app: str, what: str = "pipeline") -> dict[str, Any]:
    """Same typing/unknown-key rules as ``parse_user_defined_parameters`` for Python keyword arguments."""
    out = {k: p.default for k, p in spec.items()}
    for key, value in kwargs.items():
        if key not in spec:
            raise TuwenError(f"{what}: unknown parameter {key!r} for {app!r}{did_you_mean(key, spec)}; known: "
                             f"{', '.join(sorted(spec))}")
        out[key] = coerce(value, spec[key].type, f"{what}: {key}")
    return out
