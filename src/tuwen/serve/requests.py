"""Reading a request body: the fields each endpoint takes, typed getters, and the one error type (``ApiError``)
that becomes a 4xx with a one-line reason."""
from __future__ import annotations

import math



GEN_FIELDS = ("prompt", "n", "response_format", "size", "model", "user", "seed", "top_k", "top_p", "temperature",
              "guidance_scale", "rerank", "keep", "stream")
PREDICT_FIELDS = ("text", "idx", "max_generated_num", "seed", "top_k", "top_p", "temperature", "guidance_scale")
CAPTION_FIELDS = ("image", "images", "video", "videos", "max_generated_num", "num_beams", "top_k", "top_p",
                  "temperature", "seed")
SEED_MAX = 2 ** 62 - 1



class ApiError(Exception):
    """A request the server refuses: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def _error_body(status: int, message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


# ================================================================================================ field parsing

def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _int(body: dict, name: str, default=None, lo: int | None = None, hi: int | None = None, where: str = ""):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ApiError(400, f"{where}{name} must be an integer, got {_type_name(v)}")
    if lo is not None and v < lo or hi is not None and v > hi:
        rng = f"between {lo} and {hi}" if hi is not None else f"≥ {lo}"
        raise ApiError(400, f"{where}{name} must be {rng}, got {v}")
    return v


def _float(body: dict, name: str, where: str = ""):
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ApiError(400, f"{where}{name} must be a finite number, got {_type_name(v) if not isinstance(v, float) else v}")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} must be true or false, got {_type_name(v)}")
    return v


def _unknown(body: dict, known: tuple[str, ...], where: str = "") -> None:
    extra = [k for k in body if k not in known]
    if extra:
        raise ApiError(400, f"{where}unknown field(s) {', '.join(map(repr, extra))}; accepted: {', '.join(known)}")
