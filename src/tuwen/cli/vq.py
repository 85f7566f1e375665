"""``tuwen vq``: the VQGAN image tokenizer (stage 1 of text→image).

    tuwen vq import vqgan_f16_16384.bin models/vqgan          # or a taming last.ckpt [--config model.yaml]
    tuwen vq encode --model models/vqgan a.png b.jpg --out codes.npy
    tuwen vq encode --model models/vqgan --tables train.tsv --input_schema idx:str:1,text:str:1,imgbase64:str:1 \\
        --second_sequence imgbase64 --out codes.tsv
    tuwen vq decode --model models/vqgan --codes codes.npy --out recon/
    tuwen vq tokenize --model models/vqgan --tables train.tsv --input_schema idx:str:1,text:str:1,imgbase64:str:1 \\
        --first_sequence text --second_sequence imgbase64 --out data/train_codes   # torchrun-able, resumable
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ..errors import TuwenError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("vq", help="VQGAN image tokenizer: import, encode, decode, tokenize a data set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="vq_command", metavar="VQ_COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 1)[1])

    q = sub.add_parser("import", help="convert a taming .ckpt / EasyNLP .bin VQGAN into a tuwen model folder")
    q.add_argument("src", help="taming .ckpt, a .bin/.pth state dict, or an EasyNLP model folder / pytorch_model.bin "
                               "(first_stage_model.* keys)")
    q.add_argument("dst", help="output model folder (config.json + model.safetensors)")
    q.add_argument("--config", help="taming model.yaml or a JSON config; default: inferred from the tensor shapes")
    q.add_argument("--resolution", type=int, default=256,
                   help="training image size to record when the architecture is inferred (default 256)")
    q.set_defaults(func=cmd_import)

    q = sub.add_parser("encode", help="images → codes (.npy [n,h,w] or .tsv)")
    q.add_argument("images", nargs="*", help="image files (or use --tables)")
    _model_args(q)
    _table_args(q, text=False)
    q.add_argument("--out", required=True, help="codes.npy (codes [n,h,w] + codes.ids.txt) or codes.tsv "
                                                "(id \\t space-separated codes)")
    q.add_argument("--image_size", type=int, help="resize + center-crop to this size (default: the model's)")
    q.set_defaults(func=cmd_encode)

    q = sub.add_parser("decode", help="codes → PNG images")
    _model_args(q)
    q.add_argument("--codes", required=True, help=".npy ([n,h,w] or [n,h*w]), .tsv (id \\t codes) or a folder "
                                                  "made by tuwen vq tokenize")
    q.add_argument("--out", required=True, help="folder for the PNGs (named after the ids when known)")
    q.add_argument("--grid", help="HxW of flat codes when not the model's grid and not square, e.g. 16x32")
    q.add_argument("--limit", type=int, help="decode only the first N")
    q.set_defaults(func=cmd_decode)

    q = sub.add_parser("tokenize", help="pre-tokenize a whole data set into code shards (resumable; torchrun)")
    _model_args(q)
    _table_args(q, text=True, required=True)
    q.add_argument("--out", required=True, help="output folder (meta.json + shard-*.npy/.tsv)")
    q.add_argument("--image_size", type=int, help="resize + center-crop to this size (default: the model's)")
    q.add_argument("--shard_size", type=int, default=10000, help="input rows per shard (default 10000)")
    q.set_defaults(func=cmd_tokenize)

    add_train_parser(sub)


# =================================================================================================
# `tuwen vq train` — stage-1 training on the shared trainer (tuwen.training.tasks.vqgan)
# =================================================================================================
def add_train_parser(sub) -> None:
    from .common import add_data_flags, add_train_flags

    q = sub.add_parser(
        "train", help="train (or finetune) a VQGAN on TSV tables / image folders",
        description="Train a VQGAN image tokenizer with the shared trainer (torchrun for several GPUs). "
                    "Example: tuwen vq train --tables train.tsv,val.tsv --input_schema idx:str:1,text:str:1,"
                    "imgbase64:str:1 --second_sequence imgbase64 --checkpoint_dir models/vqgan --preset tiny "
                    "--size 64 --micro_batch_size 32 --learning_rate 2e-4 --epoch_num 10")
    add_data_flags(q)
    add_train_flags(q)
    d = q.add_argument_group("DALLE-pytorch train_vae.py spellings (README: Data)")
    d.add_argument("--image_folder", default=None, help="a folder of images (captions not needed) → --tables")
    d.add_argument("--image_size", dest="size", type=int, default=None, help="→ --size")
    d.add_argument("--num_tokens", type=int, default=None, help="codebook size → --arch n_embed=")
    d.add_argument("--emb_dim", type=int, default=None, help="code vector size → --arch embed_dim=")
    d.add_argument("--num_layers", type=int, default=None,
                   help="down-sampling levels (grid = size / 2^num_layers) → --arch ch_mult= of num_layers+1 levels")
    m = q.add_argument_group("VQGAN")
    m.add_argument("--image_column", default=None,
                   help="image column (default: --second_sequence, else imgbase64; 'image' for folders)")
    m.add_argument("--size", type=int, default=None, help="training image size (default: the preset's resolution)")
    m.add_argument("--random_crop", action="store_true", help="random instead of center crops")
    m.add_argument("--augment", default="none", metavar="LIST",
                   help="training-image augmentation, comma-separated: flip (mirror half), hue (rotate half "
                        "the images' hue by a random angle, luminance kept; `tuwen recipe` uses it: it taught the "
                        "stamps tokenizer the hues its training images lack); default none")
    m.add_argument("--preset", default="tiny", help="architecture preset: f16_16384, f16_1024, small, tiny")
    m.add_argument("--arch", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override preset fields, e.g. --arch n_embed=1024 ch=64 'ch_mult=[1,2,2,4]'")
    m.add_argument("--init", default=None, help="start from this tuwen VQGAN folder (finetune)")
    lo = q.add_argument_group("loss")
    defaults = _loss_flags()
    for name, (typ, default, helptext) in defaults.items():
        lo.add_argument(f"--{name}", type=typ, default=default, help=helptext)
    q.set_defaults(func=_cmd_train)


def dalle_vae_overrides(ns, preset: dict, overrides: dict, size: int) -> dict:
    """train_vae.py's --num_tokens / --emb_dim / --num_layers as VQGAN settings (an --arch of the same key wins
    only if it agrees)."""
    from ..errors import TuwenError

    out = {}
    for flag, key in (("num_tokens", "n_embed"), ("emb_dim", "embed_dim")):
        v = getattr(ns, flag, None)
        if v is not None:
            if v < 1:
                raise TuwenError(f"--{flag} {v}: must be ≥ 1")
            out[key] = v
    L = getattr(ns, "num_layers", None)
    if L is not None:
        if not 1 <= L <= 8 or size % (2 ** L):
            raise TuwenError(f"--num_layers {L}: the image size {size} must divide by 2^{L} (1 to 8 levels)")
        base = list(overrides.get("ch_mult") or preset["ch_mult"])
        ch_mult = (base + [base[-1]] * L)[:L + 1]
        out["ch_mult"] = ch_mult
        out["attn_resolutions"] = [size // 2 ** L]
    for k, v in out.items():
        if k in overrides and overrides[k] != v:
            raise TuwenError(f"--arch {k}={overrides[k]} disagrees with the train_vae.py flag that sets {k}={v}")
    return out


def _loss_flags() -> dict:
    return {
        "l2_weight": (float, 0.0, "extra L2 reconstruction weight (L1 is always on)"),
        "color_weight": (float, 0.0, "L2 weight on 4×4 average-pooled images (region colours)"),
        "codebook_weight": (float, 1.0, "codebook + commitment loss weight (beta on the commitment term)"),
        "disc_weight": (float, 0.75, "adversarial weight; 0 turns the PatchGAN discriminator off"),
        "disc_start": (int, 10000, "optimizer step at which the discriminator starts (generator term and D training)"),
        "disc_num_layers": (int, 2, "PatchGAN layers"),
        "perceptual_weight": (float, 1.0, "LPIPS weight (only with --lpips_path and --vgg_path)"),
        "lpips_path": (str, None, "local taming/LPIPS vgg.pth (lin layers); perceptual loss is off without it"),
        "vgg_path": (str, None, "local torchvision VGG16 weights for LPIPS"),
        "dead_code_steps": (int, 0, "re-initialise codes unused for this many steps from encoder outputs (0: off)"),
    }


def _cmd_train(ns) -> int:
    from ..config import coerce
    from ..errors import TuwenError
    from ..models.vqgan import VQGANConfig, PRESETS
    from ..training.tasks.vqgan import VQGANTrainTask, VQLossConfig, VQTrainSettings, parse_augment
    from ..training.trainer import Trainer
    from .common import train_args_from
    import typing

    if ns.preset not in PRESETS:
        raise TuwenError(f"--preset {ns.preset!r}: choose one of {', '.join(PRESETS)}")
    hints = typing.get_type_hints(VQGANConfig)
    overrides = {}
    for item in ns.arch:
        if "=" not in item:
            raise TuwenError(f"--arch {item!r}: expected key=value")
        k, v = item.split("=", 1)
        if k not in hints or k == "model_type":
            raise TuwenError(f"--arch {k!r}: not a VQGAN setting; known: {', '.join(sorted(h for h in hints if h != 'model_type'))}")
        overrides[k] = coerce(v, hints[k], f"--arch {k}")
    if ns.image_folder:
        if ns.tables:
            raise TuwenError("--tables and --image_folder both given; keep one")
        ns.tables = ns.image_folder
    if not ns.tables:
        raise TuwenError("--tables (or --image_folder) is required: the training images")
    size = ns.size or overrides.get("resolution") or PRESETS[ns.preset]["resolution"]
    overrides.update(dalle_vae_overrides(ns, PRESETS[ns.preset], overrides, size))
    loss = VQLossConfig(**{k: getattr(ns, k) for k in _loss_flags()})
    loss.validate()
    image_col = ns.image_column or ns.second_sequence or ("imgbase64" if ns.input_schema else "image")
    settings = VQTrainSettings(tables=ns.tables, input_schema=ns.input_schema, image_column=image_col, size=size,
                               preset=ns.preset, config_overrides=overrides, init=ns.init, loss=loss,
                               random_crop=ns.random_crop, augment=parse_augment(ns.augment),
                               skip_first_line=ns.skip_first_line, seed=ns.random_seed)
    args = train_args_from(ns, default_lr=2e-4, default_wd=0.0)
    task = VQGANTrainTask(settings)
    if not ns.init and task.vq_config.norm_groups == task.vq_config.ch:  # a level with one channel per group
        print(f"note: GroupNorm with {task.vq_config.norm_groups} groups on the {task.vq_config.ch}-channel levels "
              f"normalises each channel on its own, which loses colours (reds and greens come back brown and "
              f"black); --arch norm_groups=1 keeps them (README \"Training on your own images\")", file=sys.stderr)
    Trainer(args, task).train()
    return 0


# ------------------------------------------------------------------------------------------------- flags

def _model_args(q) -> None:
    q.add_argument("--model", required=True, help="tuwen VQGAN folder (tuwen vq import makes one) or a taming "
                                                   ".ckpt / .bin")
    q.add_argument("--device", default="auto", help="auto (cuda:$LOCAL_RANK if available, else cpu), cpu, cuda, cuda:1")
    q.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default 32)")
    q.add_argument("--bf16", action="store_true", help="run the encoder/decoder under bf16 autocast (faster on "
                                                       "GPUs; codes may differ slightly from fp32)")


def _table_args(q, text: bool, required: bool = False) -> None:
    q.add_argument("--tables", required=required, help="EasyNLP TSV file(s) and/or image folders, comma-separated")
    q.add_argument("--input_schema", help="e.g. idx:str:1,text:str:1,imgbase64:str:1")
    if text:
        q.add_argument("--first_sequence", default="text", help="text column (default text)")
    q.add_argument("--second_sequence", default="imgbase64", help="image column: base64 (default imgbase64)")
    q.add_argument("--id_column", default="idx", help="id column written with the codes (default idx; the row "
                                                      "number when the schema has none)")
    q.add_argument("--skip_first_line", action="store_true", help="the tables have a header line")
    q.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    q.add_argument("--num_workers", type=int, help="image-decoding worker processes (default: min(4, cores-1))")
    from .common import add_reader_flags
    add_reader_flags(q)


def _dtype(args):
    import torch

    return torch.bfloat16 if getattr(args, "bf16", False) else None


def _workers(args) -> int:
    if getattr(args, "num_workers", None) is not None:
        return max(0, args.num_workers)
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def _load(args):
    from ..convert.taming import load_vqgan
    from ..runtime import resolve_device

    if args.batch_size < 1:
        raise TuwenError("--batch_size must be ≥ 1")
    return load_vqgan(args.model, device=resolve_device(args.device))


def _model_signature(path: str) -> dict:
    from ..data.codes import file_signature
    from ..hub import resolve_model_path

    p = resolve_model_path(path, what="--model")
    if p.is_dir():
        return {"dir": str(p.resolve()), "files": [file_signature(f) for f in sorted(p.rglob("*"))
                                                   if f.is_file() and f.suffix in (".json", ".safetensors", ".bin")]}
    return file_signature(p)


def _source(args, text_col: str | None):
    from ..data.tables import Table, open_source, require_columns

    image_col = args.second_sequence
    src = open_source(args.tables, args.input_schema, args.skip_first_line, idx_col=args.id_column,
                      text_col=text_col or "text", image_col=image_col)
    for s in getattr(src, "sources", [src]):
        if isinstance(s, Table):
            flags = {"--second_sequence": image_col}
            if text_col:
                flags["--first_sequence"] = text_col
            require_columns(s.schema, flags)
    return src


class _FileSource:
    """Image files given on the command line, as rows ``{"idx": file name, "image": Path}``."""

    columns = ["idx", "image"]

    def __init__(self, paths: list[str]):
        self.paths = [Path(p).expanduser() for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def location(self, i: int):
        return str(self.paths[i]), 0

    def bad(self, i: int, reason: str):
        from ..data.tables import BadRow
        return BadRow(str(self.paths[i]), 0, reason)

    def row(self, i: int):
        p = self.paths[i]
        if not p.is_file():
            return self.bad(i, "no such image file")
        return {"idx": p.name, "image": p}


# ------------------------------------------------------------------------------------------------- commands

def cmd_import(args) -> int:
    from ..convert.taming import vqgan_from_taming

    model = vqgan_from_taming(args.src, config=args.config, resolution=args.resolution)
    dst = model.save_pretrained(args.dst)
    print(f"{dst}: {model.describe()}")
    return 0


def cmd_encode(args) -> int:
    import numpy as np

    from ..data.codes import clean_field, code_dtype, encode_batches, image_transform
    from ..data.tables import BadRowReport

    out = Path(args.out)
    if out.suffix not in (".npy", ".tsv"):
        raise TuwenError(f"--out {out}: use a .npy or .tsv file name")
    if bool(args.images) == bool(args.tables):
        raise TuwenError("give image files or --tables (one of them)")
    for f in args.images or ():  # before the model is loaded and before anything is written
        fp = Path(f).expanduser()
        if fp.is_dir():
            raise TuwenError(f"{f}: is a folder; give image files, or the folder as --tables {f}")
        if not fp.is_file():
            raise TuwenError(f"{f}: no such image file")
    vq = _load(args)
    size = args.image_size or vq.config.resolution
    h, w = vq.grid_size(size)
    if args.tables:
        src = _source(args, None)
        transform = image_transform(args.second_sequence, size, None, args.id_column)
    else:
        src = _FileSource(args.images)
        transform = image_transform("image", size, None, "idx")
    batches = [range(s, min(s + args.batch_size, len(src))) for s in range(0, len(src), args.batch_size)]
    report = BadRowReport()
    ids, codes = [], []
    from tqdm import tqdm

    from ..runtime import progress_disable
    bar = tqdm(total=len(src), desc="encode", unit="img", disable=progress_disable(None), file=sys.stderr)
    for batch, c in encode_batches(vq, src, batches, transform, size=size, num_workers=_workers(args) if args.tables else 0,
                                   dtype=_dtype(args), strict=args.strict, report=report):
        ids += batch["idx"]
        codes.append(c)
        bar.update(len(batch["idx"]) + len(batch["bad_rows"]))
    bar.close()
    if not codes:
        if report.count:
            print(report.summary(len(src)), file=sys.stderr)
        raise TuwenError(f"no image could be encoded ({report.count} bad of {len(src)}); {out} not written")
    arr = np.concatenate(codes)
    from ..hub import atomic_write, atomic_write_text

    if out.suffix == ".npy":
        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, arr.reshape(-1, h, w).astype(code_dtype(vq.config.n_embed)))
        atomic_write(out, write)
        atomic_write_text(_ids_path(out), "".join(clean_field(i) + "\n" for i in ids))
    else:
        atomic_write_text(out, "".join(f"{clean_field(i)}\t{' '.join(map(str, row))}\n" for i, row in zip(ids, arr)))
    if report.count:
        print(report.summary(len(src)), file=sys.stderr)
    print(f"encoded {len(arr)} image(s) → {out} ({h}×{w} codes each)")
    return 0


def _ids_path(npy: Path) -> Path:
    return npy.with_name(npy.stem + ".ids.txt")


def _parse_grid(s: str | None):
    if not s:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×,]\s*(\d+))?\s*", s)
    if not m:
        raise TuwenError(f"--grid {s!r}: expected HxW, e.g. 16x16")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def _read_codes(path: Path, limit: int | None):
    """→ (list of ids or None, codes array [n, h, w] or [n, L], grid or None)."""
    import numpy as np

    if path.is_dir():
        from ..data.codes import CodeShards

        ds = CodeShards(path)
        n = len(ds) if limit is None else min(limit, len(ds))
        ids = [ds.text(i)[0] for i in range(n)]
        arr = np.stack([ds.codes(i) for i in range(n)]) if n else np.zeros((0, ds.seq_len), np.int64)
        return ids, arr, ds.grid
    if not path.exists():
        raise TuwenError(f"--codes {path}: no such file or folder")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise TuwenError(f"--codes {path}: not a readable .npy file ({e})") from None
        if arr.ndim not in (2, 3):
            raise TuwenError(f"--codes {path}: expected codes [n, h, w] or [n, h*w], got shape {arr.shape}")
        ids = None
        idp = _ids_path(path)
        if idp.exists():
            ids = idp.read_text(encoding="utf-8").splitlines()
            if len(ids) != len(arr):
                ids = None
        if limit is not None:
            arr, ids = arr[:limit], (ids[:limit] if ids else None)
        return ids, arr, None
    ids, rows = [], []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            idx, _, codes = line.rpartition("\t")
            try:
                rows.append([int(c) for c in re.split(r"[ ,]+", codes.strip())])
            except ValueError:
                raise TuwenError(f"{path}:{ln}: expected 'id<TAB>code code …' with integer codes") from None
            if rows and len(rows[-1]) != len(rows[0]):
                raise TuwenError(f"{path}:{ln}: {len(rows[-1])} codes, but line 1 has {len(rows[0])}")
            ids.append(idx or str(len(ids)))
            if limit is not None and len(rows) >= limit:
                break
    return ids, np.asarray(rows, dtype=np.int64).reshape(len(rows), -1), None


def _safe_name(s: str) -> str:
    s = re.sub(r"[^\w.\-]+", "_", s).strip("._") or "image"
    return s[:100]


def cmd_decode(args) -> int:
    from ..data.images import to_pil
    from ..hub import atomic_write

    ids, arr, grid = _read_codes(Path(args.codes), args.limit)
    grid = _parse_grid(args.grid) or grid
    vq = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    seen: dict[str, int] = {}
    for i in range(len(arr)):
        base = _safe_name(ids[i]) if ids else f"{i:06d}"
        base = re.sub(r"\.(png|jpe?g|webp|gif|bmp|tiff?)$", "", base, flags=re.I)
        if base in seen:
            seen[base] += 1
            base = f"{base}_{seen[base]}"
        else:
            seen[base] = 0
        names.append(base + ".png")
    for s in range(0, len(arr), args.batch_size):
        imgs = to_pil(vq.decode(arr[s:s + args.batch_size], grid=grid, dtype=_dtype(args)).cpu())
        for name, img in zip(names[s:s + args.batch_size], imgs):
            atomic_write(out / name, lambda t, img=img: img.save(t, format="PNG"))
    print(f"decoded {len(arr)} image(s) → {out}")
    return 0


def cmd_tokenize(args) -> int:
    from ..data.codes import file_signature, tokenize_source

    if args.shard_size < 1:
        raise TuwenError("--shard_size must be ≥ 1")
    from ..data.formats import is_self_describing

    if not args.input_schema and not all(is_self_describing(t) for t in args.tables.split(",") if t.strip()):
        raise TuwenError("--input_schema is required for TSV input (e.g. idx:str:1,text:str:1,imgbase64:str:1)")
    vq = _load(args)
    src = _source(args, args.first_sequence)
    tables = [t for t in args.tables.split(",") if t.strip()]
    source_info = {"tables": [str(Path(t).expanduser().resolve()) for t in tables],
                   "input_schema": args.input_schema, "first_sequence": args.first_sequence,
                   "second_sequence": args.second_sequence, "id_column": args.id_column,
                   "skip_first_line": bool(args.skip_first_line)}
    fp_extra = {"source": source_info, "files": [file_signature(t) for t in tables],
                "model": _model_signature(args.model)}
    meta = tokenize_source(
        vq, src, args.out, image_col=args.second_sequence, text_col=args.first_sequence, id_col=args.id_column,
        image_size=args.image_size, batch_size=args.batch_size, shard_size=args.shard_size,
        num_workers=_workers(args), strict=args.strict, dtype=_dtype(args), fingerprint_extra=fp_extra,
        meta_extra={"source": source_info, "model": str(Path(args.model).expanduser().resolve()),
                    "model_config": vq.config.to_dict()})
    if meta is not None:  # rank 0
        report = meta.pop("_report")
        if report.count:
            print(report.summary(meta["rows_in"]), file=sys.stderr)
        h, w = meta["grid"]
        print(f"tokenized {meta['count']} of {meta['rows_in']} row(s) into {meta['num_shards']} shard(s) of "
              f"{h}×{w} codes → {args.out}")
    return 0
