"""``tuwen recipe``: presets picked from the data, the plan and its timing probe; generation defaults saved with a
model trained with classifier-free guidance."""
from __future__ import annotations

import dataclasses
import json

import pytest

from tuwen.cli import main
from tuwen.cli.recipe import choose_plan, probe
from tuwen.data import synth
from tuwen.sampling import SamplingParams
from tuwen.training.tasks.text2image import CFG_SAMPLING, default_sampling


def test_presets_follow_the_data():
    small = choose_plan(rows=600, image_side=64, caption_chars=12)
    assert small.size == 64 and small.gpt["n_layer"] == 4 and small.gpt["dropout"] > 0 and small.gpt_wd >= 0.1
    assert small.vq_arch == {"n_embed": 1024, "embed_dim": 8, "l2_norm": True, "norm_groups": 1}
    assert 0 < small.vq_loss["disc_start"] < small.vq_steps and small.vq_loss["dead_code_steps"] > 0
    assert small.vq_loss["perceptual_weight"] == 0 and any("perceptual" in n for n in small.notes)
    assert small.text_len == 16 and small.cfg_drop_prob > 0
    # ~40 epochs of the VQGAN, ~60 of the GPT on a small set (with floors)
    assert small.vq_steps == 3000 and small.gpt_steps == 2850
    assert small.vq_augment == "hue"  # the tokenizer sees rotated hues (half its images); captions stay true
    assert any("--tokenizer_images" in n for n in small.notes)  # a small set is told to add caption-free images
    assert not any("--tokenizer_images" in n for n in choose_plan(600, 64, 12, tokenizer_rows=900).notes)
    # a small set's captioner reads the VQGAN codes (it learns to name the training images; a ViT from scratch
    # did not in the same CPU time); a large set's trains a ViT
    assert small.cap["prefix"] == "vqgan"
    tiny_imgs = choose_plan(rows=600, image_side=32, caption_chars=40)
    assert tiny_imgs.size == 32 and tiny_imgs.text_len == 48
    big_cpu = choose_plan(rows=50000, image_side=256, caption_chars=20)
    assert big_cpu.size == 64 and any("128 px with a GPU" in n for n in big_cpu.notes)
    assert big_cpu.gpt["n_layer"] == 8 and big_cpu.gpt["dropout"] == 0 and big_cpu.vq_arch["n_embed"] == 2048
    assert big_cpu.cap["prefix"] == "vit"
    big_gpu = choose_plan(rows=50000, image_side=256, caption_chars=20, cuda=True)
    assert big_gpu.size == 128 and big_gpu.vq_arch["ch_mult"] == [1, 1, 2, 2, 4]  # f16: 8×8 codes
    mid = choose_plan(rows=5000, image_side=64, caption_chars=100, lpips=("lp.pth", "vgg.pth"))
    assert mid.gpt["n_layer"] == 6 and mid.text_len == 64 and mid.vq_loss["lpips_path"] == "lp.pth"
    assert mid.vq_loss["perceptual_weight"] > 0 and not mid.notes


