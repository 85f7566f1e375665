"""ViT image tower: OpenAI CLIP names and numerics, checkpoint layouts (state dict, TorchScript, fp16, HF), resizing."""
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tuwen.convert.clip import load_openai_vit, vit_config_from_state_dict
from tuwen.errors import TuwenError
from tuwen.data.images import to_uint8_batch
from tuwen.models.vit import CLIP_MEAN, CLIP_STD, ViTConfig, VisionTransformer, preprocess, resize_pos_embed


# ------------------------------------------------------------------ OpenAI's visual tower, as in openai/CLIP model.py
class _LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, h)
        self.ln_1 = _LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = _LayerNorm(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class OpenAIVisual(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = _LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads)
        self.ln_post = _LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x],
                      dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)   # NLD -> LND -> NLD
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAICLIPStub(nn.Module):
    """Enough of OpenAI's CLIP for its state-dict layout: visual.* plus text-side keys and int buffers."""

    def __init__(self, **kw):
        super().__init__()
        self.visual = OpenAIVisual(**kw)
        self.token_embedding = nn.Embedding(10, 8)
        self.transformer = _Transformer(8, 1, 1)       # the text transformer (top-level transformer.*)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("input_resolution", torch.tensor(kw["input_resolution"]))

    def forward(self, x):
        return self.visual(x)


KW = dict(input_resolution=32, patch_size=8, width=128, layers=2, heads=2, output_dim=48)   # heads = width // 64


def _ref(seed=0):
    torch.manual_seed(seed)
    ref = OpenAICLIPStub(**KW)
    with torch.no_grad():   # non-trivial LayerNorm / bias values
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "ln" in n:
                p.add_(0.1 * torch.randn_like(p))
    return ref.eval()


def test_openai_state_dict_loads_and_forward_matches(tmp_path):
    ref = _ref()
    path = tmp_path / "ViT-tiny.pt"
    torch.save(ref.state_dict(), path)
    vit = load_openai_vit(path)
    assert vit.config.width == 128 and vit.config.patch_size == 8 and vit.config.layers == 2
    assert vit.config.heads == 2 and vit.config.output_dim == 48 and vit.config.image_size == 32
    # every visual.* key of the file maps 1:1 onto the tower
    visual_keys = {k[len("visual."):] for k in ref.state_dict() if k.startswith("visual.")}
    assert visual_keys == set(vit.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = ref.visual(x)
        got = vit(x)
        tok = vit.forward_tokens(x)
    assert got.shape == (3, 48)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert tok.shape == (3, 1 + 16, 128)
    torch.testing.assert_close(tok[:, 0] @ vit.proj, got, atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_torchscript_archive_and_fp16(tmp_path):
    ref = _ref(1)
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(ref, x, check_trace=False)
    path = tmp_path / "ViT-ts.pt"
    torch.jit.save(traced, str(path))
    vit = load_openai_vit(path)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), ref(x), atol=2e-5, rtol=1e-4)
    # a half-precision plain state dict (OpenAI's weights are fp16) loads as fp32
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in ref.state_dict().items()}
    torch.save(half, tmp_path / "half.pt")
    vit16 = load_openai_vit(tmp_path / "half.pt")
    assert vit16.conv1.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(vit16(x), ref(x), atol=0.05, rtol=0.05)


def test_hf_clip_vision_layout_loads(tmp_path):
    ref = _ref(2)
    sd = ref.visual.state_dict()
    hf = {"vision_model.embeddings.class_embedding": sd["class_embedding"],
          "vision_model.embeddings.patch_embedding.weight": sd["conv1.weight"],
          "vision_model.embeddings.position_embedding.weight": sd["positional_embedding"],
          "vision_model.embeddings.position_ids": torch.arange(17)[None],
          "vision_model.pre_layrnorm.weight": sd["ln_pre.weight"], "vision_model.pre_layrnorm.bias": sd["ln_pre.bias"],
          "vision_model.post_layernorm.weight": sd["ln_post.weight"],
          "vision_model.post_layernorm.bias": sd["ln_post.bias"],
          "visual_projection.weight": sd["proj"].T.contiguous()}
    for i in range(2):
        s, d = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[s + f"attn.in_proj_{kind}"].chunk(3)
            hf[d + f"self_attn.q_proj.{kind}"], hf[d + f"self_attn.k_proj.{kind}"] = q, k
            hf[d + f"self_attn.v_proj.{kind}"] = v
            hf[d + f"self_attn.out_proj.{kind}"] = sd[s + f"attn.out_proj.{kind}"]
            hf[d + f"layer_norm1.{kind}"], hf[d + f"layer_norm2.{kind}"] = sd[s + f"ln_1.{kind}"], sd[s + f"ln_2.{kind}"]
            hf[d + f"mlp.fc1.{kind}"], hf[d + f"mlp.fc2.{kind}"] = sd[s + f"mlp.c_fc.{kind}"], sd[s + f"mlp.c_proj.{kind}"]
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    vit = load_openai_vit(tmp_path)   # a folder with model.safetensors
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), ref.visual(x), atol=2e-5, rtol=1e-4)


