"""``tuwen.pipeline(task, model_path=..., **user_defined_parameters)`` — EasyNLP's ``pipeline()`` shape, offline.

    >>> from tuwen import pipeline
    >>> gen = pipeline("text2image_generation", model_path="models/t2i", max_generated_num=2)
    >>> out = gen("左上角有一个红色的圆形")          # [{"gen_imgbase64": [b64, b64], "images": [PIL, PIL]}]
    >>> cap = pipeline("image2text_generation", model_path="models/cap")
    >>> cap(["path/to/a.png"])                      # [{"gen_text": ["..."]}]

Keyword arguments are EasyNLP ``user_defined_parameters`` with typed values (unknown keys are an error). With no
``model_path`` the text→image pipeline uses the shipped demo model; nothing is downloaded.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from .config import Param, typed_kwargs
from .errors import TuwenError
from .hub import read_model_type, resolve_model_path

TASKS = ("text2image_generation", "image2text_generation", "video2text_generation")

DEMO_DIR = Path(__file__).parent / "assets" / "demo_t2i"


def demo_model_path() -> Path:
    """The text→image model shipped in the package (``tuwen demo``, pipelines without ``model_path``)."""
    if not (DEMO_DIR / "config.json").exists():
        raise TuwenError(f"the shipped demo model is missing ({DEMO_DIR}); reinstall tuwen or build it with "
                         f"scripts/train_demo.sh")
    return DEMO_DIR


# ----------------------------------------------------------------------------------------------- text→image

#: text→image and captioning training from scratch
DO_LOWER_CASE = Param(bool, True, "a vocabulary built from the training texts lowercases them (as "
                                  "bert-base-chinese does); false keeps case, so captions that differ only in case "
                                  "(字母Ａ, 字母ａ) stay apart")

#: ``text2image_generation``'s user_defined_parameters (EasyNLP command line and pipeline keyword arguments)
TEXT2IMAGE_PARAMS: dict[str, Param] = {
    "size": Param(int, None, "image size in pixels (EasyNLP default 256)"),
    "text_len": Param(int, None, "text positions (EasyNLP default 32)"),
    "img_len": Param(int, None, "image positions = VQGAN grid h*w (EasyNLP default 256)"),
    "img_vocab_size": Param(int, None, "VQGAN codebook size (EasyNLP default 16384)"),
    "text_vocab_size": Param(int, None, "tokenizer vocabulary size (taken from the vocabulary when known)"),
    "pretrain_model_name_or_path": Param(str, None, "model to finetune (folder or model-zoo name under TUWEN_HOME)"),
    "vqgan_ckpt_path": Param(str, None, "VQGAN for training from scratch: tuwen folder, taming .ckpt or .bin"),
    "vqgan_config": Param(str, None, "taming yaml/json describing vqgan_ckpt_path (default: inferred from shapes)"),
    "vocab_path": Param(str, None, "vocab.txt to use when training from scratch (default: built from the texts)"),
    "vocab_size": Param(int, 8000, "size of the vocabulary built from training texts when none is given"),
    "do_lower_case": DO_LOWER_CASE,
    "random_crop": Param(bool, False, "random instead of center crops"),
    "n_layer": Param(int, None, "GPT layers for training from scratch (default 12)"),
    "n_head": Param(int, None, "GPT heads (default 12)"),
    "n_embd": Param(int, None, "GPT width (default 768)"),
    "gpt_preset": Param(str, None, "GPT size preset: tiny, small, base, large"),
    "block_size": Param(int, None, "accepted for EasyNLP compatibility; must equal text_len + img_len"),
    "dropout": Param(float, None, "embedding/attention/residual dropout for training from scratch"),
    "sandwich_ln": Param(bool, None, "CogView's Sandwich-LN (a LayerNorm after attention and after the MLP, inside "
                                     "the residual branch) for stable bf16/fp16 training of deep models (default off)"),
    "pb_relax": Param(bool, None, "CogView's PB-relax LayerNorm (LN(x / (max|x| / 8))), fp16-safe (default off)"),
    "cfg_drop_prob": Param(float, None, "classifier-free guidance training: probability of dropping the text"),
    "null_cond_prob": Param(float, None, "alias of cfg_drop_prob (DALLE-pytorch name)"),
    "pkeep": Param(float, 1.0, "probability of keeping each input image code (taming's corruption trick)"),
    "txt_loss_scale": Param(float, None, "CogView's --txt-loss-scale: weight of the text-token loss; only for "
                                         "CogView-format models (their head covers the text vocabulary; default 1)"),
    "max_generated_num": Param(int, 1, "images per prompt (predict)"),
    "top_k": Param(int, None, "sampling: keep the k most likely codes (1 = greedy; default from the model)"),
    "top_p": Param(float, None, "sampling: nucleus probability mass"),
    "temperature": Param(float, None, "sampling temperature"),
    "guidance_scale": Param(float, None, "classifier-free guidance scale (model trained with cfg_drop_prob)"),
    "do_eval": Param(bool, True, "evaluate on the validation table while training"),
    "eval_num": Param(int, 64, "evaluate --metric attributes: prompts to generate for"),
    "seed": Param(int, None, "sampling seed (default: --random_seed)"),
    "weights_dtype": Param(str, None, "predict/evaluate/pipeline: GPT Linear weights fp32 | bf16 | int8 | w8a8 "
                                      "(default auto: w8a8 on x86 CPUs, else int8; as loaded on GPU)"),
    "vq_dtype": Param(str, None, "predict/pipeline: VQGAN decode dtype fp32 | bf16 | auto (default fp32; auto: bf16 "
                                 "on CUDA and CPUs with AVX512-BF16/AMX); recorded in each PNG"),
}


def load_text2image(path: str, udp: dict, device: str = "auto"):
    """A TextToImage for inference from a folder and the typed udp (vqgan_config / vqgan_ckpt_path for EasyNLP
    folders without a VQGAN; size/text_len/img_len shape an EasyNLP folder and are checked against a tuwen one)."""
    from .models.text2image import EASYNLP_MODEL_TYPES, TextToImage
    from .runtime import init_distributed

    dev = init_distributed(device)
    kw = {}
    if udp.get("vqgan_config"):
        kw["vqgan_config"] = udp["vqgan_config"]
    if udp.get("vqgan_ckpt_path") and not Path(path, "vqgan").exists():
        kw["vqgan_path"] = udp["vqgan_ckpt_path"]
    sizes = {k: udp[k] for k in ("text_len", "img_len", "size") if udp.get(k) is not None}
    if sizes and _model_type(path) not in EASYNLP_MODEL_TYPES:
        sizes = {}  # a tuwen folder records its sizes: checked below instead
    from .models.quant import resolve_weights_dtype
    wd = resolve_weights_dtype(udp.get("weights_dtype"), dev, "weights_dtype")
    from .models.vqgan import resolve_vq_dtype
    vd = resolve_vq_dtype(udp.get("vq_dtype"), dev, "vq_dtype")
    model = TextToImage.from_pretrained(path, **kw, **sizes, weights_dtype=wd, vq_dtype=vd)
    cfg = model.config
    for k, ck in (("text_len", "text_len"), ("img_len", "img_len"), ("size", "image_size"),
                  ("img_vocab_size", "img_vocab_size")):
        if udp.get(k) is not None and udp[k] != getattr(cfg, ck):
            raise TuwenError(f"--user_defined_parameters {k}={udp[k]} does not match the model ({ck}="
                             f"{getattr(cfg, ck)})")
    return model.to(dev).eval()


def _model_type(path: str) -> str | None:
    try:
        return read_model_type(resolve_model_path(path))
    except TuwenError:  # from_pretrained reports a bad path
        return None


def text2image_sampling(model, udp: dict) -> dict:
    """The sampling settings the udp gives (top_k, top_p, temperature, guidance_scale), for ``model.generate``."""
    kw = {k: udp[k] for k in ("top_k", "top_p", "temperature", "guidance_scale") if udp.get(k) is not None}
    if kw.get("guidance_scale") is not None and model.config.cfg_drop_prob == 0:
        print("warning: guidance_scale is set but the model was trained without cfg_drop_prob; the unconditional "
              "prompt may be meaningless", file=sys.stderr)
    return kw


class TextToImagePipeline:
    """Callable on a prompt or a list of prompts → one dict per prompt: ``gen_imgbase64`` (base64 PNGs, each with
    its generation record in PNG text chunks), ``images`` (PIL), ``records`` (prompt, seed, sampling, model, …),
    ``warnings`` (what the model will not see of the prompt: unknown words, text past ``text_len``) and
    ``unknown_tokens`` (the words outside the vocabulary, drawn as if absent)."""

    def __init__(self, model_path: str | None = None, device: str = "auto", **udp: Any):
        self.udp = typed_kwargs(udp, TEXT2IMAGE_PARAMS, "text2image_generation")
        if model_path is None:
            model_path = demo_model_path()
        self.model = load_text2image(str(model_path), self.udp, device)

    def __call__(self, prompts: str | Sequence[str], **overrides: Any) -> list[dict]:
        import base64

        from .data.pngmeta import png_bytes
        udp = dict(self.udp)
        if overrides:  # per-call settings, same typing rules
            typed = typed_kwargs(overrides, TEXT2IMAGE_PARAMS, "text2image_generation")
            udp.update({k: typed[k] for k in overrides})
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise TuwenError("text2image pipeline: every prompt must be a non-empty string")
        seed = udp["seed"] if udp["seed"] is not None else 0
        warnings = [self.model.prompt_warnings(p) for p in prompts]
        for w in (w for ws in warnings for w in ws):
            print(f"warning: {w}", file=sys.stderr)
        gen = text2image_sampling(self.model, udp)
        n = udp["max_generated_num"]
        vd = udp.get("vq_dtype")  # None: as loaded (the model's)
        images = self.model.generate(prompts, num_images_per_prompt=n, seed=seed, vq_dtype=vd, **gen)
        out = []
        for i, (p, group) in enumerate(zip(prompts, images)):
            records = self.model.records(p, seed, i, n, vq_dtype=vd, **gen)
            out.append({"gen_imgbase64": [base64.b64encode(png_bytes(im, r)).decode("ascii")
                                          for im, r in zip(group, records)],
                        "images": group, "records": records, "warnings": warnings[i],
                        "unknown_tokens": self.model.tokenizer.unknown_words(p)})
        return out


#: ``tuwen.pipeline("complete", ...)`` keyword arguments: the text→image keys plus the completion settings
COMPLETE_PARAMS: dict[str, Param] = {
    **TEXT2IMAGE_PARAMS,
    "sweeps": Param(int, 1, "Gibbs sweeps over the unknown codes when the mask is not a suffix (0: raster fill)"),
    "window": Param(str, "row", "codes after an unknown code its candidates are scored on: row, all or a number"),
}


class CompletionPipeline:
    """``tuwen.pipeline("complete", model_path=DIR)``: image completion with a text→image model (default: the demo
    model). ``comp(prompt, image, mask=MASK | box=(x0, y0, x1, y1) | extend={"right": px, "down": px})`` → one dict:
    ``gen_imgbase64``, ``images`` (known pixels pasted back), ``records``, ``warnings``, ``mask`` (bool array, True =
    generated). The method and its limits: ``tuwen.models.completion``."""

    def __init__(self, model_path: str | None = None, device: str = "auto", **udp: Any):
        self.udp = typed_kwargs(udp, COMPLETE_PARAMS, "complete")
        self.model = load_text2image(str(model_path or demo_model_path()), self.udp, device)

    def __call__(self, prompt: str, image, mask=None, *, box=None, extend: dict | None = None,
                 **overrides: Any) -> dict:
        import base64

        from .data.images import resize_crop
        from .data.pngmeta import png_bytes
        from .models.completion import box_mask, extend_canvas, load_mask, open_input
        udp = dict(self.udp)
        if overrides:
            typed = typed_kwargs(overrides, COMPLETE_PARAMS, "complete")
            udp.update({k: typed[k] for k in overrides})
        if not isinstance(prompt, str) or not prompt.strip():
            raise TuwenError("complete pipeline: the prompt must be a non-empty string")
        if sum(x is not None for x in (mask, box, extend)) != 1:
            raise TuwenError("complete pipeline: give exactly one of mask=, box=, extend=")
        img, size = open_input(image), self.model.config.image_size
        if extend is not None:
            img, pix = extend_canvas(img, size, right=int(extend.get("right", 0)), down=int(extend.get("down", 0)))
        else:
            pix = box_mask(box, img.size, size) if box is not None else \
                (mask if hasattr(mask, "dtype") else load_mask(mask, img.size, size, "mask"))
            img = resize_crop(img, size)
        w = udp["window"]
        window = None if w == "all" else "row" if w == "row" else int(w)
        seed = udp["seed"] if udp["seed"] is not None else 0
        gen = text2image_sampling(self.model, udp)
        n = udp["max_generated_num"]
        warnings = self.model.prompt_warnings(prompt)
        for m in warnings:
            print(f"warning: {m}", file=sys.stderr)
        images = self.model.complete(prompt, img, pix, num_images=n, seed=seed, key="complete",
                                     sweeps=udp["sweeps"], window=window, vq_dtype=udp.get("vq_dtype"), **gen)
        records = [{**r, "task": "complete"}
                   for r in self.model.records(prompt, seed, "complete", n, vq_dtype=udp.get("vq_dtype"), **gen)]
        return {"gen_imgbase64": [base64.b64encode(png_bytes(im, r)).decode("ascii") for im, r in zip(images, records)],
                "images": images, "records": records, "warnings": warnings, "mask": pix}


# ----------------------------------------------------------------------------------------------- image/video→text

#: ``image2text_generation`` / ``video2text_generation`` user_defined_parameters (EasyNLP command line and
#: pipeline keyword arguments)
CAPTION_PARAMS: dict[str, Param] = {
    "frame_num": Param(int, None, "video: frames per clip (EasyNLP default 3); shorter clips are padded by repeating "
                                  "the last frame (warning; --strict rejects them), longer ones keep the first frames"),
    "vit_ckpt_path": Param(str, None, "image tower weights: OpenAI CLIP .pt (ViT-L/14 → $TUWEN_HOME/models/"
                                      "ViT-L-14.pt), a tuwen CLIP folder, or a visual state dict"),
    "vit_preset": Param(str, None, "ViT size when the image tower is trained from scratch (tiny, small, base-64, "
                                   "ViT-B-32, ...; default small)"),
    "freeze_vit": Param(bool, None, "keep the image tower fixed (default: frozen when loaded from weights, trained "
                                    "when from scratch)"),
    "img_size": Param(int, None, "image side in pixels (EasyNLP: 224 ViT, 256 VQGAN)"),
    "img_len": Param(int, None, "prefix positions: ViT (img_size/patch)², VQGAN codes; video: reserved, >= frame_num"),
    "text_len": Param(int, None, "caption tokens (default 32)"),
    "pretrain_model_name_or_path": Param(str, None, "captioner to finetune, or (from scratch) the tokenizer: a "
                                                    "vocab.txt, a folder with one, or a name under $TUWEN_HOME/models"),
    "vocab_size": Param(int, 8000, "size of the vocabulary built from the training texts when no tokenizer is given"),
    "do_lower_case": DO_LOWER_CASE,
    "block_size": Param(int, None, "EasyNLP compatibility: must equal text_len + img_len"),
    "n_layer": Param(int, None, "GPT layers (default 12)"),
    "n_head": Param(int, None, "GPT heads (default 12)"),
    "n_embd": Param(int, None, "GPT width (default 768)"),
    "gpt_preset": Param(str, None, "GPT size preset: tiny, small, medium, base, large"),
    "dropout": Param(float, None, "GPT dropout when training from scratch"),
    "text_vocab_size": Param(int, None, "text vocabulary size (default: the tokenizer's)"),
    "img_vocab_size": Param(int, None, "VQ prefix: VQGAN codebook size (checked against the VQGAN)"),
    "enable_vit": Param(bool, None, "EasyNLP: the ViT prefix (the default)"),
    "enable_vqgan": Param(bool, None, "EasyNLP: the VQGAN-code prefix (also --app_name=image2text_generation_vqgan)"),
    "vqgan_ckpt_path": Param(str, None, "VQ prefix from scratch: tuwen VQGAN folder, taming .ckpt or EasyNLP .bin"),
    "vqgan_config": Param(str, None, "taming yaml/json for vqgan_ckpt_path (default: inferred from the shapes)"),
    "enable_img_path": Param(bool, False, "image columns hold file paths (relative to img_root_dir), not base64"),
    "img_root_dir": Param(str, None, "folder that image paths are relative to (with enable_img_path)"),
    "max_generated_num": Param(int, 1, "captions per input; gen_text is then a JSON list"),
    "num_beams": Param(int, None, "beam width (1 = no beam search)"),
    "length_penalty": Param(float, None, "beam search: score = sum log p / length ** length_penalty"),
    "no_repeat_ngram_size": Param(int, None, "beam search: never repeat an n-gram of this size"),
    "top_k": Param(int, None, "sampling: keep the k most likely tokens (1 = greedy, the default)"),
    "top_p": Param(float, None, "sampling: nucleus probability mass"),
    "temperature": Param(float, None, "sampling temperature"),
    "seed": Param(int, None, "sampling seed (default: --random_seed)"),
    "pkeep": Param(float, 1.0, "training: probability of keeping each input text token (EasyNLP pkeep)"),
    "loss_on_padding": Param(bool, False, "loss over all text_len positions, padding included (EasyNLP's "
                                          "definition); default: the caption and its end token"),
    "do_eval": Param(bool, True, "evaluate on the validation table while training"),
    "eval_num": Param(int, None, "evaluate: caption at most this many images for BLEU/CIDEr/ROUGE (default all)"),
    "device": Param(str, None, "EasyNLP compatibility (cuda/cpu); same as --device"),
}


def caption_sampling(udp: dict) -> dict:
    """The decoding settings the udp gives (those set), for ``Captioner.generate`` / ``from_pretrained``."""
    from .models.captioner import SAMPLING_KEYS
    return {k: udp[k] for k in SAMPLING_KEYS if udp.get(k) is not None}


def udp_device(device: str | None, udp: dict) -> str:
    """--device, or EasyNLP's ``device=`` key when --device is auto."""
    import torch

    device = device or "auto"
    if device == "auto" and udp.get("device"):
        device = udp["device"]
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TuwenError(f"--user_defined_parameters device={device}: no CUDA device here; drop it or use cpu")
    return device


