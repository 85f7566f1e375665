"""Captioning (image/video → text): prefixes, KV cache, decoding, EasyNLP checkpoints, commands, pipeline.

Everything is tiny (32 px images, 2-layer models) so the file runs in seconds on a CPU.
"""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tuwen import sampling
from tuwen.cli import main as cli_main
from tuwen.errors import TuwenError
from tuwen.models.gpt import GPT, GPTConfig, KVCache
from tuwen.models.vit import ViTConfig, VisionTransformer
from tuwen.models.vqgan import VQGAN, VQGANConfig
from tuwen.data.images import fit_frames
from tuwen.models.captioner import Captioner, CaptionerConfig, caption_seed, normalize_pixels
from tuwen.pipelines import CaptionPipeline
from tuwen.text.tokenizer import TextTokenizer

CAPS = ["红色", "左上角有一个蓝色的正方形", "下方有一个绿色的三角形"]
COLORS = [(220, 40, 40), (40, 70, 225), (50, 170, 50)]


def _img(color, size=32, box=None) -> Image.Image:
    im = Image.new("RGB", (size, size), (248, 248, 246))
    x = np.array(im)
    a, b, c, d = box or (4, 4, 20, 20)
    x[b:d, a:c] = color
    return Image.fromarray(x)


def _b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(CAPS + ["一个红色的圆形从左向右移动", "上方有一个黄色的长方形"], vocab_size=120)


def _vit_cfg(tok, frame_num=0, n_embd=32, proj=True, text_len=12, **kw):
    v = ViTConfig.preset("tiny")  # 32 px, patch 8 → 16 patches, width 64, output 64
    return CaptionerConfig.build(prefix_encoder="vit", frame_num=frame_num,
                                 img_len=4 if frame_num else v.num_patches, image_size=32, text_len=text_len,
                                 text_vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=n_embd,
                                 vit=v.to_dict(), vit_proj=proj, **kw)


def _tiny_vqgan(seed=0) -> VQGAN:
    torch.manual_seed(seed)
    cfg = VQGANConfig(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=32, embed_dim=16,
                      n_embed=64, resolution=32)
    return VQGAN(cfg).eval()


def _overfit(model: Captioner, images, texts, steps=150, lr=3e-3):
    """Teach a tiny model its captions (a few seconds): the test model for decoding/stopping/scoring."""
    torch.manual_seed(0)
    pv = model.pixel_values(images)
    ids = model.tokenize(texts)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        logits = model(pv, ids)
        loss = F.cross_entropy(logits.transpose(1, 2), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), float(loss.detach())


@pytest.fixture(scope="module")
def trained(tok):
    torch.manual_seed(0)
    m = Captioner(_vit_cfg(tok, n_embd=48, freeze_vit=False, text_len=14), tok)
    imgs = [_img(c, box=(4 + 8 * i, 4, 16 + 8 * i, 16)) for i, c in enumerate(COLORS)]
    m, loss = _overfit(m, imgs, CAPS)
    assert loss < 0.05, loss
    return m, imgs


# ----------------------------------------------------------------------------------------------- model