def test_position_embedding_resize(tmp_path):
    ref = _ref(3)
    torch.save(ref.state_dict(), tmp_path / "v.pt")
    vit = load_openai_vit(tmp_path / "v.pt", image_size=48)            # 4×4 grid → 6×6
    assert vit.positional_embedding.shape == (1 + 36, 128)
    torch.testing.assert_close(vit.positional_embedding[0], ref.visual.positional_embedding[0])
    assert vit(torch.randn(1, 3, 48, 48)).shape == (1, 48)
    # at run time too: a 32 px tower on 40 px inputs
    vit32 = load_openai_vit(tmp_path / "v.pt")
    assert vit32.forward_tokens(torch.randn(1, 3, 40, 40)).shape == (1, 1 + 25, 128)
    # resizing to the same grid is the identity
    pos = torch.randn(17, 8)
    assert resize_pos_embed(pos, 4) is pos
    with pytest.raises(TuwenError, match="multiple of the patch size"):
        vit32(torch.randn(1, 3, 33, 33))


def test_bad_checkpoints_are_user_errors(tmp_path):
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1), "visual.attnpool.c_proj.weight": torch.zeros(1)},
               tmp_path / "rn50.pt")
    with pytest.raises(TuwenError, match="ResNet"):
        load_openai_vit(tmp_path / "rn50.pt")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(TuwenError, match="no CLIP image tower"):
        load_openai_vit(tmp_path / "x.pt")
    sd = {k: v for k, v in _ref().state_dict().items() if not k.endswith("ln_post.bias")}
    with pytest.raises(TuwenError, match="missing keys: ln_post.bias"):
        load_openai_vit(sd)
    with pytest.raises(TuwenError, match="no such file"):
        load_openai_vit(tmp_path / "nothing.pt")


def test_presets_match_openai_sizes():
    vit = VisionTransformer(ViTConfig.preset("ViT-B-32"))
    assert vit.num_params() == 87_849_216          # OpenAI ViT-B/32 image tower
    assert len(vit.state_dict()) == 152
    cfg = vit_config_from_state_dict({k: v for k, v in vit.state_dict().items()})
    assert (cfg.width, cfg.patch_size, cfg.layers, cfg.heads, cfg.output_dim, cfg.image_size) == \
        (768, 32, 12, 12, 512, 224)
    with pytest.raises(TuwenError, match="unknown ViT preset"):
        ViTConfig.preset("ViT-Q-1")
    with pytest.raises(TuwenError, match="multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8)


def test_preprocess_like_openai():
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 40))                       # left quarter blue: cropped away
    x = preprocess(img, 32)
    assert x.shape == (1, 3, 32, 32)
    want = torch.tensor([(1 - CLIP_MEAN[0]) / CLIP_STD[0], (0 - CLIP_MEAN[1]) / CLIP_STD[1],
                         (0 - CLIP_MEAN[2]) / CLIP_STD[2]])
    torch.testing.assert_close(x[0, :, 16, 16], want, atol=1e-5, rtol=1e-5)
    arr = to_uint8_batch([np.zeros((32, 32, 3), np.uint8), img], 32)
    assert arr.shape == (2, 32, 32, 3) and arr.dtype == np.uint8
    sq = to_uint8_batch(img, 32, resize="squash")                # Chinese-CLIP's Resize((S, S)): blue kept
    assert sq[0, 16, 2, 2] > 200 and arr[1, 16, 2, 0] > 200