def check_caption_udp(udp: dict, c, video: bool, vq: bool, what: str = "the model") -> None:
    """EasyNLP passes the size keys again at predict time: they must describe the model (a CaptionerConfig)."""
    checks = (("text_len", c.text_len), ("img_len", c.img_len), ("img_size", c.image_size),
              ("block_size", c.block_size))
    for k, v in checks:
        if udp.get(k) is not None and udp[k] != v:
            raise TuwenError(f"--user_defined_parameters {k}={udp[k]} does not match {what} ({k}={v})")
    if udp.get("frame_num") is not None and c.video and udp["frame_num"] != c.frame_num:
        raise TuwenError(f"--user_defined_parameters frame_num={udp['frame_num']} does not match {what}, which was "
                         f"trained on {c.frame_num} frames")
    if video and not c.video:
        raise TuwenError(f"--app_name=video2text_generation but {what} is a still-image captioner; use "
                         f"--app_name=image2text_generation")
    if not video and c.video:
        raise TuwenError(f"--app_name=image2text_generation but {what} is a video captioner (frame_num="
                         f"{c.frame_num}); use --app_name=video2text_generation")
    if vq and c.prefix_encoder != "vqgan":
        raise TuwenError(f"enable_vqgan / image2text_generation_vqgan but {what} has a ViT prefix")


