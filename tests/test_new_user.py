"""What a new user meets (issue 12) and output-name collisions (issue 11 item 8): EasyNLP folders of any image size,
unknown prompt words, grids and prompts.json, one-line errors instead of tracebacks, --version / did-you-mean / app
help, pipeline names and the clip task, progress switches, checks before expensive work, PNG records and
--from-png, the demo page, and unique output names."""
import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_text2image import SCHEMA, tiny_model, tiny_tokenizer, tiny_vqgan, write_easynlp_checkpoint  # noqa: E402

import tuwen  # noqa: E402
from tuwen.cli import main  # noqa: E402
from tuwen.cli.common import ImageWriter, sanitize_name  # noqa: E402
from tuwen.data import synth  # noqa: E402
from tuwen.data.pngmeta import read_png_record  # noqa: E402
from tuwen.errors import TuwenError  # noqa: E402
from tuwen.models.text2image import TextToImage, TextToImageConfig  # noqa: E402
from tuwen.pipelines import demo_model_path  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_model()  # text_len 12 + img_len 16 (32 px, 4×4 codes): an EasyNLP folder that is not 256 px


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model):
    """A tuwen folder and an EasyNLP folder of the tiny model."""
    root = tmp_path_factory.mktemp("models")
    model.save_pretrained(root / "tuwen")
    write_easynlp_checkpoint(root / "artist", model)
    return root


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ----------------------------------------------------------------------------------------------- item 1

def test_easynlp_size_is_inferred_or_refused_never_negative(tmp_path, folders, model, capsys):
    art = folders / "artist"
    # 28 positions on an f8 VQGAN: text_len 32 does not fit → one error naming size= / img_len=, no model
    with pytest.raises(TuwenError, match=r"size= .*img_len="):
        TextToImage.from_pretrained(art)
    # any one of size / img_len / text_len is enough
    for kw in ({"size": 32}, {"img_len": 16}, {"text_len": 12}):
        m = TextToImage.from_pretrained(art, **kw)
        assert (m.config.text_len, m.config.img_len, m.config.image_size) == (12, 16, 32), kw
    # a size that leaves no text positions is refused with the same advice
    with pytest.raises(TuwenError, match=r"text_len -?\d+; pass the size"):
        TextToImage.from_pretrained(art, size=64)
    # the VQGAN's own resolution is used when its config is given (vqgan_path= a tuwen VQGAN folder)
    m = TextToImage.from_pretrained(art, vqgan_path=str(folders / "tuwen" / "vqgan"))
    assert m.config.image_size == 32 and m.config.text_len == 12
    # EasyNLP's default text_len 32 picks the size when nothing else says it: 32 + 16 positions → 32 px
    tok = tiny_tokenizer()
    c = TextToImageConfig.build(text_len=32, img_len=16, img_vocab_size=64, text_vocab_size=tok.vocab_size,
                                image_size=32, n_layer=1, n_head=2, n_embd=16)
    write_easynlp_checkpoint(tmp_path / "t32", TextToImage(c, tiny_vqgan(), tok))
    m = TextToImage.from_pretrained(tmp_path / "t32")
    assert (m.config.text_len, m.config.img_len, m.config.image_size) == (32, 16, 32)
    # a tuwen folder checks the sizes it is given
    with pytest.raises(TuwenError, match="size=64 does not match"):
        TextToImage.from_pretrained(folders / "tuwen", size=64)


def test_easynlp_size_on_every_path(tmp_path, folders, capsys):
    art = folders / "artist"
    # convert: refused without a size (nothing written), works with one
    assert main(["convert", str(art), str(tmp_path / "c0")]) == 2
    assert "size=" in capsys.readouterr().err and not (tmp_path / "c0").exists()
    assert main(["convert", str(art), str(tmp_path / "c1"), "--text_len", "12"]) == 0
    assert TextToImage.from_pretrained(tmp_path / "c1").config.image_size == 32
    # generate: --size / --img_len / --text_len
    assert main(["generate", "红色的圆形", "-n", "1", "--model", str(art), "--out", str(tmp_path / "g0")]) == 2
    assert main(["generate", "红色的圆形", "-n", "1", "--model", str(art), "--img_len", "16",
                 "--out", str(tmp_path / "g1")]) == 0
    # pipeline
    p = tuwen.pipeline("text2image_generation", model_path=str(art), size=32)
    assert p.model.config.text_len == 12


