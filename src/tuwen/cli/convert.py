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
    p.add_argument("--size", type=int, default=None,
                   help="EasyNLP: image size in pixels (their config.json does not say; default: from --img_len / "
                        "--text_len, the VQGAN config, or the size leaving text_len 32)")
    p.add_argument("--text_len", type=int, default=None, help="EasyNLP: text positions (default 32)")
    p.add_argument("--vqvae", default=None, help="CogView folders: vqvae_hard_biggerset_011.pt")
    p.add_argument("--tokenizer", default=None, help="CogView folders: cog-pretrain.model")
    p.add_argument("--num-attention-heads", "--num_attention_heads", dest="n_head", type=int, default=None,
                   help="CogView folders: attention heads (default hidden size / 64)")
    p.set_defaults(func=run)


def run(a) -> int:
    import json
    from pathlib import Path

    from ..errors import TuwenError
    from ..hub import read_model_type, resolve_model_path

    src = resolve_model_path(a.src, what="convert: SRC")
    mt = read_model_type(src) if src.is_dir() else None
    if src.is_dir() and (src / "config.json").exists() and mt is None:
        try:
            json.loads((src / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TuwenError(f"{src / 'config.json'}: not valid JSON ({e})") from None
    from ..convert.cogview import is_checkpoint_folder
    if mt == "cogview" or (mt is None and is_checkpoint_folder(src)):  # CogView (Megatron/DeepSpeed) folder
        from ..models.cogview import CogView
        model = CogView.from_pretrained(src, vqvae=a.vqvae, tokenizer=a.tokenizer, n_head=a.n_head)
    elif mt is None and src.is_file() and _is_cogview_vqvae(src):
        from ..convert.cogview import read_vqvae
        from ..hub import load_state_dict_checked
        from ..models.cogview_vqvae import CogViewVQVAE
        cfg, sd = read_vqvae(src)
        model = CogViewVQVAE(cfg)
        load_state_dict_checked(model, sd, str(src))
    elif mt in ("artist", "text2image"):
        from ..models.text2image import TextToImage
        model = TextToImage.from_pretrained(src, vqgan_config=a.vqgan_config, vqgan_path=a.vqgan_path,
                                            img_len=a.img_len, size=a.size, text_len=a.text_len)
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


def _is_cogview_vqvae(path) -> bool:
    """A state dict with CogView's VQ-VAE names (``enc_b.``/``quantize_t.``)."""
    from ..convert.cogview import load_pt

    try:
        obj = load_pt(path)
    except Exception:  # noqa: BLE001 - the taming reader reports unreadable files
        return False
    return isinstance(obj, dict) and any(str(k).startswith(("enc_b.", "module.enc_b.")) for k in obj)