def load_captioner(path: str, udp: dict, video: bool | None = None, device: str = "auto", vq: bool = False):
    """A Captioner for predict/evaluate/pipelines: EasyNLP folders get their sizes from ``udp``; tuwen folders
    are checked against them (when ``video`` says which app asks)."""
    from .convert.easynlp_i2t import load_kwargs_from_udp
    from .models.captioner import EASYNLP_MODEL_TYPES, Captioner
    from .runtime import init_distributed

    dev = init_distributed(udp_device(device, udp))
    over = caption_sampling(udp)
    if _model_type(path) in EASYNLP_MODEL_TYPES:
        over.update(load_kwargs_from_udp(udp, bool(video)))
    model = Captioner.from_pretrained(path, **over)
    if video is not None:
        check_caption_udp(udp, model.config, video, vq)
    return model.to(dev).eval()


class CaptionPipeline:
    """``tuwen.pipeline("image2text_generation" | "video2text_generation", model_path=..., **udp)``.

    Callable on one input or a list (base64 strings, PIL images, paths, bytes; for video each input is a list of
    frames — a flat list of frames is one video) → one ``{"gen_text": [captions…]}`` per input. Keyword arguments
    are ``CAPTION_PARAMS`` (``max_generated_num``, ``num_beams``, ``top_k``, ``seed``, ...; typed, unknown keys are
    an error); calls may override them.
    """

    def __init__(self, task: str, model_path: str, device: str = "auto", **udp: Any):
        if task not in TASKS[1:]:
            raise TuwenError(f"CaptionPipeline: task must be one of {', '.join(TASKS[1:])}, got {task!r}")
        self.task = task
        self.udp = typed_kwargs(udp, CAPTION_PARAMS, task)
        self.model = load_captioner(str(model_path), self.udp, task == "video2text_generation", device)

    def __call__(self, inputs, **overrides: Any) -> list[dict]:
        udp = dict(self.udp)
        if overrides:
            typed = typed_kwargs(overrides, CAPTION_PARAMS, self.task)
            udp.update({k: typed[k] for k in overrides})
        root = udp["img_root_dir"] if udp["enable_img_path"] else None
        items = self.model._as_items(inputs)
        if not items:
            return []
        seed = udp["seed"] if udp["seed"] is not None else 0
        caps = self.model.generate(items, num_return_sequences=udp["max_generated_num"], seed=seed, root=root,
                                   **caption_sampling(udp))
        return [{"gen_text": g} for g in caps]


