"""``tuwen --mode=train|predict|evaluate --app_name=text2image_generation ...``: EasyNLP's text→image app.

The typed ``user_defined_parameters`` (``USER_PARAMS``) and the inference loading they drive are shared with
``tuwen.pipeline("text2image_generation")`` and live in ``tuwen.pipelines``.
"""
from __future__ import annotations

import base64
import json
import sys

import torch

from ...config import parse_user_defined_parameters
from ...data import checker
from ...data.images import load_image
from ...data.pngmeta import png_bytes
from ...data.synth import parse_caption
from ...data.tables import BadRow, open_source
from ...errors import TuwenError
from ...models.text2image import TextToImage
from ...pipelines import TEXT2IMAGE_PARAMS as USER_PARAMS
from ...pipelines import load_text2image as load_for_inference
from ...pipelines import text2image_sampling
from ...rerank import load_scorer, rerank
from ...training.tasks.text2image import T2ITask
from ...training.trainer import Trainer, TrainArgs
from ..common import ImageWriter, train_args_from
from ..cogview import is_cogview_model
from ..predict import parse_columns, run_predict as run_rows

__all__ = ["USER_PARAMS", "parse_udp", "load_for_inference", "run_predict", "run_evaluate", "attribute_accuracy",
           "run_easynlp"]


def parse_udp(args) -> dict:
    udp = parse_user_defined_parameters(args.user_defined_parameters, USER_PARAMS, "text2image_generation")
    if getattr(args, "weights_dtype", None) is not None:  # --weights_dtype (the flag wins over the udp key)
        udp["weights_dtype"] = args.weights_dtype
    if getattr(args, "vq_dtype", None) is not None:  # --vq_dtype likewise
        udp["vq_dtype"] = args.vq_dtype
    return udp


def run_easynlp(args) -> int:
    udp = parse_udp(args)
    if args.mode == "train":
        targs = train_args_from(args, default_lr=4e-5, default_wd=0.01)
        if not udp["do_eval"]:
            targs.do_eval = False
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        if is_cogview_model(udp["pretrain_model_name_or_path"]):  # CogView's sequence and loss (txt_loss_scale)
            from ...training.tasks.cogview import CogViewTask
            task = CogViewTask.from_udp(args, udp, log=log)
        else:
            task = T2ITask.from_udp(args, udp, log=log)
        Trainer(targs, task).train()
        return 0
    if args.mode == "predict":
        return run_predict(args, udp)
    return run_evaluate(args, udp)


# ----------------------------------------------------------------------------------------------- predict

def run_predict(args, udp: dict) -> int:
    """Images for every prompt of ``--tables`` → ``--outputs`` TSV (base64 PNGs), optionally reranked."""
    if not args.checkpoint_dir:
        raise TuwenError("--checkpoint_dir is required for --mode=predict (the model folder)")
    if not args.tables:
        raise TuwenError("--tables is required for --mode=predict (the input TSV)")
    n = udp["max_generated_num"]
    if n < 1:
        raise TuwenError("max_generated_num must be ≥ 1")
    keep = args.keep or n
    if keep > n:
        raise TuwenError(f"--keep {keep} is more than max_generated_num={n}")
    text_col = args.first_sequence or "text"
    schema = args.input_schema or "idx:str:1,text:str:1"
    src = open_source(args.tables.split(",")[0] if "," in args.tables else args.tables, schema,
                      args.skip_first_line, text_col=text_col)
    if text_col not in src.columns:
        raise TuwenError(f"--first_sequence={text_col!r} is not a column of --input_schema ({', '.join(src.columns)})")
    scorer = load_scorer(args.rerank) if args.rerank else None  # flags and inputs are checked before the model
    model = load_for_inference(args.checkpoint_dir, udp, args.device)
    gen = text2image_sampling(model, udp)
    seed = udp["seed"] if udp["seed"] is not None else args.random_seed
    writer = ImageWriter(args.output_dir) if args.output_dir else None
    if writer is not None:
        writer.warn_if_not_empty("--output_dir")
    warned: set[str] = set()

    def predict_batch(rows: list[dict], indices: list[int]) -> list:
        prompts, keys, results = [], [], [None] * len(rows)
        for j, r in enumerate(rows):
            t = r.get(text_col, "")
            if not t or not t.strip():
                results[j] = ValueError(f"empty text in column {text_col!r}")
            else:
                for w in model.prompt_warnings(t):
                    if w not in warned and len(warned) < 20:  # the first 20 distinct ones
                        warned.add(w)
                        print(f"warning: {src.bad(indices[j], w)}", file=sys.stderr)
                prompts.append(t)
                keys.append((j, r.get("idx", indices[j])))
        if prompts:
            imgs = model.generate(prompts, num_images_per_prompt=n, seed=seed, keys=[k for _, k in keys],
                                  batch_size=max(1, args.micro_batch_size) * n, **gen)
            for (j, key), prompt, group in zip(keys, prompts, imgs):
                scores = None
                records = model.records(prompt, seed, key, n, **gen)
                if scorer is not None:
                    order, sc = rerank(scorer, prompt, group, keep)
                    group, scores = [group[i] for i in order], [sc[i] for i in order]
                    records = [records[i] for i in order]
                pred = {"idx": rows[j].get("idx", key), "text": prompt,
                        "gen_imgbase64": [base64.b64encode(png_bytes(im, r)).decode("ascii")
                                          for im, r in zip(group, records)],
                        "gen_info": records}
                if scores is not None:
                    pred["scores"] = [round(float(s), 6) for s in scores]
                if writer is not None:
                    writer.write(key, group, scores, records, row=src.location(indices[j])[1])
                results[j] = pred
        return results

    run_rows(src, predict_batch, args.outputs, parse_columns(args.output_schema),
             parse_columns(args.append_cols), batch_size=max(1, args.micro_batch_size),
             strict=args.strict, max_listed=args.max_bad_listed, desc="text2image",
             progress=getattr(args, "progress", None))
    return 0


