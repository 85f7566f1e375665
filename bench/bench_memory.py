"""Memory figures for the hardening issue: a decompression bomb is refused from its header; building the vocabulary
streams the table (peak RSS flat as the table grows 10×).

    python bench/bench_memory.py [--rows 20000]

Each measurement runs in a fresh subprocess and prints its wall time and peak RSS (ru_maxrss).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

BOMB = r'''
import io, resource, time
from PIL import Image
from tuwen.data.images import ImageDecodeError, open_image
buf = io.BytesIO(); Image.new("RGBA" if {rgba} else "1", (20000, 20000)).save(buf, format="PNG"); data = buf.getvalue()
del buf
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
try:
    open_image(data); print("decoded (not refused)")
except ImageDecodeError as e:
    print("refused:", e)
print(f"file {{len(data)/1e6:.2f}} MB, {{time.time()-t:.3f}} s, peak RSS during the call +{{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-base)/1024:.0f}} MB")
'''

VOCAB = r'''
import resource, time
from tuwen.data.tables import open_source, BadRow
from tuwen.text import TextTokenizer
src = open_source("{table}", "idx:str:1,text:str:1")
def texts():
    for i in range(len(src)):
        r = src.row(i)
        if not isinstance(r, BadRow):
            yield r["text"]
t = time.time()
tok = TextTokenizer.train(texts(), vocab_size=8000)
print(f"{{len(src)}} rows: {{time.time()-t:.1f}} s, vocabulary {{tok.vocab_size}}, "
      f"peak RSS {{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f}} MB")
'''


def run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return (r.stdout + r.stderr).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=20000)
    a = ap.parse_args()
    print("decompression bomb, 20000×20000 PNG (mode 1):", run(BOMB.format(rgba=False)), sep="\n  ")
    print("decompression bomb, 20000×20000 PNG (RGBA):", run(BOMB.format(rgba=True)), sep="\n  ")
    import random
    with tempfile.TemporaryDirectory() as d:
        rng = random.Random(0)
        chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
        for n in (a.rows, 10 * a.rows):
            p = Path(d) / f"t{n}.tsv"
            with open(p, "w", encoding="utf-8") as f:
                for i in range(n):  # ~1 KB captions so that the table dominates memory if it were held
                    f.write(f"{i}\t{''.join(rng.choices(chars, k=300))}\n")
            print(f"vocabulary from a {p.stat().st_size / 1e6:.0f} MB table:", run(VOCAB.format(table=p)), sep="\n  ")


if __name__ == "__main__":
    main()