# ----------------------------------------------------------------------------------------------- CLIP

#: ``tuwen.pipeline("clip", ...)`` keyword arguments
CLIP_PIPELINE_PARAMS: dict[str, Param] = {
    "batch_size": Param(int, 64, "images / texts per forward pass"),
}


class ClipPipeline:
    """``tuwen.pipeline("clip", model_path=DIR)``: image–text scores and embeddings with a tuwen CLIP folder.

    ``clip(images, texts)`` → ``{"scores": [[cosine of image i and text j]], "logits": scores × logit_scale}``;
    ``clip.embed_images(images)`` / ``clip.embed_texts(texts)`` → L2-normalised embeddings (float32 tensors).
    Images: paths, PIL images, base64 strings or bytes (one or a list); texts: a string or a list.
    """

    def __init__(self, model_path: str, device: str = "auto", **kwargs: Any):
        from .models.clip import CLIP
        from .runtime import init_distributed

        self.udp = typed_kwargs(kwargs, CLIP_PIPELINE_PARAMS, "clip")
        self.model = CLIP.from_pretrained(resolve_model_path(model_path, what="CLIP model"),
                                          device=init_distributed(device)).eval()
        if self.model.tokenizer is None:
            raise TuwenError(f"pipeline('clip'): {model_path} has no vocab.txt")

    @staticmethod
    def _list(x) -> list:
        return [x] if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple)) else list(x)

    def embed_images(self, images):
        import torch
        with torch.no_grad():
            return self.model.encode_image(self._list(images), batch_size=self.udp["batch_size"]).cpu()

    def embed_texts(self, texts):
        import torch
        with torch.no_grad():
            return self.model.encode_text(self._list(texts), batch_size=self.udp["batch_size"]).cpu()

    def __call__(self, images, texts) -> dict:
        sims = self.embed_images(images) @ self.embed_texts(texts).T
        scale = float(self.model.logit_scale.detach().exp()) if hasattr(self.model, "logit_scale") else 1.0
        return {"scores": sims.tolist(), "logits": (sims * scale).tolist()}


