"""A table of good and bad rows of every kind users make, run through validate, one epoch of text→image training
and predict; prints what each command reported against the truth.

    python bench/fuzz_rows.py --rows 10000 --out /tmp/fuzz          # the full run (a few minutes on 2 cores)
    python bench/fuzz_rows.py --rows 300 --out /tmp/fuzz_small       # what tests/test_fuzz.py runs

Printed: tracebacks, bad rows reported (with file:line) vs truth, good rows used vs truth, output rows vs input
rows, output PNG names unique, peak RSS of the commands. Exit status 0 when every target is met: 0 tracebacks,
100 % of bad rows reported with file:line, 0 good rows lost, peak RSS < 1 GB.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import re
import resource
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tuwen.data import synth

SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"


def _b64(im: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def build_table(path: Path, n: int, seed: int = 0) -> dict:
    """Write the table; return the truth: which lines are bad for training / for predict, and why."""
    rng = random.Random(seed)
    bomb = _b64(Image.new("1", (5000, 4000)))              # 20 M pixels > the 16.7 M default limit
    kinds = ["good"] * 62 + ["good_mode"] * 4 + ["good_jpeg"] * 4 + ["weird_idx"] * 4 + [
        "few_columns", "bad_utf8", "bad_base64", "truncated_png", "not_an_image", "empty_image", "empty_text",
        "bomb", "frame_list", "text_is_image", "zero_size", "only_spaces_text"] * 2 + ["blank_line"] * 2
    weird = ["a/b", "a_b", "a b", "a?b", "..", ".", "", "a\x00b", "名字/斜杠", "a" * 300]
    lines: list[bytes] = []
    bad_train: dict[int, str] = {}
    bad_predict: dict[int, str] = {}
    rows_train = rows_predict = 0
    good_idx: list[str] = []
    lineno = 0
    i = 0
    while rows_train + len(bad_train) < n:
        kind = rng.choice(kinds)
        img, text, _ = synth.make_sample(rng.randrange(1 << 30), size=rng.choice([24, 32, 48]))
        idx = f"r{i}"
        i += 1
        field = _b64(img)
        line = None
        if kind == "blank_line":
            lines.append(b"\n" if rng.random() < 0.5 else b"\r\n")
            lineno += 1
            continue
        lineno += 1
        if kind == "good_mode":
            mode = rng.choice(["RGBA", "P", "L", "CMYK"])
            field = _b64(img.convert(mode), "JPEG" if mode == "CMYK" else "PNG")
        elif kind == "good_jpeg":
            field = _b64(img, "JPEG")
        elif kind == "weird_idx":
            idx = weird[i % len(weird)]
        elif kind == "few_columns":
            line = f"{idx}\t{text}\n".encode()
            bad_train[lineno] = bad_predict[lineno] = kind
        elif kind == "bad_utf8":
            line = f"{idx}\t".encode() + b"\xff\xfe bad" + f"\t{field}\n".encode()
            bad_train[lineno] = bad_predict[lineno] = kind
        elif kind == "bad_base64":
            field = "!!!not base64!!!"
        elif kind == "truncated_png":
            field = base64.b64encode(base64.b64decode(field)[: len(base64.b64decode(field)) // 2]).decode()
        elif kind == "not_an_image":
            field = base64.b64encode(b"just some bytes, not an image" * 4).decode()
        elif kind == "empty_image":
            field = ""
        elif kind in ("empty_text", "only_spaces_text"):
            text = "" if kind == "empty_text" else "   "
            bad_predict[lineno] = kind   # (and bad for training: below)
        elif kind == "bomb":
            field = bomb
        elif kind == "frame_list":
            field = json.dumps([field, field])
        elif kind == "text_is_image":  # a caption that is an image: training reads it as text (bad vocabulary)
            pass
        elif kind == "zero_size":
            field = base64.b64encode(b"").decode()
        if kind not in ("good", "good_mode", "good_jpeg", "weird_idx", "text_is_image", "few_columns", "bad_utf8"):
            bad_train[lineno] = kind
        if line is None:
            line = f"{idx}\t{text}\t{field}".encode("utf-8") + (b"\r\n" if rng.random() < 0.05 else b"\n")
        if lineno == 1:
            line = "\ufeff".encode() + line  # a BOM, as Windows editors write
        lines.append(line)
        if lineno not in bad_train:
            rows_train += 1
        if lineno not in bad_predict:
            rows_predict += 1
            good_idx.append(idx)
    path.write_bytes(b"".join(lines))
    return {"bad_train": bad_train, "bad_predict": bad_predict, "rows_train": rows_train,
            "rows_predict": rows_predict, "good_idx": good_idx, "lines": lineno}


def run(cmd: list[str], log: Path) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "tuwen", *cmd], capture_output=True, text=True, env=env)
    log.write_text(r.stdout + "\n--- stderr ---\n" + r.stderr, encoding="utf-8")
    return r.returncode, r.stdout + r.stderr


def reported_lines(text: str, table: Path) -> set[int]:
    return {int(m) for m in re.findall(re.escape(str(table)) + r":(\d+):", text)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "fuzz.tsv"
    truth = build_table(table, a.rows, a.seed)

    from tuwen.models.vqgan import VQGAN, VQGANConfig
    import torch
    torch.manual_seed(0)
    VQGAN(VQGANConfig.preset("tiny", resolution=32, n_embed=64, ch_mult=[1, 1, 1], attn_resolutions=[],
                             z_channels=8, embed_dim=8)).save_pretrained(out / "vq")

    results = {}
    tracebacks = 0
    rc, text = run(["data", "validate", str(table), f"--input_schema={SCHEMA}", "--first_sequence=text",
                    "--second_sequence=imgbase64", "--max_listed=1000000", "--app_name=text2image_generation"],
                   out / "validate.log")
    tracebacks += text.count("Traceback")
    results["validate"] = reported_lines(text, table)

    ck = out / "model"
    udp = (f"vqgan_ckpt_path={out / 'vq'} size=32 text_len=16 img_len=64 img_vocab_size=64 n_layer=1 n_head=2 "
           f"n_embd=32 vocab_size=300")
    rc_train, text = run(["--mode=train", "--app_name=text2image_generation", f"--tables={table}",
                          f"--input_schema={SCHEMA}", "--first_sequence=text", "--second_sequence=imgbase64",
                          f"--checkpoint_dir={ck}", "--epoch_num=1", "--micro_batch_size=64", "--data_threads=0",
                          "--logging_steps=1000", "--max_bad_listed=1000000", "--no_tensorboard",
                          "--sequence_length=80", f"--user_defined_parameters={udp}"], out / "train.log")
    tracebacks += text.count("Traceback")
    results["train"] = reported_lines(text, table)
    m = re.search(r"skipped (\d+) bad row\(s\) of (\d+)", text)
    train_bad, train_total = (int(m.group(1)), int(m.group(2))) if m else (0, truth["rows_train"])

    pred = out / "pred.tsv"
    rc_pred, text = run(["--mode=predict", "--app_name=text2image_generation", f"--tables={table}",
                         f"--input_schema={SCHEMA}", "--first_sequence=text", f"--outputs={pred}",
                         "--output_schema=idx,text,gen_imgbase64", f"--checkpoint_dir={ck}", "--micro_batch_size=64",
                         "--sequence_length=80", f"--output_dir={out / 'png'}", "--max_bad_listed=1000000",
                         "--user_defined_parameters=max_generated_num=1 top_k=4"], out / "predict.log")
    tracebacks += text.count("Traceback")
    results["predict"] = reported_lines(text, table)
    out_rows = pred.read_text(encoding="utf-8").splitlines() if pred.exists() else []
    pngs = list((out / "png").glob("*.png")) if (out / "png").exists() else []
    nul_in_output = any("\x00" in r for r in out_rows)
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    bt, bp = set(truth["bad_train"]), set(truth["bad_predict"])
    rows = [
        ("tracebacks", tracebacks, 0),
        ("validate: bad rows reported / truth", f"{len(results['validate'] & bt)}/{len(bt)}", None),
        ("validate: good rows reported as bad", len(results["validate"] - bt), 0),
        ("train: exit status", rc_train, 0),
        ("train: bad rows reported / truth", f"{len(results['train'] & bt)}/{len(bt)}", None),
        ("train: good rows used / truth", f"{train_total - train_bad}/{truth['rows_train']}", None),
        ("predict: exit status", rc_pred, 0),
        ("predict: bad rows reported / truth", f"{len(results['predict'] & bp)}/{len(bp)}", None),
        ("predict: output rows / good input rows", f"{len(out_rows)}/{truth['rows_predict']}", None),
        ("predict: PNG files / output rows", f"{len([p for p in pngs if not p.name.endswith('_grid.png')])}"
                                             f"/{len(out_rows)}", None),
        ("predict: NUL characters in the output", int(nul_in_output), 0),
        ("peak RSS of one command (MB)", f"{rss_mb:.0f}", None),
    ]
    print(f"{table}: {truth['lines']} lines, {truth['rows_train']} good rows for training, {len(bt)} bad; "
          f"{truth['rows_predict']} good for predict")
    for name, value, want in rows:
        print(f"  {name:45s} {value}")
    ok = (tracebacks == 0 and results["validate"] == bt and results["train"] >= bt and rc_train == 0
          and train_total - train_bad == truth["rows_train"] and rc_pred == 0 and results["predict"] >= bp
          and len(out_rows) == truth["rows_predict"] and len(pngs) >= len(out_rows) and not nul_in_output
          and rss_mb < 1024)
    print("all targets met" if ok else "TARGETS MISSED (see the logs in " + str(out) + ")")
    json.dump({"ok": ok, "rows": [(n, str(v)) for n, v, _ in rows]}, open(out / "fuzz_result.json", "w"), indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
