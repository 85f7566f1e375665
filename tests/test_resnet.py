"""RN50: the ModifiedResNet image tower — OpenAI names and numerics, RN50.pt TorchScript archives read without
running them, CLIP with a ResNet tower (config round trip, old ViT folders unchanged), presets and flags."""
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuwen.convert.clip import (load_openai_resnet, load_openai_vit, load_visual_into, openai_visual_state_dict,
                                resnet_config_from_state_dict)
from tuwen.convert.torchscript import read_torchscript_state_dict
from tuwen.errors import TuwenError
from tuwen.models.clip import CLIP, CLIPConfig, vision_preset
from tuwen.models.resnet import ModifiedResNet, ResNetConfig
from tuwen.models.vit import ViTConfig
from tuwen.text.tokenizer import TextTokenizer

V1 = Path(__file__).parent / "fixtures" / "v1"


# ------------------------------------------------------------------ OpenAI's ModifiedResNet, as in openai/CLIP model.py
class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        self.stride = stride
        if stride > 1 or inplanes != planes * _Bottleneck.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion))]))

    def forward(self, x):
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.avgpool(out)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu3(out)


class _AttentionPool2d(nn.Module):
    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x):
        x = x.flatten(start_dim=2).permute(2, 0, 1)                        # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)            # (HW+1)NC
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training,
            need_weights=False)
        return x.squeeze(0)


