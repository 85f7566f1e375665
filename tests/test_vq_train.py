"""Stage-1 training through `tuwen vq train`: a tiny VQGAN on the synthetic set beats the mean-colour baseline."""
import re

import pytest
import torch

from tuwen.cli import main
from tuwen.data import synth
from tuwen.models.vqgan import VQGAN, VQGANConfig

SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"


@pytest.mark.slow
def test_tiny_vqgan_beats_mean_colour_baseline(tmp_path, capsys):
    synth.write_dataset(tmp_path / "d", n=400, size=32, seed=1)
    ck = tmp_path / "vq"
    rc = main(["vq", "train", "--tables", f"{tmp_path}/d/train.tsv,{tmp_path}/d/val.tsv", "--input_schema", SCHEMA,
               "--second_sequence", "imgbase64", "--checkpoint_dir", str(ck), "--preset", "tiny", "--size", "32",
               "--arch", "n_embed=128", "ch_mult=[1,2,2]", "attn_resolutions=[]", "--micro_batch_size", "16",
               "--learning_rate", "2e-3", "--max_steps", "250", "--disc_weight", "0", "--l2_weight", "2",
               "--dead_code_steps", "20", "--logging_steps", "50", "--save_checkpoint_steps", "250",
               "--data_threads", "0", "--no_progress", "--random_seed", "0"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "--arch norm_groups=1 keeps them" in err  # taming's 32 groups on 32 channels: the colour note
    m = re.search(r"eval step 250: .*psnr ([\d.]+) psnr_mean_color ([\d.]+)", err)
    assert m, err[-2000:]
    psnr, baseline = float(m.group(1)), float(m.group(2))
    print(f"tiny VQGAN PSNR {psnr:.2f} dB vs mean-colour baseline {baseline:.2f} dB")
    assert psnr > baseline + 3.0
    vq = VQGAN.from_pretrained(ck)
    assert vq.encode(torch.zeros(2, 3, 32, 32)).shape == (2, 8, 8)


def test_l2_normalised_codebook_option():
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.preset("tiny", resolution=32, n_embed=32, embed_dim=8, l2_norm=True)).eval()
    cb = vq.quantize.codebook()
    torch.testing.assert_close(cb.norm(dim=1), torch.ones(32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = vq.encode(x)
    z = torch.nn.functional.normalize(vq.encode_latent(x).permute(0, 2, 3, 1), dim=-1)
    assert torch.equal(codes, (z @ cb.t()).argmax(-1))  # nearest by cosine
    assert vq.decode(codes).shape == (2, 3, 32, 32)


def test_color_loss_is_the_pooled_l2_and_off_by_default():
    from tuwen.training.tasks.vqgan import VQLoss, VQLossConfig
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    xrec = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    vq_loss = torch.tensor(0.0)
    off = VQLoss(VQLossConfig(disc_weight=0))(x, xrec, vq_loss, step=0)
    on = VQLoss(VQLossConfig(disc_weight=0, color_weight=3.0))(x, xrec, vq_loss, step=0)
    pooled = (torch.nn.functional.avg_pool2d(x, 4) - torch.nn.functional.avg_pool2d(xrec, 4)).pow(2).mean()
    assert "color_loss" not in off and torch.allclose(on["color_loss"], pooled)
    assert torch.allclose(on["loss"] - off["loss"], 3.0 * pooled, atol=1e-6)
    with pytest.raises(Exception, match="≥ 0"):
        VQLossConfig(color_weight=-1).validate()


def test_augment_flip_and_hue_are_seeded_and_keep_grey(tmp_path):
    from tuwen.errors import TuwenError
    from tuwen.training.tasks.vqgan import image_transform, parse_augment, rotate_hue
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 4, 4)
    assert torch.allclose(rotate_hue(red, 0.0), red, atol=1e-5) and torch.allclose(rotate_hue(red, 360.0), red,
                                                                                      atol=1e-5)
    assert not torch.allclose(rotate_hue(red, 120.0), red, atol=0.3)  # another hue ...
    y = torch.tensor([0.299, 0.587, 0.114])
    lum = lambda im: (y.view(3, 1, 1) * (im + 1) / 2).sum(0)  # noqa: E731
    grey = torch.full((3, 4, 4), 0.2)
    assert torch.allclose(rotate_hue(grey, 77.0), grey, atol=1e-5)  # ... greys (and white backgrounds) unchanged
    pale = torch.tensor([0.2, 0.0, -0.1]).view(3, 1, 1).expand(3, 4, 4)  # in gamut after rotation: luminance kept
    assert torch.allclose(lum(rotate_hue(pale, 200.0)), lum(pale), atol=1e-4)
    assert parse_augment("flip, hue") == ("flip", "hue") and parse_augment("none") == () and parse_augment(None) == ()
    with pytest.raises(TuwenError, match="--augment .*blur.*flip, hue"):
        parse_augment("flip,blur")
    img = synth.render(synth.sample_attrs(3), 16)
    t = image_transform("image", 16, False, seed=5, augment=("flip", "hue"))
    a, b = t({"image": img}, 7, 0)["image"], t({"image": img}, 7, 0)["image"]
    assert torch.equal(a, b)  # the same (seed, epoch, index) → the same augmented image (exact resume)
    plain = image_transform("image", 16, False, seed=5)({"image": img}, 7, 0)["image"]
    outs = [t({"image": img}, i, e)["image"] for i in range(4) for e in range(2)]
    assert all(o.shape == plain.shape for o in outs) and any(not torch.allclose(o, plain, atol=0.05) for o in outs)
    # hue alone: half the images keep the data's own colours, the other half are rotated
    th = image_transform("image", 16, False, seed=5, augment=("hue",))
    kept = [torch.allclose(th({"image": img}, i, 0)["image"], plain, atol=1e-5) for i in range(40)]
    assert 10 <= sum(kept) <= 30


def test_weights_do_not_depend_on_how_often_it_evaluates(tmp_path):
    """Evaluation (its DataLoader, sample images) must not move the training run's random streams: the same run
    saved and evaluated every step or every other step ends with the same weights (it did not, before)."""
    synth.write_dataset(tmp_path / "d", n=24, size=16, seed=2)
    finals = []
    for every in (1, 3):
        ck = tmp_path / f"vq{every}"
        assert main(["vq", "train", "--tables", f"{tmp_path}/d/train.tsv,{tmp_path}/d/val.tsv", "--input_schema",
                     SCHEMA, "--second_sequence", "imgbase64", "--checkpoint_dir", str(ck), "--preset", "tiny",
                     "--size", "16", "--arch", "n_embed=32", "ch=8", "ch_mult=[1,2]", "attn_resolutions=[]",
                     "z_channels=8", "norm_groups=1", "--micro_batch_size", "4", "--max_steps", "3", "--augment",
                     "flip,hue", "--random_crop", "--disc_weight", "0.1", "--disc_start", "1", "--dead_code_steps",
                     "1", "--save_checkpoint_steps", str(every), "--data_threads", "0", "--no_progress"]) == 0
        st = torch.load(ck / "checkpoints" / "step-00000003.pt", weights_only=True, map_location="cpu")
        finals.append(st["module"])
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
