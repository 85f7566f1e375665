"""``tuwen convert SRC DST``: rewrite a foreign checkpoint folder (EasyNLP ARTIST / mingpt_i2t, taming VQGAN)
in tuwen's format (config.json + model.safetensors + tokenizer files + component sub-folders)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert an EasyNLP / taming checkpoint to a tuwen model folder",
        description="Detects the layout of SRC: EasyNLP text2image (config.json model_type artist + "
                    "pytorch_model.bin + vocab.txt), EasyNLP image2text (model_type mingpt_i2t/artist_i2t), a "
                    "taming VQGAN .ckpt/.bin, and writes DST in tuwen's format.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--vqgan_config", default=None, help="taming yaml/json for the VQGAN (default: inferred)")
    p.add_argument("--vqgan_path", default=None, help="separate VQGAN weights when SRC has none")
    p.add_argument("--img_len", type=int, default=None, help="EasyNLP: image positions (default: from the VQGAN)")
    p.add_argument("--size", type=int, default=None, help="EasyNLP: image size in pixels (default 256)")
    p.set_defaults(func=run)


def run(a) -> int:
    import json
    from pathlib import Path

    from ..errors import TuwenError
    from ..hub import resolve_model_path

    src = resolve_model_path(a.src, what="convert: SRC")
    mt = None
    if src.is_dir() and (src / "config.json").exists():
        try:
            mt = json.loads((src / "config.json").read_text(encoding="utf-8")).get("model_type")
        except json.JSONDecodeError as e:
            raise TuwenError(f"{src / 'config.json'}: not valid JSON ({e})") from None
    if mt in ("artist", "text2image"):
        from ..models.text2image import TextToImage
        model = TextToImage.from_pretrained(src, vqgan_config=a.vqgan_config, vqgan_path=a.vqgan_path,
                                            img_len=a.img_len, size=a.size)
    elif mt in ("mingpt_i2t", "artist_i2t", "captioner"):
        from ..models.captioner import Captioner
        model = Captioner.from_pretrained(src)
    elif mt in (None, "vqgan") or not src.is_dir():
        from ..convert.taming import load_vqgan
        model = load_vqgan(src, config=a.vqgan_config)
    else:
        raise TuwenError(f"{src}: model_type {mt!r} is not something tuwen converts "
                         f"(artist, mingpt_i2t/artist_i2t, taming VQGAN)")
    model.save_pretrained(Path(a.dst))
    print(f"wrote {type(model).__name__} to {a.dst}")
    return 0