class _ModifiedResNet(nn.Module):
    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = _AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        layers = [_Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * _Bottleneck.expansion
        for _ in range(1, blocks):
            layers.append(_Bottleneck(self._inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.attnpool(x)


class OpenAIRNStub(nn.Module):
    """Enough of OpenAI's CLIP RN50 for its archive layout: visual.* plus text-side keys."""

    def __init__(self, **kw):
        super().__init__()
        self.visual = _ModifiedResNet(**kw)
        self.token_embedding = nn.Embedding(10, 8)
        self.text_projection = nn.Parameter(torch.randn(8, kw["output_dim"]))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.visual(x)


# RN50-shaped (4 stages, 2 blocks in stage 3 so block counts are read per stage) at a tiny width
KW = dict(layers=(1, 1, 2, 1), output_dim=24, heads=4, input_resolution=64, width=8)   # heads = 32·8 // 64


def _ref(seed=0):
    torch.manual_seed(seed)
    ref = OpenAIRNStub(**KW)
    with torch.no_grad():   # non-trivial BatchNorm statistics and affine parameters
        for name, m in ref.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return ref.eval()


def _archive(tmp_path, how="trace", seed=0):
    ref = _ref(seed)
    x = torch.randn(2, 3, 64, 64)
    mod = torch.jit.trace(ref, x, check_trace=False) if how == "trace" else torch.jit.script(ref)
    path = tmp_path / f"RN50-{how}.pt"
    torch.jit.save(mod, str(path))
    return ref, path


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("how", ["trace", "script"])
def test_rn50_archive_state_dict_and_forward_match_openai(tmp_path, how):
    ref, path = _archive(tmp_path, how)
    sd = read_torchscript_state_dict(path)
    want = ref.state_dict()
    assert set(sd) == set(want)
    for k, v in want.items():
        assert torch.equal(sd[k], v), k
    rn = load_openai_resnet(path)
    assert isinstance(rn, ModifiedResNet) and not rn.training
    assert rn.config == ResNetConfig(image_size=64, layers=[1, 1, 2, 1], width=8, heads=4, output_dim=24)
    assert {k[len("visual."):] for k in want if k.startswith("visual.")} == set(rn.state_dict())
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(rn(x), ref.visual(x), atol=2e-5, rtol=1e-4)
        # another input size: the attention-pooling grid is resized (bicubic), the rest is convolutional
        assert rn(torch.randn(1, 3, 96, 96)).shape == (1, 24)


@pytest.mark.filterwarnings("ignore")
def test_clip_with_the_archive_tower_gives_the_reference_logits(tmp_path):
    ref, path = _archive(tmp_path, "trace", seed=3)
    tok = TextTokenizer.train(["一个红色的圆形", "一个蓝色的正方形", "a red circle"], vocab_size=120)
    vis = openai_visual_state_dict(path, allow_resnet=True)
    clip = CLIP.build(tok, vision=resnet_config_from_state_dict(vis), text="tiny", context_length=16).eval()
    load_visual_into(clip.visual, vis, str(path))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ids = clip.tokenize(["一个红色的圆形", "一个蓝色的正方形", "a red circle"])
    with torch.no_grad():
        img, txt, scale = clip(x, ids)
        logits = scale * img @ txt.T                                     # [2 images, 3 texts]
        # independent: OpenAI's forward for the image side, the text tower's pooled output for the text side
        want_img = F.normalize(ref.visual(x), dim=-1)
        want_txt = F.normalize(clip.bert.pooled(ids) @ clip.text_projection, dim=-1)
        want = clip.logit_scale.exp() * want_img @ want_txt.T
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-4)


def test_clip_resnet_folder_round_trip_and_v1_vit_folder_unchanged(tmp_path):
    tok = TextTokenizer.train(["一个红色的圆形", "a red circle"], vocab_size=100)
    torch.manual_seed(0)
    clip = CLIP.build(tok, vision="rn-tiny", text="tiny", context_length=16).eval()
    assert isinstance(clip.visual, ModifiedResNet) and clip.config.embed_dim == 64
    clip.save_pretrained(tmp_path / "rn")
    cfg = json.loads((tmp_path / "rn" / "config.json").read_text())
    assert cfg["vision"]["model_type"] == "resnet" and cfg["vision"]["layers"] == [1, 1, 1, 1]
    back = CLIP.from_pretrained(tmp_path / "rn")
    assert back.config == clip.config and isinstance(back.visual, ModifiedResNet)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back.image_features(x), clip.image_features(x))
    # a format-1 folder (vision without a tower kind) is still a ViT, with the same config fields
    old = json.loads((V1 / "clip" / "config.json").read_text())
    m = CLIP.from_pretrained(V1 / "clip")
    assert isinstance(m.config.vision, ViTConfig)
    new = m.config.to_dict()
    for d in (old, new, old["vision"], new["vision"], old["text"], new["text"]):
        d.pop("format_version")
    assert new == old
    # a vision kind tuwen does not know is one clear line
    bad = dict(cfg, vision=dict(cfg["vision"], model_type="convnext"))
    with pytest.raises(TuwenError, match="vision.model_type is 'convnext'"):
        CLIPConfig.from_dict(bad, source="config.json")


def test_presets_and_config_checks():
    rn50 = vision_preset("RN50")
    assert rn50 == ResNetConfig(image_size=224, layers=[3, 4, 6, 3], width=64, heads=32, output_dim=1024)
    assert vision_preset("RN50-quickgelu") == rn50 and isinstance(vision_preset("ViT-B-32"), ViTConfig)
    assert ModifiedResNet(rn50).num_params() == 38_316_896        # OpenAI RN50's visual tower
    with pytest.raises(TuwenError, match="unknown image tower 'RN51'.*RN50"):
        vision_preset("RN51")
    with pytest.raises(TuwenError, match="multiple of 32"):
        ResNetConfig(image_size=100)
    with pytest.raises(TuwenError, match="4 block counts"):
        ResNetConfig(layers=[3, 4, 6])
    with pytest.raises(TuwenError, match="not a multiple of 32"):
        ModifiedResNet(ResNetConfig.preset("rn-tiny"))(torch.randn(1, 3, 40, 40))


def test_bf16_autocast_and_grad_checkpointing():
    torch.manual_seed(0)
    rn = ModifiedResNet(ResNetConfig.preset("rn-tiny"))
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rn.eval()(x)
    assert y.shape == (2, 64) and torch.isfinite(y.float()).all()
    rn.train()
    rn(x).square().sum().backward()
    g = [p.grad.clone() for p in rn.parameters()]
    rn.zero_grad()
    rn.set_grad_checkpointing(True)
    rn(x).square().sum().backward()
    for a, p in zip(g, rn.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)


def test_resnet_towers_are_user_errors_where_a_vit_is_needed(tmp_path):
    ref = _ref()
    torch.save(ref.state_dict(), tmp_path / "rn.pt")
    with pytest.raises(TuwenError, match="ResNet image tower"):
        load_openai_vit(tmp_path / "rn.pt")
    assert isinstance(load_openai_resnet(tmp_path / "rn.pt"), ModifiedResNet)   # a plain state dict loads too
    sd = {k: v for k, v in ref.state_dict().items() if k != "visual.attnpool.positional_embedding"}
    with pytest.raises(TuwenError, match="lack attnpool.positional_embedding"):
        load_openai_resnet(sd)
    # a tuwen CLIP folder with a ResNet tower cannot be the captioner's ViT prefix
    from tuwen.models.captioner import load_image_tower
    tok = TextTokenizer.train(["a red circle"], vocab_size=60)
    CLIP.build(tok, vision="rn-tiny", context_length=8).save_pretrained(tmp_path / "rnclip")
    with pytest.raises(TuwenError, match="ResNet image tower"):
        load_image_tower(str(tmp_path / "rnclip"))


@pytest.mark.filterwarnings("ignore")
def test_udp_and_course_flag_pick_the_resnet_tower(tmp_path):
    from tuwen.cli.easynlp import parse
    from tuwen.cli.easynlp.clip import CLIP_PARAMS
    from tuwen.config import parse_user_defined_parameters
    from tuwen.training.tasks.clip import model_factory

    a = parse(["--mode=train", "--app_name=clip", "--tables=t.csv", "--model", "RN50"])
    p = parse_user_defined_parameters(a.user_defined_parameters + " context_length=16", CLIP_PARAMS, "clip")
    tok = TextTokenizer.train(["a red circle"], vocab_size=60)
    cfg, _ = model_factory(p, tok)
    assert cfg.vision == vision_preset("RN50") and cfg.embed_dim == 1024 and cfg.image_size == 224
    p = parse_user_defined_parameters("vision=RN50 vision_width=16 vision_heads=8 embed_dim=32 image_size=64",
                                      CLIP_PARAMS, "clip")
    cfg, _ = model_factory(p, tok)
    assert cfg.vision == ResNetConfig(image_size=64, layers=[3, 4, 6, 3], width=16, heads=8, output_dim=32)
    p = parse_user_defined_parameters("vision=RN50 patch_size=16", CLIP_PARAMS, "clip")
    with pytest.raises(TuwenError, match="patch_size= set a ViT image tower"):
        model_factory(p, tok)
    # vit_ckpt_path= an OpenAI RN50-style archive: the tower and its weights come from the file
    ref, path = _archive(tmp_path, "trace")
    p = parse_user_defined_parameters(f"vit_ckpt_path={path} context_length=16", CLIP_PARAMS, "clip")
    cfg, make = model_factory(p, tok)
    m = make().eval()
    assert isinstance(m.visual, ModifiedResNet) and cfg.embed_dim == 24
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.image_features(x), ref.visual(x), atol=2e-5, rtol=1e-4)


