"""VQGAN: architecture parity with taming, conversion, inference API, training objective."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tuwen.convert.taming import infer_vqgan_config, load_vqgan, vqgan_from_taming
from tuwen.errors import TuwenError
from tuwen.models.discriminator import LPIPS, NLayerDiscriminator, VGG16Features
from tuwen.models.vqgan import AttnBlock, VQGAN, VQGANConfig, VectorQuantizer
from tuwen.training.tasks.vqgan import VQGANTrainModule, VQLoss, VQLossConfig


def tiny(seed: int = 0, **kw) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig.preset("tiny", **kw)).eval()


def randomize(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-default values everywhere (GroupNorm affine too), so that a mix-up of two tensors shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def images(n=3, size=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


class FakeCallbackState:  # stands for pytorch_lightning objects pickled into a .ckpt
    def __init__(self):
        self.best_model_score = 1.5


# ----------------------------------------------------------------------------------------------- architecture

def test_f16_16384_matches_taming_parameter_count():
    with torch.device("meta"):
        m = VQGAN(VQGANConfig.preset("f16_16384"))
    sd = m.state_dict()
    assert len(sd) == 343
    assert sum(p.numel() for p in m.parameters()) == 76_073_859
    assert sum(p.numel() for p in m.encoder.parameters()) == 29_298_176
    assert sum(p.numel() for p in m.decoder.parameters()) == 42_449_795
    for key, shape in {
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "decoder.up.4.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "quant_conv.weight": (256, 256, 1, 1),
        "quantize.embedding.weight": (16384, 256),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "encoder.down.4.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert m.grid_size() == (16, 16) and m.grid_size(512) == (32, 32)


def test_tiny_shapes_and_forward():
    m = tiny()
    for size, grid in ((32, (4, 4)), (64, (8, 8))):
        x = images(2, size)
        codes = m.encode(x)
        assert codes.shape == (2, *grid) and codes.dtype == torch.long
        assert int(codes.max()) < m.config.n_embed
        assert m.decode(codes).shape == (2, 3, size, size)
        assert m.decode(codes.flatten(1)).shape == (2, 3, size, size)  # flat codes, square grid inferred
    x = torch.rand(1, 3, 32, 64) * 2 - 1  # non-square
    assert m.encode(x).shape == (1, 4, 8)
    assert m.decode(m.encode(x).flatten(1), grid=(4, 8)).shape == (1, 3, 32, 64)
    m.train()
    xrec, vq_loss, info = m(images(2, 32))
    assert xrec.shape == (2, 3, 32, 32) and vq_loss.dim() == 0
    assert info["indices"].shape == (2, 4, 4) and {"codebook_loss", "commitment_loss", "z_e"} <= set(info)
    assert m.get_last_layer() is m.decoder.conv_out.weight
    with pytest.raises(TuwenError, match="multiples of 8"):
        m.encode(images(1, 36))


def test_config_validation_and_presets():
    with pytest.raises(TuwenError, match="unknown VQGAN preset"):
        VQGANConfig.preset("nope")
    with pytest.raises(TuwenError, match="multiple of norm_groups=32"):
        VQGANConfig(ch=48)
    with pytest.raises(TuwenError, match="norm_groups 0"):
        VQGANConfig(norm_groups=0)
    with pytest.raises(TuwenError, match="attn_resolutions"):
        VQGANConfig(attn_resolutions=[20])
    with pytest.raises(TuwenError, match="double_z"):
        VQGANConfig(double_z=True)
    cfg = VQGANConfig.preset("f16_16384")
    assert VQGANConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TuwenError, match="unknown key"):
        VQGANConfig.from_dict({**cfg.to_dict(), "n_embd": 3})


def test_attention_matches_taming_bmm():
    torch.manual_seed(0)
    blk = AttnBlock(64)
    x = torch.randn(2, 64, 5, 7)
    # taming's AttnBlock.forward, verbatim in spirit
    h_ = blk.norm(x)
    q, k, v = blk.q(h_), blk.k(h_), blk.v(h_)
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)
    w_ = torch.bmm(q, k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
    w_ = F.softmax(w_, dim=2)
    h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
    ref = x + blk.proj_out(h_)
    torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)


def test_quantizer_nearest_losses_and_straight_through():
    torch.manual_seed(0)
    q = VectorQuantizer(50, 8, beta=0.25)
    assert q.embedding.weight.abs().max() <= 1 / 50
    q.embedding.weight.data.normal_()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    z_q, loss, info = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    brute = torch.cdist(flat, q.embedding.weight.detach()).argmin(1)
    assert torch.equal(info["indices"].flatten(), brute)
    torch.testing.assert_close(z_q.detach(), q.embed(info["indices"]))
    mse = torch.mean((q.embedding.weight[brute] - flat) ** 2).detach()
    torch.testing.assert_close(loss.detach(), mse * 1.25)
    # straight-through: d(sum z_q)/dz = 1, plus the commitment term's gradient β·2(z − e)/N
    z_q.sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    # β placement: non-legacy puts β on the commitment (encoder) term, legacy on the codebook term
    for legacy, enc_w, code_w in ((False, 0.25, 1.0), (True, 1.0, 0.25)):
        q.legacy = legacy
        z.grad = None
        q.embedding.weight.grad = None
        _, loss, _ = q(z)
        loss.backward()
        n = flat.numel()
        e = q.embedding.weight.detach()[brute]
        torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 8), enc_w * 2 * (flat - e) / n)
        g = torch.zeros_like(q.embedding.weight).index_add_(0, brute, code_w * 2 * (e - flat) / n)
        torch.testing.assert_close(q.embedding.weight.grad, g)


def test_codebook_stats_and_dead_code_restart():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4)
    st = q.stats(torch.tensor([0, 1, 2, 3] * 5))
    assert abs(float(st["perplexity"]) - 4.0) < 1e-4 and abs(float(st["usage"]) - 0.25) < 1e-6
    for _ in range(3):
        q.update_usage(torch.tensor([0, 1]))
    assert q.unused_steps[:2].tolist() == [0, 0] and q.unused_steps[2:].eq(3).all()
    z_e = torch.randn(2, 4, 3, 3) * 10
    before = q.embedding.weight.detach().clone()
    assert q.restart_dead_codes(z_e, unused_for=5) == 0
    assert q.restart_dead_codes(z_e, unused_for=3) == 14
    w = q.embedding.weight.detach()
    assert torch.equal(w[:2], before[:2])
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.cdist(w[2:], flat).min(1).values.max() < 0.5  # each restarted code sits on an encoder output
    assert q.unused_steps.eq(0).all()


# ----------------------------------------------------------------------------------------------- inference API

def test_encode_is_deterministic_and_accepts_all_input_forms():
    m = tiny()
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    c1 = m.encode(x)
    assert torch.equal(c1, m.encode(x))
    assert torch.equal(c1, m.encode(x, batch_size=1))
    assert torch.equal(c1, m.encode(arr))
    assert torch.equal(c1, m.encode(list(arr)))
    assert torch.equal(c1, m.encode(torch.from_numpy(arr)))
    assert torch.equal(c1, m.encode([Image.fromarray(a) for a in arr], size=32))
    assert torch.equal(c1[:1], m.encode(arr[0]))
    with pytest.raises(TuwenError, match="uint8"):
        m.encode(arr.astype(np.float32))


def test_decode_fp32_under_autocast_and_bf16_close():
    m = tiny()
    codes = m.encode(images(2, 32))
    ref = m.decode(codes)
    assert ref.dtype == torch.float32 and ref.min() >= -1 and ref.max() <= 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = m.decode(codes)
        c_inside = m.encode(images(2, 32))
    assert torch.equal(inside, ref) and torch.equal(c_inside, codes)
    low = m.decode(codes, dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    psnr = 10 * torch.log10(4.0 / (low - ref).pow(2).mean())  # value range [-1, 1]: peak-to-peak 2
    assert psnr > 40, psnr
    torch.testing.assert_close(m.decode(codes, batch_size=1), ref, atol=5e-5, rtol=1e-4)  # conv algos vary by batch
    pil = m.decode_to_pil(codes)
    assert len(pil) == 2 and pil[0].size == (32, 32)


def test_decode_rejects_bad_codes():
    m = tiny()
    with pytest.raises(TuwenError, match="outside this codebook"):
        m.decode(torch.full((1, 4, 4), 512))
    with pytest.raises(TuwenError, match="not .* a square|pass grid"):
        m.decode(torch.zeros(1, 12, dtype=torch.long))
    with pytest.raises(TuwenError, match="integers"):
        m.decode(torch.zeros(1, 4, 4))


# ----------------------------------------------------------------------------------------------- conversion

def taming_state_dict(model: VQGAN) -> dict:
    sd = {k: v.clone() for k, v in randomize(model).state_dict().items()}
    disc = NLayerDiscriminator(3, 64, 2)
    sd.update({f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()})
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    return sd


def test_lightning_ckpt_roundtrip(tmp_path):
    src = tiny(3)
    sd = taming_state_dict(src)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "global_step": 3, "epoch": 1, "callbacks": {"ckpt": FakeCallbackState()},
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}}]}, ckpt)
    m = vqgan_from_taming(ckpt, resolution=64)
    assert m.config == src.config  # architecture inferred from the shapes
    out = m.save_pretrained(tmp_path / "vq")
    assert json.loads((out / "config.json").read_text())["model_type"] == "vqgan"
    m2 = VQGAN.from_pretrained(out)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
        assert torch.equal(m2.state_dict()[k], v), k
    x = images(2, 32)
    src.eval()
    c = src.encode(x)
    assert torch.equal(m2.encode(x), c)
    assert torch.equal(m2.decode(c), src.decode(c))
    assert torch.equal(load_vqgan(out).encode(x), c)


def test_first_stage_model_prefix_and_configs(tmp_path):
    src = tiny(4)
    sd = {f"first_stage_model.{k}": v for k, v in taming_state_dict(src).items() if not k.startswith("loss.")}
    sd["transformer.tok_emb.weight"] = torch.randn(10, 4)
    sd["cond_stage_model.x"] = torch.randn(2)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    cfg = src.config
    taming_yaml = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed,
        "ddconfig": {"double_z": False, "z_channels": cfg.z_channels, "resolution": 64, "in_channels": 3,
                     "out_ch": 3, "ch": cfg.ch, "ch_mult": cfg.ch_mult, "num_res_blocks": cfg.num_res_blocks,
                     "attn_resolutions": cfg.attn_resolutions, "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 0}}}}}
    yaml = pytest.importorskip("yaml")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(taming_yaml))
    (tmp_path / "model.json").write_text(json.dumps(taming_yaml))
    x = images(1, 32)
    ref = src.encode(x)
    for config in (None, tmp_path / "model.yaml", tmp_path / "model.json", taming_yaml, cfg):
        m = vqgan_from_taming(path, config=config)
        assert torch.equal(m.encode(x), ref), config
    m = vqgan_from_taming(tmp_path)  # the EasyNLP model folder itself
    assert torch.equal(m.encode(x), ref)
    assert torch.equal(load_vqgan(tmp_path).encode(x), ref)


def test_infer_config_from_shapes():
    with torch.device("meta"):
        sd = VQGAN(VQGANConfig.preset("f16_16384")).state_dict()
    assert infer_vqgan_config(sd) == VQGANConfig.preset("f16_16384")
    assert infer_vqgan_config({f"first_stage_model.{k}": v for k, v in sd.items()}).n_embed == 16384
    cfg = infer_vqgan_config(tiny().state_dict(), resolution=32)
    assert cfg.attn_resolutions == [4] and cfg.ch_mult == [1, 1, 2, 2] and cfg.num_res_blocks == 1
    with pytest.raises(TuwenError, match="cannot infer"):
        infer_vqgan_config({"foo.weight": torch.zeros(1)})


def test_conversion_errors(tmp_path):
    src = tiny()
    sd = taming_state_dict(src)
    del sd["decoder.up.1.block.0.conv1.weight"]
    torch.save(sd, tmp_path / "missing.bin")
    with pytest.raises(TuwenError, match="missing keys: decoder.up.1.block.0.conv1.weight"):
        vqgan_from_taming(tmp_path / "missing.bin")
    sd = taming_state_dict(src)
    sd["encoder.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.bin")
    with pytest.raises(TuwenError, match="unexpected keys: encoder.extra.weight"):
        vqgan_from_taming(tmp_path / "extra.bin")
    with pytest.raises(TuwenError, match="shape mismatches"):
        vqgan_from_taming(tmp_path / "extra.bin", config=VQGANConfig.preset("tiny", n_embed=256))
    (tmp_path / "notes.bin").write_text("hello, not a checkpoint")
    with pytest.raises(TuwenError, match="notes.bin"):
        vqgan_from_taming(tmp_path / "notes.bin")
    with pytest.raises(TuwenError, match="no such file"):
        vqgan_from_taming(tmp_path / "absent.ckpt")
    torch.save({"quantize.embed.weight": torch.zeros(4, 2), "quantize.proj.weight": torch.zeros(4, 2, 1, 1)},
               tmp_path / "gumbel.bin")
    with pytest.raises(TuwenError, match="Gumbel"):
        vqgan_from_taming(tmp_path / "gumbel.bin")
    torch.save({"step": 3}, tmp_path / "empty.pt")
    with pytest.raises(TuwenError, match="holds no tensors"):
        vqgan_from_taming(tmp_path / "empty.pt")


def test_remap_and_ema_buffers_are_dropped(tmp_path, capsys):
    src = tiny()
    sd = dict(src.state_dict())
    sd["quantize.used"] = torch.arange(100)
    sd["quantize.embedding.cluster_size"] = torch.ones(512)
    torch.save(sd, tmp_path / "remap.bin")
    m = vqgan_from_taming(tmp_path / "remap.bin", config=src.config)
    assert "remap" in capsys.readouterr().err
    x = images(1, 32)
    assert torch.equal(m.encode(x), src.encode(x))


# ----------------------------------------------------------------------------------------------- training objective

def test_discriminator_layout_matches_taming():
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, 64, n_layers=2)
    keys = {k.rsplit(".", 1)[0] for k in d.state_dict()}
    assert keys == {"main.0", "main.2", "main.3", "main.5", "main.6", "main.8"}
    assert d.main[2].bias is None and isinstance(d.main[3], torch.nn.BatchNorm2d)
    assert abs(float(d.main[5].weight.detach().std()) - 0.02) < 0.002
    assert d(images(2, 32)).shape == (2, 1, 6, 6)
    assert len(NLayerDiscriminator(3, 64, 3).state_dict()) == 2 + 3 * 6 + 2


def _module(disc_start=0, **kw) -> VQGANTrainModule:
    m = tiny(5)
    return VQGANTrainModule(m, VQLossConfig(disc_start=disc_start, disc_ndf=16, **kw)).train()


def test_generator_adversarial_term_sends_no_gradient_to_discriminator():
    mod = _module()
    x = images(4, 32)
    xrec, _, _ = mod.vqgan(x)
    g_loss = -mod.loss._d_frozen(xrec).mean()
    g_loss.backward()
    assert all(p.grad is None for p in mod.loss.discriminator.parameters())
    assert mod.vqgan.get_last_layer().grad is not None and mod.vqgan.get_last_layer().grad.abs().sum() > 0

    # in the combined loss, D's gradient is exactly that of its own hinge loss on detached reconstructions
    mod.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = mod({"image": x}, step=0)
    out["loss"].backward()
    got = [p.grad.clone() for p in mod.loss.discriminator.parameters()]
    assert out["d_weight"] > 0 and out["g_loss"] != 0
    mod.zero_grad(set_to_none=True)
    d = mod.loss.discriminator
    with torch.no_grad():
        xrec = mod.vqgan(x)[0]
    from tuwen.training.tasks.vqgan import hinge_d_loss
    hinge_d_loss(d(x), d(xrec)).backward()
    for a, p in zip(got, d.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


def test_single_optimizer_moves_discriminator_the_right_way():
    mod = _module()
    x = images(4, 32, seed=1)
    d = mod.loss.discriminator

    def logits():
        with torch.no_grad():
            xrec = mod.vqgan(x)[0]
            return float(d(x).mean()), float(d(xrec).mean())

    real0, fake0 = logits()
    opt = torch.optim.Adam(mod.parameters(), lr=1e-3, betas=(0.5, 0.9))  # ONE optimizer over G and D
    for step in range(8):
        opt.zero_grad(set_to_none=True)
        mod({"image": x}, step=step)["loss"].backward()
        opt.step()
    real1, fake1 = logits()
    assert real1 > real0 + 0.1 and fake1 < fake0 - 0.1, (real0, fake0, real1, fake1)


def test_disc_start_gates_the_gan_and_eval_mode():
    mod = _module(disc_start=100)
    x = images(2, 32)
    out = mod({"image": x}, step=5)
    assert float(out["g_loss"]) == 0 and float(out["d_loss"]) == 0 and float(out["d_weight"]) == 0
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in mod.loss.discriminator.parameters())
    assert set(out) >= {"loss", "rec_loss", "codebook_loss", "g_loss", "d_loss", "d_weight", "perplexity", "usage"}
    mod.eval()
    with torch.no_grad():
        out = mod({"image": x}, step=200)
    assert out["loss"].dim() == 0 and float(out["d_weight"]) == 0.75
    no_gan = VQGANTrainModule(tiny(), VQLossConfig(disc_weight=0.0))
    assert no_gan.loss.discriminator is None
    assert float(no_gan({"image": x}, step=10**6)["g_loss"]) == 0


def test_adam_steps_reduce_the_loss_and_restart_dead_codes():
    mod = _module(disc_start=10**9, dead_code_steps=5)
    g = torch.Generator().manual_seed(2)  # smooth images (a 4×4 colour field, upsampled) that a VQGAN can fit
    x = F.interpolate(torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bilinear", align_corners=False)
    mean_color_l1 = float((x - x.mean((2, 3), keepdim=True)).abs().mean())
    opt = torch.optim.Adam(mod.vqgan.parameters(), lr=2e-3)
    losses, restarted = [], 0.0
    for step in range(50):
        opt.zero_grad(set_to_none=True)
        out = mod({"image": x}, step=step)
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
        restarted += float(out.get("restarted", 0))
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    assert float(out["rec_loss"]) < mean_color_l1
    assert restarted > 0  # 512 codes, 64 positions a batch: most codes are dead and get restarted


def test_lpips_loads_torchvision_and_taming_names(tmp_path):
    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in VGG16Features().features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(1)  # torchvision's head: ignored
    torch.save(vgg, tmp_path / "vgg16.pth")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / "vgg.pth")
    with pytest.raises(TuwenError, match="VGG16 weights"):
        LPIPS.from_files(tmp_path / "vgg.pth")
    lp = LPIPS.from_files(tmp_path / "vgg.pth", tmp_path / "vgg16.pth")
    x, y = images(2, 32), images(2, 32, seed=9)
    assert lp(x, x).abs().max() < 1e-6 and (lp(x, y) > 0).all()
    # a taming checkpoint's loss.perceptual_loss.* (net.sliceK.N names) in one file
    taming = {f"loss.perceptual_loss.net.slice1.{k.split('.', 1)[1]}": v for k, v in vgg.items()
              if k.startswith("features.")}
    taming.update({f"loss.perceptual_loss.{k}": v for k, v in lins.items()})
    torch.save(taming, tmp_path / "both.pth")
    lp2 = LPIPS.from_files(tmp_path / "both.pth")
    torch.testing.assert_close(lp2(x, y), lp(x, y))
    lp.train()
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    loss = VQLoss(VQLossConfig(lpips_path=str(tmp_path / "vgg.pth"), vgg_path=str(tmp_path / "vgg16.pth"),
                               disc_weight=0.0))
    out = loss(x, y, torch.tensor(0.0), step=0)
    assert out["p_loss"] > 0 and out["loss"] > out["rec_loss"]


def test_norm_groups_is_saved_and_old_folders_load_with_taming_groups(tmp_path):
    """norm_groups (GroupNorm groups) is not in the weights: it travels in config.json; a folder written before the
    field existed loads with taming's 32, and the same weights under other groups give other images."""
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.preset("tiny", resolution=32, norm_groups=8)).eval()
    assert vq.decoder.norm_out.num_groups == 8 and vq.encoder.down[0].block[0].norm1.num_groups == 8
    vq.save_pretrained(tmp_path / "g8")
    back = VQGAN.from_pretrained(tmp_path / "g8").eval()
    codes = torch.randint(0, 512, (2, 4, 4))
    assert back.config.norm_groups == 8 and torch.equal(back.decode(codes), vq.decode(codes))
    cfg = json.loads((tmp_path / "g8" / "config.json").read_text())
    assert cfg["norm_groups"] == 8
    VQGAN(VQGANConfig.preset("tiny", resolution=32)).save_pretrained(tmp_path / "old")
    old_cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del old_cfg["norm_groups"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(old_cfg))
    (tmp_path / "old" / "checksums.sha256").unlink(missing_ok=True)
    assert VQGAN.from_pretrained(tmp_path / "old").config.norm_groups == 32
    other = VQGAN(VQGANConfig.preset("tiny", resolution=32)).eval()
    other.load_state_dict(vq.state_dict())
    assert not torch.allclose(other.decode(codes), vq.decode(codes))
