"""taming-transformers / EasyNLP VQGAN checkpoints → ``tuwen.models.vqgan.VQGAN``.

Accepted inputs (``vqgan_from_taming(path)``):

* a PyTorch-Lightning ``.ckpt`` (``{"state_dict": ..., "global_step": ..., ...}``): the ``loss.*`` keys (PatchGAN
  discriminator, LPIPS) are dropped. Lightning files also pickle non-tensor objects (callbacks, hparams); they are
  read with ``torch.load(weights_only=True)`` and, where that refuses a class, once more with inert stand-ins for
  the classes it names (nothing from the file is executed), so neither pytorch_lightning nor ``weights_only=False``
  is needed;
* a plain state dict ``.bin`` / ``.pth`` / ``.safetensors`` (EasyNLP's ``vqgan_f16_16384.bin``), optionally
  wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` and/or prefixed ``module.``;
* an app checkpoint whose VQGAN keys are prefixed ``first_stage_model.`` (EasyNLP ARTIST ``pytorch_model.bin``,
  taming ``Net2NetTransformer``): the prefix is stripped and everything else ignored; a folder holding
  ``pytorch_model.bin`` / ``model.safetensors`` works too.

The architecture comes from ``config`` (a ``VQGANConfig``, a dict, a taming ``model.yaml`` or a JSON file) or is
**inferred from the tensor shapes** (``infer_vqgan_config``). Loading is strict: a missing or unexpected key is a
``TuwenError`` listing them.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import TuwenError
from ..hub import load_state_dict_checked, load_torch_file, load_weights, read_model_type, resolve_model_path
from ..models.vqgan import VQGAN, VQGANConfig

PREFIX = "first_stage_model."
# quantizer buffers of other taming quantizers that do not change encoding/decoding (EMAVectorQuantizer)
_DROP_QUANT = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg", "quantize.embedding.initted")
_DDCONFIG_KEYS = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                  "num_res_blocks", "attn_resolutions", "dropout"}


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- reading files

def _make_stub(name: str) -> type:
    """An inert stand-in for a pickled class: accepts any constructor args / state and stores them."""

    def __new__(cls, *args, **kwargs):
        return dict.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def append(self, x):
        self.__dict__.setdefault("_items", []).append(x)

    def extend(self, xs):
        self.__dict__.setdefault("_items", []).extend(xs)

    mod, _, qual = name.rpartition(".")
    return type(qual or name, (dict,), {"__new__": __new__, "__init__": __init__, "__setstate__": __setstate__,
                                        "append": append, "extend": extend, "__hash__": object.__hash__,
                                        "__module__": mod or "stub", "__repr__": lambda self: f"<stub {name}>"})


def _load_with_stubs(path: Path) -> Any:
    """Retry ``torch.load(weights_only=True)`` with inert stand-ins for the non-allowlisted classes in the file."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    stubs = [(_make_stub(n), n) for n in names]
    with torch.serialization.safe_globals(stubs):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw tensors of a VQGAN checkpoint file or folder (still with their ``loss.``/prefix keys)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TuwenError(f"{path}: no such file or folder (expected a taming .ckpt, a .bin/.pth state dict or an "
                         f"EasyNLP model folder)")
    if path.is_dir() or path.suffix == ".safetensors":
        obj: Any = load_weights(path)
    else:
        try:
            obj = load_torch_file(path)
        except TuwenError as first:
            if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
                raise
            try:
                obj = _load_with_stubs(path)
            except Exception:
                raise first from None
    if not isinstance(obj, dict):
        raise TuwenError(f"{path}: expected a checkpoint dict or state dict, got {type(obj).__name__}")
    for wrapper in ("state_dict", "model", "module"):
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and any(torch.is_tensor(v) for v in inner.values()):
            obj = inner
            break
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not sd:
        raise TuwenError(f"{path}: holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:8]))}); "
                         f"is this a model checkpoint?")
    return sd


