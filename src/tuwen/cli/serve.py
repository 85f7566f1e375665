"""``tuwen serve [--model DIR] [--captioner DIR] [--clip DIR] [--host 127.0.0.1] [--port 8000]``: REST server + page.

    tuwen serve                                   # the shipped demo model on http://127.0.0.1:8000/
    tuwen serve --model models/painter --max_batch 32 --clip runs/clip
    tuwen serve --host 0.0.0.0 --api_key "$TUWEN_API_KEY"     # reachable from other machines: a key is required

Endpoints: POST /v1/images/generations (OpenAI Images shape), POST /predict (EasyNLP rows), POST /v1/captions,
POST /v1/rerank, GET /health, GET /metrics, GET / (the page). Requests that arrive while others decode join the
running batch at the next decode step. Needs the serve extra: pip install 'tuwen[serve]'.
"""
from __future__ import annotations

import argparse
import ipaddress
import os


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="REST server and web page for text→image (and captioning, reranking)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="text→image model folder (default: the shipped demo model)")
    p.add_argument("--captioner", default=None, help="captioner folder: enables POST /v1/captions")
    p.add_argument("--clip", default=None, help="CLIP folder: enables POST /v1/rerank and \"rerank\": true")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--weights_dtype", default="auto", choices=["auto", "fp32", "bf16", "int8", "w8a8"],
                   help="GPT Linear weights for decoding (auto: as tuwen generate — w8a8 on x86 CPUs, else int8)")
    p.add_argument("--vq_dtype", default=None, choices=["fp32", "bf16", "auto"],
                   help="VQGAN decode dtype (default auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, 2–3× faster "
                        "there and within a few levels, else fp32); recorded in each PNG")
    p.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API (default: $TUWEN_API_KEY if set)")
    p.add_argument("--no_api_key", action="store_true",
                   help="allow a non-loopback --host without an API key (anyone who can reach it may use it)")
    p.add_argument("--max_batch", type=int, default=16, help="images decoded together (default 16)")
    p.add_argument("--max_queue", type=int, default=64, help="images waiting before requests get 429 (default 64)")
    p.add_argument("--max_n", type=int, default=8, help="images per request (default 8)")
    p.add_argument("--max_prompt_chars", type=int, default=500)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request, queue included (default 300)")
    p.add_argument("--preview_rows", type=int, default=None,
                   help="streaming: code-grid rows between partial images (default: about 8 previews per image)")
    p.add_argument("--max_image_bytes", type=int, default=10 << 20, help="largest uploaded image (bytes)")
    p.add_argument("--max_image_pixels", type=int, default=None, help="largest uploaded image (pixels)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(a: argparse.Namespace) -> int:
    import importlib.util

    from ..errors import TuwenError

    missing = [m for m in ("fastapi", "uvicorn", "python_multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise TuwenError(f"tuwen serve needs {', '.join(missing)}: pip install 'tuwen[serve]'")
    if not 0 <= a.port <= 65535:
        raise TuwenError(f"--port {a.port} is not a TCP port (0-65535)")
    key = a.api_key if a.api_key is not None else os.environ.get("TUWEN_API_KEY")
    if not _is_loopback(a.host) and not key and not a.no_api_key:
        raise TuwenError(f"--host {a.host} makes the server reachable from other machines; give --api_key KEY "
                         f"(clients send 'Authorization: Bearer KEY'), or --no_api_key to serve it open")
    import torch
    import uvicorn

    from ..serve.app import ServeOptions, Server, create_app

    if a.threads is not None:
        if a.threads < 1:
            raise TuwenError(f"--threads must be ≥ 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    opts = ServeOptions(model=a.model, captioner=a.captioner, clip=a.clip, device=a.device,
                        weights_dtype=a.weights_dtype, vq_dtype=a.vq_dtype, max_batch=a.max_batch,
                        max_queue=a.max_queue, max_n=a.max_n, max_prompt_chars=a.max_prompt_chars,
                        timeout=a.timeout, api_key=key or None, preview_rows=a.preview_rows,
                        max_image_bytes=a.max_image_bytes, max_image_pixels=a.max_image_pixels)
    server = Server(opts)
    print(f"tuwen serve: {server.model_name} on {server.device} (max_batch {opts.max_batch}, max_queue "
          f"{opts.max_queue}{', captioner' if server.captioner else ''}{', rerank ' + server.scorer.name if server.scorer else ''}"
          f"{', API key required' if opts.api_key else ''}) at http://{a.host}:{a.port}/", flush=True)
    uvicorn.run(create_app(server), host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)
    return 0