# ----------------------------------------------------------------------------------------------- pipeline()

#: EasyNLP model-zoo names (as the ARTIST / captioning articles call them) → their task
ZOO_TASKS = {
    "pai-painter-base-zh": "text2image_generation",
    "pai-painter-large-zh": "text2image_generation",
    "pai-painter-commercial-base-zh": "text2image_generation",
    "pai-painter-painting-base-zh": "text2image_generation",
    "pai-painter-scenery-base-zh": "text2image_generation",
    "artist-base-zh": "text2image_generation",
    "artist-large-zh": "text2image_generation",
    "artist-i2t-large-zh": "image2text_generation",
}


def _task_of_model(name: str) -> str | None:
    """The task of a model named as ``pipeline``'s first argument: a known zoo name, or the ``model_type`` of a
    folder found locally / under ``$TUWEN_HOME/models``; None when it is neither."""
    import json

    base = name.rstrip("/").split("/")[-1]
    if base in ZOO_TASKS:
        return ZOO_TASKS[base]
    try:
        path = resolve_model_path(name)
    except TuwenError:
        return None
    mt = read_model_type(path)
    if mt in ("text2image", "artist"):
        return "text2image_generation"
    if mt in ("captioner", "mingpt_i2t", "artist_i2t"):
        try:
            video = bool(json.loads((path / "config.json").read_text(encoding="utf-8")).get("video"))
        except (OSError, ValueError):
            video = False
        return "video2text_generation" if video else "image2text_generation"
    if mt == "clip":
        return "clip"
    return None