def test_prefix_shapes(tok):
    torch.manual_seed(0)
    imgs = [_img(c) for c in COLORS]
    m = Captioner(_vit_cfg(tok, n_embd=32), tok)               # tiny ViT output 64 → GPT prefix_proj 64→32
    pv = m.pixel_values(imgs)
    assert pv.shape == (3, 3, 32, 32) and m.gpt.config.n_prefix_embd == 64
    assert m.encode_images(pv).shape == (3, 16, 32)            # every patch token
    m = Captioner(_vit_cfg(tok, n_embd=64, proj=False), tok)   # EasyNLP rule: n_embd == width → no proj
    assert m.gpt.config.n_prefix_embd == 0 and m.encode_images(m.pixel_values(imgs)).shape == (3, 16, 64)
    mv = Captioner(_vit_cfg(tok, frame_num=3), tok)            # video: one CLS vector per frame
    pv = mv.pixel_values([imgs, imgs[::-1]])
    assert pv.shape == (2, 3, 3, 32, 32) and mv.encode_images(pv).shape == (2, 3, 32)
    # the video prefix is the per-frame CLS feature @ proj, in time order
    tokens = mv.vit.forward_tokens(pv[0])[:, 0] @ mv.vit.proj
    assert torch.allclose(mv.gpt.embed_prefix(tokens[None]), mv.encode_images(pv[:1]), atol=1e-6)
    vq = _tiny_vqgan()
    cfg = CaptionerConfig.build(prefix_encoder="vqgan", img_len=64, image_size=32, text_len=8,
                                text_vocab_size=tok.vocab_size, img_vocab_size=64, n_layer=2, n_head=2, n_embd=32,
                                vit=None)
    mq = Captioner(cfg, tok, vqgan=vq)
    assert mq.gpt.config.vocab_size == tok.vocab_size + 64 + 1 and mq.gpt.config.n_out == tok.vocab_size
    pq = mq.pixel_values(imgs)
    assert float(pq.min()) >= -1 and float(pq.max()) <= 1
    assert mq.encode_images(pq).shape == (3, 64, 32)
    ids = mq.prefix_inputs(pq)["prefix_ids"]                   # [codes + text_vocab][text]
    assert torch.equal(ids, vq.encode(pq).flatten(1) + tok.vocab_size)


def test_config_checks(tok):
    with pytest.raises(TuwenError, match="img_len"):
        _vit_cfg(tok).replace(img_len=15).validate()
    with pytest.raises(TuwenError, match="frame_num"):
        _vit_cfg(tok, frame_num=5)  # img_len 4 < 5 frames
    with pytest.raises(TuwenError, match="video needs the ViT"):
        CaptionerConfig.build(prefix_encoder="vqgan", frame_num=2, img_vocab_size=4, vit=None)


def test_cached_logits_equal_full_forward(trained):
    m, imgs = trained
    pv = m.pixel_values(imgs)
    ids = m.tokenize(CAPS)
    with torch.no_grad():
        full = m(pv, ids)                                      # [B, T, V] teacher forced, no cache
        feats = m.prefix_inputs(pv)["prefix_embeds"]
        P, T = feats.shape[1], ids.shape[1]
        cache = KVCache.for_model(m.gpt, 3, max_len=P + T - 1)
        step = [m.gpt(None, feats, cache=cache, start_pos=0, logits_start=-1)[:, -1]]
        for t in range(T - 1):
            step.append(m.gpt(ids[:, t:t + 1], cache=cache, start_pos=P + t, logits_start=-1)[:, -1])
    assert torch.allclose(torch.stack(step, 1), full, atol=1e-4)


def test_greedy_decoding_beam1_and_per_row_stopping(trained):
    m, imgs = trained
    ids = m.generate(imgs, return_ids=True)                    # [3, 1, T]
    assert m.decode(ids[:, 0]) == CAPS                         # rows of different lengths in one batch
    end = m.end_id
    for row, cap in zip(ids[:, 0].tolist(), CAPS):
        n = len(m.tokenizer.encode(cap))
        assert row[n] == end and all(t == end for t in row[n:])   # stopped at its own end token
    assert [m.generate([im])[0][0] for im in imgs] == CAPS    # batch of one = same
    pre = m.prefix_inputs(m.pixel_values(imgs))
    beam1, _ = sampling.beam_search(m.gpt, **pre, max_new_tokens=m.config.text_len, num_beams=1, eos_id=end,
                                    pad_id=end)
    assert torch.equal(beam1[:, 0].cpu(), ids[:, 0])           # beam width 1 == greedy
    beams = m.generate(imgs, num_beams=3, num_return_sequences=2)
    assert [b[0] for b in beams] == CAPS and all(len(b) == 2 and b[0] != b[1] for b in beams)
    # greedy with several captions = the best beams (distinct); the first is the greedy caption
    assert [g[0] for g in m.generate(imgs, num_return_sequences=2)] == CAPS


