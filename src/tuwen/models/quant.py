"""Low-precision weights for decoding: bf16 and int8 weight-only, and int8 W8A8 ``nn.Linear`` replacements.

At batch 1 a decode step of a base-size GPT reads every weight once (390 MB in fp32), so on CPU its time is the
memory bandwidth divided into the bytes read. Storing the Linear weights in bf16 halves them, int8 with one
scale per output channel quarters them. Activations, LayerNorms, the residual stream, embeddings, attention and
the KV cache stay in the model's dtype; only the matrix products read low-precision weights::

    quantize_weights(gpt, "int8")   # in place; returns gpt. "fp32" restores nothing: load the model again

* ``"bf16"`` — :class:`Bf16Linear`: weight [N, K] bf16, ``F.linear(x.bf16(), w, b)`` → x's dtype.
* ``"int8"`` — :class:`Int8Linear`: weight [N, K] int8 + scales [N] (symmetric, per output channel:
  ``w ≈ q * scale``, ``scale = max|w_row| / 127``). The product runs as ``torch._weight_int8pack_mm`` (bf16
  activations, the int8 weights are read as they are) where this torch build and CPU have it; elsewhere (other
  devices, older torch, a kernel that refuses) it falls back to dequantising to the activation dtype
  (``F.linear(x, q * scale)``), which is correct but saves no time. The choice is made once per layer, on the
  first call, by trying the kernel against the fallback.
* ``"w8a8"`` — :class:`Int8DynLinear`: the same int8 weights and scales, and the activations quantised too, per
  row at each call (symmetric: ``x ≈ xq * sx``, ``sx = max|x_row| / 127``, an all-zero row gives zeros); the
  product is exact int32 sums times ``sx`` times the channel scales. On an x86 CPU it runs as fbgemm's integer
  linear (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` on weights packed once per layer): each
  row is first scaled to max|x| = 1 and then quantised with one fixed scale (1/127, uint8 zero point 128 — the
  same 255 levels), so no row's result depends on another's; fbgemm is used only where a probe shows it sums
  exactly (an AVX2 kernel without VNNI saturates). Elsewhere it runs as ``torch._int_mm(xq, q.t())``; on CUDA
  ``_int_mm`` wants more than 16 rows and K, N multiples of 8: smaller batches are padded with zero rows; without
  either (no ``_int_mm``, a kernel that refuses) the same integers are multiplied by a float ``F.linear``. The
  kernels agree up to an activation on a half level rounded the other way. Each row's result depends on that
  row only, so images do not depend on the batch.

All are inference-only (no gradients) and keep the GPT's state-dict names for ``weight`` and ``bias``
(``weight`` holds the low-precision tensor; ``Int8Linear`` adds ``scales``), so ``model.fused_qkv()`` and the
samplers work unchanged. Measured choice of the CPU default: see README "Speed".
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TuwenError

__all__ = ["WEIGHTS_DTYPES", "cpu_default", "Bf16Linear", "Int8Linear", "Int8DynLinear", "quantize_weights",
           "weights_dtype_of", "check_weights_dtype", "resolve_weights_dtype"]

#: the values ``--weights_dtype`` / ``weights_dtype=`` accept
WEIGHTS_DTYPES = ("fp32", "bf16", "int8", "w8a8")


def cpu_default() -> str:
    """What ``"auto"`` means on CPU: ``"w8a8"`` where fbgemm's integer linear runs exactly (x86 builds of torch),
    else ``"int8"`` — measured fastest with the quality guard met (README "Speed": a base-size image's codes at
    2 threads, w8a8 2.25 s against int8 2.45 at batch 1, 0.48 against 0.60 s per image at batch 8; the demo's
    attribute accuracy the same). On CUDA "auto" keeps the weights as loaded (bf16 autocast, CUDA graph)."""
    return "w8a8" if _fbgemm_ok() else "int8"


def resolve_weights_dtype(name: str | None, device: torch.device | str, flag: str = "weights_dtype") -> str | None:
    """``"auto"``/None → the default for ``device`` (:func:`cpu_default` on CPU, None = as loaded elsewhere); other
    values are checked with :func:`check_weights_dtype`."""
    if name is None or str(name).strip().lower() == "auto":
        return cpu_default() if torch.device(device).type == "cpu" else None
    return check_weights_dtype(name, flag)


def check_weights_dtype(name: str | None, flag: str = "weights_dtype") -> str | None:
    """``name`` lower-cased if it is one of WEIGHTS_DTYPES (None passes), else a TuwenError naming ``flag``."""
    if name is None:
        return None
    n = str(name).strip().lower()
    if n not in WEIGHTS_DTYPES:
        raise TuwenError(f"{flag} {name!r}: expected one of {', '.join(WEIGHTS_DTYPES)}")
    return n


class Bf16Linear(nn.Module):
    """``nn.Linear`` with its weight (and bias) stored in bf16; input and output keep their dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())  # [N, K]
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))  # [N]

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Bf16Linear":
        return cls(lin.weight, lin.bias)

    @classmethod
    def cat(cls, layers: list["Bf16Linear"]) -> "Bf16Linear":
        """One layer computing the outputs of ``layers`` side by side (fused q/k/v)."""
        bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
        return cls(torch.cat([m.weight for m in layers]), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"


_KERNEL_OK: dict[tuple[str, torch.dtype], bool] = {}  # (device type, activation dtype) -> int8pack_mm usable


def _int8pack_ok(x2: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether ``torch._weight_int8pack_mm`` runs here and agrees with the dequantised product."""
    fn = getattr(torch, "_weight_int8pack_mm", None)
    if fn is None:
        return False
    try:
        y = fn(x2.to(torch.bfloat16), w, scales.to(torch.bfloat16)).float()
    except (RuntimeError, NotImplementedError):
        return False
    tol = 3e-2 * float(ref.abs().max()) + 1e-3  # bf16 activations: ~3 significant digits
    return bool(torch.isfinite(y).all()) and float((y - ref.float()).abs().max()) <= tol


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and one fp32 scale per output channel (weight-only quantisation)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()  # [N, K]
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # [N]
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight", q.contiguous())  # [N, K] int8
        self.register_buffer("scales", scales)  # [N] fp32
        self.register_buffer("bias", None if bias is None else bias.detach().float())  # [N]
        self._kernel: bool | None = None  # None: not decided yet; True: int8pack_mm; False: dequantise
        self._scales_bf16: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        return cls(lin.weight, lin.bias)

    @classmethod
    def cat(cls, layers: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing the outputs of ``layers`` side by side (fused q/k/v); same quantised values."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features = layers[0].in_features
        new.out_features = sum(m.out_features for m in layers)
        new.register_buffer("weight", torch.cat([m.weight for m in layers]))
        new.register_buffer("scales", torch.cat([m.scales for m in layers]))
        new.register_buffer("bias", None if layers[0].bias is None else torch.cat([m.bias for m in layers]))
        new._kernel, new._scales_bf16 = None, None
        return new

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, [N, K] in ``dtype``."""
        return (self.weight.float() * self.scales[:, None]).to(dtype)

    def _apply(self, fn, *args, **kwargs):  # .to(device) etc.: the kernel choice is per device
        self._kernel, self._scales_bf16 = None, None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        if self._kernel is None:
            key = (x.device.type, x.dtype)
            if key not in _KERNEL_OK:  # decided once per process, device type and activation dtype
                ref = F.linear(x2, self.dequantized(x.dtype))
                _KERNEL_OK[key] = x.device.type == "cpu" and _int8pack_ok(x2, self.weight, self.scales, ref)
            self._kernel = _KERNEL_OK[key]
        if self._kernel:
            if self._scales_bf16 is None:
                self._scales_bf16 = self.scales.to(torch.bfloat16)
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self._scales_bf16).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def _quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``x2`` [M, K] (computed in fp32): ``(xq [M, K] int8, sx [M, 1] fp32)`` with
    ``x2 ≈ xq * sx``; an all-zero row gives zeros. Row by row: no row's values depend on another's."""
    xf = x2.float()
    sx = xf.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30).div_(127.0)  # [M, 1]; a zero row: 0 / 1e-30 = 0
    return (xf / sx).round_().to(torch.int8), sx  # |xf / sx| <= 127 (+ rounding): no clamp needed


#: CPU: ``_int_mm`` products of 2 … this many rows run one row at a time. oneDNN has a fast one-row (GEMV) kernel;
#: from two rows on it runs a GEMM that costs about 2× per weight byte. Measured on a base-size decode step, one
#: thread, random weights, a shared 2-core machine (process-CPU ms per decode step, w8a8 one call / row by row /
#: int8 weight-only): 1 row 10.4 / — / 11.3; 2 rows 19.6 / 15.1 / 13.8; 3 rows 17.2 / 14.5 / 13.5; 4 rows
#: 19.5 / 18.4 / 12.5; 6 rows 19.5 / 25.3 / 19.2 — from 6 rows on one call wins.
_ROW_BY_ROW = 4
_INTMM_OK: dict[tuple[str, bool, bool], bool] = {}  # (device type, K % 8 == 0, N % 8 == 0) -> _int_mm usable


def _fbgemm_op():
    """fbgemm's ``linear_with_input_q_dq_qweight_dq_output_fp32`` (x86 builds of torch), or None."""
    try:
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    except (AttributeError, RuntimeError):
        return None


def _fbgemm_pack(weight: torch.Tensor, scales: torch.Tensor):
    """fbgemm's packed form of int8 ``weight`` [N, K] with per-channel ``scales`` [N] (the same integers)."""
    with warnings.catch_warnings():  # torch warns that quantized tensors are deprecated; the pack is its input
        warnings.simplefilter("ignore")
        zero_points = torch.zeros_like(scales, dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(weight, scales.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def _fbgemm_linear(x2: torch.Tensor, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2`` [M, K] fp32 → fp32 [M, N] (+ ``bias``): each row scaled to max|x| = 1, quantised with the one fixed
    scale 1/127 (uint8, zero point 128: the same 255 levels as :func:`_quantize_rows`), multiplied in integers by
    fbgemm and scaled back; the fixed scale keeps every row's result independent of the other rows."""
    sx = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # [M, 1] (6× faster than vector_norm(inf) here)
    y = _fbgemm_op()(x2 / sx, 1.0 / 127.0, 128, packed)
    return y.mul_(sx) if bias is None else torch.addcmul(bias, y, sx)


_FBGEMM_OK: list[bool] = []  # [] not decided; [True] fbgemm's kernel is used on CPU


def _fbgemm_ok() -> bool:
    """Whether fbgemm's integer linear runs in this torch build on this CPU and sums exactly: a probe whose every
    product is 255 × 127 (an AVX2 kernel without VNNI saturates pairs of them at int16), against the exact sum."""
    if not _FBGEMM_OK:
        ok = False
        if _fbgemm_op() is not None:
            try:
                k = 256
                packed = _fbgemm_pack(torch.full((8, k), 127, dtype=torch.int8), torch.ones(8))
                y = _fbgemm_linear(torch.ones(2, k), packed)
                ok = bool(torch.allclose(y, torch.full_like(y, 127.0 * k), rtol=1e-5, atol=0.0))
            except (RuntimeError, NotImplementedError, AttributeError):
                ok = False
        _FBGEMM_OK.append(ok)
    return _FBGEMM_OK[0]


class Int8DynLinear(Int8Linear):
    """W8A8: the int8 weights and per-channel scales of :class:`Int8Linear`, with the activations quantised per
    row at each call and the product computed in integers (int32 sums; kernels: the module docstring). ``weight``
    stays the row-major [N, K] of :class:`Int8Linear` (``_int_mm`` reads its transposed view: on one CPU thread a
    base-size decode step measured the same or faster than with a contiguous [K, N] copy at 1–16 rows); fbgemm's
    packed copy is made at the first call on CPU (as many bytes again)."""

    def _int_mm(self, xq: torch.Tensor) -> torch.Tensor:
        """``xq @ q.t()`` as int32 [M, N]; on CUDA rows are padded to 17 (``_int_mm`` wants M > 16); on CPU 2 …
        _ROW_BY_ROW rows go one at a time (oneDNN's one-row kernel; the same exact sums)."""
        m, wt = xq.shape[0], self.weight.t()
        if xq.is_cuda:
            return torch._int_mm(torch.cat([xq, xq.new_zeros(17 - m, xq.shape[1])]), wt)[:m] if m <= 16 \
                else torch._int_mm(xq, wt)
        if 1 < m <= _ROW_BY_ROW:
            return torch.cat([torch._int_mm(xq[i:i + 1], wt) for i in range(m)])
        return torch._int_mm(xq, wt)

    def _intmm_ok(self, xq: torch.Tensor) -> bool:
        """Whether ``torch._int_mm`` runs here for this layer and equals the float product of the same integers
        (tried on one row of ``xq``)."""
        if getattr(torch, "_int_mm", None) is None:
            return False
        xq = xq[:1]
        ref = F.linear(xq.float(), self.weight.float())
        try:
            y = self._int_mm(xq).float()
        except (RuntimeError, NotImplementedError):
            return False
        tol = 1e-5 * float(ref.abs().max()) + 1e-3  # exact integers; the float reference rounds above 2**24
        return y.shape == ref.shape and float((y - ref).abs().max()) <= tol

    _packed = None  # fbgemm's packed weights (CPU), made at the first call

    def _apply(self, fn, *args, **kwargs):
        self._packed = None
        return super()._apply(fn, *args, **kwargs)

    def _choose_kernel(self, x2: torch.Tensor) -> str:
        """"fbgemm" (CPU, where fbgemm's integer linear sums exactly), "int_mm" (``torch._int_mm``, tried once per
        process, device type and shape class: CUDA wants K, N multiples of 8) or "float" (the same integers
        multiplied as floats)."""
        if x2.device.type == "cpu" and _fbgemm_ok():
            return "fbgemm"
        key = (x2.device.type, self.in_features % 8 == 0, self.out_features % 8 == 0)
        if key not in _INTMM_OK:
            _INTMM_OK[key] = self._intmm_ok(_quantize_rows(x2[:1])[0])
        return "int_mm" if _INTMM_OK[key] else "float"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if self._kernel is None and x2.shape[0]:
            self._kernel = self._choose_kernel(x2)
        sc, b = self.scales, self.bias
        if sc.dtype != torch.float32 or (b is not None and b.dtype != torch.float32):  # cast: compute in fp32
            sc, b = sc.float(), None if b is None else b.float()
        if self._kernel == "fbgemm":
            if self._packed is None:
                self._packed = _fbgemm_pack(self.weight, sc)
            y = _fbgemm_linear(x2.float().contiguous(), self._packed, b)  # [M, N] fp32
        else:
            xq, sx = _quantize_rows(x2)  # [M, K] int8, [M, 1]
            acc = self._int_mm(xq) if self._kernel == "int_mm" else F.linear(xq.float(), self.weight.float())
            y = acc * sx  # int32 (or fp32) × fp32 → fp32 [M, N]
            y = y.mul_(sc) if b is None else torch.addcmul(b, y, sc)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and activations"


LOW_PRECISION_LINEARS = (Bf16Linear, Int8Linear)  # Int8DynLinear is an Int8Linear


def _replace_linears(module: nn.Module, make) -> int:
    n = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, make(child))
            n += 1
        else:
            n += _replace_linears(child, make)
    return n


@torch.no_grad()
def quantize_weights(model: nn.Module, weights_dtype: str = "fp32") -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (a GPT: attention, MLP, head, prefix projection) in place by a
    bf16 or int8 weight-only layer, or an int8 weights-and-activations layer (``"w8a8"``); ``"fp32"`` leaves the
    model as it is. Returns ``model``.

    For inference: the replaced layers have no trainable parameters. Embeddings, LayerNorms, positions and the KV
    cache are untouched. A model whose Linears are already replaced is an error (quantise once, from fp32).
    """
    wd = check_weights_dtype(weights_dtype)
    if wd == "fp32":
        return model
    if any(isinstance(m, LOW_PRECISION_LINEARS) for m in model.modules()):
        raise TuwenError(f"quantize_weights({wd!r}): the model's weights are already low-precision "
                         f"({weights_dtype_of(model)}); load it again to change")
    make = {"bf16": Bf16Linear, "int8": Int8Linear, "w8a8": Int8DynLinear}[wd].from_linear
    if _replace_linears(model, make) == 0:
        raise TuwenError(f"quantize_weights({wd!r}): the model has no nn.Linear layers")
    model.requires_grad_(False)
    return model


def weights_dtype_of(model: nn.Module) -> str:
    """"w8a8", "int8", "bf16" or the dtype name of the first parameter ("fp32", …)."""
    for m in model.modules():
        if isinstance(m, Int8DynLinear):
            return "w8a8"
        if isinstance(m, Int8Linear):
            return "int8"
        if isinstance(m, Bf16Linear):
            return "bf16"
    p = next(model.parameters(), None)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        p.dtype if p is not None else torch.float32, str(p.dtype))
