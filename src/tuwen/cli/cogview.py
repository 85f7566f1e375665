"""CogView's command-line conventions for ``tuwen generate`` (``generate_samples.py`` / ``arguments.py``).

``--input-source FILE|interactive`` (one query per line; ``interactive`` prompts on stderr and reads stdin,
``stop`` or end of input ends, empty queries are refused with a message), ``--with-id`` (``id<TAB>text`` lines →
``OUT/id/0.png … OUT/id/concat.png``), ``--debug`` (one grid per query named ``<first 20 characters of the
text>-<mm-dd-HH-MM-SS>.png``), ``--batch-size`` = samples per query, ``--max-inference-batch-size`` = rows
per forward, ``--generation-task`` for CogView models (text2image, image2text, post-selection,
super-resolution). File lines are shared over ``torchrun`` ranks by ``line_no % world_size``.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Iterator

TASKS = ("text2image", "image2text", "post-selection", "super-resolution")
PROMPT = "\nPlease Input Query (stop to exit) >>> "


def add_flags(p: argparse.ArgumentParser) -> None:
    """CogView's flags on ``tuwen generate``."""
    g = p.add_argument_group("CogView conventions (also for tuwen models)")
    g.add_argument("--input-source", "--input_source", dest="input_source", default=None,
                   help="a file with one query per line, or 'interactive' (read queries from stdin; 'stop' ends)")
    g.add_argument("--with-id", "--with_id", dest="with_id", action="store_true",
                   help="file lines are 'id<TAB>text'; images go to OUT/id/0.png … and OUT/id/concat.png")
    g.add_argument("--debug", action="store_true",
                   help="one grid per query, named by the first 20 characters of the text and the date")
    g.add_argument("--batch-size", dest="num_images", type=int, default=argparse.SUPPRESS,
                   help="CogView: samples per query (same as -n)")
    g.add_argument("--max-inference-batch-size", "--max_inference_batch_size", dest="batch_size", type=int,
                   default=argparse.SUPPRESS, help="rows per forward pass (reduce it when out of memory)")
    g.add_argument("--output-path", "--output_path", dest="out", default=argparse.SUPPRESS, help="same as --out")
    g.add_argument("--generation-task", "--generation_task", dest="task", choices=TASKS, default=None,
                   help="CogView models: what to do with each query (default: the model's own task)")
    g.add_argument("--vqvae", default=None, help="CogView folders: vqvae_hard_biggerset_011.pt (default: found "
                                                 "where CogView keeps it, pretrained/vqvae/)")
    g.add_argument("--tokenizer", default=None, help="CogView folders: cog-pretrain.model")
    g.add_argument("--num-attention-heads", "--num_attention_heads", dest="n_head", type=int, default=None,
                   help="CogView folders: attention heads (default hidden size / 64)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="CogView models: weight dtype (default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--offload", action="store_true",
                   help="CogView models on a GPU smaller than the model: weights stay in CPU memory and each "
                   "transformer block visits the GPU only while it runs (slower; embeddings, head and KV cache "
                   "stay on the GPU)")


def is_cogview_model(path) -> bool:
    if not path:
        return False
    from ..convert.cogview import is_checkpoint_folder
    from ..hub import read_model_type, resolve_model_path

    try:
        p = resolve_model_path(path)
    except Exception:  # noqa: BLE001 - the normal loader reports it
        return False
    return read_model_type(p) == "cogview" or (is_checkpoint_folder(p) and read_model_type(p) is None)


def wants_cogview_path(a: argparse.Namespace) -> bool:
    return bool(getattr(a, "input_source", None) or getattr(a, "with_id", False) or getattr(a, "debug", False)
                or getattr(a, "task", None) or getattr(a, "offload", False)
                or is_cogview_model(getattr(a, "model", None)))


# ============================================================================================ queries

def iter_queries(a: argparse.Namespace, stdin=None) -> Iterator[tuple[int, str]]:
    """(line number, query) from ``--input-source``, the prompts on the command line, or stdin."""
    from ..errors import TuwenError
    from ..runtime import rank, world_size

    if a.input_source == "interactive":
        if a.with_id:
            raise TuwenError("--with-id is only used with file inputs (--input-source FILE)")
        stdin = stdin or sys.stdin
        n = 0
        while True:
            print(PROMPT, end="", file=sys.stderr, flush=True)
            line = stdin.readline()
            if not line:
                return
            q = line.rstrip("\r\n")
            if q == "stop":
                return
            if not q.strip():
                print("Query should not be empty!", file=sys.stderr)
                continue
            yield n, q
            n += 1
    elif a.input_source:
        from ..errors import read_text_lines

        lines = read_text_lines(a.input_source, f"--input-source {a.input_source}",
                                "file (one query per line, or 'interactive')")
        r, w = rank(), world_size()
        for i, line in enumerate(lines):
            if i % w == r and line.strip():
                yield i, line.strip()
    else:
        yield from enumerate(a.prompts)


def split_id(a, line_no: int, q: str) -> tuple[str, str]:
    from ..errors import TuwenError

    if not a.with_id:
        return str(line_no), q
    if "\t" not in q:
        raise TuwenError(f"--input-source {a.input_source}: line {line_no + 1}: --with-id needs 'id<TAB>text'")
    ident, text = q.split("\t", 1)
    if not ident or "/" in ident or ident in (".", ".."):
        raise TuwenError(f"--input-source {a.input_source}: line {line_no + 1}: bad id {ident!r}")
    return ident, text


def debug_name(text: str) -> str:
    """CogView's ``--debug`` file name: the first 20 characters of the text (no '/') and the date."""
    return f"{text.replace('/', '')[:20]}-{datetime.now().strftime('%m-%d-%H-%M-%S')}.png"


def save_group(a, out: Path, ident: str, text: str, images: list) -> list[Path]:
    """``--debug``: one grid named by text and date; otherwise OUT/id/{0..n-1}.png + concat.png."""
    from ..data.images import make_grid

    out.mkdir(parents=True, exist_ok=True)
    if a.debug:
        dest = out / debug_name(text)
        make_grid(images).save(dest)
        return [dest]
    d = out / ident
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, im in enumerate(images):
        im.save(d / f"{k}.png")
        paths.append(d / f"{k}.png")
    make_grid(images, cols=len(images)).save(d / "concat.png")
    return paths + [d / "concat.png"]


# ============================================================================================ run

def run(a: argparse.Namespace) -> int:
    import torch

    from ..errors import TuwenError
    from ..runtime import init_distributed

    if a.with_id and a.debug:
        raise TuwenError("--with-id conflicts with --debug (CogView's rule): give one of them")
    if a.input_source and a.prompts:
        raise TuwenError("give prompts on the command line or --input-source, not both")
    if not a.input_source and not a.prompts:
        raise TuwenError("tuwen generate: give a prompt, --input-source FILE or --input-source interactive")
    if a.num_images < 1 or (a.batch_size is not None and a.batch_size < 1):
        raise TuwenError("--batch-size/-n and --max-inference-batch-size must be ≥ 1")
    device = init_distributed(a.device)
    out = Path(a.out)
    kw = {k: getattr(a, k) for k in ("top_k", "top_p", "temperature") if getattr(a, k) is not None}
    mbz = a.batch_size or 12
    if is_cogview_model(a.model):
        from ..models.cogview import CogView

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        model = CogView.from_pretrained(a.model, vqvae=a.vqvae, tokenizer=a.tokenizer, n_head=a.n_head, dtype=dtype,
                                        device=device if a.offload else None, offload=a.offload)
        if not a.offload:
            model.gpt.to(device)
            if model.vqvae is not None:
                model.vqvae.to(device)
        task = a.task or model.config.task
        return _run_cogview(a, model, task, out, kw, mbz)
    if a.task not in (None, "text2image"):
        raise TuwenError(f"--generation-task {a.task}: only CogView models do this; this model does text2image")
    if a.offload:
        raise TuwenError("--offload is for CogView models (--model COGVIEW_DIR); tuwen's own text→image models fit "
                         "on the GPU: drop --offload")
    from ..models.text2image import TextToImage

    model_path = a.model
    if model_path is None:
        from ..pipelines import demo_model_path
        model_path = demo_model_path()
    model = TextToImage.from_pretrained(model_path).to(device)
    if a.guidance_scale is not None:
        kw["guidance_scale"] = a.guidance_scale
    n = 0
    for line_no, q in iter_queries(a):
        ident, text = split_id(a, line_no, q)
        images = model.generate([text], num_images_per_prompt=a.num_images, seed=a.seed, batch_size=mbz, **kw)[0]
        paths = save_group(a, out, ident, text, images)
        print(f"{text}\t{paths[-1]}")
        n += 1
    print(f"wrote images for {n} quer{'y' if n == 1 else 'ies'} to {out}/", file=sys.stderr)
    return 0


def _run_cogview(a, model, task: str, out: Path, kw: dict, mbz: int) -> int:
    from ..errors import TuwenError
    from ..runtime import rank, world_size

    if task == "post-selection" and a.input_source == "interactive":
        raise TuwenError("post-selection only takes file inputs (--input-source FILE), as in CogView")
    scores_file = None
    if task == "post-selection":
        out.mkdir(parents=True, exist_ok=True)
        scores_file = out / ("scores.txt" if world_size() == 1 else f"scores_rank_{rank()}.txt")
        scores_file.write_text("", encoding="utf-8")
    n = 0
    for line_no, q in iter_queries(a):
        ident, text = split_id(a, line_no, q)
        try:
            if task == "text2image":
                images = model.text2image(text, a.num_images, seed=a.seed, max_inference_batch_size=mbz, **kw)
                paths = save_group(a, out, ident, text, images)
                print(f"{text}\t{paths[-1]}")
            elif task == "image2text":
                caps = model.image2text(text, a.num_images, seed=a.seed, max_inference_batch_size=mbz, **kw)
                print(f"{text}\t" + "\t".join(caps), flush=True)
            elif task == "post-selection":
                parts = text.split("\t")
                if len(parts) < 2:
                    raise TuwenError(f"line {line_no + 1}: post-selection lines are text<TAB>img1<TAB>img2…")
                scores = model.post_selection_scores(parts[0], parts[1:], max_inference_batch_size=mbz)
                with open(scores_file, "a", encoding="utf-8") as f:  # CogView: the line, then its scores
                    f.write(text + "\n" + "\t".join(str(s) for s in scores) + "\n")
            else:  # super-resolution: text<TAB>image path
                parts = text.split("\t")
                if len(parts) != 2:
                    raise TuwenError(f"line {line_no + 1}: super-resolution queries are text<TAB>image_path")
                codes = model.encode_image(parts[1])
                big = model.super_resolution(parts[0], codes, seed=a.seed, **kw)
                img = model.vqvae.decode_to_pil(big.view(1, 64, 64))[0]
                out.mkdir(parents=True, exist_ok=True)
                dest = out / debug_name(parts[0])
                img.save(dest)
                print(f"{parts[0]}\t{dest}")
        except (TuwenError, FileNotFoundError) as e:
            if a.input_source == "interactive":  # CogView prints the error and asks again
                print(f"error: {e}", file=sys.stderr)
                continue
            raise
        n += 1
    if scores_file is not None:
        print(f"wrote scores for {n} line(s) to {scores_file}", file=sys.stderr)
    return 0