def test_recipe_command_prints_the_plan(tmp_path, capsys):
    synth.write_dataset(tmp_path / "d", n=40, size=32, seed=0)
    script = tmp_path / "plan.sh"
    assert main(["recipe", str(tmp_path / "d" / "train.tsv"), str(tmp_path / "d" / "val.tsv"), "--out",
                 str(tmp_path / "r"), "--no_probe", "--script", str(script)]) == 0
    out = capsys.readouterr().out
    assert "images ~32 px" in out and "plan: 32 px" in out
    for what in ("tuwen vq train", "tuwen vq tokenize", "--app_name=text2image_generation",
                 "--app_name=image2text_generation", "evaluate-images", "--retrieval"):
        assert what in out, what
    body = script.read_text()
    assert body.startswith("#!/usr/bin/env bash") and "l2_norm=true" in body and "cfg_drop_prob=0.1" in body
    vq_line = next(line for line in body.splitlines() if line.startswith("tuwen vq train"))
    assert " --augment hue " in vq_line and body.count("--augment") == 1  # the tokenizer only, never the GPT
    # both vocabularies keep case: captions differing only in case (字母Ａ, 字母ａ) stay two prompts
    assert body.count("do_lower_case=false") == 2
    assert f"enable_vqgan=true vqgan_ckpt_path={tmp_path / 'r'}/vqgan" in body and "vit_preset" not in body
    # the checks on the training data run on the last training step, exported as a model folder
    assert f"tuwen export {tmp_path / 'r'}/cap {tmp_path / 'r'}/cap_last" in body
    assert f"--checkpoint_dir={tmp_path / 'r'}/t2i_last" in body and "cap_eval_train.json" in body
    assert main(["recipe", str(tmp_path / "d" / "train.tsv"), "--no_probe", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["data"]["image_side"] == 32 and res["plan"]["size"] == 32 and res["expected_seconds"] is None
    # rows that share a caption cap self-retrieval by idx: the plan says so
    lines = (tmp_path / "d" / "train.tsv").read_text(encoding="utf-8").splitlines()
    dup = tmp_path / "dup.tsv"
    dup.write_text("".join(f"{k}\t{lines[0].split(chr(9))[1]}\t{b}\n" for k, _, b in
                           (line.split("\t") for line in lines[:4])) + "\n".join(lines[4:]) + "\n", encoding="utf-8")
    assert main(["recipe", str(dup), "--no_probe", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["data"]
    assert res["rows_sharing_a_caption"] >= 4 and res["distinct_captions"] <= res["rows"] - 3
    assert main(["recipe", str(dup), "--no_probe"]) == 0
    assert "share their caption with another" in capsys.readouterr().out
    assert main(["recipe", str(tmp_path / "nope.tsv"), "--no_probe"]) == 2
    assert main(["recipe", str(tmp_path / "d" / "train.tsv"), "--lpips_path", "x"]) == 2
    assert "go together" in capsys.readouterr().err


@pytest.mark.slow  # seconds on an idle machine, but a 2-thread probe on a loaded 2-core machine can take 10+ s
@pytest.mark.parametrize("prefix", ["vqgan", "vit"])
def test_timing_probe_runs_each_stage(prefix):
    plan = choose_plan(rows=100, image_side=32, caption_chars=6)
    plan = dataclasses.replace(plan, size=16, vq_batch=2, gpt_batch=2, cap_batch=2,
                               vq_arch={"n_embed": 64, "embed_dim": 8, "l2_norm": True, "ch_mult": [1, 2],
                                        "attn_resolutions": []},
                               gpt={"n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.0},
                               cap={"prefix": prefix, "vit_preset": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32,
                                    "dropout": 0.0})
    t = probe(plan, "cpu")
    assert set(t) == {"vq", "t2i", "cap"} and all(v > 0 for v in t.values())


def test_generation_defaults_follow_cfg_training():
    udp = {"top_k": None, "top_p": None, "temperature": None, "guidance_scale": None}
    assert default_sampling(udp, 0.1) == SamplingParams(**CFG_SAMPLING)
    assert default_sampling(udp, 0.0) == SamplingParams(top_k=100)
    assert default_sampling({**udp, "top_k": 8}, 0.1) == SamplingParams(top_k=8, guidance_scale=2.0)


@pytest.mark.parametrize("cfg,want", [("cfg_drop_prob=0.1", (16, 2.0)), ("", (100, None)),
                                      ("cfg_drop_prob=0.1 top_k=4 guidance_scale=3", (4, 3.0))])
def test_trained_model_saves_its_generation_defaults(tmp_path, cfg, want):
    import torch

    from tuwen.models.text2image import TextToImage
    from tuwen.models.vqgan import VQGAN, VQGANConfig

    synth.write_dataset(tmp_path / "d", n=24, size=32, seed=0)
    torch.manual_seed(0)
    VQGAN(VQGANConfig.preset("tiny", resolution=32, n_embed=64)).save_pretrained(tmp_path / "vq")
    d = tmp_path / "d"
    assert main(["--mode=train", f"--tables={d}/train.tsv,{d}/val.tsv", "--input_schema=idx:str:1,text:str:1,"
                 "imgbase64:str:1", "--first_sequence=text", "--second_sequence=imgbase64",
                 f"--checkpoint_dir={tmp_path / 'm'}", "--max_steps=1", "--micro_batch_size=4",
                 "--app_name=text2image_generation", "--no_progress", "--data_threads=0",
                 f"--user_defined_parameters=vqgan_ckpt_path={tmp_path / 'vq'} size=32 text_len=12 n_layer=1 "
                 f"n_head=2 n_embd=32 {cfg}"]) == 0
    s = TextToImage.from_pretrained(tmp_path / "m").config.sampling
    assert (s.top_k, s.guidance_scale) == want


def test_thread_and_worker_defaults(monkeypatch):
    import torch

    from tuwen import runtime

    assert runtime.default_workers("cpu", cores=2) == 0 and runtime.default_workers("cpu", cores=16) == 4
    assert runtime.default_workers("cpu", cores=8) == 2 and runtime.default_workers("cuda", cores=2) == 1
    assert runtime.default_threads(0, cores=2) == 1 and runtime.default_threads(2, cores=8) == 5
    assert runtime.default_threads(4, cores=4) == 1
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("TUWEN_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        assert runtime.configure_threads("cpu", 0, cores=2) == 1       # threads + workers ≤ cores − 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")                      # the user's choice stands
        assert runtime.configure_threads("cpu", 0, cores=2) == 2
        monkeypatch.setenv("TUWEN_NUM_THREADS", "1")
        assert runtime.configure_threads("cpu", 0, cores=2) == 1
        monkeypatch.setenv("TUWEN_NUM_THREADS", "x")
        with pytest.raises(Exception, match="TUWEN_NUM_THREADS"):
            runtime.configure_threads("cpu", 0)
    finally:
        torch.set_num_threads(before)


def test_tokenizer_images_join_the_vqgan_stage_only(tmp_path, capsys):
    """--tokenizer_images: caption-free images for the VQGAN; the captioned table is repeated to stay about half."""
    plan = choose_plan(rows=600, image_side=64, caption_chars=12, tokenizer_rows=1200)
    assert plan.train_repeats == 2 and plan.tokenizer_rows == 1200 and plan.vq_steps == 4000
    many = choose_plan(rows=600, image_side=64, caption_chars=12, tokenizer_rows=4000)
    assert many.train_repeats == 7 and many.vq_steps == 4000  # more images, not more steps, on a small set
    large = choose_plan(rows=5000, image_side=64, caption_chars=12, tokenizer_rows=5000)
    assert large.train_repeats == 1 and large.vq_steps == 26 * 10000 // 16
    assert plan.vq_loss["disc_start"] == 2400 and plan.gpt_steps == choose_plan(600, 64, 12).gpt_steps
    assert choose_plan(rows=600, image_side=64, caption_chars=12, tokenizer_rows=100).train_repeats == 1
    d = tmp_path / "d"
    synth.write_dataset(d, n=40, size=32, seed=0)
    extra = tmp_path / "extra"
    extra.mkdir()
    from PIL import Image
    for i in range(80):  # an image folder without captions
        Image.new("RGB", (32, 32), (3 * i, 255 - 3 * i, 128)).save(extra / f"{i}.png")
    script = tmp_path / "plan.sh"
    assert main(["recipe", str(d / "train.tsv"), str(d / "val.tsv"), "--out", str(tmp_path / "r"), "--no_probe",
                 "--tokenizer_images", str(extra), "--script", str(script)]) == 0
    body = script.read_text()
    vq_line = next(line for line in body.splitlines() if line.startswith("tuwen vq train"))
    assert f"--tables {d / 'train.tsv'},{d / 'train.tsv'},{extra},{d / 'val.tsv'} " in vq_line
    assert str(extra) not in body.replace(vq_line, "")  # only the tokenizer sees them
    assert "80 caption-free images" in capsys.readouterr().out
    assert main(["recipe", str(d / "train.tsv"), "--no_probe", "--tokenizer_images", str(tmp_path / "nope")]) == 2
    assert "--tokenizer_images" in capsys.readouterr().err
