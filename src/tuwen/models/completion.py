"""Image completion ("text and part of image"): keep the codes of the known region, sample the others.

CogView's code can fill any ``[MASK]`` span but never exposes it; this module does it for a text→image GPT over
``[text ids][image codes]`` (tuwen's own models, EasyNLP ARTIST). Given the codes of an image and a mask of the
codes to generate (``unknown`` [n], True = generate):

1. **Raster fill (exact for a prefix mask).** Let ``u0`` be the first unknown code. The text and codes
   ``0 … u0-1`` are the prefix; codes ``u0 …`` are decoded one by one through the KV cache with every known code
   *forced* (``tuwen.sampling.generate(forced=…)``), so each unknown code is sampled conditioned on the text and
   on **all codes before it in raster order**, known or generated. When every known code comes before every
   unknown one (the unknown region is a suffix: "extend down", the bottom rows) this is an exact sample of
   p(unknown | known, text).
2. **Gibbs sweeps (a mask that is not a suffix).** Step 1 cannot look ahead: an unknown code does not see the
   known codes after it (e.g. the right of a box, or the columns of "extend right" on later rows). So each
   unknown code ``i`` is then resampled, in raster order, ``sweeps`` times, from

       p(x_i | all other codes) ∝ Π_{j ≥ i} q(x_j | x_<j)

   where ``q`` is the model's conditional as sampling uses it (classifier-free guidance mixed in when
   ``guidance_scale`` is set). The candidates for ``x_i`` are the ``top_k`` codes of ``q(x_i | x_<i)`` (64 when
   top_k is off), the nucleus of ``top_p`` when set; each candidate is scored by teacher forcing the codes after
   it (``log q`` of every later code, known and unknown) on a KV cache of the codes before it, the total
   divided by ``temperature``, and drawn by Gumbel-max with tuwen's counter-based noise (same seed → same image,
   independent of the batch). ``window`` limits the product to the next ``window`` codes (``TextToImage.complete``
   uses one grid row + 1: the codes to its right and the one below it, which depend on it most); ``None`` keeps
   every later code (the exact conditional over the candidates).

Limits: Gibbs sampling over a truncated candidate set (and, with a ``window``, a truncated product) converges
to the conditional only with many sweeps; one or two sweeps (the default is 1) make the unknown codes agree with
the known codes after them (objects cut at the right/bottom border of a box) but are not an exact sample. Cost:
step 1 is one generation; each sweep costs, per unknown code, K × ``window`` teacher-forced tokens (K
candidates) on top of one more decode of the sequence — fine for tuwen's small models, heavy for a 1024-code
CogView image with a large mask (use ``sweeps=0`` there: raster fill only). Each unknown code also
stays within the VQ grid: a code cell is unknown when any of its pixels is (``code_mask``); the known pixels
are pasted back after decoding (:func:`paste_known`), so the visible known region is the input exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.images import open_any_image, resize_crop
from ..errors import TuwenError
from ..runtime import autocast
from ..sampling import as_seeds, generate, gumbel_noise
from .gpt import GPT, KVCache

__all__ = ["complete_codes", "code_mask", "load_mask", "box_mask", "extend_canvas", "paste_known",
           "is_suffix_mask"]

_SWEEP_STEP = 0x20000000  # RNG "steps" of the Gibbs sweeps: apart from generate's steps 0 … n-1


# ---------------------------------------------------------------------------------------------- masks

def load_mask(mask, image_size: tuple[int, int], size: int, what: str = "--mask") -> np.ndarray:
    """A mask image (path / PIL; white ≥ 128 = generate, black = keep) of the input image's size ``image_size``
    (w, h) → bool [size, size] after the same resize + center crop as the image (True = generate)."""
    try:
        m = mask if isinstance(mask, Image.Image) else Image.open(mask)
        m.load()
    except (OSError, ValueError) as e:
        raise TuwenError(f"{what} {mask}: cannot read the mask image ({e})") from None
    if m.mode in ("RGBA", "LA") and m.getextrema()[-1][0] < 255:  # transparency marks the region to generate
        m = Image.eval(m.getchannel("A"), lambda a: 255 - a)
    m = m.convert("L")
    if m.size != tuple(image_size):
        raise TuwenError(f"{what} {getattr(mask, 'filename', None) or mask}: the mask is {m.size[0]}×{m.size[1]} px "
                         f"but the image is {image_size[0]}×{image_size[1]}; give a mask of the image's size")
    arr = np.asarray(resize_crop(m.convert("RGB"), size))[..., 0] >= 128
    if not arr.any():
        raise TuwenError(f"{what}: the mask marks nothing to generate (white = generate, black = keep)")
    return arr


def box_mask(box: Sequence[float], image_size: tuple[int, int], size: int) -> np.ndarray:
    """A box ``(x0, y0, x1, y1)`` in the input image's pixels → bool [size, size] (True = generate)."""
    w, h = image_size
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise TuwenError(f"--box {','.join(str(v) for v in box)}: need 0 ≤ x0 < x1 ≤ {w} and 0 ≤ y0 < y1 ≤ {h} "
                         f"(pixels of the {w}×{h} input image)")
    m = Image.new("L", (w, h), 0)
    m.paste(255, (int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))))
    return load_mask(m, (w, h), size, "--box")