# ----------------------------------------------------------------------------------------------- evaluate

def run_evaluate(args, udp: dict) -> int:
    """Loss and bits per image token on the last table of ``--tables`` (+ ``--metric attributes``)."""
    if not args.checkpoint_dir:
        raise TuwenError("--checkpoint_dir is required for --mode=evaluate (the model folder)")
    if not args.tables:
        raise TuwenError("--tables is required for --mode=evaluate (the validation TSV)")
    table = [t for t in args.tables.split(",") if t.strip()][-1]
    if is_cogview_model(args.checkpoint_dir):  # CogView's weighted LM loss on [ROI1] text [BASE] [BOI1] codes [EOI1]
        if args.metric:
            raise TuwenError(f"--metric {args.metric}: not available for CogView-format models (drop the flag)")
        from ...models.cogview import CogView
        from ...training.tasks.cogview import DEFAULT_TXT_LOSS_SCALE, CogViewTask
        model = CogView.from_pretrained(args.checkpoint_dir, vqvae=udp["vqgan_ckpt_path"], tokenizer=udp["vocab_path"],
                                        n_head=udp["n_head"], dtype=torch.float32)
        scale = udp["txt_loss_scale"] if udp["txt_loss_scale"] is not None else DEFAULT_TXT_LOSS_SCALE
        task = CogViewTask(args, udp, model, scale, udp["text_len"])
        print(json.dumps(evaluate_loss(args, task, model, table), ensure_ascii=False, indent=2))
        return 0
    model = load_for_inference(args.checkpoint_dir, udp, args.device)
    task = T2ITask(args, udp, config=model.config, tokenizer=model.tokenizer, vqgan=model.vqgan, base=model)
    result = evaluate_loss(args, task, model, table)
    if args.metric:
        if args.metric != "attributes":
            raise TuwenError(f"--metric {args.metric!r}: tuwen evaluates 'attributes' (synthetic shapes set)")
        result.update(attribute_accuracy(model, table, args, udp))
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


def evaluate_loss(args, task, model, table: str) -> dict:
    """Loss and bits per image token of ``task``'s module around ``model.gpt`` on ``table`` (bad rows reported)."""
    ds = task.dataset([table])
    trainer = Trainer(TrainArgs(checkpoint_dir=args.checkpoint_dir, micro_batch_size=args.micro_batch_size,
                                device=args.device, num_workers=args.num_workers, strict=args.strict,
                                tensorboard=False), task)
    metrics = trainer.evaluate(task.build_module(gpt=model.gpt).to(trainer.device), ds)
    result = {"eval_loss": metrics.get("loss"), "bits_per_image_token": metrics.get("bits_per_token"),
              "rows": len(ds)}
    if trainer.report.count:
        print(trainer.report.summary(total=len(ds)), file=sys.stderr)
        result["bad_rows"] = trainer.report.count
    return result


def attribute_accuracy(model: TextToImage, table: str, args, udp: dict) -> dict:
    """Generate one image per prompt of ``table`` (synthetic captions) and score it with the attribute checker."""
    from PIL import Image

    text_col, image_col = args.first_sequence or "text", args.second_sequence or "imgbase64"
    src = open_source(table, args.input_schema or "idx:str:1,text:str:1,imgbase64:str:1", args.skip_first_line,
                      text_col=text_col)
    prompts, keys, real = [], [], []
    for i in range(len(src)):
        r = src.row(i)
        if isinstance(r, BadRow) or parse_caption(r.get(text_col, "")) is None:
            continue
        prompts.append(r[text_col])
        keys.append(r.get("idx", i))
        if real is not None and r.get(image_col):
            try:
                real.append(Image.fromarray(load_image(r[image_col], model.config.image_size)))
            except Exception:  # noqa: BLE001 - a bad image only removes the real-image reference figure
                real = None
        else:
            real = None
        if len(prompts) >= udp["eval_num"]:
            break
    if not prompts:
        raise TuwenError(f"--metric attributes: no prompt of {table} is a synthetic-set caption")
    seed = udp["seed"] if udp["seed"] is not None else args.random_seed
    imgs = model.generate(prompts, seed=seed, keys=keys, progress=getattr(args, "progress", None),
                          **text2image_sampling(model, udp))
    keep = ("color", "shape", "position", "object", "image")
    res = checker.score([g[0] for g in imgs], prompts)
    out = {"attributes": {k: res[k] for k in keep if k in res}, "attributes_prompts": len(prompts)}
    if real:
        # references: the table's own images (the ceiling), and the same images paired with other prompts
        # (what an image that ignores its prompt scores: the chance level of this prompt distribution)
        ref = checker.score(real, prompts, shuffled=True)
        out["attributes_real_images"] = {k: ref[k] for k in keep if k in ref}
        out["attributes_random_images"] = {k: ref["shuffled"][k] for k in keep if k in ref["shuffled"]}
    return out
