"""Image completion (tuwen.models.completion, TextToImage.complete, `tuwen complete`, pipeline("complete")):
known codes are kept exactly, the raster fill is generate() with the known codes forced, the Gibbs step picks the
exact conditional argmax, rows do not depend on the batch, the known pixels are pasted back."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tuwen.cli import main
from tuwen.data import synth
from tuwen.errors import TuwenError
from tuwen.models.completion import box_mask, code_mask, complete_codes, extend_canvas, is_suffix_mask, load_mask
from tuwen.models.text2image import TextToImage, TextToImageConfig, image_logits
from tuwen.models.vqgan import VQGAN, VQGANConfig
from tuwen.text import TextTokenizer

PROMPT = "左上角有一个红色的圆形"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.preset("tiny", resolution=32, n_embed=64)).eval()  # 32 px → 4×4 codes
    tok = TextTokenizer.train([synth.make_sample(i, size=32)[1] for i in range(100)], vocab_size=200)
    c = TextToImageConfig.build(text_len=12, img_len=16, img_vocab_size=64, text_vocab_size=tok.vocab_size,
                                image_size=32, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(1)
    return TextToImage(c, vq, tok).eval()


@pytest.fixture(scope="module")
def image():
    return synth.render(synth.sample_attrs(3, n_objects=2), 32)


def _known(model, image):
    return model.vqgan.encode([image], size=32).reshape(1, -1)


def test_masks():
    m = np.zeros((32, 32), bool)
    m[9:10, 17:18] = True  # one pixel → its code cell (row 1, col 2)
    cm = code_mask(m, (4, 4))
    assert cm.tolist() == [i == 6 for i in range(16)]
    assert not is_suffix_mask(cm)
    m[:, :] = False
    m[24:, :] = True  # the bottom code row: a suffix
    assert is_suffix_mask(code_mask(m, (4, 4)))
    canvas, mask = extend_canvas(Image.new("RGB", (32, 32), (10, 20, 30)), 32, right=8)
    assert mask[:, 24:].all() and not mask[:, :24].any() and canvas.size == (32, 32)
    b = box_mask((0, 0, 16, 16), (64, 64), 32)  # box in input pixels, mask at the model's size
    assert b[:8, :8].all() and not b[8:, :].any()
    with pytest.raises(TuwenError, match="need 0"):
        box_mask((0, 0, 70, 10), (64, 64), 32)
    with pytest.raises(TuwenError, match="mask is 10×10 px but the image is 64×64"):
        load_mask(Image.new("L", (10, 10), 255), (64, 64), 32)
    with pytest.raises(TuwenError, match="marks nothing"):
        load_mask(Image.new("L", (64, 64), 0), (64, 64), 32)


@pytest.mark.parametrize("box", [(8, 8, 24, 24), (24, 0, 32, 32), (0, 16, 32, 32)])
def test_known_codes_kept_exactly(model, image, box):
    mask = box_mask(box, (32, 32), 32)
    codes, unknown = model.complete(PROMPT, image, mask, num_images=3, seed=5, return_codes=True)
    known = _known(model, image)
    assert codes.shape == (3, 16)
    assert torch.equal(codes[:, ~unknown], known[:, ~unknown].expand(3, -1))
    assert (codes[:, unknown] != known[:, unknown]).any()  # something was generated (random model: different)


def test_all_unknown_is_plain_generation(model, image):
    """With nothing known the raster fill is the model's own sampler: same seeds → the same codes."""
    from tuwen.models.text2image import image_seed
    mask = np.ones((32, 32), bool)
    codes, _ = model.complete(PROMPT, image, mask, num_images=2, seed=7, key="k", return_codes=True)
    ref = model.generate_codes(model.tokenize([PROMPT]).expand(2, -1), [image_seed(7, "k", j) for j in range(2)])
    assert torch.equal(codes, ref)


def test_rows_independent_of_batch_and_deterministic(model, image):
    mask = box_mask((8, 8, 24, 24), (32, 32), 32)  # not a suffix: Gibbs sweep runs
    a, _ = model.complete(PROMPT, image, mask, num_images=3, seed=1, return_codes=True, top_k=8)
    b, _ = model.complete(PROMPT, image, mask, num_images=1, seed=1, return_codes=True, top_k=8)
    c, _ = model.complete(PROMPT, image, mask, num_images=3, seed=1, return_codes=True, top_k=8)
    assert torch.equal(a[:1], b) and torch.equal(a, c)


def test_gibbs_step_is_the_exact_conditional_argmax(model):
    """One unknown code with known codes after it, greedy, all candidates, window=None: the sweep must pick
    argmax_c log p(whole sequence with x_i = c) (brute force over the 64 codes)."""
    torch.manual_seed(3)
    text = model.tokenize([PROMPT])
    codes = torch.randint(0, 64, (1, 16))
    unknown = torch.zeros(16, dtype=torch.bool)
    unknown[5] = True
    out = complete_codes(model.gpt, text, codes, unknown, [0], text_len=12, top_k=None, temperature=0.0,
                         sweeps=1, window=None)
    cands = codes.repeat(64, 1)
    cands[:, 5] = torch.arange(64)
    with torch.no_grad():
        lp = image_logits(model.gpt, text.expand(64, -1), cands, 12).log_softmax(-1)
    joint = lp.gather(2, cands[:, :, None])[..., 0].sum(1)
    assert int(out[0, 5]) == int(joint.argmax())
    assert torch.equal(out[:, ~unknown], codes[:, ~unknown])
    # no sweep: the raster fill's greedy choice from p(x_5 | x_<5) alone
    out0 = complete_codes(model.gpt, text, codes, unknown, [0], text_len=12, top_k=None, temperature=0.0, sweeps=0)
    assert int(out0[0, 5]) == int(lp[0, 5].argmax())