def test_sampling_is_seeded_per_input(trained):
    m, imgs = trained
    a = m.generate(imgs, top_k=50, temperature=3.0, num_return_sequences=3, seed=5, keys=["x", "y", "z"])
    b = m.generate(imgs[1:], top_k=50, temperature=3.0, num_return_sequences=3, seed=5, keys=["y", "z"])
    assert a[1:] == b                                          # independent of the batch
    c = m.generate(imgs, top_k=50, temperature=3.0, num_return_sequences=3, seed=6, keys=["x", "y", "z"])
    assert a != c and caption_seed(5, "x", 0) != caption_seed(5, "x", 1)


def test_log_likelihood(trained):
    m, imgs = trained
    ll = m.log_likelihood(imgs, CAPS)
    assert ll.shape == (3,) and ll.dtype == torch.float32 and bool((ll <= 0).all())
    wrong = m.log_likelihood(imgs, [CAPS[1], CAPS[2], CAPS[0]])
    assert bool((ll > wrong + 5).all())                         # the right caption is far more likely
    batched = m.log_likelihood(imgs + imgs, CAPS + CAPS[::-1], batch_size=2)
    assert torch.allclose(batched[:3], ll, atol=1e-4)
    # = sum of teacher-forced token log-probs (end token excluded by default)
    ids = m.tokenize(CAPS[:1])
    logp = m(m.pixel_values(imgs[:1]), ids).log_softmax(-1).gather(-1, ids[..., None])[0, :, 0]
    n = len(m.tokenizer.encode(CAPS[0]))
    assert float(ll[0]) == pytest.approx(float(logp[:n].sum().detach()), abs=1e-4)
    assert float(m.log_likelihood(imgs[:1], CAPS[0], include_end=True)[0]) == \
        pytest.approx(float(logp[:n + 1].sum().detach()), abs=1e-4)


def test_save_load_roundtrip_vit_and_vq(tmp_path, trained, tok):
    m, imgs = trained
    m.save_pretrained(tmp_path / "vit")
    m2 = Captioner.from_pretrained(tmp_path / "vit", num_beams=2)
    assert m2.config.sampling.num_beams == 2 and m2.generate(imgs, num_beams=1) == m.generate(imgs)
    with pytest.raises(TuwenError, match="cannot change text_len"):
        Captioner.from_pretrained(tmp_path / "vit", text_len=3)
    with pytest.raises(TuwenError, match="still-image model"):
        Captioner.from_pretrained(tmp_path / "vit", frame_num=4)
    cfg = CaptionerConfig.build(prefix_encoder="vqgan", img_len=64, image_size=32, text_len=8,
                                text_vocab_size=tok.vocab_size, img_vocab_size=64, n_layer=2, n_head=2, n_embd=32,
                                vit=None)
    mq = Captioner(cfg, tok, vqgan=_tiny_vqgan())
    mq.save_pretrained(tmp_path / "vq")
    assert (tmp_path / "vq" / "vqgan" / "config.json").exists()
    mq2 = Captioner.from_pretrained(tmp_path / "vq")
    pv = mq.pixel_values(imgs)
    assert torch.allclose(mq(pv, mq.tokenize(CAPS)), mq2(pv, mq2.tokenize(CAPS)), atol=1e-6)


def test_fit_frames(capsys):
    assert fit_frames([1, 2, 3, 4, 5], 3) == [1, 2, 3]                     # the first frame_num frames
    assert fit_frames([1, 2], 4, where="t.tsv:3") == [1, 2, 2, 2]         # padded with the last frame
    assert "t.tsv:3: the video has 2 frame(s) but frame_num=4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--strict"):
        fit_frames([1, 2], 4, strict=True)


# ----------------------------------------------------------------------------------------------- EasyNLP layout

