"""Load test of ``tuwen serve``: concurrent clients against a server on 127.0.0.1, bounded in count and time.

Starts ``python -m tuwen serve`` as a child process (so that its peak RSS is its own), waits for ``/health``, then
for each concurrency level C runs C client threads; each sends ``--requests`` requests (``n=1``, a fixed prompt,
its own seed) one after another, without retrying a 429. Prints per level: requests by status code, p50/p95
latency of the 200s, images/s, the speed-up over C=1 (the same requests served one at a time), the mean number of
images per decode step (from /metrics), and the server's RSS and peak RSS.

    OMP_NUM_THREADS=2 python bench/serve_load.py                          # demo model, 1/8/32/200 clients
    OMP_NUM_THREADS=2 python bench/serve_load.py --model base --levels 1,8,32,200 --requests 1,1,1,1
    python bench/serve_load.py --model DIR --device cuda --max_batch 64

``--model base`` builds a random-weight pai-painter-shaped model (GPT preset ``base``: 12×768, 32 text + 256
image positions, 16384 codes; a tiny random VQGAN at 128 px) in a temporary folder. Traffic goes to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PROMPT = "左上角有一个红色的圆形，右下角有一个蓝色的正方形"


def build_base(folder: Path) -> Path:
    import torch

    from tuwen.models.text2image import TextToImage, TextToImageConfig
    from tuwen.models.vqgan import VQGAN, VQGANConfig
    from tuwen.pipelines import demo_model_path
    from tuwen.text.tokenizer import TextTokenizer

    torch.manual_seed(0)
    tok = TextTokenizer.from_pretrained(demo_model_path())
    vq = VQGAN(VQGANConfig.preset("tiny", n_embed=16384, resolution=128, attn_resolutions=[16]))
    cfg = TextToImageConfig.build(text_len=32, img_len=256, img_vocab_size=16384, text_vocab_size=tok.vocab_size,
                                  image_size=128, n_layer=12, n_head=12, n_embd=768)
    model = TextToImage(cfg, vq, tok)
    out = folder / "base_random"
    model.save_pretrained(out)
    print(f"built a random base model: GPT {sum(p.numel() for p in model.gpt.parameters()) / 1e6:.1f} M parameters, "
          f"{cfg.img_len} codes per image, in {out}", flush=True)
    return out


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            vals[k] = int(v.split()[0])
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def post(url: str, body: dict, timeout: float):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = json.loads(r.read())
            return r.status, time.perf_counter() - t, len(data.get("data", []))
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, time.perf_counter() - t, 0
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        return f"conn:{type(e).__name__}", time.perf_counter() - t, 0


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def run_level(base: str, clients: int, requests: int, timeout: float, seed0: int):
    results = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(i):
        start.wait()
        for r in range(requests):
            res = post(base + "/v1/images/generations",
                       {"prompt": PROMPT, "n": 1, "seed": seed0 + i * requests + r}, timeout)
            with lock:
                results.append(res)

    ths = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in ths:
        t.start()
    steps0, sum0 = metric(base, "tuwen_batch_size_count"), metric(base, "tuwen_batch_size_sum")
    start.wait()
    t0 = time.perf_counter()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    steps, rows = metric(base, "tuwen_batch_size_count") - steps0, metric(base, "tuwen_batch_size_sum") - sum0
    return results, wall, (rows / steps if steps else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="demo (the shipped model), base (random weights) or a folder")
    ap.add_argument("--levels", default="1,8,32,200", help="concurrent clients per level")
    ap.add_argument("--requests", default="4,2,1,1", help="requests per client at each level (one value or one per level)")
    ap.add_argument("--max_batch", type=int, default=32)
    ap.add_argument("--max_queue", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=600.0, help="client and server timeout per request (s)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--weights_dtype", default="auto", choices=["auto", "fp32", "bf16", "int8", "w8a8"],
                    help="the server's GPT weights (auto: int8 on CPU, as tuwen generate)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    reqs = [int(x) for x in args.requests.split(",")]
    reqs = reqs * len(levels) if len(reqs) == 1 else reqs
    if len(reqs) != len(levels):
        ap.error("--requests: give one value or one per level")

    with tempfile.TemporaryDirectory() as tmp:
        model = None if args.model == "demo" else str(build_base(Path(tmp))) if args.model == "base" else args.model
        cmd = [sys.executable, "-m", "tuwen", "serve", "--host", "127.0.0.1", "--port", str(args.port),
               "--device", args.device, "--max_batch", str(args.max_batch), "--max_queue", str(args.max_queue),
               "--timeout", str(args.timeout), "--log_level", "warning", "--weights_dtype", args.weights_dtype] + \
            (["--model", model] if model else [])
        proc = subprocess.Popen(cmd)
        base = f"http://127.0.0.1:{args.port}"
        try:
            t0 = time.time()
            while True:
                try:
                    with urllib.request.urlopen(base + "/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if proc.poll() is not None or time.time() - t0 > 600:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
            print(f"server ready in {time.time() - t0:.1f} s (pid {proc.pid}); model {args.model}, max_batch "
                  f"{args.max_batch}, max_queue {args.max_queue}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
            print(f"{'clients':>7} {'requests':>8}  {'status codes':<26} {'p50 s':>7} {'p95 s':>7} {'images/s':>9} "
                  f"{'vs 1':>6} {'imgs/step':>9} {'RSS MB':>7} {'peak MB':>7}")
            one = None
            for c, r in zip(levels, reqs):
                res, wall, per_step = run_level(base, c, r, args.timeout, seed0=1000 * c)
                codes = collections.Counter(str(s) for s, _, _ in res)
                lat = sorted(t for s, t, _ in res if s == 200)
                imgs = sum(n for _, _, n in res)
                ips = imgs / wall
                one = ips if c == 1 else one
                p50 = statistics.median(lat) if lat else float("nan")
                p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan")
                rss, hwm = rss_kb(proc.pid)
                vs = f"{ips / one:.2f}x" if one else "-"
                print(f"{c:>7} {len(res):>8}  {json.dumps(dict(sorted(codes.items()))):<26} {p50:>7.2f} {p95:>7.2f} "
                      f"{ips:>9.3f} {vs:>6} {per_step:>9.1f} {rss / 1024:>7.0f} {hwm / 1024:>7.0f}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
