"""``tuwen --mode=train|evaluate --app_name=super_resolution ...``: token super-resolution (CogView's recipe) on
text→image rows; the udp keys are text→image's (``size`` = the high-resolution side; the low side is size / 2)
and ``low_vqgan_ckpt_path`` (a second tokenizer for the low side).
Inference: ``tuwen upscale IMG --model DIR --text …`` or ``tuwen generate … --super_resolution DIR``."""
from __future__ import annotations

import json
import sys

from ...config import Param, parse_user_defined_parameters
from ...errors import TuwenError
from ...pipelines import TEXT2IMAGE_PARAMS
from ...training.tasks.superres import SRTask
from ...training.trainer import Trainer
from ..common import train_args_from

__all__ = ["USER_PARAMS", "run_easynlp"]

USER_PARAMS = {**TEXT2IMAGE_PARAMS, "low_vqgan_ckpt_path": Param(
    str, None, "a second image tokenizer for the low-res side (size / 2), e.g. the VQGAN of the model whose "
               "images are upscaled (default: vqgan_ckpt_path for both sides, CogView's recipe)")}


def run_easynlp(args) -> int:
    udp = parse_user_defined_parameters(args.user_defined_parameters, USER_PARAMS, "super_resolution")
    if args.mode == "train":
        targs = train_args_from(args, default_lr=4e-5, default_wd=0.01)
        if not udp["do_eval"]:
            targs.do_eval = False
        Trainer(targs, SRTask.from_udp(args, udp, log=lambda m: print(m, file=sys.stderr))).train()
        return 0
    if args.mode == "predict":
        raise TuwenError("--app_name=super_resolution has no --mode=predict; upscale images with "
                         "`tuwen upscale IMG --model DIR --text ...` or `tuwen generate ... --super_resolution DIR`")
    if not args.checkpoint_dir or not args.tables:
        raise TuwenError("--mode=evaluate needs --checkpoint_dir (the model folder) and --tables (the validation "
                         "table)")
    from ...models.superres import SuperRes
    model = SuperRes.from_pretrained(args.checkpoint_dir, device=args.device if args.device != "auto" else None)
    from .text2image import evaluate_loss
    table = [t for t in args.tables.split(",") if t.strip()][-1]
    task = SRTask(args, udp, config=model.config, tokenizer=model.tokenizer, vqgan=model.vqgan,
                  low_vqgan=model.low_vqgan, base=model)
    print(json.dumps(evaluate_loss(args, task, model, table), indent=2))
    return 0