def _mingpt_reference(sd: dict, n_head: int, idx: torch.Tensor | None, emb: torch.Tensor | None) -> torch.Tensor:
    """EasyNLP's MinGPT.forward (modeling_mingpt_i2t.py), written out: embeddings + pos, masked softmax attention
    with the attn.mask buffer, exact GELU MLP, ln_f, head. Independent of tuwen's GPT."""
    x = sd["transformer.tok_emb.weight"][idx] if idx is not None else None
    if emb is not None:
        x = emb if x is None else torch.cat([emb, x], 1)
    T, C = x.shape[1], x.shape[2]
    x = x + sd["transformer.pos_emb"][:, :T]
    n_layer = len({k.split(".")[2] for k in sd if k.startswith("transformer.blocks.")})

    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(h, name):
        return F.layer_norm(h, (C,), sd[name + ".weight"], sd[name + ".bias"])
    for i in range(n_layer):
        p = f"transformer.blocks.{i}."
        h = ln(x, p + "ln1")
        B = h.shape[0]
        q, k, v = (lin(h, p + f"attn.{n}").view(B, T, n_head, -1).transpose(1, 2) for n in ("query", "key", "value"))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        att = att.masked_fill(sd[p + "attn.mask"][:, :, :T, :T] == 0, float("-inf")).softmax(-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, C), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "ln2"), p + "mlp.0")), p + "mlp.2")
    return ln(x, "transformer.ln_f") @ sd["transformer.head.weight"].T


def _easynlp_gpt_sd(vocab, block, n_out, C=64, n_layer=2, seed=1) -> dict:
    torch.manual_seed(seed)
    g = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_out=n_out, n_layer=n_layer, n_head=2, n_embd=C))
    for p in g.parameters():  # not the init's zero biases / unit norms: every tensor matters
        p.data.normal_(0, 0.05)
    sd = {f"transformer.{k}": v.clone() for k, v in g.state_dict().items()}
    for i in range(n_layer):
        sd[f"transformer.blocks.{i}.attn.mask"] = torch.tril(torch.ones(block, block)).view(1, 1, block, block)
    return sd


def _write_easynlp(d: Path, config: dict, sd: dict, tok: TextTokenizer) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    torch.save(sd, d / "pytorch_model.bin")
    tok.save_pretrained(d)
    return d


def _openai_visual(width=64, proj_dim=None, seed=2) -> dict:
    """A random CLIP visual tower (32 px, patch 8) with OpenAI key names; heads = width // 64 as OpenAI infers."""
    torch.manual_seed(seed)
    vit = VisionTransformer(ViTConfig(image_size=32, patch_size=8, width=width, layers=2, heads=width // 64,
                                      output_dim=proj_dim or width))
    for p in vit.parameters():
        p.data.normal_(0, 0.05)
    return {k: v.clone() for k, v in vit.state_dict().items()}, vit


@pytest.mark.parametrize("variant", ["proj", "no_proj", "video"])
def test_easynlp_vit_checkpoint_loads(tmp_path, tok, variant):
    C = 64
    proj_dim = 64 if variant != "no_proj" else None
    vis, vit = _openai_visual(width=128 if variant != "no_proj" else 64, proj_dim=proj_dim)
    if variant == "no_proj":
        del vis["proj"]                       # EasyNLP: visual.proj = None when n_embd == width
    text_len, img_len = 8, 16
    sd = {f"first_stage_model.{k}": v for k, v in vis.items()}
    sd.update(_easynlp_gpt_sd(tok.vocab_size, text_len + img_len, tok.vocab_size, C))
    cfg = {"model_type": "mingpt_i2t", "vocab_size": tok.vocab_size, "block_size": text_len + img_len, "n_layer": 2,
           "n_head": 2, "n_embd": C, "decode_vocab_size": tok.vocab_size, "prefix_encoder_type": "vit",
           "prefix_encoder_ckpt_path": "ViT-L/14", "easynlp_version": "0.0.3"}
    d = _write_easynlp(tmp_path / "m", cfg, sd, tok)
    frame_num = 3 if variant == "video" else 0
    m = Captioner.from_pretrained(d, text_len=text_len, frame_num=frame_num)
    assert m.config.vit_proj == (variant != "no_proj") and m.config.frame_num == frame_num
    imgs = [_img(c) for c in COLORS]
    pv = m.pixel_values([imgs] if frame_num else imgs)
    ids = m.tokenize(CAPS[:1] if frame_num else CAPS)
    with torch.no_grad():
        if frame_num:   # CLIPGPTFrameTextGeneration: ln_post(x[:, 0]) @ proj per frame
            emb = (vit.forward_tokens(pv[0])[:, 0] @ vit.proj)[None]
        else:           # CLIPGPTImageTextGeneration: ln_post(x[:, 1:]) (@ proj)
            tokens = vit.forward_tokens(pv)[:, 1:]
            emb = tokens @ vit.proj if variant == "proj" else tokens
        want = _mingpt_reference(sd, 2, ids[:, :-1], emb)[:, emb.shape[1] - 1:]
        got = m(pv, ids)
    assert torch.allclose(got, want, atol=1e-4)
    # and it converts: a tuwen folder that gives the same logits
    m.save_pretrained(tmp_path / "converted")
    m2 = Captioner.from_pretrained(tmp_path / "converted")
    assert torch.allclose(m2(pv, ids), got, atol=1e-5)