@pytest.mark.slow
def test_easynlp_size_when_finetuning(tmp_path, folders, capsys):
    """Finetuning an EasyNLP folder takes size= from --user_defined_parameters (and refuses without one)."""
    art = folders / "artist"
    train = tmp_path / "train.tsv"
    train.write_text("\n".join(_rows(8)) + "\n", encoding="utf-8")
    base = ["--tables", f"{train},{train}", "--input_schema", SCHEMA, "--first_sequence", "text",
            "--second_sequence", "imgbase64", "--app_name", "text2image_generation"]
    assert main(["--mode=train", *base, "--checkpoint_dir", str(tmp_path / "ft"), "--max_steps", "1",
                 "--micro_batch_size", "4", "--no_tensorboard", "--no_progress", "--data_threads", "0",
                 f"--user_defined_parameters=pretrain_model_name_or_path={art} size=32"]) == 0
    assert TextToImage.from_pretrained(tmp_path / "ft").config.text_len == 12
    assert main(["--mode=train", *base, "--checkpoint_dir", str(tmp_path / "ft2"), "--max_steps", "1",
                 "--no_tensorboard", "--data_threads", "0",
                 f"--user_defined_parameters=pretrain_model_name_or_path={art}"]) == 2
    assert "size=" in capsys.readouterr().err


def _rows(n: int, size: int = 32) -> list[str]:
    out = []
    for i in range(n):
        img, text = synth.make_sample(i, size=size)[:2]
        out.append(f"{i}\t{text}\t{_b64(img)}")
    return out


def _b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------- item 2

def test_unknown_prompt_words_are_named(tmp_path, capsys):
    demo = TextToImage.from_pretrained(demo_model_path())
    assert demo.tokenizer.unknown_words("一只红色的猫 a red cat") == ["只", "猫", "red", "cat"]
    assert demo.prompt_warnings("左上角有一个红色的圆形") == []
    out = tuwen.pipeline("text2image_generation", max_generated_num=1)(["一只红色的猫", "左上角有一个红色的圆形"])
    assert out[0]["unknown_tokens"] == ["只", "猫"] and "只 猫" in out[0]["warnings"][0]
    assert out[1]["unknown_tokens"] == [] and out[1]["warnings"] == []
    assert "只 猫" in capsys.readouterr().err
    assert main(["generate", "一只红色的猫", "-n", "1", "--out", str(tmp_path / "g")]) == 0
    assert "unknown to the model's vocabulary" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- items 3, 14, 16

