"""The models, the continuous batcher and the worker threads behind the HTTP app (``tuwen.serve.app``)."""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import queue
import threading
import time
import traceback
from pathlib import Path

import torch
from fastapi import Request

from ..data.images import encode_png_b64, set_max_image_pixels
from ..data.pngmeta import png_bytes as png_with_record
from ..errors import TuwenError
from ..models.text2image import TextToImage, image_seed
from ..runtime import resolve_device
from .batcher import Batcher, QueueFull, SamplingKey
from .metrics import Metrics

from .requests import ApiError, _float, _int, _type_name


@dataclasses.dataclass
class ServeOptions:
    """Settings of a server (the ``tuwen serve`` flags)."""

    model: str | None = None          # text→image model folder (None: the shipped demo model)
    captioner: str | None = None      # captioner folder: /v1/captions (and caption reranking without --clip)
    clip: str | None = None           # CLIP folder: /v1/rerank and "rerank": true
    device: str = "auto"
    weights_dtype: str | None = "auto"  # GPT Linear weights: auto (CPU: w8a8 where fbgemm runs, else int8), fp32, …
    vq_dtype: str | None = None       # VQGAN decode: auto (None: bf16 where fast, as tuwen generate), fp32, bf16
    max_batch: int = 16               # images decoded together
    max_queue: int = 64               # images waiting; beyond → 429
    max_n: int = 8                    # images per request
    max_prompt_chars: int = 500
    max_rows: int = 16                # rows per /predict request
    max_images: int = 32              # images per /v1/captions or /v1/rerank request
    max_image_bytes: int = 10 << 20   # one uploaded image
    max_body_bytes: int = 64 << 20
    max_image_pixels: int | None = None
    timeout: float = 300.0            # seconds per request (queue + decoding)
    api_key: str | None = None
    preview_rows: int | None = None   # streaming: grid rows between partial images (default: ~8 per image)
    warmup: bool = True

    def validate(self) -> None:
        for name in ("max_batch", "max_queue", "max_n", "max_prompt_chars", "max_rows", "max_images",
                     "max_image_bytes", "max_body_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise TuwenError(f"--{name} must be a positive integer, got {v!r}")
        if self.max_queue < self.max_n:
            raise TuwenError(f"--max_queue ({self.max_queue}) must be at least --max_n ({self.max_n}), or no request "
                             f"of n={self.max_n} images could ever be queued")
        if not self.timeout > 0:
            raise TuwenError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.preview_rows is not None and self.preview_rows < 1:
            raise TuwenError(f"--preview_rows must be ≥ 1, got {self.preview_rows}")
        if self.api_key is not None and not self.api_key.strip():
            raise TuwenError("--api_key is empty")


# ================================================================================================ server

class _GenJob:
    """One request's images on their way back: events are put on an asyncio queue from the worker threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int, records: list[dict] | None = None):
        self.loop, self.n = loop, n
        self.records = records  # generation record of each image, written into its PNG (tuwen.data.pngmeta)
        self.events: asyncio.Queue = asyncio.Queue()
        self.ticket = None
        self.cancelled = False

    def put(self, event: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass


class _ImagePost(threading.Thread):
    """Codes → PNG images, off the decode loop. Partial grids (streaming) of all requests are decoded together and
    their not-yet-sampled part painted grey; a request's final images are decoded together, in order, as one
    batch — as ``TextToImage.generate`` decodes a prompt's images — so that their pixels equal ``tuwen generate``'s
    (the VQGAN's float results depend slightly on the batch they are decoded in)."""

    def __init__(self, model: TextToImage):
        super().__init__(name="tuwen-images", daemon=True)
        self.model = model
        self.q: queue.Queue = queue.Queue()
        h, w = model.grid
        self.grid_w, self.grid_h = w, h

    def partial(self, job: _GenJob, k: int, codes: torch.Tensor, codes_done: int) -> None:
        self.q.put(("partial", job, (k, codes, codes_done)))

    def final(self, job: _GenJob, codes: torch.Tensor) -> None:
        self.q.put(("final", job, codes))

    def stop(self) -> None:
        self.q.put(None)

    def run(self) -> None:
        while True:
            items = [self.q.get()]
            while len(items) < 32:
                try:
                    items.append(self.q.get_nowait())
                except queue.Empty:
                    break
            if any(it is None for it in items):
                return
            items = [it for it in items if not it[1].cancelled]
            partials = [it for it in items if it[0] == "partial"]
            finals = [it for it in items if it[0] == "final"]
            if partials:
                self._guarded([it[1] for it in partials], self._partials, partials)
            for _, job, codes in finals:
                self._guarded([job], self._finals, job, codes)

    def _guarded(self, jobs, fn, *args) -> None:
        try:
            with torch.inference_mode():
                fn(*args)
        except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
            traceback.print_exc()
            for job in jobs:
                job.put({"type": "error", "message": f"decoding images failed: {type(e).__name__}: {e}"})

    def _partials(self, items) -> None:
        images = self.model.decode_codes(torch.stack([it[2][1] for it in items]))
        for (_, job, (k, _, done)), im in zip(items, images):
            y = im.height * (done // self.grid_w) // self.grid_h
            im.paste((232, 232, 232), (0, y, im.width, im.height))
            job.put({"type": "partial", "index": k, "codes_done": done, "b64": encode_png_b64(im)})

    def _finals(self, job: _GenJob, codes: torch.Tensor) -> None:
        for k, im in enumerate(self.model.decode_codes(codes)):
            rec = job.records[k] if job.records else None
            job.put({"type": "image", "index": k, "image": im,
                     "b64": base64.b64encode(png_with_record(im, rec)).decode("ascii")})


class Server:
    """Models + batcher + worker threads behind the HTTP app (``create_app``)."""

    def __init__(self, opts: ServeOptions):
        opts.validate()
        self.opts = opts
        if opts.max_image_pixels is not None:
            set_max_image_pixels(opts.max_image_pixels)
        self.device = resolve_device(opts.device)
        path = opts.model
        if path is None:
            from ..pipelines import demo_model_path
            path = demo_model_path()
        self.model_path = str(path)
        self.model_name = Path(path).resolve().name
        from ..models.quant import resolve_weights_dtype
        wd = resolve_weights_dtype(opts.weights_dtype, self.device, "--weights_dtype")
        from ..models.vqgan import resolve_vq_dtype
        vd = resolve_vq_dtype(opts.vq_dtype or "auto", self.device, "--vq_dtype")  # as `tuwen generate`
        self.model = TextToImage.from_pretrained(path, weights_dtype=wd, vq_dtype=vd).to(self.device).eval()
        self.captioner = None
        if opts.captioner:
            from ..models.captioner import Captioner
            self.captioner = Captioner.from_pretrained(opts.captioner, device=self.device).eval()
        self.scorer = None
        if opts.clip:
            from ..rerank import load_scorer
            self.scorer = load_scorer(f"clip:{opts.clip}", device=self.device, flag="--clip")
        elif self.captioner is not None:
            from ..rerank import CaptionScorer
            self.scorer = CaptionScorer(self.captioner, name=f"caption:{opts.captioner}")
        self.metrics = Metrics()
        self.batcher = Batcher(self.model, max_batch=opts.max_batch, max_queue=opts.max_queue,
                               on_step=self.metrics.step)
        self.post = _ImagePost(self.model)
        h, w = self.model.grid
        self.preview_codes = w * (opts.preview_rows or max(1, h // 8))
        self.aux = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tuwen-aux")
        self.aux_waiting = 0
        self.ready = threading.Event()
        self.warmup_error: str | None = None
        self.started = time.time()
        m = self.metrics
        m.gauge("tuwen_queue_depth", "Images waiting to start decoding.", lambda: self.batcher.waiting)
        m.gauge("tuwen_running_images", "Images being decoded now.", lambda: self.batcher.running)
        m.gauge("tuwen_images_generated_total", "Images generated.", lambda: self.batcher.images_done)
        m.gauge("tuwen_decode_steps_total", "Decode steps run.", lambda: self.batcher.steps)
        m.gauge("tuwen_images_per_second", "Images finished per second over the last minute.",
                lambda: self.batcher.images_per_second())
        m.gauge("tuwen_ready", "1 once the warm-up generation is done.", lambda: float(self.ready.is_set()))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Server":
        self.batcher.start()
        if not self.post.is_alive():
            self.post.start()
        if self.opts.warmup:
            threading.Thread(target=self._warmup, name="tuwen-warmup", daemon=True).start()
        else:
            self.ready.set()
        return self

    def close(self) -> None:
        self.batcher.stop()
        self.post.stop()
        self.aux.shutdown(wait=False, cancel_futures=True)

    def _warmup(self) -> None:
        done = threading.Event()
        errors = []
        try:
            ids = self.model.tokenize("warm up")[0]
            sp = self.model.config.sampling
            key = SamplingKey(sp.top_k, sp.top_p, sp.temperature, sp.guidance_scale)
            self.batcher.submit(ids, [0], key, lambda k, c, n, final: final and done.set(),
                                on_error=lambda msg: (errors.append(msg), done.set()))
            done.wait()
            if errors:
                raise RuntimeError(errors[0])
            with torch.inference_mode():
                self.model.decode_codes(torch.zeros(1, self.model.config.img_len, dtype=torch.long))
            self.ready.set()
        except Exception as e:  # noqa: BLE001 - reported by /health
            traceback.print_exc()
            self.warmup_error = f"{type(e).__name__}: {e}"

    def info(self) -> dict:
        c, sp = self.model.config, self.model.config.sampling
        return {"model": self.model_name, "image_size": c.image_size, "grid": list(self.model.grid),
                "text_len": c.text_len, "max_n": self.opts.max_n, "max_batch": self.opts.max_batch,
                "max_queue": self.opts.max_queue, "max_prompt_chars": self.opts.max_prompt_chars,
                "defaults": {"top_k": sp.top_k, "top_p": sp.top_p, "temperature": sp.temperature,
                             "guidance_scale": sp.guidance_scale},
                "captioner": self.captioner is not None, "rerank": self.scorer.name if self.scorer else None,
                "auth": self.opts.api_key is not None}

    # ------------------------------------------------------------------ generation
    def check_prompt(self, prompt, where: str = "prompt") -> str:
        if not isinstance(prompt, str):
            raise ApiError(400, f"{where} must be a string, got {_type_name(prompt)}")
        if not prompt.strip():
            raise ApiError(400, f"{where} is empty")
        if len(prompt) > self.opts.max_prompt_chars:
            raise ApiError(400, f"{where} has {len(prompt)} characters; the limit is {self.opts.max_prompt_chars}")
        n_tok = len(self.model.tokenizer.encode(prompt))
        if n_tok > self.model.config.text_len:
            raise ApiError(400, f"{where} is {n_tok} tokens long; this model reads at most "
                                f"{self.model.config.text_len} (shorten it)")
        return prompt

    def sampling_key(self, body: dict, where: str = "") -> tuple[SamplingKey, dict]:
        """The request's sampling settings → (batcher key, the overrides as given, for the PNG record)."""
        over = {}
        top_k = _int(body, "top_k", lo=1, where=where)
        if top_k is not None:
            over["top_k"] = top_k
        for name in ("top_p", "temperature", "guidance_scale"):
            v = _float(body, name, where=where)
            if v is not None:
                over[name] = v
        try:
            sp = self.model.sampling_params(**over)
        except TuwenError as e:
            raise ApiError(400, f"{where}{e}") from None
        return SamplingKey(sp.top_k, sp.top_p, sp.temperature, sp.guidance_scale), over

    def submit(self, loop, prompt: str, seed: int, key_of_prompt, n: int, sampling: tuple[SamplingKey, dict],
               stream: bool) -> _GenJob:
        """Queue ``n`` images of ``prompt``: image k gets ``image_seed(seed, key_of_prompt, k)``, as in
        ``TextToImage.generate`` (429 when the queue is full)."""
        key, over = sampling
        seeds = [image_seed(seed, key_of_prompt, k) for k in range(n)]
        job = _GenJob(loop, n, self.model.records(prompt, seed, key_of_prompt, n, **over))
        ids = self.model.tokenize(prompt)[0]
        finished: dict[int, torch.Tensor] = {}

        def listener(k, codes, done, final):  # batcher thread
            if not final:
                self.post.partial(job, k, codes, done)
                return
            finished[k] = codes
            if len(finished) == n:  # decode the request's images together, in order (see _ImagePost)
                self.post.final(job, torch.stack([finished[i] for i in range(n)]))
        try:
            job.ticket = self.batcher.submit(
                ids, seeds, key, listener=listener,
                on_error=lambda msg: job.put({"type": "error", "message": f"generation failed: {msg}"}),
                preview_every=self.preview_codes if stream else 0)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", "rate_limit_error",
                           headers={"Retry-After": str(e.retry_after)}) from None
        return job

    def cancel(self, job: _GenJob) -> None:
        if not job.cancelled:
            job.cancelled = True
            if job.ticket is not None:
                job.ticket.cancel()
            self.metrics.cancel()

    async def run_aux(self, fn, *args):
        """Run a captioner/CLIP call on the single auxiliary thread (bounded: 429 when too many wait)."""
        if self.aux_waiting >= self.opts.max_queue:
            raise ApiError(429, f"server busy: {self.aux_waiting} caption/rerank requests waiting", "rate_limit_error",
                           headers={"Retry-After": "5"})
        self.aux_waiting += 1
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self.aux, fn, *args),
                                          self.opts.timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, f"timed out after {self.opts.timeout:g} s", "timeout") from None
        finally:
            self.aux_waiting -= 1


async def _collect(server: Server, job: _GenJob, request: Request | None, deadline: float, partial: bool):
    """Yield the job's events until its n final images arrived; raises ApiError on timeout/error. With
    ``request``, a client that went away cancels the job; without, the caller handles cancellation. Yields
    ``None`` as a heartbeat when nothing happened for a second (streaming keeps the connection checked)."""
    loop = asyncio.get_running_loop()
    left = job.n
    while left:
        wait = deadline - loop.time()
        if wait <= 0:
            raise ApiError(504, f"timed out after {server.opts.timeout:g} s (queue + decoding); try fewer images "
                                f"or later", "timeout")
        try:
            ev = await asyncio.wait_for(job.events.get(), min(wait, 1.0))
        except asyncio.TimeoutError:
            if request is not None and await request.is_disconnected():
                raise ApiError(499, "client closed the request", "cancelled")
            yield None
            continue
        if ev["type"] == "error":
            raise ApiError(500, ev["message"], "server_error")
        if ev["type"] == "image":
            left -= 1
            yield ev
        elif partial:
            yield ev
