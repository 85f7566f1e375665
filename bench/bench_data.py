"""Rows/s read per data format (EasyNLP TSV, CSV + image files, JSONL + image files, WebDataset shards, Parquet)
and peak RSS, on one synthetic set of JPEGs written in every format by ``tuwen data convert``.

    python bench/bench_data.py --mb 100 --out /tmp/bench_data

Each format is read twice in a fresh process: sequentially (row order, as ``data convert|clean`` and a streaming
reader do) and in a shuffled order (what the trainer's sampler does), fetching each row's image bytes (no decode).
Prints one line per format: open time (index build), rows/s sequential, rows/s shuffled, peak RSS of the process.
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def build(out: Path, mb: int) -> None:
    import numpy as np
    from PIL import Image

    from tuwen.cli import main

    out.mkdir(parents=True, exist_ok=True)
    if (out / "done").exists():
        return
    rng = np.random.default_rng(0)
    imgs = out / "folder"
    imgs.mkdir(exist_ok=True)
    total, k = 0, 0
    while total < mb * 2 ** 20:
        side = int(rng.integers(96, 256))
        arr = (rng.random((side // 8, side // 8, 3)) * 255).astype("uint8")
        im = Image.fromarray(arr).resize((side, side))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        (imgs / f"{k:07d}.jpg").write_bytes(buf.getvalue())
        (imgs / f"{k:07d}.txt").write_text(f"第{k}张图片 的描述 " * int(rng.integers(1, 4)), encoding="utf-8")
        total += len(buf.getvalue())
        k += 1
    for target in ("d.tsv", "d.csv", "d.jsonl", "d.parquet"):
        main(["data", "convert", str(imgs), str(out / target)])
    main(["data", "convert", str(imgs), str(out / "shards.tar"), "--shard_size", "1000"])
    (out / "done").write_text(str(k))


FOODS = ["红烧肉", "蛋糕", "牛肉面", "米饭", "饺子", "包子", "火锅", "寿司"]
OTHER = ["汽车", "风景", "手机", "衣服"]


def dirty_wukong(out: Path, n: int = 2000) -> Path:
    """A Wukong-like CSV (filepath,title) with every kind of dirt at known rates; returns the CSV's path."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    d = out / "wukong"
    (d / "imgs").mkdir(parents=True, exist_ok=True)
    (d / "foodNames.txt").write_text("\n".join(FOODS) + "\n", encoding="utf-8")
    lines, last = ["filepath,title"], None
    for k in range(n):
        kind = rng.choice(["ok"] * 11 + ["no_keyword", "long", "special", "aspect", "small", "dup", "empty",
                                         "broken", "badrow"])
        w = h = int(rng.integers(96, 320))
        text = f"{rng.choice(FOODS)}{'好吃' * int(rng.integers(0, 4))}"
        if kind == "no_keyword":
            text = f"一个{rng.choice(OTHER)}"
        elif kind == "long":
            text = f"{rng.choice(FOODS)}" + "的做法大全家常菜谱" * 5
        elif kind == "special":
            text = f"{rng.choice(FOODS)}#特价@{k}"
        elif kind == "aspect":
            w, h = 400, 100
        elif kind == "small":
            w = h = 40
        elif kind == "empty":
            text = ""
        name = f"imgs/{k:05d}.jpg"
        if kind == "dup" and last:
            name = last
        elif kind == "broken":
            (d / name).write_bytes(b"<html>404 not found</html>")
        else:
            arr = (rng.random((8, 8, 3)) * 255).astype("uint8")
            Image.fromarray(arr).resize((w, h)).save(d / name, quality=85)
            last = name
        lines.append(f"{name}\n" if kind == "badrow" else f'{name},"{text}"')
    (d / "wukong.csv").write_text("\n".join(x.rstrip("\n") for x in lines) + "\n", encoding="utf-8")
    return d / "wukong.csv"


def measure(spec: str, order: str) -> dict:
    import numpy as np

    from tuwen.data.formats import set_reader_options
    from tuwen.data.tables import open_source
    from tuwen.data.writers import Sample

    path, schema = spec.split("|")
    set_reader_options(table_format="folder" if path.endswith("folder") else None)
    t0 = time.perf_counter()
    src = open_source(path, schema or None, text_col="text", image_col="imgbase64")
    t_open = time.perf_counter() - t0
    n = len(src)
    idx = np.arange(n) if order == "seq" else np.random.default_rng(0).permutation(n)
    t0 = time.perf_counter()
    nbytes = 0
    for i in idx:
        r = src.row(int(i))
        nbytes += len(Sample("", "", r["imgbase64"]).image_bytes())
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": n, "open_s": t_open, "rows_per_s": n / dt, "mb_per_s": nbytes / dt / 2 ** 20, "peak_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100, help="JPEG bytes in the set (default 100)")
    ap.add_argument("--out", default="/tmp/tuwen_bench_data")
    ap.add_argument("--dirty", action="store_true",
                    help="instead: build a 2000-row Wukong-like CSV with dirt of every kind and clean it")
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_order", default="seq", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._measure:
        print(json.dumps(measure(a._measure, a._order)))
        return
    out = Path(a.out)
    if a.dirty:
        from tuwen.cli import main as tuwen
        csv = dirty_wukong(out)
        tuwen(["data", "clean", str(csv), "--out", str(out / "wukong" / "clean.tar"), "--keywords",
               str(csv.parent / "foodNames.txt"), "--max_text_len", "32", "--drop_pattern", "[#@&*<>{}|~^\\\\]",
               "--max_aspect", "3", "--min_size", "64", "--dedupe", "--examples", "1"])
        return
    build(out, a.mb)
    n = int((out / "done").read_text())
    print(f"{n} rows, {a.mb} MB of JPEG ({sum(f.stat().st_size for f in (out / 'folder').glob('*.jpg')) / 2**20:.0f} "
          f"MB on disk as files)")
    specs = {"tsv (EasyNLP, base64)": f"{out / 'd.tsv'}|idx:str:1,text:str:1,imgbase64:str:1",
             "csv + jpg files": f"{out / 'd.csv'}|", "jsonl + jpg files": f"{out / 'd.jsonl'}|",
             "webdataset (1000/shard)": f"{out}/shards-{{000000..{(n - 1) // 1000:06d}}}.tar|",
             "parquet (256/row group)": f"{out / 'd.parquet'}|", "image folder (jpg+txt)": f"{out / 'folder'}|"}
    print(f"{'format':<26} {'open s':>7} {'seq rows/s':>11} {'seq MB/s':>9} {'shuf rows/s':>12} {'peak RSS MB':>12}")
    for name, spec in specs.items():
        res = {}
        for order in ("seq", "shuf"):
            p = subprocess.run([sys.executable, __file__, "--_measure", spec, "--_order", order], capture_output=True,
                               text=True, check=True)
            res[order] = json.loads(p.stdout.strip().splitlines()[-1])
        s, r = res["seq"], res["shuf"]
        print(f"{name:<26} {s['open_s']:>7.2f} {s['rows_per_s']:>11.0f} {s['mb_per_s']:>9.1f} {r['rows_per_s']:>12.0f} "
              f"{max(s['peak_rss_mb'], r['peak_rss_mb']):>12.0f}")


if __name__ == "__main__":
    main()