def test_generate_outputs_explain_themselves(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["generate", "左上角有一个红色的圆形", "中间有一个蓝色的正方形", "-n", "2", "--seed", "3",
                 "--top_k", "8", "--out", str(out)]) == 0
    assert "not empty" not in capsys.readouterr().err
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["prompt000.png", "prompt001.png"]
    assert not list(out.glob("*_grid.png"))
    index = json.loads((out / "prompts.json").read_text(encoding="utf-8"))
    assert index[1]["grid"] == "grids/prompt001.png" and index[1]["records"][1]["k"] == 1
    rec = read_png_record(out / "prompt001_1.png")
    assert rec["prompt"] == "中间有一个蓝色的正方形" and rec["seed"] == 3 and rec["sampling"]["top_k"] == 8
    assert rec == index[1]["records"][1] and Image.open(out / "prompt001_1.png").text["prompt"] == rec["prompt"]
    # --from-png re-creates the same pixels
    assert main(["generate", "--from-png", str(out / "prompt001_1.png"), "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(_png(out / "prompt001_1.png"), _png(tmp_path / "again" / "prompt001_1_again.png"))
    with pytest.raises(TuwenError, match="no tuwen record"):
        read_png_record(out / "grids" / "prompt000.png")
    # readers: 4 images (grids left out), prompts from prompts.json; a second run into the folder warns
    assert main(["data", "score", str(out)]) == 0
    assert "scored 4 images" in capsys.readouterr().out
    from tuwen.metrics.image import iter_image_set
    items = list(iter_image_set(out))
    assert len(items) == 4 and {i.text for i in items} == {"左上角有一个红色的圆形", "中间有一个蓝色的正方形"}
    assert main(["generate", "下方有一个青色的正方形", "-n", "1", "--out", str(out)]) == 0
    assert "is not empty" in capsys.readouterr().err
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "grids" not in page and "seed 0" in page and "--from-png" in page


def test_demo_page_explains_itself(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "-n", "1", "--prompt", "中间有一个蓝色的正方形",
                 "--prompt", "左上角有一个红色的圆形"]) == 0
    page = (tmp_path / "d" / "index.html").read_text(encoding="utf-8")
    for want in ("✓</b> the attribute checker", "attribute checker over 2 images", "seed 0", "top_k",
                 "never appears in the demo model", 'width="192"'):
        assert want in page, want
    assert (tmp_path / "d" / "grids" / "prompt00.png").exists()
    assert read_png_record(tmp_path / "d" / "prompt01_0.png")["prompt"] == "左上角有一个红色的圆形"


# ----------------------------------------------------------------------------------------------- items 4, 5, 6

def test_missing_inputs_are_one_line_errors(tmp_path, capsys):
    vq = str(demo_model_path() / "vqgan")
    assert main(["vq", "encode", "--model", vq, str(tmp_path / "nope.png"), "--out", str(tmp_path / "c.npy")]) == 2
    assert "nope.png: no such image file" in capsys.readouterr().err and not (tmp_path / "c.npy").exists()
    assert main(["vq", "encode", "--model", vq, str(tmp_path), "--out", str(tmp_path / "c.npy")]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_caption_inputs(tmp_path, capsys):
    from tuwen.cli.caption import expand_image_args

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "grids").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "grids" / "g.png")
    (tmp_path / "list.txt").write_text("0.png\n\n" + str(tmp_path / "2.png") + "\n", encoding="utf-8")
    assert expand_image_args([str(tmp_path / "list.txt")]) == [str(tmp_path / "0.png"), str(tmp_path / "2.png")]
    assert expand_image_args([str(tmp_path)]) == [str(tmp_path / f"{i}.png") for i in range(3)]
    assert expand_image_args([str(tmp_path / "[01].png")]) == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    with pytest.raises(TuwenError, match="missing.png: no such file or folder"):
        expand_image_args([str(tmp_path / "missing.png")])
    (tmp_path / "bad.txt").write_text("0.png\nnot-there.png\n", encoding="utf-8")
    with pytest.raises(TuwenError, match=r"bad.txt:2: not-there.png: no such image file"):
        expand_image_args([str(tmp_path / "bad.txt")])
    with pytest.raises(TuwenError, match="no file matches"):
        expand_image_args([str(tmp_path / "*.jpg")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    for argv in (["generate", "x", "--device", "cuda", "--out", str(tmp_path / "g")],
                 ["demo", "--device", "cuda", "--out", str(tmp_path / "d")],
                 ["vq", "encode", "--model", str(demo_model_path() / "vqgan"), "--device", "cuda",
                  "--tables", str(tmp_path), "--out", str(tmp_path / "c.npy")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--device cuda" in err[0] and "available: cpu" in err[0], argv


# ----------------------------------------------------------------------------------------------- item 9

def test_version_did_you_mean_and_app_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"tuwen {tuwen.__version__}")
    with pytest.raises(SystemExit):
        main(["generate", "x", "--outt", "d"])
    assert "did you mean: --outt → --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generat", "x"])
    assert "generat → generate" in capsys.readouterr().err
    assert main(["--mode=train", "--app_name=clip", "--learnin_rate", "3"]) == 2
    assert "--learning_rate" in capsys.readouterr().err
    assert main(["--mode=predict", "--app_name=text2image_generation", "--user_defined_parameters=text_lne=3"]) == 2
    assert "did you mean 'text_len'" in capsys.readouterr().err
    with pytest.raises(TuwenError, match="did you mean 'max_generated_num'"):
        tuwen.pipeline("text2image_generation", max_generated_nun=2)
    for app, key in (("text2image_generation", "  guidance_scale (float"), ("clip", "  context_length (int, "
                                                                                   "default 52)"),
                     ("image2text_generation", "  num_beams (int")):
        assert main(["--mode=train", f"--app_name={app}", "--help"]) == 0
        assert key in capsys.readouterr().out, app
    doc = tuwen.pipeline.__doc__
    for want in ("text2image_generation", "image2text_generation", "video2text_generation", '"clip"',
                 "max_generated_num", "pai-painter-commercial-base-zh", "TUWEN_HOME"):
        assert want in doc, want


# ----------------------------------------------------------------------------------------------- item 10

def test_pipeline_by_model_name_and_clip_task(tmp_path, monkeypatch, model):
    from tuwen.models.clip import CLIP

    monkeypatch.setenv("TUWEN_HOME", str(tmp_path / "home"))
    with pytest.raises(TuwenError, match=r"put the files in .*pai-painter-commercial-base-zh"):
        tuwen.pipeline("pai-painter-commercial-base-zh")
    write_easynlp_checkpoint(tmp_path / "home" / "models" / "pai-painter-commercial-base-zh", model)
    gen = tuwen.pipeline("pai-painter-commercial-base-zh", size=32, max_generated_num=1)
    assert gen.model.config.text_len == 12 and len(gen("红色的圆形")[0]["images"]) == 1
    with pytest.raises(TuwenError, match="did you mean 'text2image_generation'"):
        tuwen.pipeline("text2image_generaton")
    clip = CLIP.build(tiny_tokenizer(), image_size=32)
    clip.save_pretrained(tmp_path / "clip")
    cp = tuwen.pipeline("clip", model_path=str(tmp_path / "clip"))
    imgs = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    res = cp(imgs, ["红色", "蓝色", "圆形"])
    assert np.array(res["scores"]).shape == (2, 3) and np.abs(res["scores"]).max() <= 1 + 1e-5
    e = cp.embed_texts("红色")
    assert e.shape[0] == 1 and torch.allclose(e.norm(dim=-1), torch.ones(1))
    assert type(tuwen.pipeline(str(tmp_path / "clip"))).__name__ == "ClipPipeline"  # a folder names its task


# ----------------------------------------------------------------------------------------------- items 11, 12, 16

def test_progress_switch(monkeypatch):
    from tuwen import runtime

    assert runtime.progress_disable(None) is None and runtime.progress_disable(True) is False
    assert runtime.progress_disable(False) is True
    monkeypatch.setattr(runtime, "rank", lambda: 1)
    assert runtime.progress_disable(True) is True


def test_bad_rerank_is_found_before_generating(tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("generated before checking --rerank")

    monkeypatch.setattr(TextToImage, "generate", boom)
    assert main(["generate", "x", "--rerank", "clipp:clip", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "did you mean clip:clip" in err and "clip:DIR" in err and "caption:DIR" in err


def test_clip_default_batch_is_contrastive():
    from tuwen.cli import easynlp

    assert easynlp.parse(["--mode=train", "--app_name=clip"]).micro_batch_size == 64
    assert easynlp.parse(["--mode=train", "--app_name=text2image_generation"]).micro_batch_size == 2
    assert easynlp.parse(["--mode=train", "--app_name=clip", "--micro_batch_size=8"]).micro_batch_size == 8


# ----------------------------------------------------------------------------------------------- issue 11 item 8

def test_output_names_are_unique_per_row(tmp_path, capsys):
    keys = ["a/b", "a_b", "a b", "a?b", "..", ".", "", "x\x00y"]
    names = [sanitize_name(k) for k in keys]
    assert len(set(names)) == len(keys) and names[1] == "a_b"
    assert all("/" not in n and "\x00" not in n and not n.startswith(".") for n in names)
    w = ImageWriter(tmp_path / "o")
    img = Image.new("RGB", (8, 8))
    written = [w.write(k, [img])[0] for k in keys]
    assert len(set(written)) == len(keys) and len(list((tmp_path / "o").glob("*.png"))) == len(keys)
    assert w.write("a_b", [img], row=7) == ["a_b_row7_0.png"]  # a repeated idx: its row number, with a warning
    assert "repeats" in capsys.readouterr().err


def test_predict_output_dir_names_records_and_nul(tmp_path, folders, capsys):
    idxs = ["a/b", "a_b", "a b", "a?b", "..", "", "a_b", "n\x00ul"]
    texts = ["左上角有一个红色的圆形"] * len(idxs)
    (tmp_path / "in.tsv").write_text("".join(f"{i}\t{t}\n" for i, t in zip(idxs, texts)), encoding="utf-8")
    out_dir = tmp_path / "png"
    rc = main(["--mode=predict", "--app_name=text2image_generation", "--tables", str(tmp_path / "in.tsv"),
               "--input_schema", "idx:str:1,text:str:1", "--first_sequence", "text",
               "--outputs", str(tmp_path / "out.tsv"), "--output_schema", "idx,gen_imgbase64,gen_info",
               "--checkpoint_dir", str(folders / "tuwen"), "--output_dir", str(out_dir),
               "--user_defined_parameters=max_generated_num=1", "--no_progress"])
    assert rc == 0
    raw = (tmp_path / "out.tsv").read_bytes()
    assert b"\x00" not in raw
    lines = raw.decode("utf-8").splitlines()
    assert len(lines) == len(idxs)
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert len(pngs) == len(idxs) and len(list((out_dir / "grids").iterdir())) == len(idxs)
    assert "repeats" in capsys.readouterr().err  # the second a_b
    idx, b64, info = lines[2].split("\t")
    rec = json.loads(info)[0]
    assert rec["key"] == "a b" and rec["prompt"] == texts[2]
    im = Image.open(io.BytesIO(base64.b64decode(json.loads(b64)[0])))
    assert json.loads(im.text["tuwen"]) == rec