def extend_canvas(image: Image.Image, size: int, right: int = 0, down: int = 0) -> tuple[Image.Image, np.ndarray]:
    """Outpainting with a fixed-size model: the view moves ``right``/``down`` pixels (of the ``size``² model
    image). The image (resized + center-cropped to ``size``) is shifted left/up; the strip that comes into view is
    to be generated. → (canvas, bool mask [size, size], True = generate)."""
    if right < 0 or down < 0 or (right == 0 and down == 0):
        raise TuwenError("--extend: give right:PX and/or down:PX with PX > 0")
    if right >= size or down >= size:
        raise TuwenError(f"--extend: PX must be below the model's image size ({size}); something must stay known")
    img = resize_crop(image, size)
    canvas = Image.new("RGB", (size, size), (127, 127, 127))
    canvas.paste(img.crop((right, down, size, size)), (0, 0))
    mask = np.zeros((size, size), bool)
    if right:
        mask[:, size - right:] = True
    if down:
        mask[size - down:, :] = True
    return canvas, mask


def code_mask(pixel_mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """bool [H, W] pixel mask → bool [h*w] code mask (raster order): a code is unknown when any pixel of its
    cell is."""
    h, w = grid
    H, W = pixel_mask.shape
    if H % h or W % w:
        raise TuwenError(f"mask of {W}×{H} px does not tile a {w}×{h} code grid")
    cells = pixel_mask.reshape(h, H // h, w, W // w).any(axis=(1, 3))
    return torch.from_numpy(cells.reshape(-1).copy())


def is_suffix_mask(unknown: torch.Tensor) -> bool:
    """True when every unknown code comes after every known one in raster order (step 1 is then exact)."""
    idx = torch.nonzero(unknown.reshape(-1)).reshape(-1)
    return idx.numel() == 0 or bool(unknown.reshape(-1)[int(idx[0]):].all())


def paste_known(generated: Image.Image, original: Image.Image, pixel_mask: np.ndarray) -> Image.Image:
    """``generated`` where the mask says generate, ``original`` elsewhere (both ``size``²)."""
    g, o = np.asarray(generated.convert("RGB")), np.asarray(original.convert("RGB"))
    return Image.fromarray(np.where(pixel_mask[..., None], g, o).astype(np.uint8), "RGB")


def open_input(image) -> Image.Image:
    """An image input (path, PIL, base64) → RGB PIL, with a TuwenError naming the file when it is unreadable."""
    try:
        return open_any_image(image)
    except TuwenError:
        raise
    except (OSError, ValueError) as e:
        raise TuwenError(f"{image}: cannot read the image ({e})") from None


# ---------------------------------------------------------------------------------------------- sampling

def _gibbs_sweeps(gpt: GPT, text_ids: torch.Tensor, out: torch.Tensor, positions: list[int], seeds: torch.Tensor,
                  *, text_len: int, K: int, top_p: float | None, temperature: float, greedy: bool,
                  guidance_scale: float | None, uncond_ids: torch.Tensor | None, sweeps: int, window: int | None,
                  amp_dtype) -> None:
    """Resample ``out[:, i]`` for i in ``positions`` (raster order), ``sweeps`` times, in place (module docstring).

    The sequence's keys/values up to code i-1 are kept in a KV cache that advances with i; the K candidates of
    code i are scored in one batched forward of the codes after it (``window`` of them; None: all) on a copy of
    that cache. Rows of the cache: [cond B; uncond B] with guidance."""
    dev = out.device
    B, n = out.shape
    T = text_len
    R = 2 if guidance_scale is not None else 1
    text = torch.cat([text_ids, uncond_ids.expand(B, -1)]) if R == 2 else text_ids  # [R*B, T]
    L = T + n - 1
    cache_dtype = amp_dtype if amp_dtype is not None else gpt.tok_emb.weight.dtype

    def logprobs(logits: torch.Tensor) -> torch.Tensor:  # [R*rows, t, V] → guided log q [rows, t, V]
        logits = logits.float()
        if R == 2:
            c, u = logits.chunk(2)
            logits = u + guidance_scale * (c - u)
        return logits.log_softmax(-1)

    with autocast(dev, amp_dtype):
        for sweep in range(sweeps):
            base = KVCache.for_model(gpt, R * B, max_len=L, dtype=cache_dtype)
            cand = KVCache.for_model(gpt, R * B * K, max_len=L, dtype=cache_dtype)
            filled = 0  # inputs in the base cache: text + codes[:filled - T]
            for i in positions:
                seq = torch.cat([text, out[:, :i].repeat(R, 1)], dim=1)  # inputs 0 … T+i-1
                lp_i = logprobs(gpt(seq[:, filled:], cache=base, start_pos=filled, logits_start=-1))[:, -1]  # [B, V]
                filled = T + i
                cand_lp, cand_ids = lp_i.topk(K, dim=-1)  # [B, K], sorted
                if top_p is not None and top_p < 1.0:
                    p = cand_lp.exp()
                    cand_lp = cand_lp.masked_fill(p.cumsum(-1) - p > top_p, float("-inf"))
                e = n if window is None else min(n, i + 1 + window)  # score codes i+1 … e-1
                later = torch.zeros(B, K, device=dev)
                if e > i + 1:
                    for t in range(2):  # cand rows [r, b, k] ← base rows [r, b]
                        src = (base.k, base.v)[t][:, :, :, :filled]
                        shp = src.shape
                        (cand.k, cand.v)[t][:, :, :, :filled] = src.reshape(shp[0], R, B, *shp[2:]) \
                            .repeat_interleave(K, dim=2).reshape(shp[0], R * B * K, *shp[2:])
                    rows = out.repeat_interleave(K, dim=0)  # [B*K, n]
                    rows[:, i] = cand_ids.reshape(-1)
                    x = rows[:, i:e - 1].repeat(R, 1)  # inputs: candidate, codes i+1 … e-2
                    lp = logprobs(gpt(x, cache=cand, start_pos=filled, logits_start=0))  # [B*K, e-1-i, V]
                    later = lp.gather(2, rows[:, i + 1:e, None])[..., 0].sum(-1).view(B, K)
                score = (cand_lp + later) / max(temperature, 1e-6)  # [B, K]
                if greedy:
                    pick = score.argmax(-1)
                else:
                    pick = (score + gumbel_noise(seeds, _SWEEP_STEP + sweep * n + i, cand_ids)).argmax(-1)
                out[:, i] = cand_ids.gather(1, pick[:, None])[:, 0]


@torch.inference_mode()
def complete_codes(gpt: GPT, text_ids: torch.Tensor, codes: torch.Tensor, unknown: torch.Tensor,
                   seeds, *, text_len: int, top_k: int | None = None, top_p: float | None = None,
                   temperature: float = 1.0, guidance_scale: float | None = None,
                   uncond_ids: torch.Tensor | None = None, sweeps: int = 1, window: int | None = None,
                   amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Complete ``codes`` [B, n] (values at ``unknown`` [n] positions are ignored) given ``text_ids``
    [B, text_len] → LongTensor [B, n]; known codes are returned unchanged. See the module docstring for the
    method (raster fill with forced known codes, then ``sweeps`` Gibbs sweeps when the mask is not a suffix);
    ``window``: how many codes after code i its candidates are scored on (None: all of them, the exact Gibbs
    conditional over the candidates; a grid width + 1 covers the codes whose causal neighbourhood holds code i
    nearest: the rest of its row and the code below it)."""
    dev = gpt.tok_emb.weight.device
    codes, text_ids = codes.to(dev).long(), text_ids.to(dev)
    B, n = codes.shape
    unknown = torch.as_tensor(unknown, dtype=torch.bool).reshape(-1).to(dev)
    if unknown.numel() != n:
        raise TuwenError(f"mask has {unknown.numel()} codes, the image {n}")
    if sweeps < 0:
        raise TuwenError(f"sweeps must be ≥ 0, got {sweeps}")
    if not bool(unknown.any()):
        return codes.clone()
    seeds_t = as_seeds(seeds, B, dev)
    u0 = int(torch.nonzero(unknown)[0])
    prefix = torch.cat([text_ids, codes[:, :u0]], dim=1)  # [B, text_len + u0]
    forced = torch.where(unknown[u0:], -1, codes[:, u0:])  # [B, n - u0]
    uncond = None
    if guidance_scale is not None:
        if uncond_ids is None:
            raise TuwenError("guidance_scale needs uncond_ids")
        uncond = torch.cat([uncond_ids.to(dev).expand(B, -1), codes[:, :u0]], dim=1)
    tail = generate(gpt, prefix_ids=prefix, num_tokens=n - u0, seeds=seeds_t, top_k=top_k, top_p=top_p,
                    temperature=temperature, guidance_scale=guidance_scale, uncond_prefix_ids=uncond,
                    forced=forced, amp_dtype=amp_dtype)
    out = torch.cat([codes[:, :u0], tail], dim=1)
    if is_suffix_mask(unknown.cpu()) or sweeps == 0:
        return out
    positions = torch.nonzero(unknown).reshape(-1).tolist()
    with gpt.fused_qkv(dtype=amp_dtype):
        _gibbs_sweeps(gpt, text_ids, out, positions, seeds_t, text_len=text_len, K=min(gpt.config.n_out, top_k or 64),
                      top_p=top_p, temperature=temperature, greedy=temperature == 0 or top_k == 1,
                      guidance_scale=guidance_scale, uncond_ids=uncond_ids.to(dev) if uncond_ids is not None else None,
                      sweeps=sweeps, window=window, amp_dtype=amp_dtype)
    return out
