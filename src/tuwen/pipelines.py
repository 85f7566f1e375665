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

from typing import Any, Sequence

from .config import typed_kwargs
from .errors import TuwenError

TASKS = ("text2image_generation", "image2text_generation", "video2text_generation")


class TextToImagePipeline:
    """Callable on a prompt or a list of prompts → one ``{"gen_imgbase64": [...], "images": [...]}`` per prompt."""

    def __init__(self, model_path: str | None = None, device: str = "auto", **udp: Any):
        from .tasks.text2image import USER_PARAMS, load_for_inference

        self.udp = typed_kwargs(udp, USER_PARAMS, "text2image_generation")
        if model_path is None:
            from .demo import demo_model_path
            model_path = demo_model_path()
        self.model = load_for_inference(str(model_path), self.udp, device)

    def __call__(self, prompts: str | Sequence[str], **overrides: Any) -> list[dict]:
        from .data.images import encode_png_b64
        from .tasks.text2image import USER_PARAMS, _generation_kwargs

        udp = dict(self.udp)
        if overrides:  # per-call settings, same typing rules
            typed = typed_kwargs(overrides, USER_PARAMS, "text2image_generation")
            udp.update({k: typed[k] for k in overrides})
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise TuwenError("text2image pipeline: every prompt must be a non-empty string")
        seed = udp["seed"] if udp["seed"] is not None else 0
        images = self.model.generate(prompts, num_images_per_prompt=udp["max_generated_num"], seed=seed,
                                     **_generation_kwargs(self.model, udp))
        return [{"gen_imgbase64": [encode_png_b64(im) for im in group], "images": group} for group in images]


def pipeline(task: str, model_path: str | None = None, **kwargs: Any):
    """Build a pipeline for ``task`` (see the module docstring)."""
    if task == "text2image_generation":
        return TextToImagePipeline(model_path, **kwargs)
    if task in ("image2text_generation", "video2text_generation"):
        from .tasks.captioning import CaptionPipeline
        if model_path is None:
            raise TuwenError(f"pipeline({task!r}): give model_path= (a captioning model folder); nothing is downloaded")
        return CaptionPipeline(task, model_path, **kwargs)
    raise TuwenError(f"pipeline: unknown task {task!r}; choose one of {', '.join(TASKS)}")