def test_known_pixels_pasted_back(model, image):
    mask = box_mask((8, 8, 24, 24), (32, 32), 32)
    out = model.complete(PROMPT, image, mask, num_images=2, seed=0)
    for im in out:
        a, b = np.asarray(im), np.asarray(image)
        assert im.size == (32, 32)
        assert np.array_equal(a[~mask], b[~mask])
        assert not np.array_equal(a[mask], b[mask])


def test_guidance_and_pipeline(model, image, tmp_path):
    import tuwen
    model.save_pretrained(tmp_path / "m")
    comp = tuwen.pipeline("complete", model_path=str(tmp_path / "m"), max_generated_num=2, guidance_scale=2.0,
                          top_k=8, seed=3)
    out = comp(PROMPT, image, box=(16, 0, 32, 32))
    assert len(out["images"]) == 2 and len(out["gen_imgbase64"]) == 2 and out["records"][0]["task"] == "complete"
    assert out["mask"][:, 16:].all() and not out["mask"][:, :16].any()
    again = comp(PROMPT, image, box=(16, 0, 32, 32))
    assert out["gen_imgbase64"] == again["gen_imgbase64"]
    with pytest.raises(TuwenError, match="exactly one of"):
        comp(PROMPT, image)
    with pytest.raises(TuwenError, match="sweeps"):
        tuwen.pipeline("complete", model_path=str(tmp_path / "m"), sweeps="x")


def test_cli(model, image, tmp_path, capsys):
    model.save_pretrained(tmp_path / "m")
    image.save(tmp_path / "in.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "black.png")
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (0, 24, 32, 32))
    m.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    rc = main(["complete", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", PROMPT,
               "--model", str(tmp_path / "m"), "-n", "2", "--out", str(out)])
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"complete_0.png", "complete_1.png", "input.png", "mask.png", "grids",
                                               "prompts.json"}
    a, b = np.asarray(Image.open(out / "complete_0.png").convert("RGB")), np.asarray(image)
    assert np.array_equal(a[:24], b[:24])  # the known rows are the input's pixels
    rc = main(["complete", str(tmp_path / "in.png"), "--extend", "right:8", "--prompt", PROMPT, "--model",
               str(tmp_path / "m"), "-n", "1", "--out", str(tmp_path / "out2"), "--sweeps", "0"])
    assert rc == 0
    capsys.readouterr()
    for args, msg in (
            (["--box", "1,2,3"], "--box '1,2,3': give four numbers"),
            (["--mask", str(tmp_path / "nope.png")], "file not found"),
            (["--mask", str(tmp_path / "black.png")], "marks nothing"),
            (["--extend", "left:4"], "right:PX and/or down:PX"),
            (["--box", "0,0,8,8", "--window", "wide"], "--window 'wide'")):
        assert main(["complete", str(tmp_path / "in.png"), "--prompt", PROMPT, "--model", str(tmp_path / "m"),
                     *args]) == 2
        assert msg in capsys.readouterr().err
    assert main(["complete", str(tmp_path / "missing.png"), "--prompt", PROMPT, "--box", "0,0,8,8"]) == 2
    assert "image file not found" in capsys.readouterr().err
    # a completion's PNG is not re-created from its prompt alone
    assert main(["generate", "--from-png", str(out / "complete_0.png"), "--out", str(tmp_path / "o3")]) == 2
    assert "tuwen complete" in capsys.readouterr().err


# ------------------------------------------------------------------------ CogView's training options for text→image

@pytest.mark.slow
def test_sandwich_ln_pb_relax_training_options(tmp_path, capsys):
    """udp keys sandwich_ln= / pb_relax= build a text→image GPT with CogView's layers; saved and reloaded; a
    finetune that names a different value is refused."""
    data = tmp_path / "data"
    synth.write_dataset(data, n=24, size=32, seed=0)
    vq = tmp_path / "vq"
    torch.manual_seed(0)
    VQGAN(VQGANConfig.preset("tiny", resolution=32, n_embed=64)).save_pretrained(vq)
    run = tmp_path / "run"
    common = [f"--tables={data}/train.tsv,{data}/val.tsv", "--input_schema=idx:str:1,text:str:1,imgbase64:str:1",
              "--first_sequence=text", "--second_sequence=imgbase64", "--learning_rate=1e-3", "--max_steps=2",
              "--micro_batch_size=4", "--app_name=text2image_generation", "--no_progress", "--data_threads=0"]
    assert main(["--mode=train", *common, f"--checkpoint_dir={run}",
                 f"--user_defined_parameters=vqgan_ckpt_path={vq} size=32 text_len=12 n_layer=1 n_head=2 n_embd=32 "
                 f"sandwich_ln=true pb_relax=true do_eval=false"]) == 0
    m = TextToImage.from_pretrained(run)
    assert m.config.gpt.sandwich_ln and m.config.gpt.pb_relax
    assert "blocks.0.ln3.weight" in m.gpt.state_dict()
    assert m.generate([PROMPT], seed=0)[0][0].size == (32, 32)
    capsys.readouterr()
    assert main(["--mode=train", *common, f"--checkpoint_dir={tmp_path / 'run2'}",
                 f"--user_defined_parameters=pretrain_model_name_or_path={run} sandwich_ln=false"]) == 2
    assert "sandwich_ln=False" in capsys.readouterr().err
