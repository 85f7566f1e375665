"""EasyNLP-style CLIP commands (``tuwen --mode=... --app_name=clip``)::

    tuwen --mode=train --app_name=clip --tables=train.tsv,val.tsv \\
        --input_schema=idx:str:1,text:str:1,imgbase64:str:1 --first_sequence=text --second_sequence=imgbase64 \\
        --checkpoint_dir=runs/clip --micro_batch_size=64 --epoch_num=10 --learning_rate=5e-4 \\
        --user_defined_parameters='vision=small text=small image_size=64'
    tuwen --mode=evaluate --app_name=clip --tables=test.tsv --input_schema=... --checkpoint_dir=runs/clip \\
        [--user_defined_parameters='class_prompts=classes.txt'] [--outputs=metrics.json]
    tuwen --mode=predict --app_name=clip --tables=in.tsv --input_schema=... --checkpoint_dir=runs/clip \\
        --outputs=out.tsv --output_schema=idx,score,text_embedding,image_embedding

Evaluate reports image→text and text→image R@1/5/10, mean and median rank (identical texts count as the same
text), ``mean_recall`` (mean of the six R@K, Chinese-CLIP's figure) and, with ``class_prompts=FILE``
(``label[<TAB>prompt…]`` lines), zero-shot top-1/top-5 accuracy; JSON on stdout (and ``--outputs``). Predict
columns: ``score`` (cosine of the row's text and image), ``logit`` (× logit_scale.exp()), ``text_embedding`` /
``image_embedding`` (L2-normalised, JSON lists; EasyNLP's ``text_feat`` / ``image_feat`` are accepted as aliases),
plus any input column.

``--user_defined_parameters`` keys: see ``CLIP_PARAMS`` (typed; an unknown key is an error that lists the known
ones). The start points of training (random, ``vit_ckpt_path=``, ``bert_ckpt_path=``, ``cnclip_ckpt_path=``,
``pretrain_model_name_or_path=``) are described in ``tuwen.training.tasks.clip``; ``freeze_vision=true`` trains
LiT-style.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import torch

from ... import runtime as D
from ...config import Param, parse_user_defined_parameters
from ...data.images import load_pixels
from ...data.tables import BadRow, BadRowReport, check_columns, open_source, parse_schema, require_columns
from ...errors import TuwenError
from ...hub import atomic_write_text
from ...metrics.retrieval import embed_rows, image_text_retrieval, read_class_prompts, zero_shot_classifier
from ...models.clip import CLIP
from ...training.tasks.clip import CLIPTrainTask, model_factory, training_tokenizer
from ...training.tasks.common import split_tables
from ...training.trainer import Trainer
from ..common import train_args_from
from ..predict import RowError, parse_columns, run_predict

CLIP_PARAMS: dict[str, Param] = {
    "pretrain_model_name_or_path": Param(str | None, None, "a tuwen CLIP folder to start from (or to evaluate)"),
    "cnclip_ckpt_path": Param(str | None, None, "a Chinese-CLIP checkpoint (.pt) to start from; needs vocab="),
    "vit_ckpt_path": Param(str | None, None, "OpenAI CLIP .pt (TorchScript or state dict) for the image tower "
                                            "(ViT-B-32.pt … or RN50.pt …)"),
    "bert_ckpt_path": Param(str | None, None, "HF BERT/RoBERTa weights (folder or file) for the text tower; "
                                             "needs its vocab.txt (vocab=)"),
    "vocab": Param(str | None, None, "vocab.txt (or a folder with it); default: built from the training texts"),
    "vocab_size": Param(int, 8000, "size of a vocabulary built from the training texts"),
    "vision": Param(str, "tiny", "image tower preset: tiny, small, base-64, ViT-B-32, ViT-B-16, ViT-L-14, "
                                 "RN50, RN101, RN50x4, RN50x16, RN50x64, rn-tiny"),
    "text": Param(str, "tiny", "text tower preset: tiny, small, base-64, RBT3-chinese, RoBERTa-wwm-ext-base-chinese"),
    "image_size": Param(int | None, None, "input resolution (default: the preset's / checkpoint's)"),
    "patch_size": Param(int | None, None, "ViT patch size override"),
    "vision_width": Param(int | None, None, "ViT / ResNet width override"),
    "vision_layers": Param(int | None, None, "ViT depth override"),
    "vision_heads": Param(int | None, None, "ViT / ResNet attention-pool heads override"),
    "text_width": Param(int | None, None, "text tower hidden size override"),
    "text_layers": Param(int | None, None, "text tower depth override"),
    "text_heads": Param(int | None, None, "text tower heads override"),
    "embed_dim": Param(int | None, None, "shared embedding size (default: the image tower's output_dim)"),
    "context_length": Param(int, 52, "text tokens incl. [CLS]/[SEP] (Chinese-CLIP: 52)"),
    "freeze_vision": Param(bool, False, "keep the image tower fixed (LiT, Chinese-CLIP stage 1)"),
    "random_crop": Param(bool, False, "random instead of center crops when training"),
    "grad_checkpointing": Param(bool, False, "recompute activations in backward (less memory)"),
    "batch_size": Param(int, 64, "evaluate/predict: images per forward pass"),
    "class_prompts": Param(str | None, None, "evaluate: zero-shot classes, one a line: label[<TAB>prompt…]"),
    "prompt_template": Param(str, "{}", "evaluate: prompt for a class line without prompts ('{}' = label)"),
    "label_column": Param(str | None, None, "evaluate: the column with each row's class label (default: the "
                                            "class whose label occurs in the text)"),
}


_ARCH_KEYS = ("vision", "text", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
              "text_layers", "text_heads", "embed_dim", "vit_ckpt_path", "bert_ckpt_path")


def _log(msg: str) -> None:
    if D.is_main():
        print(msg, file=sys.stderr, flush=True)


def _open(path: str, args, text_col: str | None, image_col: str | None):
    """One table or image folder; checks that the columns that will be read (not None) are in the schema."""
    from ...data.formats import is_self_describing

    schema = args.input_schema
    if schema is None and not is_self_describing(path):
        schema = "idx:str:1,text:str:1,imgbase64:str:1"
        _log(f"note: no --input_schema; assuming {schema}")
    src = open_source(path, schema, skip_first_line=args.skip_first_line, text_col=text_col or "text",
                      image_col=image_col or "imgbase64")
    if schema is not None and not is_self_describing(path):
        cols = parse_schema(schema)
        require_columns(cols, {"--first_sequence": text_col, "--second_sequence": image_col})  # None: not needed
    return src


def _columns(args) -> tuple[str, str]:
    return args.first_sequence or "text", args.second_sequence or "imgbase64"


def run_easynlp(args) -> int:
    p = parse_user_defined_parameters(args.user_defined_parameters, CLIP_PARAMS, "clip")
    if args.mode == "train":
        return _train(args, p)
    if args.mode == "evaluate":
        return _evaluate(args, p)
    return _predict(args, p)


def _train(args, p: dict) -> int:
    text_col, image_col = _columns(args)
    train, val = split_tables(args.tables, what="training (train.tsv[,val.tsv])")
    if len(train) > 1:
        raise TuwenError(f"--tables: give train[,validation] ({len(train) + len(val)} given); join several "
                         f"training files into one first")
    targs = train_args_from(args, default_lr=5e-4, default_wd=0.2)
    train_src = _open(train[0], args, text_col, image_col)
    check_columns(train_src, text_col, image_col, "--first_sequence", "--second_sequence")
    val_src = _open(val[0], args, text_col, image_col) if val else None
    tok = training_tokenizer(p, train_src, text_col)
    start = [k for k in ("pretrain_model_name_or_path", "cnclip_ckpt_path") if p[k]]
    ignored = [k for k in _ARCH_KEYS if p[k] != CLIP_PARAMS[k].default]
    if start and ignored:
        _log(f"note: {start[0]} fixes the architecture; ignoring {', '.join(ignored)}")
    cfg, make = model_factory(p, tok)

    def make_model() -> CLIP:
        m = make()
        if p["grad_checkpointing"]:
            m.visual.set_grad_checkpointing(True)
            m.bert.set_grad_checkpointing(True)
        return m
    task = CLIPTrainTask(make_model, tok, train_src, val_src, text_col, image_col, image_size=cfg.image_size,
                         context_length=cfg.context_length, freeze_vision=p["freeze_vision"],
                         random_crop=p["random_crop"], image_resize=cfg.image_resize)
    result = Trainer(targs, task).train()
    _log(f"CLIP saved to {targs.checkpoint_dir} (step {result['step']}, best val loss {result['best']})")
    D.cleanup()
    return 0


# ---------------------------------------------------------------- evaluate / predict

def _load_model(args, p: dict, device: torch.device) -> CLIP:
    path = p["pretrain_model_name_or_path"] or args.checkpoint_dir
    if not path:
        raise TuwenError("--checkpoint_dir (the trained CLIP folder) is required")
    model = CLIP.from_pretrained(path, device=device)
    if model.tokenizer is None:
        raise TuwenError(f"{path}: no vocab.txt in the model folder")
    return model.eval()


def _row_label(row: dict, text: str, labels: list[str], label_column: str | None) -> str:
    if label_column:
        lab = str(row.get(label_column, "")).strip()
        if lab not in labels:
            raise ValueError(f"label {lab!r} (column {label_column!r}) is not a class of class_prompts")
        return lab
    found = [lab for lab in labels if lab in text]
    found = [a for a in found if not any(a != b and a in b for b in found)]   # keep the longest matches
    if len(found) != 1:
        raise ValueError(f"the text names {'no' if not found else len(found)} class label(s)"
                         f"{': ' + ', '.join(found) if found else ''}; give label_column=")
    return found[0]


def _evaluate(args, p: dict) -> int:
    text_col, image_col = _columns(args)
    train, val = split_tables(args.tables, what="evaluate (the input table)")
    path = (val or train)[-1]
    if val:
        _log(f"note: evaluating on the last table of --tables ({path})")
    device = D.resolve_device(args.device)
    model = _load_model(args, p, device)
    src = _open(path, args, text_col, image_col)
    report = BadRowReport(args.max_bad_listed)
    idx, img, txt, texts, report = embed_rows(model, src, text_col, image_col, p["batch_size"], strict=args.strict,
                                              report=report)
    if len(idx) == 0:
        raise TuwenError(f"{path}: no usable rows to evaluate")
    metrics: dict[str, Any] = {"table": path, "rows": len(src), "evaluated": int(len(idx)), "bad_rows": report.count,
                               "unique_texts": len(set(texts))}
    # identical captions count as the same text (both directions)
    metrics.update(image_text_retrieval(img, txt, image_ids=texts, text_ids=texts))
    metrics["mean_recall"] = float(np.mean([metrics[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image")
                                            for k in (1, 5, 10)]))   # Chinese-CLIP's "mean recall" (6 R@K)
    if p["class_prompts"]:
        classes = read_class_prompts(p["class_prompts"], p["prompt_template"])
        labels = [c for c, _ in classes]
        W = zero_shot_classifier(model, classes)
        scores = img @ W.T                                             # [n, C]
        y, keep = [], []
        zs_report = BadRowReport(args.max_bad_listed)
        for k, i in enumerate(idx.tolist()):
            row = src.row(i)
            if isinstance(row, BadRow):
                continue
            try:
                y.append(labels.index(_row_label(row, texts[k], labels, p["label_column"])))
                keep.append(k)
            except ValueError as e:
                zs_report.add(src.bad(i, str(e)))
        if keep:
            s = scores[keep]
            yt = torch.tensor(y)
            top = s.topk(min(5, len(labels)), dim=1).indices
            metrics["zeroshot_classes"] = len(labels)
            metrics["zeroshot_rows"] = len(keep)
            metrics["zeroshot_top1"] = float((top[:, 0] == yt).float().mean())
            if len(labels) >= 5:
                metrics["zeroshot_top5"] = float((top == yt[:, None]).any(1).float().mean())
        else:
            metrics["zeroshot_rows"] = 0
        if zs_report.count:
            _log(f"zero-shot: {zs_report.summary(total=len(idx)).replace('bad row', 'unlabelled row')}")
    _print_metrics(metrics)
    if report.count:
        _log(report.summary(total=len(src)))
    if args.outputs:
        atomic_write_text(args.outputs, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
        _log(f"wrote {args.outputs}")
    return 0


def _print_metrics(m: dict) -> None:
    lines = [f"CLIP evaluation on {m['table']}: {m['evaluated']} of {m['rows']} rows "
             f"({m['unique_texts']} distinct texts; identical texts count as matches)"]
    for d in ("image_to_text", "text_to_image"):
        lines.append(f"  {d.replace('_', ' ')}: R@1 {100 * m[d + '_R@1']:.1f}%  R@5 {100 * m[d + '_R@5']:.1f}%  "
                     f"R@10 {100 * m[d + '_R@10']:.1f}%  mean rank {m[d + '_mean_rank']:.2f}  "
                     f"median rank {m[d + '_median_rank']:.0f}")
    lines.append(f"  mean recall (6 R@K) {100 * m['mean_recall']:.1f}%")
    if "zeroshot_top1" in m:
        t5 = f"  top-5 {100 * m['zeroshot_top5']:.1f}%" if "zeroshot_top5" in m else ""
        lines.append(f"  zero-shot ({m['zeroshot_classes']} classes, {m['zeroshot_rows']} rows): "
                     f"top-1 {100 * m['zeroshot_top1']:.1f}%{t5}")
    if D.is_main():
        print("\n".join(lines), file=sys.stderr)
        print(json.dumps(m, ensure_ascii=False))


PREDICT_OUTPUTS = ("score", "logit", "text_embedding", "image_embedding")
# EasyNLP's CLIP predictor names; tuwen writes them as JSON lists (EasyNLP tab-joins the floats)
PREDICT_ALIASES = {"text_feat": "text_embedding", "image_feat": "image_embedding"}


def _predict(args, p: dict) -> int:
    text_col, image_col = _columns(args)
    table = split_tables(args.tables, what="predict (the input table)")[0][0]
    device = D.resolve_device(args.device)
    model = _load_model(args, p, device)
    out_cols = parse_columns(args.output_schema)
    wanted = {PREDICT_ALIASES.get(c, c) for c in out_cols} & set(PREDICT_OUTPUTS)
    need_text = bool(wanted & {"score", "logit", "text_embedding"})
    need_image = bool(wanted & {"score", "logit", "image_embedding"})
    src = _open(table, args, text_col if need_text else None, image_col if need_image else None)
    size, scale = model.config.image_size, float(model.logit_scale.detach().exp())

    @torch.inference_mode()
    def predict_batch(rows: list[dict], indices: list[int]) -> list[dict]:
        outs: list[dict | Exception] = [{} for _ in rows]
        good_img, pix = [], []
        if need_image:
            for k, r in enumerate(rows):
                try:
                    pix.append(load_pixels(r[image_col], size, model.config.image_resize))
                    good_img.append(k)
                except (ValueError, KeyError, OSError) as e:
                    outs[k] = RowError(str(e) if not isinstance(e, KeyError) else f"missing column {e}")
        good_txt = [k for k in range(len(rows)) if not isinstance(outs[k], Exception)]
        if need_text:
            for k in list(good_txt):
                if not str(rows[k].get(text_col, "")).strip():
                    outs[k] = RowError(f"empty text in column {text_col!r}")
            good_txt = [k for k in good_txt if not isinstance(outs[k], Exception)]
        with D.inference_autocast(device):
            ie = model.encode_image(torch.from_numpy(np.stack(pix)).to(device)).cpu() if need_image and pix else None
            te = model.encode_text([str(rows[k][text_col]) for k in good_txt]).cpu() if need_text and good_txt else None
        img_pos = {k: j for j, k in enumerate(good_img)}
        txt_pos = {k: j for j, k in enumerate(good_txt)}
        for k in range(len(rows)):
            if isinstance(outs[k], Exception):
                continue
            o = outs[k]
            if ie is not None:
                o["image_embedding"] = [round(float(v), 6) for v in ie[img_pos[k]]]
            if te is not None:
                o["text_embedding"] = [round(float(v), 6) for v in te[txt_pos[k]]]
            if need_text and need_image:
                cos = float(ie[img_pos[k]] @ te[txt_pos[k]])
                o["score"] = round(cos, 6)
                o["logit"] = round(cos * scale, 6)
            for alias, name in PREDICT_ALIASES.items():
                if name in o:
                    o[alias] = o[name]
        return outs

    run_predict(src, predict_batch, args.outputs, out_cols,
                append_cols=parse_columns(args.append_cols), batch_size=p["batch_size"],
                strict=args.strict, max_listed=args.max_bad_listed, desc="clip")
    return 0