def extract_vqgan_state_dict(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Keep just the VQModel tensors: strip ``module.`` / ``first_stage_model.``, drop ``loss.*`` and known extras."""
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    if "quantize.embed.weight" in sd or "quantize.proj.weight" in sd:
        raise TuwenError(f"{source}: this is a Gumbel-quantizer VQGAN (taming GumbelVQ, keys quantize.proj / "
                         f"quantize.embed); tuwen supports the VectorQuantizer VQGANs (quantize.embedding.weight)")
    if "quantize.used" in sd:
        used = sd.pop("quantize.used")
        _warn(f"{source}: the quantizer was trained with a remap to {used.numel()} used codes (quantize.used); "
              f"tuwen ignores the remap, so codes are indices into the full {sd.get('quantize.embedding.weight', used).shape[0]}-entry "
              f"codebook (decoding is unaffected, but a transformer trained on remapped indices will not match)")
    for k in _DROP_QUANT + ("colorize",):
        sd.pop(k, None)
    return sd


# ----------------------------------------------------------------------------------------------- configs

def infer_vqgan_config(state_dict: dict[str, torch.Tensor], resolution: int = 256,
                       source: str = "checkpoint") -> VQGANConfig:
    """Read the architecture off tensor shapes (taming key names, any ``first_stage_model.`` prefix stripped).

    ``ch`` from ``encoder.conv_in``, ``ch_mult`` from each ``encoder.down.{i}.block.0.conv1``, ``num_res_blocks``
    from the block count, attention levels from ``encoder.down.{i}.attn``, ``z_channels`` / ``embed_dim`` from
    ``quant_conv``, ``n_embed`` from ``quantize.embedding``. The training resolution is not stored in the weights:
    ``resolution`` (default 256) is assumed, and an attention level *i* becomes ``resolution // 2**i`` in
    ``attn_resolutions``. The network is the same whatever the resolution; only the default image size and grid
    (``grid_size()``) follow it.
    """
    sd = state_dict
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            sample = ", ".join(sorted(sd)[:5])
            raise TuwenError(f"{source}: cannot infer the VQGAN architecture: no {key!r} "
                             f"(keys start with: {sample}…). Is this a taming/EasyNLP VQGAN checkpoint? "
                             f"Otherwise pass --config with the model.yaml it was trained with")
        return sd[key]

    conv_in = get("encoder.conv_in.weight")
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight$", k))})
    if not levels or levels != list(range(len(levels))):
        raise TuwenError(f"{source}: cannot infer the VQGAN architecture: encoder.down.{{i}} levels are {levels}")
    ch_mult = []
    for i in levels:
        out = int(get(f"encoder.down.{i}.block.0.conv1.weight").shape[0])
        if out % ch:
            raise TuwenError(f"{source}: encoder.down.{i} has width {out}, not a multiple of ch={ch}")
        ch_mult.append(out // ch)
    num_res_blocks = len({int(m.group(1)) for k in sd
                          if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight$", k))})
    attn_levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.attn\.0\.q\.weight$", k))})
    f = 2 ** (len(levels) - 1)
    if resolution % f:
        raise TuwenError(f"{source}: resolution {resolution} is not a multiple of the downsampling factor {f}")
    qc = get("quant_conv.weight")
    embed_dim, z_channels = int(qc.shape[0]), int(qc.shape[1])
    n_embed, e_dim = (int(s) for s in get("quantize.embedding.weight").shape)
    if e_dim != embed_dim:
        raise TuwenError(f"{source}: quantize.embedding has width {e_dim} but quant_conv outputs {embed_dim}")
    z_out = int(get("encoder.conv_out.weight").shape[0])
    if z_out != z_channels:
        raise TuwenError(f"{source}: encoder.conv_out has {z_out} channels but quant_conv expects {z_channels} "
                         f"(double_z autoencoders are not VQGANs)")
    out_ch = int(get("decoder.conv_out.weight").shape[0])
    return VQGANConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                       attn_resolutions=[resolution // 2 ** i for i in attn_levels], z_channels=z_channels,
                       embed_dim=embed_dim, n_embed=n_embed, resolution=resolution, in_channels=in_channels,
                       out_ch=out_ch, dropout=0.0)


def config_from_taming(d: dict, source: str = "config") -> VQGANConfig:
    """A taming config (``model.params.{ddconfig, embed_dim, n_embed}``, or that ``params`` level), or a tuwen
    ``config.json`` dict → VQGANConfig."""
    if "model" in d and isinstance(d["model"], dict):
        d = d["model"].get("params", d["model"])
    if "ddconfig" not in d:
        return VQGANConfig.from_dict(d, source=source)
    dd = dict(d["ddconfig"])
    if not dd.pop("resamp_with_conv", True):
        raise TuwenError(f"{source}: resamp_with_conv=false (up/downsampling without convs) is not supported")
    if dd.pop("give_pre_end", False):
        raise TuwenError(f"{source}: give_pre_end=true is not supported")
    dd.pop("tanh_out", None)
    unknown = sorted(set(dd) - _DDCONFIG_KEYS)
    if unknown:
        raise TuwenError(f"{source}: unknown ddconfig key(s) {', '.join(unknown)}")
    for k in ("embed_dim", "n_embed"):
        if k not in d:
            raise TuwenError(f"{source}: model.params.{k} is missing")
        dd[k] = d[k]
    return VQGANConfig.from_dict(dd, source=source)


def load_config(config: VQGANConfig | dict | str | os.PathLike) -> VQGANConfig:
    """A VQGANConfig, a dict, or a path to a taming ``.yaml`` or a ``.json`` (taming layout or tuwen config)."""
    if isinstance(config, VQGANConfig):
        return config
    if isinstance(config, dict):
        return config_from_taming(config)
    path = Path(config).expanduser()
    if not path.is_file():
        raise TuwenError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise TuwenError(f"--config {path}: reading YAML needs pyyaml (pip install pyyaml, or "
                             f"pip install 'tuwen[yaml]'); or pass the config as JSON") from None
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TuwenError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise TuwenError(f"--config {path}: not valid JSON ({e}); use .yaml for YAML files") from None
    if not isinstance(d, dict):
        raise TuwenError(f"--config {path}: expected a mapping at the top level")
    return config_from_taming(d, source=str(path))


# ----------------------------------------------------------------------------------------------- conversion

def vqgan_from_taming(ckpt_or_bin_path: str | os.PathLike, config: VQGANConfig | dict | str | os.PathLike | None = None,
                      resolution: int = 256) -> VQGAN:
    """Build a ``VQGAN`` from a taming/EasyNLP checkpoint (see the module docstring); returned in eval mode.

    ``config``: the architecture; None infers it from the shapes (``resolution`` is then assumed, default 256).
    """
    source = str(ckpt_or_bin_path)
    sd = extract_vqgan_state_dict(read_checkpoint(ckpt_or_bin_path), source)
    cfg = load_config(config) if config is not None else infer_vqgan_config(sd, resolution, source)
    model = VQGAN(cfg)
    load_state_dict_checked(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, source)
    return model.eval()


def load_vqgan(name_or_path: str | os.PathLike, device: str | torch.device | None = None,
               config: VQGANConfig | dict | str | os.PathLike | None = None) -> VQGAN:
    """Any VQGAN source: a tuwen VQGAN folder (``config.json`` with model_type vqgan, or a model folder with a
    ``vqgan/`` part), or anything ``vqgan_from_taming`` reads (taming ``.ckpt``, ``vqgan_f16_16384.bin``, an EasyNLP
    model folder with ``first_stage_model.*`` weights)."""
    path = resolve_model_path(name_or_path, what="VQGAN",
                              expect="config.json + model.safetensors (tuwen vq import makes one), or a taming "
                                     ".ckpt / .bin state dict")
    model_type = read_model_type(path) if path.is_dir() else None
    if model_type != VQGANConfig.model_type and path.is_dir() and read_model_type(path / "vqgan") == "vqgan":
        path, model_type = path / "vqgan", VQGANConfig.model_type  # composite tuwen model with a vqgan/ part
    if model_type == VQGANConfig.model_type and config is None:
        model = VQGAN.from_pretrained(path)
    else:
        model = vqgan_from_taming(path, config)
    if device is not None:
        model.to(device)
    return model.eval()
