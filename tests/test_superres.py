"""Token super-resolution (tuwen.models.superres, --app_name=super_resolution, tuwen upscale, generate
--super_resolution): layout, greedy decoding = teacher-forced argmax, save/load, CLIs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tuwen.cli import main
from tuwen.data import synth
from tuwen.errors import TuwenError
from tuwen.models.superres import SuperRes, SuperResConfig, downsample
from tuwen.models.text2image import TextToImage, TextToImageConfig
from tuwen.models.vqgan import VQGAN, VQGANConfig
from tuwen.text import TextTokenizer

PROMPT = "左上角有一个红色的圆形"


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.preset("tiny", resolution=32, n_embed=64)).eval()  # f8: 32 px → 4×4, 16 px → 2×2
    tok = TextTokenizer.train([synth.make_sample(i, size=32)[1] for i in range(100)], vocab_size=200)
    return vq, tok


@pytest.fixture(scope="module")
def sr(parts):
    vq, tok = parts
    c = SuperResConfig.build(text_len=12, img_len=16, img_vocab_size=64, text_vocab_size=tok.vocab_size,
                             image_size=32, low_size=16, low_len=4, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(2)
    return SuperRes(c, vq, tok).eval()


def test_layout_and_greedy(sr):
    assert sr.config.gpt.block_size == 12 + 4 + 16 and sr.low_grid == (2, 2)
    imgs = [synth.render(synth.sample_attrs(i), 16) for i in range(3)]
    low = sr.encode_low(imgs)
    assert low.shape == (3, 4)
    text = sr.tokenize([PROMPT] * 3)
    codes = sr.upscale_codes(text, low, [0, 1, 2], top_k=1)
    with torch.no_grad():
        logits = sr(text, low, codes)  # teacher forcing on the greedy codes: argmax reproduces them
    assert torch.equal(logits.argmax(-1), codes)
    a = sr.upscale(imgs, PROMPT, seed=3)
    b = sr.upscale(imgs[1:], PROMPT, seed=3, keys=[1, 2])
    assert [im.size for im in a] == [(32, 32)] * 3
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[0]))  # an image's sample does not depend on its batch
    with pytest.raises(TuwenError, match="upscale"):
        sr.generate([PROMPT])
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    assert downsample(px, 16).shape == (2, 3, 16, 16)


def test_save_load_and_bad_config(sr, tmp_path):
    sr.save_pretrained(tmp_path / "sr")
    again = SuperRes.from_pretrained(tmp_path / "sr")
    assert again.config.low_size == 16 and again.config.low_len == 4
    sd, sd2 = sr.gpt.state_dict(), again.gpt.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with pytest.raises(TuwenError, match="not a superres model"):
        SuperRes.from_pretrained(__import__("tuwen.pipelines").pipelines.demo_model_path())
    with pytest.raises(TuwenError, match="low_len=9"):
        SuperRes(SuperResConfig.build(text_len=12, img_len=16, img_vocab_size=64,
                                      text_vocab_size=sr.tokenizer.vocab_size, image_size=32, low_size=16, low_len=9,
                                      n_layer=1, n_head=2, n_embd=32),
                 sr.vqgan, sr.tokenizer)


@pytest.fixture(scope="module")
def sr2(parts):
    """The low side tokenized by a second VQGAN with another codebook and downsampling factor (f4, 16 px → 4×4)."""
    vq, tok = parts
    torch.manual_seed(1)
    low_vq = VQGAN(VQGANConfig.preset("tiny", resolution=16, n_embed=24, ch_mult=[1, 2, 2])).eval()
    c = SuperResConfig.build(text_len=12, img_len=16, img_vocab_size=64, text_vocab_size=tok.vocab_size,
                             image_size=32, low_size=16, low_len=16, low_vocab_size=24, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(2)
    return SuperRes(c, vq, tok, low_vqgan=low_vq).eval()


def test_second_low_tokenizer(sr2, tmp_path):
    c = sr2.config
    assert sr2.low_grid == (4, 4) and c.low_offset == 64 + c.text_vocab_size
    assert c.gpt.vocab_size == 64 + c.text_vocab_size + 24 and c.gpt.block_size == 12 + 16 + 16
    imgs = [synth.render(synth.sample_attrs(i), 16) for i in range(3)]
    low = sr2.encode_low(imgs)  # the low VQGAN's own codes
    assert low.shape == (3, 16) and int(low.max()) < 24
    assert torch.equal(low, sr2.low_vqgan.encode(torch.stack([
        torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        for im in imgs])).reshape(3, -1))
    text = sr2.tokenize([PROMPT] * 3)
    codes = sr2.upscale_codes(text, low, [0, 1, 2], top_k=1)
    with torch.no_grad():
        logits = sr2(text, low, codes)
        # the low codes enter the GPT at their own ids, after the text's: the embedding rows of image codes differ
        x = torch.cat([text, low + c.low_offset, codes[:, :-1]], dim=1)
        assert torch.equal(logits, sr2.gpt(x, logits_start=c.text_len + c.low_len - 1))
    assert torch.equal(logits.argmax(-1), codes)
    sr2.save_pretrained(tmp_path / "sr2")
    assert (tmp_path / "sr2" / "low_vqgan" / "config.json").exists()
    again = SuperRes.from_pretrained(tmp_path / "sr2")
    assert again.config.low_vocab_size == 24
    assert torch.equal(again.upscale_codes(text, low, [0, 1, 2], top_k=1), codes)
    a = sr2.upscale(imgs, PROMPT, seed=3)
    assert [np.asarray(x).tolist() for x in a] == [np.asarray(x).tolist() for x in again.upscale(imgs, PROMPT, seed=3)]
    import shutil
    shutil.rmtree(tmp_path / "sr2" / "low_vqgan")
    with pytest.raises(TuwenError, match="no low_vqgan/"):
        SuperRes.from_pretrained(tmp_path / "sr2")
    with pytest.raises(TuwenError, match="needs a low-res VQGAN"):
        SuperRes(c, sr2.vqgan, sr2.tokenizer)
    with pytest.raises(TuwenError, match="low-res VQGAN has 24 codes"):
        SuperRes(c.replace(low_vocab_size=30, gpt=c.gpt.replace(vocab_size=64 + c.text_vocab_size + 30)),
                 sr2.vqgan, sr2.tokenizer, low_vqgan=sr2.low_vqgan)


def test_bench_edge_sharpness_ranks_crisp_over_blurred():
    """bench_superres's edge measure: real renders > bicubic 2× of their half-size version, noise does not fool it."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_superres import edge_sharpness, sharpness
    real = [synth.render(synth.sample_attrs(i), 64) for i in range(8)]
    bicubic = [im.resize((32, 32), Image.BICUBIC).resize((64, 64), Image.BICUBIC) for im in real]
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(im, np.float32) + rng.normal(0, 12, (64, 64, 3)), 0, 255)
                             .astype(np.uint8)) for im in bicubic]
    assert edge_sharpness(real) > 1.5 * edge_sharpness(bicubic)
    assert edge_sharpness(noisy) < edge_sharpness(real)
    assert sharpness(noisy) > sharpness(real)  # the mean-gradient measure is fooled by noise


