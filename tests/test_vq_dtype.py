"""The VQGAN decode dtype on the command line (issue 16, H3): ``--vq_dtype fp32|bf16|auto`` / ``vq_dtype=``, written
into the PNG record so ``--from-png`` re-creates a bf16-decoded image exactly; fp32 stays the default and leaves
the images and their records as they were."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import tuwen
from tuwen.cli import main
from tuwen.data.images import to_pil
from tuwen.data.pngmeta import png_bytes, read_png_record
from tuwen.errors import TuwenError
from tuwen.models import vqgan as vq_mod
from tuwen.models.text2image import TextToImage
from tuwen.models.vqgan import check_vq_dtype, fast_bf16, resolve_vq_dtype
from tuwen.pipelines import demo_model_path

PROMPT = "中间有一个蓝色的正方形"


def _px(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def demo():
    return TextToImage.from_pretrained(demo_model_path())


# ----------------------------------------------------------------------------------------------- parsing

def test_resolve_vq_dtype(monkeypatch):
    assert resolve_vq_dtype(None, "cpu") == "fp32"  # the default
    assert resolve_vq_dtype("fp32", "cpu") == "fp32" and resolve_vq_dtype(" BF16 ", "cpu") == "bf16"
    monkeypatch.setattr(vq_mod, "fast_bf16", lambda device: True)
    assert resolve_vq_dtype("auto", "cpu") == "bf16"
    monkeypatch.setattr(vq_mod, "fast_bf16", lambda device: False)
    assert resolve_vq_dtype("auto", "cpu") == "fp32"
    with pytest.raises(TuwenError, match=r"--vq_dtype 'fp16': expected one of fp32, bf16, auto"):
        resolve_vq_dtype("fp16", "cpu", "--vq_dtype")
    with pytest.raises(TuwenError, match="vq_dtype 'auto': expected one of fp32, bf16$"):
        check_vq_dtype("auto", "vq_dtype", allow_auto=False)  # a record holds what was used, never "auto"


def test_auto_follows_the_cpu_probes(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not fast_bf16("cpu") and resolve_vq_dtype("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert fast_bf16("cpu") and resolve_vq_dtype("auto", "cpu") == "bf16"
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert not fast_bf16("cpu")  # an older torch without the probes: fp32
    if not torch.cuda.is_available():
        assert not fast_bf16("cuda")


def test_bad_values_name_the_flag(tmp_path, capsys):
    for cmd in (["generate", PROMPT], ["demo"], ["complete", "x.png", "--prompt", PROMPT, "--box", "0,0,1,1"],
                ["upscale", "x.png", "--model", "m", "--text", PROMPT]):
        with pytest.raises(SystemExit) as e:  # argparse's choices: exit status 2 with the flag named
            main([*cmd, "--vq_dtype", "fp16", "--out", str(tmp_path / "o")])
        assert e.value.code == 2, cmd
        assert "--vq_dtype" in (err := capsys.readouterr().err) and "invalid choice: 'fp16'" in err, cmd
    with pytest.raises(TuwenError, match="vq_dtype 'half'"):
        tuwen.pipeline("text2image_generation", vq_dtype="half")
    with pytest.raises(TuwenError, match="vq_dtype 'half'"):
        TextToImage.from_pretrained(demo_model_path(), vq_dtype="half")
    # another app decodes no codes: the flag is an error, not silently ignored
    rc = main(["--mode=predict", "--app_name=image2text_generation", f"--tables={tmp_path / 'x.tsv'}",
               "--vq_dtype", "bf16", f"--checkpoint_dir={tmp_path}"])
    assert rc == 2 and "--vq_dtype bf16: the VQGAN decode dtype applies to text→image" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- records

def test_record_field_round_trip(demo, tmp_path):
    assert "vq_dtype" not in demo.records(PROMPT, 0, 0, 1)[0]  # fp32: no field (records as before)
    rec = demo.records(PROMPT, 0, 0, 1, vq_dtype="bf16")[0]
    assert rec["vq_dtype"] == "bf16"
    img = demo.generate(PROMPT, seed=0, vq_dtype="bf16")[0][0]
    (tmp_path / "a.png").write_bytes(png_bytes(img, dict(rec)))
    back = read_png_record(tmp_path / "a.png")
    assert back["vq_dtype"] == "bf16" and back["decode"] == [0, 1]
    assert np.array_equal(np.asarray(demo.regenerate(back)), np.asarray(img))  # the record's dtype, exactly
    with pytest.raises(TuwenError, match="the record's vq_dtype 'fp16'"):
        demo.regenerate({**back, "vq_dtype": "fp16"})


def test_fp32_default_outputs_unchanged(demo):
    """No flag = fp32 = the plain ``VQGAN.decode`` of earlier releases, byte for byte, and no new record field."""
    codes = demo.generate([PROMPT], num_images_per_prompt=2, seed=5, return_codes=True)[0]
    before = to_pil(demo.vqgan.decode(codes.reshape(-1, *demo.grid)))
    for kw in ({}, {"vq_dtype": "fp32"}):
        now = demo.generate([PROMPT], num_images_per_prompt=2, seed=5, **kw)[0]
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, now)), kw
    bf = demo.generate([PROMPT], num_images_per_prompt=2, seed=5, vq_dtype="bf16")[0]
    diff = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) for a, b in zip(before, bf))
    assert diff <= 8  # README: within 3 levels on the trained demo VQGAN (8: slack for other CPUs' kernels)
    assert "vq_dtype" not in demo.records(PROMPT, 5, 0, 2)[0]


# ----------------------------------------------------------------------------------------------- commands

def test_generate_bf16_and_from_png_reproduce_it(tmp_path):
    out = tmp_path / "g"
    assert main(["generate", PROMPT, "-n", "2", "--seed", "1", "--vq_dtype", "bf16", "--out", str(out)]) == 0
    rec = read_png_record(out / "prompt000_1.png")
    assert rec["vq_dtype"] == "bf16" and rec["decode"] == [1, 2]
    assert json.loads((out / "prompts.json").read_text(encoding="utf-8"))[0]["records"][1]["vq_dtype"] == "bf16"
    # --from-png decodes as the record says: the same pixels
    assert main(["generate", "--from-png", str(out / "prompt000_1.png"), "--out", str(tmp_path / "again")]) == 0
    again = tmp_path / "again" / "prompt000_1_again.png"
    assert np.array_equal(_px(out / "prompt000_1.png"), _px(again)) and read_png_record(again)["vq_dtype"] == "bf16"
    # --vq_dtype with --from-png overrides the record, and the new record says so (fp32: no field)
    assert main(["generate", "--from-png", str(out / "prompt000_1.png"), "--vq_dtype", "fp32",
                 "--out", str(tmp_path / "f32")]) == 0
    f32 = tmp_path / "f32" / "prompt000_1_again.png"
    assert "vq_dtype" not in read_png_record(f32)
    assert main(["generate", PROMPT, "-n", "2", "--seed", "1", "--vq_dtype", "fp32",
                 "--out", str(tmp_path / "plain")]) == 0
    plain = tmp_path / "plain" / "prompt000_1.png"
    assert "vq_dtype" not in read_png_record(plain) and np.array_equal(_px(f32), _px(plain))
    # without the flag `tuwen generate` decodes with auto: bf16 where the CPU has it (recorded), else fp32
    assert main(["generate", PROMPT, "-n", "2", "--seed", "1", "--out", str(tmp_path / "auto")]) == 0
    auto = tmp_path / "auto" / "prompt000_1.png"
    expect = resolve_vq_dtype("auto", "cpu")
    assert read_png_record(auto).get("vq_dtype", "fp32") == expect
    assert np.array_equal(_px(auto), _px(out / "prompt000_1.png" if expect == "bf16" else plain))


def test_pipeline_and_serve_options_take_it(monkeypatch):
    pipe = tuwen.pipeline("text2image_generation", vq_dtype="bf16")
    res = pipe(PROMPT)[0]
    assert res["records"][0]["vq_dtype"] == "bf16"
    assert "vq_dtype" not in pipe(PROMPT, vq_dtype="fp32")[0]["records"][0]  # per call
    from tuwen.serve.server import ServeOptions
    assert ServeOptions().vq_dtype is None  # the server default: auto, as `tuwen generate`


def test_predict_flag_and_udp_key(tmp_path):
    (tmp_path / "in.tsv").write_text(f"a\t{PROMPT}\n", encoding="utf-8")

    def predict(name, *extra):
        argv = ["--mode=predict", "--app_name=text2image_generation", "--tables", str(tmp_path / "in.tsv"),
                "--input_schema", "idx:str:1,text:str:1", "--outputs", str(tmp_path / f"{name}.tsv"),
                "--output_schema", "idx,gen_info", "--checkpoint_dir", str(demo_model_path()), "--no_progress"]
        assert main([*argv, *extra]) == 0
        return json.loads((tmp_path / f"{name}.tsv").read_text(encoding="utf-8").split("\t")[1])[0]

    assert "vq_dtype" not in predict("default")  # EasyNLP outputs as before
    assert predict("udp", "--user_defined_parameters=max_generated_num=1 vq_dtype=bf16")["vq_dtype"] == "bf16"
    assert "vq_dtype" not in predict("flag", "--user_defined_parameters=vq_dtype=bf16", "--vq_dtype", "fp32")
