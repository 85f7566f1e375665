"""Captions per second: greedy, sampling and beam search (KV cache), and EasyNLP's uncached loop as the baseline.

    OMP_NUM_THREADS=1 python bench/bench_caption.py --model runs/cap_img        # a trained captioner
    python bench/bench_caption.py                                              # random synthetic-recipe model

Without ``--model`` a random captioner of the synthetic-set recipe (ViT ``small`` at 64 px + GPT ``small``,
text_len 32) is timed; a random model never emits the end token, so every caption runs the full ``text_len`` steps
(the worst case). Inputs are synthetic-set images (``tuwen.data.synth``), or clips for a video model. Image
decoding/preprocessing is excluded (pixel values are prepared once); the prefix encoder is included.
Prints captions/s per strategy and the ratio to greedy and to the uncached EasyNLP-style loop.
"""
from __future__ import annotations

import argparse
import time

import torch


def build_random(device):
    from tuwen.models.vit import ViTConfig
    from tuwen.models.captioner import Captioner, CaptionerConfig
    from tuwen.text.tokenizer import TextTokenizer
    from tuwen.data import synth

    import random
    texts = [synth.make_sample(random.Random(i), 16)[1] for i in range(200)]
    tok = TextTokenizer.train(texts, vocab_size=200)
    v = ViTConfig.preset("small")
    cfg = CaptionerConfig.build(prefix_encoder="vit", img_len=v.num_patches, image_size=v.image_size, text_len=32,
                                text_vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_embd=128, vit=v,
                                vit_proj=True)
    torch.manual_seed(0)
    return Captioner(cfg, tok).to(device).eval()


def inputs(model, n):
    import random
    from tuwen.data import synth
    c = model.config
    if c.video:
        items = [synth.make_video_sample(random.Random(i), c.image_size, frame_num=c.frame_num)[0] for i in range(n)]
    else:
        items = [synth.make_sample(random.Random(i), c.image_size)[0] for i in range(n)]
    return model.pixel_values(items)


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="captioner folder (default: a random synthetic-recipe model)")
    ap.add_argument("--n", type=int, default=64, help="inputs to caption per measurement")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--beams", default="3,5", help="beam widths to time")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per strategy (best is kept)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from naive import generate_naive  # bench/naive.py (this script's folder is on sys.path)
    from tuwen.models.captioner import Captioner

    dev = torch.device(args.device)
    model = Captioner.from_pretrained(args.model, device=dev) if args.model else build_random(dev)
    c = model.config
    pv = inputs(model, args.n)
    what = "video clips" if c.video else "images"
    print(f"model: {args.model or 'random (synthetic recipe)'}; {c.prefix_encoder} prefix, {c.prefix_len} prefix "
          f"positions, text_len {c.text_len}, GPT {c.gpt.n_layer}L/{c.gpt.n_embd}; {model.num_params() / 1e6:.2f} M params; "
          f"{args.n} {what}, batch {args.batch_size}, {dev}, {torch.get_num_threads()} thread(s)")

    def run(**kw):
        return lambda: model.generate(pixel_values=pv, batch_size=args.batch_size, **kw)

    def naive():  # EasyNLP's decoding loop: no KV cache, full forward over the growing sequence each step
        for s in range(0, pv.shape[0], args.batch_size):
            with torch.inference_mode():
                pre = model.prefix_inputs(pv[s:s + args.batch_size])
                generate_naive(model.gpt, **pre, num_tokens=c.text_len, seeds=0, top_k=1,
                               eos_id=model.end_id, pad_id=model.end_id)

    rows = [("greedy (KV cache)", run(top_k=1)),
            ("sampling top_k=20 (KV cache)", run(top_k=20, temperature=1.0)),
            ("greedy, uncached (EasyNLP loop)", naive)]
    rows += [(f"beam search, {b} beams", run(num_beams=int(b))) for b in args.beams.split(",") if b.strip()]
    lengths = [len(model.tokenizer.encode(t[0])) for t in model.generate(pixel_values=pv[:16], top_k=1)]
    print(f"mean greedy caption length: {sum(lengths) / len(lengths):.1f} tokens (of text_len {c.text_len})")
    base = None
    print(f"{'strategy':36s} {'captions/s':>11s} {'vs greedy':>10s}")
    results = {}
    for name, fn in rows:
        t = timeit(fn, args.repeat)
        rate = args.n / t
        results[name] = rate
        base = base or rate
        print(f"{name:36s} {rate:11.1f} {rate / base:9.2f}×")
    print(f"KV cache speed-up over the uncached loop (greedy): "
          f"{results['greedy (KV cache)'] / results['greedy, uncached (EasyNLP loop)']:.2f}×")


if __name__ == "__main__":
    main()
