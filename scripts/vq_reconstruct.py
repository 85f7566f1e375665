"""Reconstruct every image of an EasyNLP TSV with a tuwen VQGAN folder and write the reconstructions as a TSV
(``idx, text, imgbase64``) for ``tuwen evaluate-images --retrieval``; print PSNR, the codebook usage and two colour
figures: ``color_error`` (mean absolute difference of the 4×4 average-pooled images, 0–255 levels: is each region
the right colour?) and ``saturation`` / ``saturation_original`` (mean max − min channel over the pixels that are not
near-white, 0–255: do saturated colours come back saturated or washed out to brown and grey?).

    python scripts/vq_reconstruct.py --model runs/recipe/vqgan --table runs/stamps/64/test.tsv \
        --out runs/recipe/recon_test.tsv
    tuwen evaluate-images --generated runs/recipe/recon_test.tsv --reference runs/stamps/64/test.tsv --retrieval

(``tuwen vq decode`` writes PNGs named after a sanitised idx; a TSV keeps the idx, so retrieval can match it.)
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from tuwen.data.images import encode_png_b64, load_pixels, to_pil
from tuwen.data.tables import BadRow, open_source
from tuwen.fileio import atomic_write_text
from tuwen.models.vqgan import VQGAN


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="tuwen VQGAN folder")
    p.add_argument("--table", required=True, help="EasyNLP TSV idx, text, imgbase64")
    p.add_argument("--input_schema", default="idx:str:1,text:str:1,imgbase64:str:1")
    p.add_argument("--out", required=True, help="reconstructions as a TSV idx, text, imgbase64")
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's resolution)")
    p.add_argument("--batch_size", type=int, default=32)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    vq = VQGAN.from_pretrained(a.model).eval()
    size = a.size or vq.config.resolution
    src = open_source(a.table, a.input_schema, image_col="imgbase64", text_col="text")
    rows = [r for r in (src.row(i) for i in range(len(src))) if not isinstance(r, BadRow)]
    lines, psnrs, codes, col_err, sat, sat0 = [], [], [], [], [], []
    with torch.no_grad():
        for s in range(0, len(rows), a.batch_size):
            chunk = rows[s:s + a.batch_size]
            pix = torch.from_numpy(np.stack([load_pixels(r["imgbase64"], size) for r in chunk]))  # [B,H,W,3] uint8
            x = pix.permute(0, 3, 1, 2).float() / 127.5 - 1                           # [B, 3, H, W] in [-1, 1]
            xrec, _, info = vq(x)
            xrec = xrec.clamp(-1, 1)
            mse = ((xrec - x) ** 2).flatten(1).mean(1)
            o, r_ = (x + 1) * 127.5, (xrec + 1) * 127.5                                 # 0–255
            col_err += (torch.nn.functional.avg_pool2d(r_, size // 4) - torch.nn.functional.avg_pool2d(o, size // 4)
                        ).abs().flatten(1).mean(1).tolist()
            fg = (o.amin(1) < 230).float()                                                # not near-white
            for img, out in ((o, sat0), (r_, sat)):
                chroma = img.amax(1) - img.amin(1)
                out += ((chroma * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp_min(1)).tolist()
            psnrs += (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).tolist()            # peak-to-peak 2
            codes.append(info["indices"].flatten())
            for r, img in zip(chunk, to_pil(xrec)):
                lines.append(f"{r['idx']}\t{r['text']}\t{encode_png_b64(img)}\n")
    atomic_write_text(a.out, "".join(lines))
    codes = torch.cat(codes)
    used = int(torch.unique(codes).numel())
    p_ = torch.bincount(codes, minlength=vq.config.n_embed).float()
    p_ = p_ / p_.sum()
    ppl = float(torch.exp(-(p_ * p_.clamp_min(1e-12).log()).sum()))
    res = {"images": len(rows), "psnr": sum(psnrs) / max(1, len(psnrs)), "codes_used": used,
           "codebook": vq.config.n_embed, "usage": used / vq.config.n_embed, "perplexity": ppl,
           "color_error": float(np.mean(col_err)), "saturation": float(np.mean(sat)),
           "saturation_original": float(np.mean(sat0)), "out": a.out}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
