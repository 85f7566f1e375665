"""``tuwen --mode=train|predict|evaluate --app_name=image2text_generation|video2text_generation ...``: EasyNLP's
captioning apps (``image2text_generation_vqgan`` or ``enable_vqgan=true``: the VQGAN-code prefix).

The typed ``user_defined_parameters`` (``USER_PARAMS``) and the inference loading they drive are shared with
``tuwen.pipeline("image2text_generation")`` and live in ``tuwen.pipelines``; training is
``tuwen.training.tasks.captioning``.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import torch

from ...config import parse_user_defined_parameters
from ...data.tables import BadRow, BadRowError, BadRowReport, RowDataset, open_source
from ...errors import TuwenError
from ...fileio import atomic_write_text
from ...metrics.captions import caption_metrics, exact_match, split_references
from ...models.captioner import Captioner
from ...pipelines import CAPTION_PARAMS as USER_PARAMS
from ...pipelines import check_caption_udp as check_udp_against_config
from ...pipelines import load_captioner as load_for_inference
from ...pipelines import udp_device
from ...training.tasks.captioning import CaptionTask, CaptionTrainModule, EvalTask, columns, make_transform
from ...training.tasks.common import split_tables
from ...training.trainer import Trainer, TrainArgs
from ..common import train_args_from
from ..predict import parse_columns, run_predict as run_rows

__all__ = ["USER_PARAMS", "parse_udp", "check_udp_against_config", "load_for_inference", "run_predict",
           "evaluate_captions", "run_evaluate", "run_easynlp"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_udp(args) -> dict:
    return parse_user_defined_parameters(args.user_defined_parameters, USER_PARAMS, args.app_name)


def _row_pixels(model: Captioner, rows: list[dict], image_col: str, udp: dict, source, indices, strict: bool):
    """Decode the image field of each row → (uint8 tensor [n, (F,) S, S, 3], list of row positions that worked,
    {position: exception})."""
    transform = make_transform(model.config, None, source, image_col, None, udp, strict)
    arrs, ok, errors = [], [], {}
    for j, (r, i) in enumerate(zip(rows, indices)):
        try:
            arrs.append(transform(r, i)["pixels"])
            ok.append(j)
        except (ValueError, KeyError, OSError) as e:
            errors[j] = ValueError(str(e) if not isinstance(e, KeyError) else f"missing column {e}")
    return (torch.stack(arrs) if arrs else None), ok, errors


def run_predict(args, udp: dict, video: bool, vq: bool) -> int:
    if not args.checkpoint_dir:
        raise TuwenError("--checkpoint_dir is required for --mode=predict (the captioner folder)")
    if not args.tables:
        raise TuwenError("--tables is required for --mode=predict (the input TSV)")
    model = load_for_inference(args.checkpoint_dir, udp, video, args.device, vq)
    n = udp["max_generated_num"]
    if n < 1:
        raise TuwenError("max_generated_num must be >= 1")
    image_col = args.first_sequence or "imgbase64"
    schema = args.input_schema or "idx:str:1,imgbase64:str:1"
    src = open_source(split_tables(args.tables)[0][0], schema, args.skip_first_line, image_col=image_col)
    if image_col not in src.columns:
        raise TuwenError(f"--first_sequence={image_col!r} is not a column of --input_schema ({', '.join(src.columns)})")
    seed = udp["seed"] if udp["seed"] is not None else args.random_seed
    proc = model.config.image_processor()

    def predict_batch(rows: list[dict], indices: list[int]) -> list:
        pixels, ok, errors = _row_pixels(model, rows, image_col, udp, src, indices, args.strict)
        results: list[Any] = [errors.get(j) for j in range(len(rows))]
        if pixels is not None:
            keys = [rows[j].get("idx", indices[j]) for j in ok]
            caps = model.generate(pixel_values=proc.normalize(pixels.to(model.device)), num_return_sequences=n,
                                  seed=seed, keys=keys)
            for j, key, group in zip(ok, keys, caps):
                results[j] = {"idx": key, "gen_text": group if n > 1 else group[0]}
        return results

    run_rows(src, predict_batch, args.outputs, parse_columns(args.output_schema),
             parse_columns(args.append_cols), batch_size=max(1, args.micro_batch_size),
             strict=args.strict, max_listed=args.max_bad_listed, desc=args.app)
    return 0


def evaluate_captions(model: Captioner, source, image_col: str, text_col: str, udp: dict, *, batch_size: int = 16,
                      seed: int = 0, strict: bool = False, limit: int | None = None, report=None,
                      progress: bool | None = None) -> dict:
    """Caption each image of ``source`` once and score against all its references.

    Rows that share an ``idx`` value are one image with several references (the first row's image is captioned);
    a text field may also hold several (JSON list or ``a || b``). Returns BLEU-1…4, CIDEr-D, ROUGE-L (+ METEOR where
    Java and pycocoevalcap are present), the synthetic-set attribute accuracy when every reference is a synthetic
    caption, and a few examples."""
    from tqdm import tqdm

    groups: dict[str, dict] = {}
    order: list[str] = []
    for i in range(len(source)):
        r = source.row(i)
        if isinstance(r, BadRow):
            if strict:
                raise BadRowError(f"{r} (--strict stops at the first bad row)")
            if report is not None:
                report.add(r)
            continue
        key = str(r.get("idx", i))
        if key not in groups:
            if limit is not None and len(order) >= limit:
                continue
            groups[key] = {"index": i, "refs": []}  # the row (with its image) is read again when captioned
            order.append(key)
        groups[key]["refs"] += split_references(r.get(text_col, ""))
    order = [k for k in order if groups[k]["refs"]]
    if not order:
        raise TuwenError(f"no rows with a reference caption in column {text_col!r}")
    proc = model.config.image_processor()
    preds, refs, keys = [], [], []
    bar = tqdm(total=len(order), desc="captioning", unit="img", disable=(progress is False) or None, file=sys.stderr)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        idx = [groups[k]["index"] for k in chunk]
        rows = [source.row(i) for i in idx]
        pixels, ok, errors = _row_pixels(model, rows, image_col, udp, source, idx, strict)
        for j, e in errors.items():
            bad = source.bad(idx[j], str(e))
            if strict:
                raise BadRowError(f"{bad} (--strict stops at the first bad row)")
            if report is not None:
                report.add(bad)
        if pixels is not None:
            caps = model.generate(pixel_values=proc.normalize(pixels.to(model.device)), seed=seed,
                                  keys=[chunk[j] for j in ok])
            for j, group in zip(ok, caps):
                preds.append(group[0])
                refs.append(groups[chunk[j]]["refs"])
                keys.append(chunk[j])
        bar.update(len(chunk))
    bar.close()
    if not preds:
        raise TuwenError("no image could be captioned (every row was bad)")
    out = caption_metrics(preds, refs)
    # how often the caption is one of the references, spaces ignored (CJK decodes may be spaced): on the training
    # images this says whether a small model learned to name them (tuwen recipe's check); "_tokenized" compares with
    # the references as the model's tokenizer writes them (lower-cased by an uncased vocabulary, [UNK] …)
    out["exact_match"] = exact_match(preds, refs)
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        out["exact_match_tokenized"] = exact_match(preds, refs, writable=lambda r: tok.decode(tok.encode(r)))
    from ...data.synth import parse_caption
    if all(parse_caption(r[0]) is not None for r in refs):
        from ...data.checker import score_captions
        out["attributes"] = score_captions(preds, [r[0] for r in refs])
    out["examples"] = [{"idx": k, "gen_text": p, "references": r} for k, p, r in list(zip(keys, preds, refs))[:5]]
    return out


def run_evaluate(args, udp: dict, video: bool, vq: bool) -> int:
    if not args.checkpoint_dir:
        raise TuwenError("--checkpoint_dir is required for --mode=evaluate (the captioner folder)")
    tables = [t for t in (args.tables or "").split(",") if t.strip()]
    if not tables:
        raise TuwenError("--tables is required for --mode=evaluate (a table with images and reference captions)")
    model = load_for_inference(args.checkpoint_dir, udp, video, args.device, vq)
    image_col, text_col = columns(args)
    src = open_source(tables[-1], args.input_schema, args.skip_first_line, text_col=text_col, image_col=image_col)
    for col, flag in ((image_col, "--first_sequence"), (text_col, "--second_sequence")):
        if col not in src.columns:
            raise TuwenError(f"{flag}={col!r} is not a column of --input_schema ({', '.join(src.columns)})")
    # teacher-forced loss, as EasyNLP's evaluator
    ds = RowDataset(src, make_transform(model.config, model.tokenizer, src, image_col, text_col, udp, args.strict,
                                        args.random_seed, first_reference=True))
    trainer = Trainer(TrainArgs(checkpoint_dir=args.checkpoint_dir, micro_batch_size=args.micro_batch_size,
                                device=args.device, num_workers=args.num_workers, strict=args.strict,
                                tensorboard=False), EvalTask())
    module = CaptionTrainModule(model.config, model.gpt, model.vit, model.vqgan, model.end_id,
                                loss_on_padding=bool(udp["loss_on_padding"])).to(trainer.device)
    loss = trainer.evaluate(module, ds)
    report = BadRowReport(args.max_bad_listed)
    seed = udp["seed"] if udp["seed"] is not None else args.random_seed
    metrics = evaluate_captions(model, src, image_col, text_col, udp, batch_size=max(1, args.micro_batch_size),
                                seed=seed, strict=args.strict, limit=udp["eval_num"], report=report)
    result = {"eval_loss": loss.get("loss"), "caption_loss": loss.get("caption_loss"),
              "loss_all_positions": loss.get("loss_all_positions"), "token_acc": loss.get("token_acc"), **metrics}
    bad = max(trainer.report.count, report.count)
    if bad:
        print((trainer.report if trainer.report.count >= report.count else report).summary(total=len(src)),
              file=sys.stderr)
        result["bad_rows"] = bad
    if args.metric and args.metric != "attributes":
        raise TuwenError(f"--metric {args.metric!r}: captioning reports loss, BLEU, CIDEr-D, ROUGE-L and (synthetic "
                         f"set) attributes; --metric attributes requires the latter")
    if args.metric == "attributes" and "attributes" not in result:
        raise TuwenError("--metric attributes: the references are not synthetic-set captions")
    text = json.dumps(result, ensure_ascii=False, indent=2)
    print(text)
    if args.outputs:
        atomic_write_text(args.outputs, text + "\n")
    return 0


def run_easynlp(args) -> int:
    udp = parse_udp(args)
    app = args.app_name
    video = args.app == "video2text_generation"
    vq = "vqgan" in app[len(args.app):] or bool(udp["enable_vqgan"])
    if vq and udp["enable_vit"]:
        raise TuwenError("enable_vit and enable_vqgan are both set; choose one image prefix")
    if vq and video:
        raise TuwenError("video2text_generation has no VQGAN prefix (EasyNLP neither); drop enable_vqgan")
    if not video and udp["frame_num"] is not None:
        raise TuwenError("frame_num is a video2text_generation setting; for still images drop it")
    if args.mode == "train":
        args.device = udp_device(args.device, udp)
        targs = train_args_from(args, default_lr=4e-5, default_wd=0.01)
        if not udp["do_eval"]:
            targs.do_eval = False
        task = CaptionTask(args, udp, video, vq,
                           check_pretrained=lambda c, what: check_udp_against_config(udp, c, video, vq, what))
        result = Trainer(targs, task).train()
        _log(f"captioner saved to {targs.checkpoint_dir} (step {result['step']}, best val loss {result['best']})")
        return 0
    if args.mode == "predict":
        return run_predict(args, udp, video, vq)
    return run_evaluate(args, udp, video, vq)