def test_easynlp_vq_checkpoint_loads(tmp_path, tok):
    vq = _tiny_vqgan(3)
    for p in vq.parameters():
        p.data.normal_(0, 0.05)
    text_len, img_len, n_codes = 8, 64, 64
    sd = {f"first_stage_model.{k}": v for k, v in vq.state_dict().items()}
    sd.update(_easynlp_gpt_sd(tok.vocab_size + n_codes + 1, text_len + img_len, tok.vocab_size))
    cfg = {"model_type": "mingpt_i2t", "block_size": text_len + img_len, "n_layer": 2, "n_head": 2, "n_embd": 64,
           "decode_vocab_size": tok.vocab_size, "prefix_encoder_type": "vqgan",
           "prefix_encoder_ckpt_path": "vqgan_f16_16384.bin"}
    d = _write_easynlp(tmp_path / "vq", cfg, sd, tok)
    m = Captioner.from_pretrained(d, text_len=text_len, img_size=32)
    assert m.config.prefix_encoder == "vqgan" and m.config.image_resize == "squash"
    imgs = [_img(c) for c in COLORS]
    pv = m.pixel_values(imgs)
    ids = m.tokenize(CAPS)
    codes = vq.encode(pv).flatten(1) + tok.vocab_size            # EasyNLP: image codes + len(text tokenizer)
    with torch.no_grad():
        want = _mingpt_reference(sd, 2, torch.cat([codes, ids[:, :-1]], 1), None)[:, img_len - 1:]
        got = m(pv, ids)
    assert torch.allclose(got, want, atol=1e-4)
    assert len(m.generate(imgs, num_beams=2)) == 3
    # artist_i2t (the first EasyNLP captioners): VQ prefix without prefix_encoder_type
    cfg2 = {k: v for k, v in cfg.items() if not k.startswith("prefix")} | {"model_type": "artist_i2t"}
    d2 = _write_easynlp(tmp_path / "artist", cfg2, sd, tok)
    assert torch.allclose(Captioner.from_pretrained(d2, text_len=text_len, img_size=32)(pv, ids), got, atol=1e-5)


def test_easynlp_errors(tmp_path, tok):
    vis, _ = _openai_visual()
    sd = {f"first_stage_model.{k}": v for k, v in vis.items()}
    sd.update(_easynlp_gpt_sd(tok.vocab_size, 24, tok.vocab_size))
    cfg = {"model_type": "mingpt_i2t", "n_head": 2, "prefix_encoder_type": "vit"}
    d = _write_easynlp(tmp_path / "m", cfg, sd, tok)
    with pytest.raises(TuwenError, match="pass text_len=8"):
        Captioner.from_pretrained(d)                             # default text_len 32 does not fit block 24
    (d / "vocab.txt").unlink()
    with pytest.raises(TuwenError, match="no vocab.txt"):
        Captioner.from_pretrained(d, text_len=8)


# ----------------------------------------------------------------------------------------------- commands

def _write_tables(tmp_path: Path, video: bool, n: int = 6) -> tuple[Path, Path]:
    rows, test = [], []
    for i in range(n):
        c = COLORS[i % 3]
        if video:
            frames = [_b64(_img(c, box=(2 + 4 * t, 8, 12 + 4 * t, 18))) for t in range(4 + (i == 0))]
            field = json.dumps(frames)
        else:
            field = _b64(_img(c))
        rows.append(f"{i}\t{field}\t{CAPS[i % 3]}")
        test.append(f"{i}\t{field}")
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.tsv").write_text("\n".join(rows[:3]) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join(test[:3]) + "\n")
    return tmp_path / "train.tsv", tmp_path / "val.tsv"


