"""Quality guard of low-precision weights and speculative decoding on the shipped demo model (issue 16).

For 64 one-object prompts of the synthetic set (every colour × shape at rotating positions, seed 0):
greedy codes agreement of bf16/int8/w8a8 weights with fp32, and the attribute checker's accuracy of sampled images
(the model's defaults: top_k 16, guidance 2.0) per weights dtype, one-by-one and with speculative decoding,
plus the speculative decoder's codes per step.

    OMP_NUM_THREADS=1 python bench/quality_lowp.py [--n 64] [--speculative 4]
    OMP_NUM_THREADS=2 python bench/quality_lowp.py --base 8     # a base-size model (random weights) instead

``--base N``: the base shape (12×768, 32 text tokens + 256 codes, random weights, seed 0), N random prompts,
greedy codes of fp32 as the reference; per weights dtype the free-running greedy agreement (paths split at the
first near-tie, which random weights have many of) and the teacher-forced one (the share of the 256 positions
where the dtype's most likely code, given fp32's greedy prefix, is fp32's).
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from tuwen.data import checker
from tuwen.data.synth import COLOR_ZH, POSITION_ZH, SHAPE_ZH
from tuwen.models.text2image import TextToImage
from tuwen.pipelines import demo_model_path


def prompts(n: int) -> list[str]:
    combos = list(itertools.product(COLOR_ZH, SHAPE_ZH))
    pos = list(POSITION_ZH)
    return [f"{POSITION_ZH[pos[i % len(pos)]]}有一个{COLOR_ZH[c]}的{SHAPE_ZH[s]}"
            for i, (c, s) in enumerate(itertools.islice(itertools.cycle(combos), n))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--speculative", type=int, default=4)
    ap.add_argument("--dtypes", default="fp32,bf16,int8,w8a8")
    ap.add_argument("--base", type=int, default=0, help="measure a base-size random model with this many prompts")
    a = ap.parse_args()
    if a.base:
        return base_agreement(a.base, a.dtypes.split(","))
    ps = prompts(a.n)
    ref = None
    print(f"demo model, {len(ps)} prompts, seed 0, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for wd in a.dtypes.split(","):
        model = TextToImage.from_pretrained(demo_model_path(), weights_dtype=wd)
        greedy = model.generate(ps, seed=0, top_k=1, return_codes=True)[:, 0]
        ref = greedy if ref is None else ref
        agree = float((greedy == ref).float().mean())
        for spec in (None, a.speculative):
            st: dict = {}
            t = time.perf_counter()
            codes = model.generate(ps, seed=0, return_codes=True, speculative=spec, batch_size=len(ps))[:, 0] \
                if spec is None else torch.cat([model.gpt and _spec(model, ps[i:i + 16], spec, st)
                                                for i in range(0, len(ps), 16)])
            dt = time.perf_counter() - t
            imgs = model.decode_codes(codes)
            s = checker.score(imgs, ps)
            extra = f", {st['tokens_per_step']:.2f} codes/step" if st else ""
            print(f"{wd:>4} {'speculative ' + str(spec) if spec else 'one-by-one':<14} greedy agreement {agree:6.1%}  "
                  f"colour {s['color']:.1%} shape {s['shape']:.1%} position {s['position']:.1%} "
                  f"object {s['object']:.1%} image {s['image']:.1%}  ({dt:.1f} s codes{extra})", flush=True)


@torch.inference_mode()
def base_agreement(n: int, dtypes: list[str], P: int = 32, N: int = 256) -> None:
    import copy

    from tuwen.models.gpt import GPT, GPTConfig
    from tuwen.models.quant import quantize_weights
    from tuwen.sampling import generate

    torch.manual_seed(0)
    fp32 = GPT(GPTConfig.preset("base", vocab_size=37512, block_size=P + N, n_out=16384)).eval()
    prefix = torch.randint(16384, 37512, (n, P))
    ref = generate(fp32, prefix_ids=prefix, num_tokens=N, seeds=torch.arange(n), top_k=1)  # [n, N]
    print(f"base (12×768) random weights, {n} prompts, {P} + {N} codes, greedy, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for wd in dtypes:
        m = quantize_weights(copy.deepcopy(fp32), wd)
        free = generate(m, prefix_ids=prefix, num_tokens=N, seeds=torch.arange(n), top_k=1)
        logits = m(torch.cat([prefix, ref[:, :-1]], dim=1))[:, P - 1:]  # [n, N, n_out]: the code at each position
        forced = (logits.argmax(-1) == ref).float().mean()
        print(f"{wd:>4}  greedy agreement free-running {float((free == ref).float().mean()):6.1%}, "
              f"teacher-forced {float(forced):6.1%}", flush=True)


def _spec(model, ps, k, st):
    seeds = model._image_seeds(0, None, len(ps), 1)
    p = model.sampling_params()
    uncond = model.uncond_ids(1) if p.guidance_scale is not None else None
    from tuwen.sampling import generate
    one: dict = {}
    out = generate(model.gpt, prefix_ids=model.tokenize(ps), num_tokens=model.config.img_len, seeds=seeds,
                   top_k=p.top_k, top_p=p.top_p, temperature=p.temperature, guidance_scale=p.guidance_scale,
                   uncond_prefix_ids=uncond, speculative=k, stats=one)
    st["tokens_per_step"] = (st.get("tokens_per_step", 0) * st.get("n", 0) + one["tokens_per_step"] * len(ps)) / (
        st.get("n", 0) + len(ps))
    st["n"] = st.get("n", 0) + len(ps)
    return out


if __name__ == "__main__":
    main()
