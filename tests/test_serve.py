"""``tuwen serve``: continuous batching equals ``generate``, endpoints, bad input, 429, disconnects, auth.

The servers run under real uvicorn on 127.0.0.1 (ephemeral ports) and are called with urllib."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
pytest.importorskip("python_multipart", reason="the serve extra (python-multipart) is not installed")

from PIL import Image  # noqa: E402

from tuwen.models.gpt import GPT, GPTConfig, KVCache  # noqa: E402
from tuwen.models.text2image import TextToImage, image_seed  # noqa: E402
from tuwen.pipelines import demo_model_path  # noqa: E402
from tuwen.serve.app import ServeOptions, Server, create_app, serve_in_thread  # noqa: E402
from tuwen.serve.batcher import Batcher, QueueFull, SamplingKey  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "v1"
PROMPT = "左上角有一个红色的圆形"


# ============================================================================================ GPT per-row positions

def test_gpt_per_row_positions_equal_scalar_and_separate_rows():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=24, n_out=40, n_layer=2, n_head=2, n_embd=32)).eval()
    B, P = 3, 5
    ids = torch.randint(0, 50, (B, P))
    nxt = torch.randint(0, 40, (B, 1))
    with torch.inference_mode():
        # same position for every row: the [B] tensor path equals the int path
        c1 = KVCache.for_model(m, B, 12)
        m(ids, cache=c1, start_pos=0)
        ref = m(nxt, cache=c1, start_pos=P, logits_start=-1)
        c2 = KVCache.for_model(m, B, 12)
        m(ids, cache=c2, start_pos=0)
        got = m(nxt, cache=c2, start_pos=torch.full((B,), P), logits_start=-1)
        assert torch.allclose(got, ref, atol=1e-6)
        assert torch.allclose(c2.k[:, :, :, :P + 1], c1.k[:, :, :, :P + 1], atol=1e-6)
        # rows at different positions in one step equal each row run alone at its own position
        lens = [2, 5, 3]
        cache = KVCache.for_model(m, B, 12)
        for b, n in enumerate(lens):
            one = KVCache.for_model(m, 1, 12)
            m(ids[b:b + 1, :n], cache=one, start_pos=0)
            cache.k[:, b] = one.k[:, 0]
            cache.v[:, b] = one.v[:, 0]
        out = m(nxt, cache=cache.narrow(B, max(lens) + 1), start_pos=torch.tensor(lens), logits_start=-1)
        for b, n in enumerate(lens):
            alone = m(torch.cat([ids[b:b + 1, :n], nxt[b:b + 1]], 1), logits_start=-1)
            assert torch.allclose(out[b], alone[0], atol=1e-5)


# ============================================================================================ batcher

@pytest.fixture(scope="module")
def demo():
    return TextToImage.from_pretrained(demo_model_path()).eval()


def _key(model, **over):
    sp = model.sampling_params(**over)
    return SamplingKey(sp.top_k, sp.top_p, sp.temperature, sp.guidance_scale)


def test_joining_a_running_batch_changes_no_image(demo):
    """Requests submitted while others decode (staggered, more images than max_batch, different sampling
    settings) give exactly the codes of TextToImage.generate for the same seeds."""
    reqs = [(PROMPT, 3, {}), ("右下角有一个蓝色的正方形", 2, {"guidance_scale": None, "top_k": 5}),
            ("中间有一个绿色的三角形", 2, {"temperature": 0.8})]
    refs = [demo.generate(p, num_images_per_prompt=n, seed=11, return_codes=True, **kw)[0] for p, n, kw in reqs]
    b = Batcher(demo, max_batch=3, max_queue=16).start()
    got = [dict() for _ in reqs]
    done = threading.Event()
    joined_mid_run = []
    try:
        for i, (p, n, kw) in enumerate(reqs):
            def listener(k, codes, rows, final, i=i):
                if final:
                    got[i][k] = codes
                    if sum(map(len, got)) == 7:
                        done.set()
            if i:  # wait until the earlier images are half-way through
                t0 = time.time()
                while b.steps < 10 * i and time.time() - t0 < 30:
                    time.sleep(0.002)
                joined_mid_run.append(b.running > 0)
            b.submit(demo.tokenize(p)[0], [image_seed(11, 0, k) for k in range(n)], _key(demo, **kw), listener,
                     preview_every=8)
        assert done.wait(60)
    finally:
        b.stop()
    assert all(joined_mid_run)
    for i, (p, n, kw) in enumerate(reqs):
        for k in range(n):
            assert torch.equal(got[i][k], refs[i][k]), (p, k)


def test_batcher_queue_bound_and_cancel(demo):
    b = Batcher(demo, max_batch=1, max_queue=3)  # not started: everything waits
    ids = demo.tokenize(PROMPT)[0]
    t1 = b.submit(ids, [1, 2], _key(demo), lambda *a: None)
    with pytest.raises(QueueFull) as e:
        b.submit(ids, [3, 4], _key(demo), lambda *a: None)
    assert e.value.retry_after >= 1 and b.waiting == 2
    t1.cancel()
    assert b.waiting == 0
    b.submit(ids, [3, 4, 5], _key(demo), lambda *a: None)


# ============================================================================================ HTTP

def call(url, path, body=None, *, method=None, headers=None, raw: bytes | None = None, timeout=60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def jcall(url, path, body=None, **kw):
    st, h, b = call(url, path, body, **kw)
    return st, h, json.loads(b) if b else None


def wait_ready(url, server=None):
    t0 = time.time()
    while time.time() - t0 < 60:
        st, _, b = jcall(url, "/health")
        if st == 200:
            return b
        time.sleep(0.05)
    raise AssertionError("server did not become ready")


@pytest.fixture(scope="module")
def srv():
    server = Server(ServeOptions(captioner=str(FIX / "cap"), clip=str(FIX / "clip"), max_batch=4, max_queue=8,
                                 max_n=4, max_image_bytes=300_000, max_images=4, timeout=60))
    url, stop = serve_in_thread(create_app(server))
    wait_ready(url)
    yield url, server
    stop()


def png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def b64png(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_health_page_and_metrics(srv):
    url, server = srv
    st, _, h = jcall(url, "/health")
    assert st == 200 and h["status"] == "ready" and h["model"] == "demo_t2i" and h["image_size"] == 64
    assert h["captioner"] and h["rerank"].startswith("clip:")
    st, hd, page = call(url, "/")
    assert st == 200 and "text/html" in hd["content-type"] and "左上角" in page.decode()
    for name in ("app.js", "style.css"):
        assert call(url, f"/static/{name}")[0] == 200
    assert jcall(url, "/static/../app.py")[0] == 404
    jcall(url, "/v1/images/generations", {"prompt": PROMPT, "n": 1, "seed": 1})
    st, hd, text = call(url, "/metrics")
    text = text.decode()
    assert st == 200 and hd["content-type"].startswith("text/plain")
    for name in ("tuwen_requests_total{code=\"200\",endpoint=\"/v1/images/generations\"}", "tuwen_queue_depth",
                 "tuwen_batch_size_bucket", "tuwen_images_per_second", "tuwen_request_latency_seconds_count",
                 "tuwen_images_generated_total"):
        assert name in text, name


def test_same_seed_same_png_as_tuwen_generate(srv, tmp_path):
    from tuwen.cli import main
    url, _ = srv
    assert main(["generate", PROMPT, "-n", "2", "--seed", "5", "--out", str(tmp_path), "--device", "cpu"]) == 0
    st, _, out = jcall(url, "/v1/images/generations", {"prompt": PROMPT, "n": 2, "seed": 5,
                                                       "response_format": "b64_json", "size": "64x64"})
    assert st == 200 and out["seed"] == 5 and [d["index"] for d in out["data"]] == [0, 1]
    for k in range(2):
        assert base64.b64decode(out["data"][k]["b64_json"]) == (tmp_path / f"prompt000_{k}.png").read_bytes()
    # and again, concurrently with other requests: still the same bytes
    res = {}

    def go(i):
        res[i] = jcall(url, "/v1/images/generations", {"prompt": PROMPT, "n": 2, "seed": 5 if i == 0 else i})
    ths = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    assert [d["b64_json"] for d in res[0][2]["data"]] == [d["b64_json"] for d in out["data"]]


def test_predict_easynlp_rows(srv):
    url, server = srv
    demo = server.model  # as tuwen generate loads it (int8 weights on CPU)
    st, _, one = jcall(url, "/predict", {"text": PROMPT, "max_generated_num": 2, "seed": 3})
    assert st == 200 and len(one["gen_imgbase64"]) == 2 and one["idx"] == 0
    st, _, rows = jcall(url, "/predict", [{"text": PROMPT, "idx": "a7", "seed": 3},
                                          {"text": "右下角有一个蓝色的正方形", "seed": 3}])
    assert st == 200 and [r["idx"] for r in rows] == ["a7", 1]
    # same codes as TextToImage.generate with the rows' idx as keys (--mode=predict's rule); each row's images
    # are decoded as one batch, as generate decodes one prompt's images
    ref = demo.generate([PROMPT, "右下角有一个蓝色的正方形"], seed=3, keys=["a7", 1], return_codes=True)
    for i in range(2):
        want = demo.decode_codes(ref[i, :1])[0]
        assert png(rows[i]["gen_imgbase64"][0]).tobytes() == want.tobytes()


def sse(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.decode().split("\n\n"):
        ev = [line for line in block.split("\n") if line and not line.startswith(":")]
        if ev:
            name = next(x[6:].strip() for x in ev if x.startswith("event:"))
            out.append((name, json.loads("".join(x[5:].strip() for x in ev if x.startswith("data:")))))
    return out


def test_streaming_partial_images_then_final(srv):
    url, _ = srv
    st, hd, raw = call(url, "/v1/images/generations", {"prompt": PROMPT, "n": 2, "seed": 9, "stream": True})
    assert st == 200 and hd["content-type"].startswith("text/event-stream")
    evs = sse(raw)
    names = [e for e, _ in evs]
    assert names[0] == "queued" and names[-1] == "done" and names.count("image") == 2
    parts = [d for e, d in evs if e == "partial" and d["index"] == 0]
    assert len(parts) == 7 and [p["codes_done"] for p in parts] == [8, 16, 24, 32, 40, 48, 56]  # every grid row
    first = png(parts[0]["b64_json"])
    assert first.size == (64, 64) and first.getpixel((32, 60)) == (232, 232, 232)  # not sampled yet: grey
    final = [d for e, d in evs if e == "image" and d["index"] == 0][0]["b64_json"]
    plain = jcall(url, "/v1/images/generations", {"prompt": PROMPT, "n": 2, "seed": 9})[2]
    assert final == plain["data"][0]["b64_json"] == evs[-1][1]["data"][0]["b64_json"]


def test_rerank_captions_and_scores(srv):
    url, _ = srv
    st, _, out = jcall(url, "/v1/images/generations", {"prompt": PROMPT, "n": 4, "seed": 2, "rerank": True,
                                                       "keep": 2})
    assert st == 200 and len(out["data"]) == 2 and out["scorer"].startswith("clip:")
    assert out["data"][0]["score"] >= out["data"][1]["score"]
    imgs = [png(d["b64_json"]) for d in out["data"]]
    st, _, r = jcall(url, "/v1/rerank", {"text": PROMPT, "images": [b64png(i) for i in imgs]})
    assert st == 200 and len(r["scores"]) == 2 and sorted(r["order"]) == [0, 1]
    assert r["scores"][0] == pytest.approx(out["data"][0]["score"], abs=1e-4)
    st, _, c = jcall(url, "/v1/captions", {"image": b64png(imgs[0]), "max_generated_num": 2, "num_beams": 2})
    assert st == 200 and len(c["data"]) == 1 and len(c["data"][0]["gen_text"]) == 2
    assert all(isinstance(t, str) for t in c["data"][0]["gen_text"])
    # multipart upload gives the same caption as JSON
    st, _, c1 = jcall(url, "/v1/captions", {"images": [b64png(imgs[0])]})
    buf = io.BytesIO()
    imgs[0].save(buf, "PNG")
    st2, _, c2 = _multipart(url, "/v1/captions", [("image", "a.png", buf.getvalue())])
    assert st == st2 == 200 and c1["data"][0]["gen_text"] == c2["data"][0]["gen_text"]


def _multipart(url, path, files, fields=None):
    boundary = "tuwenboundary42"
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    for name, fn, data in files:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{fn}\"\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return jcall(url, path, raw=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


BAD_GENERATIONS = [
    ({"n": 1}, 400, "prompt is required"),
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": "   "}, 400, "prompt is empty"),
    ({"prompt": 5}, 400, "prompt must be a string"),
    ({"prompt": "x" * 501}, 400, "501 characters"),
    ({"prompt": "红" * 40}, 400, "tokens long"),
    ({"prompt": PROMPT, "n": 0}, 400, "n must be between 1 and 4"),
    ({"prompt": PROMPT, "n": 5}, 400, "n must be between 1 and 4"),
    ({"prompt": PROMPT, "n": "2"}, 400, "n must be an integer"),
    ({"prompt": PROMPT, "n": True}, 400, "n must be an integer"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed must be between"),
    ({"prompt": PROMPT, "seed": 1.5}, 400, "seed must be an integer"),
    ({"prompt": PROMPT, "top_k": 0}, 400, "top_k must be"),
    ({"prompt": PROMPT, "top_p": 1.5}, 400, "top_p"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"prompt": PROMPT, "temperature": "hot"}, 400, "temperature must be a finite number"),
    ({"prompt": PROMPT, "response_format": "url"}, 400, "b64_json"),
    ({"prompt": PROMPT, "size": "1024x1024"}, 400, "64x64"),
    ({"prompt": PROMPT, "model": "dall-e-3"}, 400, "not served here"),
    ({"prompt": PROMPT, "keep": 1}, 400, "keep needs"),
    ({"prompt": PROMPT, "n": 2, "rerank": True, "keep": 3}, 400, "keep must be between 1 and 2"),
    ({"prompt": PROMPT, "rerank": "yes"}, 400, "rerank must be true or false"),
    ({"prompt": PROMPT, "steps": 50}, 400, "unknown field(s) 'steps'"),
]


@pytest.mark.parametrize("body,status,words", BAD_GENERATIONS)
def test_bad_generation_requests(srv, body, status, words):
    url, _ = srv
    st, _, out = jcall(url, "/v1/images/generations", body)
    assert st == status and words in out["error"]["message"], out
    assert "\n" not in out["error"]["message"] and "Traceback" not in out["error"]["message"]


def test_bad_bodies_and_uploads(srv):
    url, _ = srv
    cases = [
        (call(url, "/v1/images/generations", raw=b"{not json"), 400, "not valid JSON"),
        (call(url, "/v1/images/generations", raw=b""), 400, "empty request body"),
        (call(url, "/v1/images/generations", raw=b"[1, 2]"), 400, "must be a JSON object"),
        (call(url, "/v1/images/generations", raw=b"\xff\xfe"), 400, "not UTF-8"),
        (call(url, "/v1/images/generations", raw=b"prompt=x",
              headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "send JSON"),
        (call(url, "/predict", raw=b"[]"), 400, "no rows"),
        (call(url, "/predict", [{"text": PROMPT}, "x"]), 400, "row 1 must be an object"),
        (call(url, "/predict", [{"text": ""}]), 400, "row 0: text is empty"),
        (call(url, "/predict", {"text": PROMPT, "max_generated_num": 9}), 400, "max_generated_num must be between"),
        (call(url, "/predict", {"prompt": PROMPT}), 400, "unknown field(s) 'prompt'"),
        (call(url, "/v1/captions", {"image": "bm90IGFuIGltYWdl"}), 400, "image 0: "),
        (call(url, "/v1/captions", {"image": "%%%"}), 400, "not valid base64"),
        (call(url, "/v1/captions", {"image": 5}), 400, "must be a base64 string"),
        (call(url, "/v1/captions", {}), 400, "give exactly one of"),
        (call(url, "/v1/captions", {"images": []}), 400, "non-empty list"),
        (call(url, "/v1/captions", {"images": ["a"] * 5}), 400, "limit is 4"),
        (call(url, "/v1/captions", {"image": base64.b64encode(b"\x89PNG" + b"0" * 400_000).decode()}), 413,
         "limit of 300,000"),
        (call(url, "/v1/rerank", {"images": [b64png(Image.new("RGB", (8, 8)))]}), 400, "text is required"),
        (call(url, "/v1/nothing", {}), 404, "no such endpoint"),
        (call(url, "/v1/images/generations"), 405, "not allowed"),
    ]
    # a small file that would decode to a huge image: refused from its header
    huge = io.BytesIO()
    Image.new("1", (5000, 5000)).save(huge, "PNG")
    cases.append((call(url, "/v1/captions", {"image": base64.b64encode(huge.getvalue()).decode()}), 413,
                  "too large"))
    cases.append((_multipart_raw(url, [("image", "notes.txt", b"hello, not an image")]), 400, "file 'notes.txt'"))
    cases.append((_multipart_raw(url, [], {"max_generated_num": "1"}), 400, "no file in the upload"))
    for (st, _, body), status, words in cases:
        msg = json.loads(body)["error"]["message"]
        assert st == status and words in msg, (st, msg, words)
        assert "\n" not in msg


def _multipart_raw(url, files, fields=None):
    st, h, b = _multipart(url, "/v1/captions", files, fields)
    return st, h, json.dumps(b).encode()


def test_queue_full_is_429_with_retry_after(srv):
    url, server = srv  # max_queue 8
    server.batcher.pause()
    res = {}

    def go(name):
        res[name] = jcall(url, "/v1/images/generations", {"prompt": PROMPT, "n": 4, "seed": 1})
    ths = [threading.Thread(target=go, args=(name,)) for name in "ab"]
    try:
        for i, th in enumerate(ths):
            th.start()
            t0 = time.time()
            while server.batcher.waiting < 4 * (i + 1) and time.time() - t0 < 10:
                time.sleep(0.01)
        assert server.batcher.waiting == 8
        st, h, out = jcall(url, "/v1/images/generations", {"prompt": PROMPT, "n": 1})
        assert st == 429 and int(h["retry-after"]) >= 1 and "queue is full" in out["error"]["message"]
        assert jcall(url, "/predict", {"text": PROMPT})[0] == 429
        assert jcall(url, "/v1/images/generations", {"prompt": PROMPT, "stream": True})[0] == 429
    finally:
        server.batcher.resume()
    for th in ths:
        th.join(60)
    assert res["a"][0] == res["b"][0] == 200 and res["a"][2]["data"] == res["b"][2]["data"]


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_drops_the_request(srv, stream):
    url, server = srv
    host, port = url.removeprefix("http://").split(":")
    before = server.metrics.cancelled
    server.batcher.pause()
    try:
        body = json.dumps({"prompt": PROMPT, "n": 4, "stream": stream}).encode()
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        t0 = time.time()
        while server.batcher.waiting < 4 and time.time() - t0 < 10:
            time.sleep(0.01)
        assert server.batcher.waiting == 4
        s.close()
        while server.batcher.waiting and time.time() - t0 < 15:
            time.sleep(0.05)
        assert server.batcher.waiting == 0 and server.metrics.cancelled == before + 1
    finally:
        server.batcher.resume()


def test_timeout_is_504(demo):
    server = Server(ServeOptions(timeout=0.5, warmup=False, max_batch=2, max_queue=8))
    url, stop = serve_in_thread(create_app(server))
    try:
        server.batcher.pause()
        st, _, out = jcall(url, "/v1/images/generations", {"prompt": PROMPT})
        assert st == 504 and "timed out after 0.5 s" in out["error"]["message"]
        assert server.batcher.waiting == 0
        server.batcher.resume()
        assert jcall(url, "/health")[0] == 200
    finally:
        stop()


def test_api_key_and_disabled_endpoints():
    server = Server(ServeOptions(api_key="s3cret", warmup=False, max_batch=2, max_queue=8))
    url, stop = serve_in_thread(create_app(server))
    try:
        st, h, out = jcall(url, "/v1/images/generations", {"prompt": PROMPT})
        assert st == 401 and h["www-authenticate"] == "Bearer" and "API key" in out["error"]["message"]
        assert jcall(url, "/metrics")[0] == 401
        assert jcall(url, "/v1/images/generations", {"prompt": PROMPT},
                     headers={"Authorization": "Bearer nope"})[0] == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert jcall(url, "/v1/images/generations", {"prompt": PROMPT}, headers=auth)[0] == 200
        assert jcall(url, "/health")[0] == 200 and call(url, "/")[0] == 200
        st, _, out = jcall(url, "/v1/captions", {"image": "x"}, headers=auth)
        assert st == 404 and "--captioner" in out["error"]["message"]
        st, _, out = jcall(url, "/v1/images/generations", {"prompt": PROMPT, "rerank": True}, headers=auth)
        assert st == 400 and "--clip" in out["error"]["message"]
    finally:
        stop()


def test_cli_refuses_open_non_loopback_and_bad_options(capsys):
    from tuwen.cli import main
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api_key" in capsys.readouterr().err
    assert main(["serve", "--max_queue", "2", "--max_n", "4"]) == 2
    assert "--max_queue (2) must be at least --max_n (4)" in capsys.readouterr().err


def test_bf16_server_matches_generate_with_bf16_weights(tmp_path):
    """The README's advice for concurrent users: a bf16 server and `tuwen generate --weights_dtype bf16` agree."""
    from tuwen.cli import main
    server = Server(ServeOptions(weights_dtype="bf16", max_batch=4, max_queue=8, max_n=4, timeout=60))
    url, stop = serve_in_thread(create_app(server))
    try:
        wait_ready(url)
        assert main(["generate", PROMPT, "-n", "2", "--seed", "9", "--out", str(tmp_path), "--device", "cpu",
                     "--weights_dtype", "bf16"]) == 0
        st, _, out = jcall(url, "/v1/images/generations", {"prompt": PROMPT, "n": 2, "seed": 9})
        assert st == 200
        for k in range(2):
            assert base64.b64decode(out["data"][k]["b64_json"]) == (tmp_path / f"prompt000_{k}.png").read_bytes()
    finally:
        stop()