@pytest.fixture
def tuwen_home(tmp_path, monkeypatch, tok):
    """$TUWEN_HOME with the seeds' named files: models/bert-base-chinese/vocab.txt and models/ViT-L-14.pt."""
    home = tmp_path / "home"
    tok.save_pretrained(home / "models" / "bert-base-chinese")
    vis, _ = _openai_visual(width=64)
    torch.save({f"visual.{k}": v for k, v in vis.items()}, home / "models" / "ViT-L-14.pt")
    monkeypatch.setenv("TUWEN_HOME", str(home))
    return home


def _seed_train(tmp_path, out, extra_udp="", seq=24, pretrain="bert-base-chinese", vit="vit_ckpt_path=ViT-L/14",
                app="video2text_generation", extra=()):
    # the tutorial's command line (examples/video2text_generation), sizes made tiny
    return cli_main([
        "--mode=train", f"--tables={tmp_path / 'train.tsv'},{tmp_path / 'val.tsv'}",
        "--input_schema=idx:str:1,imgbase64:str:1,text:str:1", "--first_sequence=imgbase64",
        "--second_sequence=text", f"--checkpoint_dir={out}", "--learning_rate=4e-3", "--epoch_num=1",
        "--random_seed=42", "--logging_steps=100", "--save_checkpoint_steps=200", f"--sequence_length={seq}",
        "--micro_batch_size=8", f"--app_name={app}", "--data_threads=0", "--no_progress", "--max_steps=3", *extra,
        f"--user_defined_parameters=frame_num=4 {vit} img_size=32 img_len=16 text_len=8 "
        f"pretrain_model_name_or_path={pretrain} block_size=24 n_layer=2 n_head=2 n_embd=64 {extra_udp}"])


