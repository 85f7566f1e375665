"""``tuwen recipe TRAIN [VAL]``: the from-scratch plan for your own captioned images — presets picked from the data
(image size, row count, caption length), the commands of every stage, their steps, and the wall time each is
expected to take on this machine (measured by a short timing probe of each model on random inputs).

    tuwen recipe runs/stamps/64/train.tsv runs/stamps/64/val.tsv --out runs/recipe [--script runs/recipe.sh]

Stages: (1) the VQGAN image tokenizer (``tuwen vq train``), (2) pre-tokenizing the images (``tuwen vq tokenize``),
(3) the text→image GPT on the codes, (4) the captioner, (5) checks: generated images for the training prompts
and their self-retrieval (``tuwen evaluate-images --retrieval``), reconstructions of the validation images.
Nothing runs but the probe; ``--script`` writes the commands as a shell script.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time

SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"


@dataclasses.dataclass
class Plan:
    size: int
    rows: int
    text_len: int
    vq_arch: dict
    vq_loss: dict
    vq_batch: int
    vq_steps: int
    vq_lr: float
    gpt: dict                 # n_layer n_head n_embd dropout
    gpt_batch: int
    gpt_steps: int
    gpt_lr: float
    gpt_wd: float
    cfg_drop_prob: float
    cap: dict                 # vit_preset n_layer n_head n_embd dropout
    cap_batch: int
    cap_steps: int
    cap_lr: float
    notes: list[str] = dataclasses.field(default_factory=list)
    tokenizer_rows: int = 0   # caption-free images added to the VQGAN stage (--tokenizer_images)
    train_repeats: int = 1    # the training table listed this many times in the VQGAN stage (keeps it ≥ half)
    vq_augment: str = "none"  # tuwen vq train --augment

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _epochs_to_steps(rows: int, batch: int, epochs: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, math.ceil(epochs * math.ceil(rows / batch)))))


def choose_plan(rows: int, image_side: int, caption_chars: int, cuda: bool = False,
                lpips: tuple[str, str] | None = None, tokenizer_rows: int = 0) -> Plan:
    """Presets from the data: ``rows`` training images, their typical (median) shorter side in pixels, the longest
    caption in characters; ``cuda``: a GPU trains it (128 px allowed); ``lpips``: (lpips_path, vgg_path);
    ``tokenizer_rows``: caption-free images added to the VQGAN stage only."""
    notes = []
    if image_side < 48:
        size = 32
    elif image_side < 96 or not cuda:
        size = 64
        if image_side >= 96:
            notes.append(f"images are {image_side} px but training runs on a CPU: 64 px (128 px with a GPU)")
    else:
        size = 128
    # (1) tokenizer for real images: f8, low-dimensional l2-normalised codes with a larger codebook (cosine
    # matching keeps all codes in use and colours apart), dead codes restarted, extra L2 for flat colours, a
    # light PatchGAN only after the warm-up
    big = rows >= 20000
    # norm_groups=1: taming's GroupNorm(32) on the tiny preset's 32-channel levels is an instance norm, which
    # erases the per-channel means and scales that carry colour (reds and greens came back brown and black); one
    # group normalises over all channels and keeps their ratios (stamps, 600 steps: test PSNR 18.6 → 19.5 dB,
    # self-retrieval 86.7 → 92.8 %, saturation 30.7 → 45.4 against the originals' 60.5)
    vq_arch = {"n_embed": 2048 if big else 1024, "embed_dim": 8, "l2_norm": True, "norm_groups": 1}
    if size == 128:
        vq_arch["ch_mult"] = [1, 1, 2, 2, 4]   # f16 at 128 px → 8×8 codes
        vq_arch["attn_resolutions"] = [8]
    vq_batch = 16 if size <= 64 else 8
    # at least 3 000 steps under 2 000 rows: on the 600-image stamps set 1 520 steps (40 epochs) gave 91.6 % test
    # self-retrieval and 19.1 dB, 3 000 steps 94.0 % and 19.7 dB (the tokenizer is the recipe's weakest stage)
    vq_steps = _epochs_to_steps(rows, vq_batch, 40, 3000 if rows < 2000 else 1500, 30000)
    # caption-free images for the tokenizer (--tokenizer_images): the training table is listed again until it is
    # about half of what the VQGAN sees. Under 2 000 rows 4 000 steps whatever their number — they add hues and
    # shapes, not passes (on the stamps set 1 200 Open Clip Art drawings beside the 600 stamps listed twice, and
    # 4 000 drawings beside them listed 7 times, both reached 98.8 % test self-retrieval in 4 000 steps; README
    # "Training on your own images"); larger sets ~26 passes over the mixture
    repeats = max(1, min(8, round(tokenizer_rows / rows))) if tokenizer_rows else 1
    if tokenizer_rows:
        vq_steps = max(vq_steps, 4000 if rows < 2000 else _epochs_to_steps(repeats * rows + tokenizer_rows,
                                                                           vq_batch, 26, 1500, 30000))
    # hue rotation of half the tokenizer's training images (caption-free, so it keeps every caption true): the
    # stamps' test split has hues its training images lack (magenta and purple flowers came back beige and pale
    # blue, a yellow-green ball olive); with it the recipe's tokenizer + 1 200 drawings reached 98.8 % test
    # self-retrieval (pixel) against 96.4 % without, and the stamps alone 96.4 % against 95.2 % (README "Training
    # on your own images")
    vq_augment = "hue"
    if rows < 2000 and not tokenizer_rows:
        notes.append("a small set: caption-free images for the tokenizer (--tokenizer_images TABLE_OR_FOLDER, e.g. "
                     "scripts/make_clipart_images.py) teach it shapes and hues your images lack (stamps: test "
                     "self-retrieval 96.4 % → 98.8 % with 1 200 drawings)")
    vq_loss = {"l2_weight": 1.0, "dead_code_steps": 50, "disc_weight": 0.1,
               "disc_start": int(vq_steps * 0.6), "disc_num_layers": 2}
    if lpips:
        vq_loss.update({"lpips_path": lpips[0], "vgg_path": lpips[1], "perceptual_weight": 0.5})
    else:
        vq_loss["perceptual_weight"] = 0.0
        notes.append("no perceptual loss: give --lpips_path and --vgg_path (local LPIPS/VGG16 weights) to add one; "
                     "tuwen downloads nothing")
    # (3) text→image GPT: small and regularised on small sets (dropout, weight decay), classifier-free guidance
    if rows < 2000:
        # 150 epochs: on the 600-image stamps set 42 epochs left 0.56 bits/code on the training codes and 29 % of
        # the generated images retrieving their own reference; a small set needs its codes nearly memorised
        gpt = {"n_layer": 4, "n_head": 4, "n_embd": 256, "dropout": 0.1}
        gpt_wd, epochs = 0.1, 150
    elif rows < 20000:
        gpt = {"n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.1}
        gpt_wd, epochs = 0.05, 30
    else:
        gpt = {"n_layer": 8, "n_head": 8, "n_embd": 512, "dropout": 0.0}
        gpt_wd, epochs = 0.01, 10
    gpt_batch = 32
    gpt_steps = _epochs_to_steps(rows, gpt_batch, epochs, 1000, 100000)
    text_len = min(64, max(8, 8 * math.ceil((caption_chars + 2) / 8)))
    # (4) captioner: a GPT over the caption and its end token (the default loss). Under 2 000 rows its prefix is
    # the frozen VQGAN's codes (measured on the 600-image stamps set: 79.5 % of training images named exactly
    # after 600 steps, against 0.5 % for a ViT-small trained from scratch at a similar CPU time); more rows: ViT
    cap = {"prefix": "vqgan" if rows < 2000 else "vit", "vit_preset": "small", "n_layer": 4, "n_head": 4,
           "n_embd": 128 if rows < 2000 else 256, "dropout": 0.1 if rows < 2000 else 0.0}
    cap_batch = 32
    cap_steps = _epochs_to_steps(rows, cap_batch, 40 if rows < 2000 else 15, 800, 60000)
    return Plan(size=size, rows=rows, text_len=text_len, vq_arch=vq_arch, vq_loss=vq_loss, vq_batch=vq_batch,
                vq_steps=vq_steps, vq_lr=4e-4, gpt=gpt, gpt_batch=gpt_batch, gpt_steps=gpt_steps, gpt_lr=1e-3,
                gpt_wd=gpt_wd, cfg_drop_prob=0.1, cap=cap, cap_batch=cap_batch, cap_steps=cap_steps, cap_lr=1e-3,
                notes=notes, tokenizer_rows=tokenizer_rows, train_repeats=repeats, vq_augment=vq_augment)


# ----------------------------------------------------------------------------------------------- the data

def scan_data(train: str, schema: str, image_col: str, text_col: str, sample: int = 64) -> dict:
    """Row count, median shorter image side (of up to ``sample`` rows) and caption lengths (98th percentile,
    longest, mean) of a training table."""
    from ..data.images import open_image
    from ..data.tables import BadRow, open_source
    from ..errors import TuwenError
    from ..metrics.captions import split_references

    src = open_source(train, schema, image_col=image_col, text_col=text_col)
    n = len(src)
    if n == 0:
        raise TuwenError(f"{train}: no rows")
    sides, chars = [], []
    step = max(1, n // sample)
    for i in range(0, n, step):
        r = src.row(i)
        if isinstance(r, BadRow):
            continue
        try:
            im = open_image(r[image_col])
            sides.append(min(im.size))
        except Exception:
            continue
    if not sides:
        raise TuwenError(f"{train}: none of the sampled rows has a readable image in column {image_col!r}")
    # the longest caption decides text_len: scan all texts (cheap: no image decoding)
    first_refs: dict[str, int] = {}  # first reference → rows
    for i in range(n):
        r = src.row(i)
        if not isinstance(r, BadRow):
            refs = split_references(r.get(text_col, ""))
            chars += [len(t) for t in refs]
            if refs:
                key = refs[0].strip()
                first_refs[key] = first_refs.get(key, 0) + 1
    sides.sort()
    chars.sort()
    # text_len follows the 98th percentile: a few very long captions are cut rather than lengthening every row
    p98 = chars[min(len(chars) - 1, int(0.98 * len(chars)))] if chars else 16
    shared = sum(c for c in first_refs.values() if c > 1)
    return {"rows": n, "image_side": sides[len(sides) // 2], "caption_chars": p98,
            "distinct_captions": len(first_refs), "rows_sharing_a_caption": shared,
            "max_caption_chars": chars[-1] if chars else 16, "mean_caption_chars": sum(chars) / max(1, len(chars))}


def count_images(tables: str, schema: str, image_col: str) -> int:
    """Rows of the caption-free image tables/folders of ``--tokenizer_images`` (an error names an unreadable one)."""
    from ..data.tables import open_source
    from ..errors import TuwenError

    n = len(open_source(tables, schema, image_col=image_col, flag="--tokenizer_images", require_text=False))
    if n == 0:
        raise TuwenError(f"--tokenizer_images {tables}: no rows")
    return n


# ----------------------------------------------------------------------------------------------- timing probe

def _time_steps(step, n: int = 3) -> float:
    step()
    step()  # warm-up (allocations, kernels)
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def probe(plan: Plan, device: str = "auto") -> dict[str, float]:
    """Seconds per optimizer step of each trained model on random inputs, on this machine."""
    import torch

    from ..runtime import configure_threads, default_workers, resolve_device

    dev = resolve_device(device)
    threads = torch.get_num_threads()
    configure_threads(dev, default_workers(dev))  # as the trainer will run
    try:
        return _probe(plan, dev)
    finally:
        torch.set_num_threads(threads)


def _probe(plan: Plan, dev) -> dict[str, float]:
    import torch

    from ..models.captioner import CaptionerConfig
    from ..models.gpt import GPT, GPTConfig
    from ..models.vit import ViTConfig, VisionTransformer
    from ..models.vqgan import VQGAN, VQGANConfig
    from ..training.tasks.captioning import CaptionTrainModule
    from ..training.tasks.vqgan import VQGANTrainModule, VQLossConfig

    torch.manual_seed(0)
    out = {}

    def train_step(module, batch_fn):
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        module.to(dev).train()

        def step():
            loss = module(batch_fn(), step=0)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return step

    vq_cfg = VQGANConfig.preset("tiny", resolution=plan.size, **plan.vq_arch)
    loss = {k: v for k, v in plan.vq_loss.items() if k not in ("lpips_path", "vgg_path")}
    loss["disc_start"] = 0  # time the steps with the discriminator on (the slower part of the run)
    vq = VQGANTrainModule(VQGAN(vq_cfg), VQLossConfig(**loss))
    x = torch.rand(plan.vq_batch, 3, plan.size, plan.size, device=dev) * 2 - 1
    out["vq"] = _time_steps(train_step(vq, lambda: {"image": x}))
    h, w = vq_cfg.grid_size(plan.size)
    img_len = h * w
    gcfg = GPTConfig(vocab_size=vq_cfg.n_embed + 8000, block_size=plan.text_len + img_len, n_out=vq_cfg.n_embed,
                     n_layer=plan.gpt["n_layer"], n_head=plan.gpt["n_head"], n_embd=plan.gpt["n_embd"])
    gpt = GPT(gcfg)

    class _G(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = gpt

        def forward(self, batch, step=0):
            logits = self.gpt(batch, logits_start=plan.text_len - 1)
            return {"loss": logits.float().mean()}

    ids = torch.randint(0, gcfg.vocab_size, (plan.gpt_batch, gcfg.block_size - 1), device=dev)
    out["t2i"] = _time_steps(train_step(_G(), lambda: ids))
    sizes = dict(text_len=plan.text_len, text_vocab_size=8000, n_layer=plan.cap["n_layer"],
                 n_head=plan.cap["n_head"], n_embd=plan.cap["n_embd"])
    if plan.cap.get("prefix") == "vqgan":   # the frozen VQGAN of stage 1 encodes the images
        ccfg = CaptionerConfig.build(prefix_encoder="vqgan", img_len=img_len, image_size=plan.size,
                                     img_vocab_size=vq_cfg.n_embed, vit=None, **sizes)
        cm = CaptionTrainModule(ccfg, GPT(ccfg.gpt), None, VQGAN(vq_cfg).eval())
    else:
        v = ViTConfig.preset(plan.cap["vit_preset"], image_size=plan.size)
        ccfg = CaptionerConfig.build(prefix_encoder="vit", img_len=v.num_patches, image_size=plan.size,
                                     vit=v.to_dict(), vit_proj=plan.cap["n_embd"] != v.width, freeze_vit=False,
                                     **sizes)
        cm = CaptionTrainModule(ccfg, GPT(ccfg.gpt), VisionTransformer(v))
    pix = torch.randint(0, 256, (plan.cap_batch, plan.size, plan.size, 3), dtype=torch.uint8, device=dev)
    tid = torch.randint(1, 8000, (plan.cap_batch, plan.text_len), device=dev)
    out["cap"] = _time_steps(train_step(cm, lambda: {"pixels": pix, "text_ids": tid}))
    return out


# ----------------------------------------------------------------------------------------------- commands

def _udp(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def commands(plan: Plan, train: str, val: str | None, out: str,
             tokenizer_images: str | None = None) -> list[tuple[str, list[str]]]:
    """(what it produces, argv) for every stage; ``tokenizer_images`` (comma list) joins the VQGAN stage only."""
    o = out.rstrip("/")
    tables = f"{train},{val}" if val else train
    vq_tables = tables
    if tokenizer_images:  # EasyNLP's rule: the last table validates (the training table when there is no val)
        vq_tables = ",".join([train] * plan.train_repeats + [tokenizer_images, val or train])
    arch = [f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in plan.vq_arch.items()]
    loss = []
    for k, v in plan.vq_loss.items():
        loss += [f"--{k}", str(v)]
    every = lambda steps: str(max(50, steps // 10))  # noqa: E731
    cmds = [
        (f"{o}/vqgan: the image tokenizer (best PSNR on validation"
         + (f"; the training table {plan.train_repeats}× + {plan.tokenizer_rows} caption-free images"
            if tokenizer_images else "") + ")",
         ["tuwen", "vq", "train", "--tables", vq_tables, "--input_schema", SCHEMA, "--second_sequence", "imgbase64",
          "--checkpoint_dir", f"{o}/vqgan", "--preset", "tiny", "--size", str(plan.size), "--arch", *arch,
          "--micro_batch_size", str(plan.vq_batch), "--learning_rate", str(plan.vq_lr), "--lr_schedule", "cosine",
          "--warmup_proportion", "0.02", "--max_steps", str(plan.vq_steps),
          *(["--augment", plan.vq_augment] if plan.vq_augment != "none" else []), *loss,
          "--save_checkpoint_steps", every(plan.vq_steps), "--logging_steps", "50"]),
    ]
    splits = [("train", train)] + ([("val", val)] if val else [])
    for name, t in splits:
        cmds.append((f"{o}/codes_{name}: the {name} images as codes",
                     ["tuwen", "vq", "tokenize", "--model", f"{o}/vqgan", "--tables", t, "--input_schema", SCHEMA,
                      "--out", f"{o}/codes_{name}"]))
    code_tables = f"{o}/codes_train" + (f",{o}/codes_val" if val else "")
    g = plan.gpt
    cmds.append((f"{o}/t2i: the text→image model (generation defaults top_k 16, guidance 2.0 saved with it)",
                 ["tuwen", "--mode=train", "--app_name=text2image_generation", f"--tables={code_tables}",
                  f"--checkpoint_dir={o}/t2i", f"--learning_rate={plan.gpt_lr}", f"--weight_decay={plan.gpt_wd}",
                  "--lr_schedule=cosine", "--warmup_proportion=0.05", f"--max_steps={plan.gpt_steps}",
                  f"--micro_batch_size={plan.gpt_batch}", f"--save_checkpoint_steps={every(plan.gpt_steps)}",
                  "--logging_steps=50", "--user_defined_parameters=" + _udp({
                      "vqgan_ckpt_path": f"{o}/vqgan", "size": plan.size, "text_len": plan.text_len,
                      "n_layer": g["n_layer"], "n_head": g["n_head"], "n_embd": g["n_embd"],
                      "dropout": g["dropout"], "cfg_drop_prob": plan.cfg_drop_prob, "do_lower_case": "false"})]))
    c = plan.cap
    prefix = ({"enable_vqgan": "true", "vqgan_ckpt_path": f"{o}/vqgan"} if c.get("prefix") == "vqgan"
              else {"vit_preset": c["vit_preset"]})
    cmds.append((f"{o}/cap: the captioner (loss over the caption and its end token"
                 f"{'; the VQGAN codes as its image prefix' if c.get('prefix') == 'vqgan' else ''})",
                 ["tuwen", "--mode=train", "--app_name=image2text_generation", f"--tables={tables}",
                  f"--input_schema={SCHEMA}", "--first_sequence=imgbase64", "--second_sequence=text",
                  f"--checkpoint_dir={o}/cap", f"--learning_rate={plan.cap_lr}", "--weight_decay=0.05",
                  "--lr_schedule=cosine", f"--max_steps={plan.cap_steps}", f"--micro_batch_size={plan.cap_batch}",
                  f"--save_checkpoint_steps={every(plan.cap_steps)}", "--logging_steps=50",
                  "--user_defined_parameters=" + _udp({
                      "img_size": plan.size, "text_len": plan.text_len, **prefix, "n_layer": c["n_layer"],
                      "n_head": c["n_head"], "n_embd": c["n_embd"], "dropout": c["dropout"],
                      "do_lower_case": "false"})]))
    # the checks on the training data use the last step: the folders above hold the best-by-validation step,
    # which on a small set can be an early one (the stamps captioner: step 150 of 300)
    for name in ("t2i", "cap"):
        cmds.append((f"{o}/{name}_last: the last training step as a model folder",
                     ["tuwen", "export", f"{o}/{name}", f"{o}/{name}_last"]))
    cmds.append((f"{o}/gen_train.tsv + {o}/gen_train/: one image per training prompt",
                 ["tuwen", "--mode=predict", "--app_name=text2image_generation", f"--tables={train}",
                  f"--input_schema={SCHEMA}", "--first_sequence=text", f"--outputs={o}/gen_train.tsv",
                  "--output_schema=idx,text,gen_imgbase64", f"--checkpoint_dir={o}/t2i_last", "--micro_batch_size=32",
                  f"--output_dir={o}/gen_train"]))
    cmds.append(("self-retrieval of the generated images among the training images (pixel + random features)",
                 ["tuwen", "evaluate-images", "--generated", f"{o}/gen_train.tsv", "--reference", train,
                  "--retrieval", "--output", f"{o}/retrieval_train.json"]))
    cmds.append(("captioner: how many training images it names exactly (exact_match)",
                 ["tuwen", "--mode=evaluate", "--app_name=image2text_generation", f"--tables={train}",
                  f"--input_schema={SCHEMA}", "--first_sequence=imgbase64", "--second_sequence=text",
                  f"--checkpoint_dir={o}/cap_last", f"--outputs={o}/cap_eval_train.json"]))
    if val:
        cmds.append(("captioner BLEU-4 / CIDEr-D on the validation table",
                     ["tuwen", "--mode=evaluate", "--app_name=image2text_generation", f"--tables={val}",
                      f"--input_schema={SCHEMA}", "--first_sequence=imgbase64", "--second_sequence=text",
                      f"--checkpoint_dir={o}/cap", f"--outputs={o}/cap_eval.json"]))
    return cmds


def _fmt_time(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def add_parser(sub) -> None:
    p = sub.add_parser("recipe", help="plan the from-scratch training on your own captioned images",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train", help="training table (EasyNLP TSV idx, text, imgbase64) or image folder")
    p.add_argument("val", nargs="?", default=None, help="validation table (optional)")
    p.add_argument("--out", default="runs/recipe", help="where the stages write (default runs/recipe)")
    p.add_argument("--input_schema", default=SCHEMA)
    p.add_argument("--first_sequence", default="text", help="text column")
    p.add_argument("--second_sequence", default="imgbase64", help="image column")
    p.add_argument("--device", default="auto", help="the device the timing probe (and the plan) is for")
    p.add_argument("--lpips_path", default=None, help="local LPIPS lin weights (vgg.pth): adds a perceptual loss")
    p.add_argument("--vgg_path", default=None, help="local torchvision VGG16 weights for LPIPS")
    p.add_argument("--tokenizer_images", default=None,
                   help="caption-free images for the image tokenizer only (comma list of tables in --input_schema or "
                        "image folders), e.g. scripts/make_clipart_images.py's; the training table is repeated to "
                        "stay about half of what the VQGAN sees")
    p.add_argument("--no_probe", action="store_true", help="skip the timing probe (no time estimates)")
    p.add_argument("--script", default=None, help="also write the commands as a shell script")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import TuwenError
    from ..fileio import atomic_write_text
    from ..runtime import resolve_device

    if bool(args.lpips_path) != bool(args.vgg_path):
        raise TuwenError("--lpips_path and --vgg_path go together (the perceptual loss needs both)")
    dev = resolve_device(args.device)
    info = scan_data(args.train, args.input_schema, args.second_sequence, args.first_sequence)
    if args.tokenizer_images:
        info["tokenizer_rows"] = count_images(args.tokenizer_images, args.input_schema, args.second_sequence)
    plan = choose_plan(info["rows"], info["image_side"], info["caption_chars"], cuda=dev.type == "cuda",
                       lpips=(args.lpips_path, args.vgg_path) if args.lpips_path else None,
                       tokenizer_rows=info.get("tokenizer_rows", 0))
    timing = None if args.no_probe else probe(plan, args.device)
    cmds = commands(plan, args.train, args.val, args.out, args.tokenizer_images)
    est = None
    if timing:
        est = {"vq": timing["vq"] * plan.vq_steps, "t2i": timing["t2i"] * plan.gpt_steps,
               "cap": timing["cap"] * plan.cap_steps}
    if args.json:
        print(json.dumps({"data": info, "plan": plan.to_dict(), "seconds_per_step": timing,
                          "expected_seconds": est, "commands": [c for _, c in cmds]}, ensure_ascii=False, indent=2))
    else:
        say = print
        cap_prefix = "VQGAN codes" if plan.cap.get("prefix") == "vqgan" else f"ViT-{plan.cap['vit_preset']}"
        say(f"data: {info['rows']} training rows, images ~{info['image_side']} px, captions of "
            f"{info['mean_caption_chars']:.1f} characters on average, 98 % up to {info['caption_chars']} (longest "
            f"{info['max_caption_chars']}); device {dev}")
        say(f"plan: {plan.size} px; VQGAN f8 {plan.vq_arch['n_embed']} codes × {plan.vq_arch['embed_dim']}-d "
            f"l2-normalised, {plan.vq_steps} steps of {plan.vq_batch}; GPT {plan.gpt['n_layer']}×{plan.gpt['n_embd']} "
            f"dropout {plan.gpt['dropout']} wd {plan.gpt_wd} cfg_drop_prob {plan.cfg_drop_prob}, {plan.gpt_steps} "
            f"steps of {plan.gpt_batch}; captioner {cap_prefix} + GPT {plan.cap['n_layer']}×{plan.cap['n_embd']}, "
            f"{plan.cap_steps} steps of {plan.cap_batch}; text_len {plan.text_len}")
        for n in plan.notes:
            say(f"note: {n}")
        if info["rows_sharing_a_caption"]:
            say(f"note: {info['rows_sharing_a_caption']} of {info['rows']} training images share their caption with "
                f"another ({info['distinct_captions']} distinct captions): a prompt cannot say which of them it "
                f"means, so a generated image finds the very image its prompt came from (evaluate-images "
                f"--retrieval) at most {info['distinct_captions'] / info['rows']:.0%} of the time; --match text "
                f"counts any image with that caption")
        if est:
            total = sum(est.values())
            say(f"expected training time on this machine (timing probe): VQGAN {_fmt_time(est['vq'])} "
                f"({timing['vq']:.2f} s/step), text→image {_fmt_time(est['t2i'])} ({timing['t2i']:.2f} s/step), "
                f"captioner {_fmt_time(est['cap'])} ({timing['cap']:.2f} s/step); total {_fmt_time(total)} "
                f"(+ tokenizing, generation and evaluation; the captioner can run beside the VQGAN on a GPU)")
        say("")
        for i, (what, argv) in enumerate(cmds, 1):
            say(f"# {i}. {what}")
            say(" ".join(shlex.quote(a) for a in argv))
        say("\nSample grids: the text→image stage shows samples in TensorBoard (--tensorboard); any training "
            "checkpoint becomes a model folder with `tuwen export CHECKPOINT OUT`.")
    if args.script:
        body = "#!/usr/bin/env bash\n# written by `tuwen recipe` — " + " ".join(sys.argv[1:]) + "\nset -euo pipefail\n"
        body += "".join(f"\n# {what}\n{' '.join(shlex.quote(a) for a in argv)}\n" for what, argv in cmds)
        atomic_write_text(args.script, body)
        print(f"wrote {args.script}", file=sys.stderr)
    return 0
