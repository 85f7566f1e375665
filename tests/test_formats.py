"""Model folders written by format_version 1 (before the package was re-layered) load and give the same outputs.

``tests/fixtures/v1`` was written by ``tests/fixtures/make_v1_models.py`` with the format-1 code; the reference
outputs were computed by that code, so these tests compare today's loaders against the old ones.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuwen.config import FORMAT_VERSION
from tuwen.models.captioner import Captioner
from tuwen.models.clip import CLIP
from tuwen.models.text2image import TextToImage

V1 = Path(__file__).parent / "fixtures" / "v1"


@pytest.fixture(scope="module")
def ref():
    return load_file(str(V1 / "reference.safetensors"))


def _version(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["format_version"]


def test_v1_text2image_loads_with_the_same_outputs(ref, tmp_path):
    assert _version(V1 / "t2i") == 1
    m = TextToImage.from_pretrained(V1 / "t2i")
    prompts = (V1 / "reference.txt").read_text(encoding="utf-8").splitlines()[:2]
    ids = m.tokenize(prompts)
    assert torch.equal(ids, ref["t2i_ids"])
    with torch.no_grad():
        logits = m(ids, ref["t2i_codes"])
        codes = m.generate(prompts, seed=0, return_codes=True)
    codes = codes if torch.is_tensor(codes) else codes[0]
    assert logits.shape == ref["t2i_logits"].shape
    assert torch.allclose(logits, ref["t2i_logits"], atol=1e-5)
    assert torch.equal(codes, ref["t2i_gen_codes"])
    assert m.config.sampling.top_k == 4 and m.config.sampling.guidance_scale == 1.5  # saved defaults kept
    # saved again, it is a current-format folder with the same outputs
    m.save_pretrained(tmp_path / "t2i")
    assert _version(tmp_path / "t2i") == FORMAT_VERSION
    m2 = TextToImage.from_pretrained(tmp_path / "t2i")
    with torch.no_grad():
        assert torch.equal(m2(ids, ref["t2i_codes"]), logits)


def test_v1_captioner_loads_with_the_same_outputs(ref):
    assert _version(V1 / "cap") == 1
    m = Captioner.from_pretrained(V1 / "cap")
    lines = (V1 / "reference.txt").read_text(encoding="utf-8").splitlines()
    assert torch.equal(m.tokenize(lines[:2]), ref["cap_ids"])
    with torch.no_grad():
        logits = m(ref["cap_pixels"], ref["cap_ids"])
        captions = m.generate(pixel_values=ref["cap_pixels"])
    assert torch.allclose(logits, ref["cap_logits"], atol=1e-5)
    assert [str(c) for c in captions] == lines[2:4]
    assert m.config.image_size == 32 and m.config.vit is not None


def test_v1_clip_loads_with_the_same_outputs(ref):
    m = CLIP.from_pretrained(V1 / "clip")
    x = torch.rand(2, 3, m.config.image_size, m.config.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(m.image_features(x), ref["clip_image_features"], atol=1e-5)


def test_a_newer_format_is_refused_with_a_clear_message(tmp_path):
    from tuwen.errors import TuwenError

    shutil.copytree(V1 / "clip", tmp_path / "clip")
    cfg = json.loads((tmp_path / "clip" / "config.json").read_text())
    cfg["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "clip" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TuwenError, match="newer than this tuwen understands"):
        CLIP.from_pretrained(tmp_path / "clip")


def test_saved_folders_carry_checksums_and_damage_is_caught(tmp_path):
    from tuwen.errors import TuwenError
    from tuwen.hub import CHECKSUMS_NAME

    m = TextToImage.from_pretrained(V1 / "t2i")
    out = m.save_pretrained(tmp_path / "m")
    listed = (out / CHECKSUMS_NAME).read_text().split()
    assert "model.safetensors" in listed and "config.json" in listed and "vocab.txt" in listed
    assert (out / "vqgan" / CHECKSUMS_NAME).exists()
    TextToImage.from_pretrained(out)                       # verifies
    (out / "notes.txt").write_text("a file the user added is not checked")
    TextToImage.from_pretrained(out)
    w = out / "vqgan" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])                     # half-copied component
    with pytest.raises(TuwenError, match=r"vqgan: the model files are damaged .*model.safetensors"):
        TextToImage.from_pretrained(out)
    c = CLIP.from_pretrained(V1 / "clip")
    c.save_pretrained(tmp_path / "c")
    data = bytearray((tmp_path / "c" / "model.safetensors").read_bytes())
    data[-5] ^= 1
    (tmp_path / "c" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(TuwenError, match="sha256 mismatch"):
        CLIP.from_pretrained(tmp_path / "c")