def test_seed_video2text_commands(tmp_path, tuwen_home, capsys):
    _write_tables(tmp_path, video=True)
    out = tmp_path / "pretrain"
    assert _seed_train(tmp_path, out) == 0
    err = capsys.readouterr().err
    assert "image encoder: CLIP image-tower weights from" in err and "ViT-L-14.pt (frozen)" in err
    assert "tokenizer: " in err and "bert-base-chinese" in err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "captioner" and cfg["frame_num"] == 4 and cfg["block_size" if False else "img_len"] == 16
    # finetune (seed step 2): the pretrained folder as pretrain_model_name_or_path
    ft = tmp_path / "finetune"
    assert cli_main([
        "--mode=train", f"--tables={tmp_path / 'train.tsv'},{tmp_path / 'val.tsv'}",
        "--input_schema=idx:str:1,imgbase64:str:1,text:str:1", "--first_sequence=imgbase64", "--second_sequence=text",
        f"--checkpoint_dir={ft}", "--learning_rate=4e-5", "--epoch_num=1", "--random_seed=42", "--logging_steps=100",
        "--save_checkpoint_steps=200", "--sequence_length=24", "--micro_batch_size=8", "--app_name=video2text_generation",
        "--data_threads=0", "--no_progress", "--max_steps=2",
        f"--user_defined_parameters=frame_num=4 pretrain_model_name_or_path={out} img_size=32 img_len=16 text_len=8"]) == 0
    # predict (seed step 3): max_generated_num=4 → gen_text is a JSON list of 4
    outputs = tmp_path / "VC_outputs.txt"
    assert cli_main([
        "--mode=predict", f"--tables={tmp_path / 'test.tsv'}", "--input_schema=idx:str:1,imgbase64:str:1",
        "--first_sequence=imgbase64", f"--outputs={outputs}", "--output_schema=idx,gen_text",
        f"--checkpoint_dir={ft}", "--sequence_length=24", "--micro_batch_size=8", "--app_name=video2text_generation",
        "--user_defined_parameters=frame_num=4 img_size=32 text_len=8 img_len=16 max_generated_num=4"]) == 0
    lines = outputs.read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["0", "1", "2"]
    caps = json.loads(lines[0].split("\t")[1])
    assert isinstance(caps, list) and len(caps) == 4 and all(isinstance(c, str) for c in caps)
    # evaluate: loss + BLEU-4 / CIDEr-D / ROUGE-L against the references
    capsys.readouterr()
    assert cli_main([
        "--mode=evaluate", f"--tables={tmp_path / 'val.tsv'}", "--input_schema=idx:str:1,imgbase64:str:1,text:str:1",
        "--first_sequence=imgbase64", "--second_sequence=text", f"--checkpoint_dir={ft}", "--micro_batch_size=8",
        "--app_name=video2text_generation", "--user_defined_parameters=frame_num=4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"eval_loss", "bleu_4", "cider_d", "rouge_l", "n_images"} <= set(res) and res["n_images"] == 3
    # predict with a mismatching size key: a clear message
    assert cli_main([
        "--mode=predict", f"--tables={tmp_path / 'test.tsv'}", "--input_schema=idx:str:1,imgbase64:str:1",
        f"--outputs={outputs}", "--output_schema=idx,gen_text", f"--checkpoint_dir={ft}",
        "--app_name=video2text_generation", "--user_defined_parameters=frame_num=3"]) == 2
    assert "frame_num=3 does not match" in capsys.readouterr().err


def test_sequence_length_and_udp_errors(tmp_path, tuwen_home, capsys):
    _write_tables(tmp_path, video=True)
    assert _seed_train(tmp_path, tmp_path / "x", seq=288) == 2      # the seeds' 288 vs a tiny config
    err = capsys.readouterr().err
    assert "--sequence_length=288 does not fit the model: text_len (8) + img_len (16) = 24" in err
    assert _seed_train(tmp_path, tmp_path / "x", extra_udp="frame_nums=4") == 2
    assert "unknown key 'frame_nums'" in capsys.readouterr().err
    assert _seed_train(tmp_path, tmp_path / "x", extra_udp="num_beams=many") == 2
    assert "num_beams: expected int, got 'many'" in capsys.readouterr().err


def test_missing_named_files_say_where_to_put_them(tmp_path, monkeypatch, capsys):
    _write_tables(tmp_path, video=True)
    monkeypatch.setenv("TUWEN_HOME", str(tmp_path / "empty"))
    assert _seed_train(tmp_path, tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert f"put its vocab.txt at {tmp_path / 'empty' / 'models' / 'bert-base-chinese' / 'vocab.txt'}" in err
    (tmp_path / "empty" / "models" / "bert-base-chinese").mkdir(parents=True)
    (tmp_path / "empty" / "models" / "bert-base-chinese" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n红\n")
    assert _seed_train(tmp_path, tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "put OpenAI's ViT-L-14.pt" in err and str(tmp_path / "empty" / "models" / "ViT-L-14.pt") in err


def test_image2text_scratch_paths_and_short_videos(tmp_path, capsys):
    """image2text from scratch (ViT preset, vocabulary built from the texts), images given as file paths."""
    root = tmp_path / "imgs"
    root.mkdir()
    rows = []
    for i in range(6):
        _img(COLORS[i % 3]).save(root / f"{i}.png")
        rows.append(f"{i}\t{i}.png\t{CAPS[i % 3]}")
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "i2t"
    udp = (f"vit_preset=tiny img_size=32 text_len=8 n_layer=2 n_head=2 n_embd=32 enable_img_path=true "
           f"img_root_dir={root} do_lower_case=false")
    assert cli_main(["--mode=train", f"--tables={tmp_path / 'train.tsv'}", "--input_schema=idx:str:1,imgbase64:str:1,text:str:1",
                     f"--checkpoint_dir={out}", "--app_name=image2text_generation", "--data_threads=0", "--no_progress",
                     "--max_steps=2", "--micro_batch_size=4", f"--user_defined_parameters={udp}"]) == 0
    err = capsys.readouterr().err
    assert "ViT preset 'tiny' from scratch (random init, trained)" in err and "built a" in err and "case kept" in err
    tok = TextTokenizer.from_pretrained(out)  # do_lower_case=false: captions that differ only in case stay apart
    assert not tok.lowercase and tok.encode("A") != tok.encode("a")
    assert json.loads((out / "config.json").read_text())["freeze_vit"] is False
    # tuwen caption on image files
    assert cli_main(["caption", str(root / "0.png"), str(root / "1.png"), "--model", str(out), "-n", "2",
                     "--beams", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith(str(root / "0.png") + "\t")
    # wrong app for the model
    assert cli_main(["--mode=predict", f"--tables={tmp_path / 'train.tsv'}", "--input_schema=idx:str:1,imgbase64:str:1",
                     f"--outputs={tmp_path / 'o.tsv'}", "--output_schema=idx,gen_text", f"--checkpoint_dir={out}",
                     "--app_name=video2text_generation", "--user_defined_parameters=frame_num=4"]) == 2
    assert "still-image captioner" in capsys.readouterr().err


def test_video_short_rows_strict_and_cli_frames(tmp_path, tok, capsys):
    torch.manual_seed(0)
    m = Captioner(_vit_cfg(tok, frame_num=4), tok)
    m.save_pretrained(tmp_path / "v2t")
    frames = [_img(c) for c in COLORS]                 # 3 frames for a 4-frame model
    rows = [f"0\t{json.dumps([_b64(f) for f in frames])}", f"1\t{json.dumps([_b64(f) for f in frames + frames])}"]
    (tmp_path / "in.tsv").write_text("\n".join(rows) + "\n")
    base = ["--mode=predict", f"--tables={tmp_path / 'in.tsv'}", "--input_schema=idx:str:1,imgbase64:str:1",
            f"--outputs={tmp_path / 'o.tsv'}", "--output_schema=idx,gen_text", f"--checkpoint_dir={tmp_path / 'v2t'}",
            "--app_name=video2text_generation", "--user_defined_parameters=frame_num=4"]
    assert cli_main(base) == 0
    assert "the video has 3 frame(s) but frame_num=4; padded" in capsys.readouterr().err
    assert len((tmp_path / "o.tsv").read_text().splitlines()) == 2
    assert cli_main(base + ["--strict"]) == 2
    assert "in.tsv:1: the video has 3 frame(s)" in capsys.readouterr().err
    for i, f in enumerate(frames + frames[:1]):
        f.save(tmp_path / f"f{i}.png")
    spec = ",".join(str(tmp_path / f"f{i}.png") for i in range(4))
    assert cli_main(["caption", "--model", str(tmp_path / "v2t"), "--frames", spec, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 1 and len(res[0]["gen_text"]) == 1
    want = m.generate([[tmp_path / f"f{i}.png" for i in range(4)]])[0]
    assert res[0]["gen_text"] == want


def test_pipeline(tmp_path, trained):
    m, imgs = trained
    m.save_pretrained(tmp_path / "cap")
    imgs[0].save(tmp_path / "a.png")
    pipe = CaptionPipeline("image2text_generation", str(tmp_path / "cap"), device="cpu")
    out = pipe([_b64(imgs[0]), imgs[1], str(tmp_path / "a.png")])
    assert out == [{"gen_text": [CAPS[0]]}, {"gen_text": [CAPS[1]]}, {"gen_text": [CAPS[0]]}]
    assert pipe(imgs[2]) == [{"gen_text": [CAPS[2]]}]
    two = pipe(imgs[:1], max_generated_num=2, num_beams=2)
    assert len(two[0]["gen_text"]) == 2 and two[0]["gen_text"][0] == CAPS[0]
    with pytest.raises(TuwenError, match="unknown parameter 'beams'"):
        CaptionPipeline("image2text_generation", str(tmp_path / "cap"), beams=2)
    from tuwen import pipeline
    assert pipeline("image2text_generation", model_path=str(tmp_path / "cap"))(imgs[:1])[0]["gen_text"] == [CAPS[0]]


def test_normalize_pixels_matches_clip_preprocess(tok):
    from tuwen.models.vit import preprocess
    m = Captioner(_vit_cfg(tok), tok)
    im = _img(COLORS[0])
    assert torch.allclose(m.pixel_values([im]), preprocess([im], 32), atol=1e-6)
    u8 = torch.from_numpy(np.asarray(im))[None]
    assert torch.allclose(normalize_pixels(u8, m.config), preprocess([im], 32), atol=1e-6)
