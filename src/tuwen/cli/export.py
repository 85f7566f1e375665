"""``tuwen export CHECKPOINT OUT``: turn any training checkpoint into a model folder.

Training saves the model folder only when the validation metric improves (in ``--checkpoint_dir``) and keeps
training checkpoints (``--checkpoint_dir/checkpoints/step-N.pt``: weights, optimizer, data position, ...). This
command writes the weights of one checkpoint as a model folder, e.g. the last step when the best-by-validation
model is not the one you want:

    tuwen export runs/t2i/checkpoints/step-00004000.pt models/t2i-last
    tuwen export runs/t2i models/t2i-last          # the latest checkpoint of a run

The parts a checkpoint does not hold (tokenizer, the frozen VQGAN of a text→image model, the config) come from the
model folder the same run wrote (``--checkpoint_dir``, found next to ``checkpoints/``; ``--model DIR`` names
another one with the same architecture). Training-only parts (the VQGAN's discriminator) are left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: task name (train_config.json / checkpoint "task") → {training-module prefix: attribute of the model ("" = the
#: model itself)}; prefixes not named here are training-only (e.g. the VQGAN loss' discriminator)
TASK_PARTS = {
    "vqgan": {"vqgan": ""},
    "text2image": {"gpt": "gpt"},
    "super_resolution": {"gpt": "gpt"},
    "captioning": {"gpt": "gpt", "vit": "vit"},
    "clip": {"clip": ""},
}


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a training checkpoint (checkpoints/step-N.pt) as a model folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a step-N.pt file, or a run's --checkpoint_dir (its latest checkpoint)")
    p.add_argument("out", help="the model folder to write")
    p.add_argument("--model", default=None,
                   help="model folder with the same architecture for the parts a checkpoint does not hold "
                        "(default: the run's --checkpoint_dir)")
    p.set_defaults(func=run)


def _model_class(model_type: str | None, where: Path):
    from ..errors import TuwenError
    if model_type == "vqgan":
        from ..models.vqgan import VQGAN
        return VQGAN
    if model_type == "text2image":
        from ..models.text2image import TextToImage
        return TextToImage
    if model_type == "superres":
        from ..models.superres import SuperRes
        return SuperRes
    if model_type == "captioner":
        from ..models.captioner import Captioner
        return Captioner
    if model_type == "clip":
        from ..models.clip import CLIP
        return CLIP
    raise TuwenError(f"--model {where}: model_type {model_type!r} is not a tuwen model folder that training "
                     f"writes (vqgan, text2image, superres, captioner, clip)")


def export_checkpoint(checkpoint: str | Path, out: str | Path, model_dir: str | Path | None = None) -> dict:
    """Write the weights of a training checkpoint as a model folder at ``out``; returns what was done."""
    import torch

    from ..errors import TuwenError
    from ..hub import load_state_dict_checked, read_model_type
    from ..training.trainer import CKPT_DIR, find_latest_checkpoint

    src = Path(checkpoint).expanduser()
    if not src.exists():
        raise TuwenError(f"export: {src}: no such file or folder (give checkpoints/step-N.pt or a --checkpoint_dir)")
    path = find_latest_checkpoint(src)
    if path is None:
        raise TuwenError(f"export: {src}: no training checkpoint (step-*.pt) in it or in {src / CKPT_DIR}")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TuwenError(f"export: cannot read {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if not isinstance(st, dict) or st.get("format") != "tuwen-train-state":
        raise TuwenError(f"export: {path} is not a tuwen training checkpoint (checkpoints/step-N.pt of a tuwen run)")
    task = (st.get("task") or {}).get("task")
    if task not in TASK_PARTS:
        raise TuwenError(f"export: {path} was written by the task {task!r}; tuwen exports "
                         f"{', '.join(TASK_PARTS)}")
    if model_dir is None:
        run_dir = path.parent.parent if path.parent.name == CKPT_DIR else path.parent
        model_dir = run_dir
        if read_model_type(model_dir) is None:
            raise TuwenError(f"export: the run's model folder {model_dir} (config.json) is missing; the checkpoint "
                             f"holds only the trained weights — give --model DIR, a model folder with the same "
                             f"architecture (e.g. the one this run was started from or wrote elsewhere)")
    model_dir = Path(model_dir)
    cls = _model_class(read_model_type(model_dir), model_dir)
    model = cls.from_pretrained(model_dir)
    parts: dict[str, dict] = {}
    for k, v in st["module"].items():
        prefix, _, rest = k.partition(".")
        parts.setdefault(prefix, {})[rest] = v
    mapping = TASK_PARTS[task]
    loaded, left_out = [], sorted(p for p in parts if p not in mapping)
    for prefix, attr in mapping.items():
        if prefix not in parts:
            continue
        target = getattr(model, attr, None) if attr else model
        if not isinstance(target, torch.nn.Module):
            raise TuwenError(f"export: {path} holds {prefix}.* weights but the model folder {model_dir} has no "
                             f"{attr or 'model'} to put them in; --model must have the run's architecture")
        load_state_dict_checked(target, parts[prefix], f"export: {path} ({prefix}.*) into {model_dir}")
        loaded.append(prefix)
    if not loaded:
        raise TuwenError(f"export: {path} holds none of the weights a {task} model is made of "
                         f"({', '.join(p + '.*' for p in mapping)})")
    model.save_pretrained(Path(out))
    return {"checkpoint": str(path), "step": st.get("step"), "task": task, "model_from": str(model_dir),
            "out": str(out), "loaded": loaded, "left_out": left_out}


def run(args) -> int:
    res = export_checkpoint(args.checkpoint, args.out, args.model)
    print(f"exported {res['task']} step {res['step']} ({res['checkpoint']}) to {res['out']}"
          + (f"; training-only parts left out: {', '.join(res['left_out'])}" if res["left_out"] else ""),
          file=sys.stderr)
    print(json.dumps(res, ensure_ascii=False))
    return 0