def pipeline(task: str, model_path: str | None = None, **kwargs: Any):
    """Build a pipeline for ``task`` — EasyNLP's ``pipeline()`` offline. Nothing is downloaded.

    Tasks and what the pipeline is called on (keyword arguments: the task's typed ``user_defined_parameters``;
    unknown keys are an error naming the closest known one):

    * ``"text2image_generation"`` — ``gen(prompt | [prompts], **overrides)`` → per prompt ``{"gen_imgbase64",
      "images", "records", "warnings", "unknown_tokens"}``. ``model_path``: a tuwen or EasyNLP ARTIST folder or
      a model-zoo name under ``$TUWEN_HOME/models`` (default: the shipped demo model). Keys
      (``TEXT2IMAGE_PARAMS``): max_generated_num, top_k, top_p, temperature, guidance_scale, seed, size,
      text_len, img_len, vqgan_config, ….
    * ``"image2text_generation"`` / ``"video2text_generation"`` — ``cap(image | [images])`` → per input
      ``{"gen_text": [...]}``; images are paths, PIL images, base64 strings or bytes (video: a list of frames per
      input). ``model_path`` required. Keys (``CAPTION_PARAMS``): max_generated_num, num_beams, top_k, seed, ….
    * ``"complete"`` — ``comp(prompt, image, mask=… | box=(x0, y0, x1, y1) | extend={"right": px})`` →
      ``{"images", "gen_imgbase64", "records", "warnings", "mask"}``: keep the known part of the image, generate
      the rest (``tuwen.models.completion``). ``model_path`` as for text2image_generation. Keys
      (``COMPLETE_PARAMS``): the text→image keys plus sweeps, window.
    * ``"clip"`` — ``clip(images, texts)`` → ``{"scores", "logits"}``; ``clip.embed_images`` /
      ``clip.embed_texts`` → embeddings. ``model_path`` required (a tuwen CLIP folder). Keys: batch_size.

    ``task`` may also be an EasyNLP model-zoo name or a model folder: ``pipeline("pai-painter-commercial-base-zh")``
    is ``pipeline("text2image_generation", "pai-painter-commercial-base-zh")`` — the files must be under
    ``$TUWEN_HOME/models/`` (default ``~/.cache/tuwen/models/``); the error says where when they are not.
    ``device=`` ("auto", "cpu", "cuda", "cuda:N") is accepted by every task.
    """
    if task not in TASKS and task not in ("clip", "complete"):
        inferred = _task_of_model(task)
        if inferred is None:
            import difflib
            near = difflib.get_close_matches(task, list(TASKS) + ["clip"], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            if "/" in task or "-" in task:  # looks like a model name: say where its files must be
                resolve_model_path(task, what="pipeline model")  # raises, naming where to put the files
            raise TuwenError(f"pipeline: unknown task {task!r}{hint}; choose one of {', '.join(TASKS)}, clip, "
                             f"complete, or pass a model folder / model-zoo name")
        if model_path is not None:
            raise TuwenError(f"pipeline({task!r}, {model_path!r}): the first argument is already a model; give the "
                             f"task first: pipeline({inferred!r}, {task!r})")
        task, model_path = inferred, task
    if task == "text2image_generation":
        return TextToImagePipeline(model_path, **kwargs)
    if task == "complete":
        return CompletionPipeline(model_path, **kwargs)
    if task in ("image2text_generation", "video2text_generation"):
        if model_path is None:
            raise TuwenError(f"pipeline({task!r}): give model_path= (a captioning model folder); nothing is downloaded")
        return CaptionPipeline(task, model_path, **kwargs)
    if model_path is None:
        raise TuwenError("pipeline('clip'): give model_path= (a tuwen CLIP folder); nothing is downloaded")
    return ClipPipeline(model_path, **kwargs)