def test_upscale_and_generate_cli(sr, parts, tmp_path, capsys):
    vq, tok = parts
    sr.save_pretrained(tmp_path / "sr")
    synth.render(synth.sample_attrs(1), 16).save(tmp_path / "small.png")
    assert main(["upscale", str(tmp_path / "small.png"), "--model", str(tmp_path / "sr"), "--text", PROMPT,
                 "--out", str(tmp_path / "up")]) == 0
    assert Image.open(tmp_path / "up" / "small_x2.png").size == (32, 32)
    # a 16 px text→image model on the same tokenizer, its generations upscaled to 32 px
    c = TextToImageConfig.build(text_len=12, img_len=4, img_vocab_size=64, text_vocab_size=tok.vocab_size,
                                image_size=16, n_layer=1, n_head=2, n_embd=32)
    TextToImage(c, vq, tok).save_pretrained(tmp_path / "t2i16")
    assert main(["generate", PROMPT, "-n", "2", "--model", str(tmp_path / "t2i16"), "--super_resolution",
                 str(tmp_path / "sr"), "--out", str(tmp_path / "gen")]) == 0
    pngs = sorted((tmp_path / "gen").glob("prompt000_*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (32, 32) for p in pngs)
    capsys.readouterr()
    assert main(["upscale", str(tmp_path / "nope.png"), "--model", str(tmp_path / "sr"), "--text", PROMPT]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", PROMPT, "--super_resolution", str(tmp_path / "nope")]) == 2
    capsys.readouterr()
    # the shipped demo draws 64 px images; this SR model takes 16 px ones
    assert main(["generate", PROMPT, "--super_resolution", str(tmp_path / "sr"), "--out", str(tmp_path / "g2")]) == 2
    assert "draws 64 px images; use an SR model trained with size=128" in capsys.readouterr().err


@pytest.mark.slow
def test_train_super_resolution_app(tmp_path, capsys):
    data = tmp_path / "data"
    synth.write_dataset(data, n=24, size=32, seed=0)
    schema = ["--input_schema=idx:str:1,text:str:1,imgbase64:str:1", "--first_sequence=text",
              "--second_sequence=imgbase64", "--app_name=super_resolution", "--micro_batch_size=4"]

    def train_and_evaluate(run, udp: str) -> SuperRes:
        assert main(["--mode=train", f"--tables={data}/train.tsv,{data}/val.tsv", *schema, "--learning_rate=1e-3",
                     "--max_steps=2", "--no_progress", "--data_threads=0", f"--checkpoint_dir={run}",
                     f"--user_defined_parameters={udp} size=32 text_len=12 n_layer=1 n_head=2 n_embd=32"]) == 0
        assert main(["--mode=evaluate", f"--tables={data}/val.tsv", *schema, f"--checkpoint_dir={run}"]) == 0
        assert "bits_per_image_token" in capsys.readouterr().out
        return SuperRes.from_pretrained(run)

    vq = tmp_path / "vq"
    torch.manual_seed(0)
    VQGAN(VQGANConfig.preset("tiny", resolution=32, n_embed=64)).save_pretrained(vq)
    m = train_and_evaluate(tmp_path / "run", f"vqgan_ckpt_path={vq}")
    assert m.config.low_size == 16 and m.config.image_size == 32 and m.config.low_vocab_size == 0
    # the low side from a second tokenizer (f4: 16 px → 4×4 codes of a 24-entry codebook)
    low_vq = tmp_path / "low_vq"
    VQGAN(VQGANConfig.preset("tiny", resolution=16, n_embed=24, ch_mult=[1, 2, 2])).save_pretrained(low_vq)
    m2 = train_and_evaluate(tmp_path / "run2", f"vqgan_ckpt_path={vq} low_vqgan_ckpt_path={low_vq}")
    assert m2.config.low_vocab_size == 24 and m2.config.low_len == 16 and m2.low_grid == (4, 4)
    # finetuning keeps both tokenizers; naming another low tokenizer then is a mistake
    m4 = train_and_evaluate(tmp_path / "run4", f"pretrain_model_name_or_path={tmp_path / 'run2'}")
    assert m4.config.low_vocab_size == 24 and all(torch.equal(a, b) for a, b in zip(
        m4.low_vqgan.state_dict().values(), m2.low_vqgan.state_dict().values()))
    assert main(["--mode=train", f"--tables={data}/train.tsv,{data}/val.tsv", *schema, "--max_steps=1",
                 f"--checkpoint_dir={tmp_path / 'run5'}", f"--user_defined_parameters=pretrain_model_name_or_path="
                 f"{tmp_path / 'run2'} low_vqgan_ckpt_path={low_vq}"]) == 2
    assert "a finetuned model keeps its tokenizers" in capsys.readouterr().err
    # the last checkpoint exported as a model folder, second tokenizer included
    assert main(["export", str(tmp_path / "run2"), str(tmp_path / "exported")]) == 0
    m3 = SuperRes.from_pretrained(tmp_path / "exported")
    assert m3.config.low_vocab_size == 24
    assert all(torch.equal(a, b) for a, b in zip(m3.low_vqgan.state_dict().values(),
                                                 m2.low_vqgan.state_dict().values()))