def test_cli_trains_a_resnet_clip_with_the_open_clip_model_flag(tmp_path, capsys):
    from tuwen.cli import main
    from test_clip import make_tsv

    train = make_tsv(tmp_path / "train.tsv", 16)
    ck = tmp_path / "ck"
    rc = main(["--mode=train", "--app_name=clip", f"--tables={train}", f"--checkpoint_dir={ck}",
               "--input_schema=idx:str:1,text:str:1,imgbase64:str:1", "--micro_batch_size=8", "--max_steps=2",
               "--num_workers=0", "--no_tensorboard", "--no_progress", "--model", "rn-tiny",
               "--user_defined_parameters=text=tiny context_length=16"])
    err = capsys.readouterr().err
    assert rc == 0, err
    m = CLIP.from_pretrained(ck)
    assert isinstance(m.visual, ModifiedResNet) and m.config.image_size == 64


def test_chinese_clip_rn50_layout_loads(tmp_path):
    from tuwen.models.clip import load_chinese_clip
    tok = TextTokenizer.train(["一个红色的圆形", "一个蓝色的正方形"], vocab_size=100)
    torch.manual_seed(0)
    src = CLIP.build(tok, vision="rn-tiny", text="tiny", context_length=16).eval()
    with torch.no_grad():
        for m in src.visual.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    sd = {f"module.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "clip_cn_rn50.pt")        # cn_clip's checkpoint layout
    m = load_chinese_clip(tmp_path / "clip_cn_rn50.pt", tok, context_length=16)
    assert isinstance(m.visual, ModifiedResNet) and m.config.vision == src.config.vision
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.image_features(x), src.image_features(x))
        # (the text config is inferred from the shapes: layer-norm eps may differ from the preset's → 1e-4)
        torch.testing.assert_close(m.encode_text(["一个红色的圆形"]), src.encode_text(["一个红色的圆形"]),
                                   atol=2e-4, rtol=1e-3)
