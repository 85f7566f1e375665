"""``tuwen export CHECKPOINT OUT``: a training checkpoint (checkpoints/step-N.pt) → a model folder."""
from __future__ import annotations

import json

import pytest
import torch

from tuwen.cli import main
from tuwen.data import synth
from tuwen.models.captioner import Captioner
from tuwen.models.text2image import TextToImage
from tuwen.models.vqgan import VQGAN, VQGANConfig

SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    synth.write_dataset(d, n=48, size=32, seed=0)
    return d


def _ckpts(run):
    return sorted((run / "checkpoints").glob("step-*.pt"))


def _assert_exported(run, out, model_cls, prefix, attr):
    """The exported folder holds the checkpoint's ``prefix.*`` weights in ``model.attr``."""
    st = torch.load(_ckpts(run)[0], map_location="cpu", weights_only=True)
    m = model_cls.from_pretrained(out)
    target = getattr(m, attr) if attr else m
    sd = target.state_dict()
    own = {k[len(prefix) + 1:]: v for k, v in st["module"].items() if k.startswith(prefix + ".")}
    assert own and set(own) == set(sd)
    assert all(torch.equal(sd[k], own[k]) for k in own)
    return m


def test_export_text2image_each_checkpoint(tmp_path, data, capsys):
    vq = tmp_path / "vq"
    torch.manual_seed(0)
    VQGAN(VQGANConfig.preset("tiny", resolution=32, n_embed=64)).save_pretrained(vq)
    run = tmp_path / "run"
    assert main(["--mode=train", f"--tables={data}/train.tsv,{data}/val.tsv", f"--input_schema={SCHEMA}",
                 "--first_sequence=text", "--second_sequence=imgbase64", f"--checkpoint_dir={run}",
                 "--learning_rate=1e-2", "--max_steps=4", "--save_checkpoint_steps=2", "--micro_batch_size=8",
                 "--app_name=text2image_generation", "--no_progress", "--data_threads=0",
                 f"--user_defined_parameters=vqgan_ckpt_path={vq} size=32 text_len=12 n_layer=1 n_head=2 n_embd=32"
                 ]) == 0
    assert [p.name for p in _ckpts(run)] == ["step-00000002.pt", "step-00000004.pt"]
    capsys.readouterr()
    # one checkpoint file → a model folder with its GPT weights and the run's tokenizer / VQGAN
    out2 = tmp_path / "step2"
    assert main(["export", str(_ckpts(run)[0]), str(out2)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 2 and res["task"] == "text2image" and res["loaded"] == ["gpt"]
    m2 = _assert_exported(run, out2, TextToImage, "gpt", "gpt")
    assert m2.generate(["左上角有一个红色的圆形"], seed=0)[0][0].size == (32, 32)
    # the run folder → its latest checkpoint; the weights differ from step 2
    out4 = tmp_path / "step4"
    assert main(["export", str(run), str(out4)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    m4 = TextToImage.from_pretrained(out4)
    sd2, sd4 = m2.gpt.state_dict(), m4.gpt.state_dict()
    assert any(not torch.equal(sd2[k], sd4[k]) for k in sd2)
    assert (out4 / "vocab.txt").exists() and (out4 / "vqgan" / "config.json").exists()


def test_export_vqgan_and_captioner(tmp_path, data, capsys):
    run = tmp_path / "vqrun"
    assert main(["vq", "train", "--tables", f"{data}/train.tsv,{data}/val.tsv", "--input_schema", SCHEMA,
                 "--second_sequence", "imgbase64", "--checkpoint_dir", str(run), "--preset", "tiny", "--size", "32",
                 "--micro_batch_size", "8", "--max_steps", "2", "--save_checkpoint_steps", "1",
                 "--data_threads", "0", "--no_progress"]) == 0
    out = tmp_path / "vq_step1"
    assert main(["export", str(_ckpts(run)[0]), str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "vqgan" and res["loaded"] == ["vqgan"]
    _assert_exported(run, out, VQGAN, "vqgan", "")

    crun = tmp_path / "caprun"
    assert main(["--mode=train", f"--tables={data}/train.tsv,{data}/val.tsv", f"--input_schema={SCHEMA}",
                 "--first_sequence=imgbase64", "--second_sequence=text", f"--checkpoint_dir={crun}",
                 "--max_steps=2", "--save_checkpoint_steps=1", "--micro_batch_size=8",
                 "--app_name=image2text_generation", "--no_progress", "--data_threads=0",
                 "--user_defined_parameters=img_size=32 text_len=16 n_layer=1 n_head=2 n_embd=32 vit_preset=tiny"
                 ]) == 0
    out = tmp_path / "cap_step1"
    assert main(["export", str(_ckpts(crun)[0]), str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["loaded"] == ["gpt", "vit"]
    m = _assert_exported(crun, out, Captioner, "gpt", "gpt")
    _assert_exported(crun, out, Captioner, "vit", "vit")
    assert isinstance(m.generate(pixel_values=torch.zeros(1, 3, 32, 32))[0][0], str)


def test_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert "no training checkpoint" in capsys.readouterr().err
    bad = tmp_path / "run" / "checkpoints" / "step-00000001.pt"
    bad.parent.mkdir(parents=True)
    torch.save({"format": "tuwen-train-state", "task": {"task": "text2image"}, "module": {}}, bad)
    assert main(["export", str(bad), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "model folder" in err and "give --model DIR" in err
    torch.save({"weights": torch.zeros(1)}, bad)
    assert main(["export", str(bad), str(tmp_path / "o")]) == 2
    assert "not a tuwen training checkpoint" in capsys.readouterr().err
