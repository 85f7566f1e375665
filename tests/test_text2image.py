"""Text→image: EasyNLP layout loading, teacher forcing vs cached sampling, per-image seeds, CFG, the seed command
lines end to end (train → finetune → predict → evaluate) with a tiny config, bad rows and bad flags."""
import ast
import base64
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tuwen import sampling
from tuwen.cli import main
from tuwen.data import synth
from tuwen.errors import TuwenError
from tuwen.models.vqgan import VQGAN, VQGANConfig
from tuwen.models.text2image import TextToImage, TextToImageConfig, image_seed
from tuwen.text import TextTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from naive import generate_naive  # noqa: E402  (EasyNLP's decoding loop, a benchmark baseline)

SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"


def tiny_vqgan(n_embed=64):
    torch.manual_seed(0)
    return VQGAN(VQGANConfig.preset("tiny", resolution=32, n_embed=n_embed)).eval()  # 32 px → 4×4 codes


def tiny_tokenizer():
    texts = [synth.make_sample(i, size=32)[1] for i in range(200)]
    return TextTokenizer.train(texts, vocab_size=300)


def tiny_model(**cfg):
    vq, tok = tiny_vqgan(), tiny_tokenizer()
    c = TextToImageConfig.build(text_len=12, img_len=16, img_vocab_size=64, text_vocab_size=tok.vocab_size, image_size=32,
                          n_layer=2, n_head=2, n_embd=32, **cfg)
    torch.manual_seed(1)
    return TextToImage(c, vq, tok).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ------------------------------------------------------------------------------------------ reference minGPT

def mingpt_reference(sd: dict, idx: torch.Tensor, n_layer: int, n_head: int) -> torch.Tensor:
    """EasyNLP's minGPT forward written out from the raw `transformer.*` tensors (explicit softmax + tril mask)."""
    g = lambda k: sd[f"transformer.{k}"]  # noqa: E731
    x = g("tok_emb.weight")[idx] + g("pos_emb")[:, : idx.shape[1]]
    B, T, C = x.shape
    hd = C // n_head
    lin = lambda h, k: h @ g(f"{k}.weight").T + g(f"{k}.bias")  # noqa: E731
    for i in range(n_layer):
        p = f"blocks.{i}"
        h = torch.nn.functional.layer_norm(x, (C,), g(f"{p}.ln1.weight"), g(f"{p}.ln1.bias"))
        q, k, v = (lin(h, f"{p}.attn.{n}").view(B, T, n_head, hd).transpose(1, 2) for n in ("query", "key", "value"))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        att = att.masked_fill(g(f"{p}.attn.mask")[:, :, :T, :T] == 0, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, f"{p}.attn.proj")
        h = torch.nn.functional.layer_norm(x, (C,), g(f"{p}.ln2.weight"), g(f"{p}.ln2.bias"))
        x = x + lin(torch.nn.functional.gelu(lin(h, f"{p}.mlp.0")), f"{p}.mlp.2")
    x = torch.nn.functional.layer_norm(x, (C,), g("ln_f.weight"), g("ln_f.bias"))
    return x @ g("head.weight").T


def write_easynlp_checkpoint(d: Path, model: TextToImage) -> dict:
    """An EasyNLP ARTIST folder: config.json (model_type artist), pytorch_model.bin, vocab.txt."""
    d.mkdir(parents=True)
    c = model.config
    sd = {f"transformer.{k}": v.clone() for k, v in model.gpt.state_dict().items()}
    for i in range(c.gpt.n_layer):  # EasyNLP keeps minGPT's causal-mask buffer in the file
        sd[f"transformer.blocks.{i}.attn.mask"] = torch.tril(torch.ones(c.gpt.block_size, c.gpt.block_size)).view(
            1, 1, c.gpt.block_size, c.gpt.block_size)
    sd.update({f"first_stage_model.{k}": v.clone() for k, v in model.vqgan.state_dict().items()})
    torch.save(sd, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({
        "model_type": "artist", "vocab_size": c.gpt.vocab_size, "img_vocab_size": c.img_vocab_size,
        "text_vocab_size": c.text_vocab_size, "block_size": c.gpt.block_size, "n_layer": c.gpt.n_layer, "n_head": c.gpt.n_head,
        "n_embd": c.gpt.n_embd, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0, "n_unmasked": 0,
        "easynlp_version": "0.0.3"}))
    model.tokenizer.save_pretrained(d)
    (d / "tokenizer_config.json").unlink()  # EasyNLP folders carry only vocab.txt
    return sd


def test_easynlp_checkpoint_loads_as_is_and_matches_reference(tmp_path, model):
    sd = write_easynlp_checkpoint(tmp_path / "artist", model)
    m = TextToImage.from_pretrained(tmp_path / "artist", size=32)
    assert m.config.text_len == 12 and m.config.img_len == 16 and m.config.image_size == 32
    text = m.tokenize(["左上角有一个红色的圆形", "a blue square in the center"])
    codes = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = m(text, codes)
        ref = mingpt_reference(sd, torch.cat([text, codes[:, :-1]], 1), 2, 2)[:, m.config.text_len - 1:]
    assert ours.shape == (2, 16, 64)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # EasyNLP tokenization: per-character ids + img_vocab_size, [PAD] padded, no [CLS]/[SEP]
    tok = m.tokenizer
    expected = [tok.vocab[ch] + 64 for ch in "左上角有一个红色的圆形"] + [tok.pad_id + 64]
    assert text[0].tolist() == expected
    # decoding goes through the checkpoint's own first_stage_model weights
    img = m.decode_codes(codes[:1])[0]
    want = model.vqgan.decode(codes[:1].view(1, 4, 4))
    got = torch.from_numpy(__import__("numpy").array(img)).permute(2, 0, 1).float() / 127.5 - 1
    assert (got - want[0]).abs().max() < 2 / 255 + 1e-6
    # tuwen convert writes the tuwen layout with the same behaviour
    assert main(["convert", str(tmp_path / "artist"), str(tmp_path / "conv"), "--size", "32"]) == 0
    m2 = TextToImage.from_pretrained(tmp_path / "conv")
    assert (tmp_path / "conv" / "model.safetensors").exists() and (tmp_path / "conv" / "vqgan").is_dir()
    with torch.no_grad():
        torch.testing.assert_close(m2(text, codes), ours)


def test_easynlp_checkpoint_errors(tmp_path, model):
    write_easynlp_checkpoint(tmp_path / "a", model)
    with pytest.raises(TuwenError, match=r"text_len \(10\) \+ img_len \(16\) = 26 but the checkpoint has 28"):
        TextToImage.from_pretrained(tmp_path / "a", size=32, text_len=10)
    sd = torch.load(tmp_path / "a" / "pytorch_model.bin", weights_only=True)
    del sd["transformer.blocks.1.mlp.2.weight"]
    torch.save(sd, tmp_path / "a" / "pytorch_model.bin")
    with pytest.raises(TuwenError, match="missing keys: blocks.1.mlp.2.weight"):
        TextToImage.from_pretrained(tmp_path / "a", size=32)
    with pytest.raises(TuwenError, match="TUWEN_HOME"):
        TextToImage.from_pretrained("alibaba-pai/pai-painter-base-zh")


def test_model_zoo_name_resolves_under_tuwen_home(tmp_path, model, monkeypatch):
    write_easynlp_checkpoint(tmp_path / "home" / "models" / "alibaba-pai" / "pai-painter-base-zh", model)
    monkeypatch.setenv("TUWEN_HOME", str(tmp_path / "home"))
    m = TextToImage.from_pretrained("alibaba-pai/pai-painter-base-zh", size=32)
    assert m.config.img_len == 16


def test_teacher_forced_logits_equal_cached_sampling(model):
    text = model.tokenize(["右下角有一个绿色的三角形"] * 2)
    codes, logp = sampling.generate(model.gpt, prefix_ids=text, num_tokens=16, seeds=[3, 4], top_k=None,
                                    return_logprobs=True)
    with torch.no_grad():
        ref = torch.log_softmax(model(text, codes).float(), -1).gather(-1, codes[..., None])[..., 0]
    torch.testing.assert_close(logp, ref, rtol=1e-4, atol=1e-4)
    naive = generate_naive(model.gpt, prefix_ids=text, num_tokens=16, seeds=[3, 4])
    assert torch.equal(naive, codes)
    # any prefix length n ≤ img_len works, logit i predicting code i
    with torch.no_grad():
        torch.testing.assert_close(model(text, codes[:, :5]), model(text, codes)[:, :5], rtol=1e-5, atol=1e-5)


def test_seed_per_image_does_not_depend_on_batching(model):
    prompts = ["左上角有一个红色的圆形", "中间有一个蓝色的正方形", "下方有一个紫色的长方形"]
    a = model.generate(prompts, num_images_per_prompt=3, seed=7, return_codes=True, batch_size=9)
    b = model.generate(prompts, num_images_per_prompt=3, seed=7, return_codes=True, batch_size=2)
    c = model.generate(prompts[1:2], num_images_per_prompt=3, seed=7, keys=[1], return_codes=True, batch_size=1)
    assert a.shape == (3, 3, 16)
    assert torch.equal(a, b) and torch.equal(a[1], c[0])
    assert not torch.equal(a[0, 0], a[0, 1])  # different images of one prompt differ
    d = model.generate(prompts, num_images_per_prompt=3, seed=8, return_codes=True)
    assert not torch.equal(a, d)
    assert image_seed(7, "abc", 0) == image_seed(7, "abc", 0) != image_seed(7, "abd", 0)
    greedy = model.generate(prompts[:1], num_images_per_prompt=2, top_k=1, return_codes=True)
    assert torch.equal(greedy[0, 0], greedy[0, 1])


def test_classifier_free_guidance(model):
    p = ["右侧有一个黄色的圆形"]
    plain = model.generate(p, num_images_per_prompt=2, seed=1, return_codes=True)
    g1 = model.generate(p, num_images_per_prompt=2, seed=1, guidance_scale=1.0, return_codes=True)
    g3 = model.generate(p, num_images_per_prompt=2, seed=1, guidance_scale=3.0, return_codes=True)
    assert torch.equal(plain, g1)  # scale 1 = the conditional model
    assert not torch.equal(plain, g3)
    imgs = model.generate(p, num_images_per_prompt=2, seed=1, guidance_scale=3.0)
    assert len(imgs[0]) == 2 and imgs[0][0].size == (32, 32)


# ------------------------------------------------------------------------------------------ commands

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    synth.write_dataset(d, n=160, size=32, seed=0)
    return d


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vq") / "vqgan"
    tiny_vqgan().save_pretrained(d)
    return d


def seed_train_cmd(data_dir, ckpt, udp, extra=()):
    """The EasyNLP tutorial's pretraining command, tuwen in place of the launcher (values scaled down)."""
    return ["--mode=train", f"--tables={data_dir}/train.tsv,{data_dir}/val.tsv", f"--input_schema={SCHEMA}",
            "--first_sequence=text", "--second_sequence=imgbase64", f"--checkpoint_dir={ckpt}",
            "--learning_rate=4e-3", "--epoch_num=1", "--random_seed=42", "--logging_steps=5",
            "--save_checkpoint_steps=10", "--sequence_length=28", "--micro_batch_size=8",
            "--app_name=text2image_generation", f"--user_defined_parameters={udp}", "--no_progress",
            "--data_threads=0", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, vqgan_dir):
    ck = tmp_path_factory.mktemp("t2i") / "pretrain"
    udp = f"""
        vqgan_ckpt_path={vqgan_dir}
        size=32
        text_len=12
        img_len=16
        img_vocab_size=64
        n_layer=2 n_head=2 n_embd=32
        cfg_drop_prob=0.1
      """
    assert main(seed_train_cmd(data_dir, ck, udp, ["--max_steps=20"])) == 0
    return ck


def test_seed_train_writes_a_complete_model_folder(trained):
    for f in ("config.json", "model.safetensors", "vocab.txt", "vqgan/config.json", "vqgan/model.safetensors",
              "train_log.jsonl", "checkpoints"):
        assert (trained / f).exists(), f
    log = [json.loads(x) for x in (trained / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 20 and log[-1]["loss"] < log[0]["loss"]
    m = TextToImage.from_pretrained(trained)
    assert m.config.cfg_drop_prob == 0.1 and m.config.text_len == 12


def test_seed_finetune_predict_evaluate(tmp_path, trained, data_dir, capsys):
    ft = tmp_path / "finetune"
    udp = f"pretrain_model_name_or_path={trained} size=32 text_len=12 img_len=16 img_vocab_size=64"
    assert main(seed_train_cmd(data_dir, ft, udp, ["--max_steps=4"])) == 0
    # predict, as in the tutorial (input without an image column)
    out = tmp_path / "T2I_outputs.txt"
    rows = (data_dir / "test_prompts.tsv").read_text(encoding="utf-8").splitlines()[:3]
    inp = tmp_path / "T2I_test.txt"
    inp.write_text("\n".join(rows + ["bad_row\t"]) + "\n", encoding="utf-8")
    rc = main(["--mode=predict", f"--tables={inp}", "--input_schema=idx:str:1,text:str:1", "--first_sequence=text",
               f"--outputs={out}", "--output_schema=idx,text,gen_imgbase64", f"--checkpoint_dir={ft}",
               "--sequence_length=28", "--micro_batch_size=8", "--app_name=text2image_generation",
               "--user_defined_parameters=size=32 text_len=12 img_len=16 img_vocab_size=64 max_generated_num=2",
               f"--output_dir={tmp_path / 'png'}"])
    assert rc == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3  # the empty-text row is reported, the others are kept
    idx, text, imgs = lines[0].split("\t")
    assert (idx, text) == tuple(rows[0].split("\t"))
    assert json.loads(imgs) == ast.literal_eval(imgs) and len(json.loads(imgs)) == 2
    im = Image.open(io.BytesIO(base64.urlsafe_b64decode(json.loads(imgs)[0])))
    assert im.size == (32, 32) and im.format == "PNG"
    assert (tmp_path / "png" / f"{idx}_0.png").exists() and (tmp_path / "png" / "grids" / f"{idx}.png").exists()
    # evaluate: loss, bits per image token, and the checker's accuracy with --metric attributes
    rc = main(["--mode=evaluate", f"--tables={data_dir}/val.tsv", f"--input_schema={SCHEMA}",
               "--first_sequence=text", "--second_sequence=imgbase64", f"--checkpoint_dir={ft}",
               "--app_name=text2image_generation", "--micro_batch_size=8", "--metric=attributes",
               "--user_defined_parameters=eval_num=8"])
    assert rc == 0
    printed = capsys.readouterr().out
    res = json.loads(printed[printed.rindex("\n{\n") + 1:] if "\n{\n" in printed else printed[printed.index("{"):])
    assert res["attributes_prompts"] == 8 and 0 <= res["attributes"]["object"] <= 1
    assert res["attributes_real_images"]["object"] == 1.0              # the checker accepts the real images
    assert res["attributes_random_images"]["object"] < 0.5             # and rejects mismatched ones


def test_pretokenized_codes_training(tmp_path, data_dir, vqgan_dir):
    codes = tmp_path / "codes_train"
    assert main(["vq", "tokenize", "--model", str(vqgan_dir), "--tables", str(data_dir / "train.tsv"),
                 "--input_schema", SCHEMA, "--first_sequence", "text", "--second_sequence", "imgbase64",
                 "--out", str(codes), "--image_size", "32"]) == 0
    ck = tmp_path / "ck"
    udp = f"vqgan_ckpt_path={vqgan_dir} size=32 text_len=12 n_layer=1 n_head=2 n_embd=32"
    args = ["--mode=train", f"--tables={codes}", f"--checkpoint_dir={ck}", "--app_name=text2image_generation",
            "--micro_batch_size=8", "--max_steps=3", f"--user_defined_parameters={udp}", "--no_progress",
            "--data_threads=0"]
    assert main(args) == 0
    m = TextToImage.from_pretrained(ck)
    assert m.config.img_len == 16 and m.tokenizer.lowercase  # EasyNLP's (bert-base-chinese's) rule by default
    assert m.tokenizer.encode("A") == m.tokenizer.encode("a")
    # do_lower_case=false: a vocabulary built from the texts keeps case (字母Ａ and 字母ａ are two prompts), and the
    # saved folder says so
    ck2 = tmp_path / "ck_case"
    args2 = [a.replace(str(ck), str(ck2)) for a in args]
    args2[args2.index(f"--user_defined_parameters={udp}")] = f"--user_defined_parameters={udp} do_lower_case=false"
    assert main(args2) == 0
    kept = TextToImage.from_pretrained(ck2).tokenizer
    assert not kept.lowercase and json.loads((ck2 / "tokenizer_config.json").read_text())["do_lower_case"] is False
    a, b = kept.encode("A"), kept.encode("a")  # Latin letters are in every built vocabulary, both cases when kept
    assert a != b and kept.unk_id not in a + b


def test_pipeline_api(trained):
    import tuwen
    gen = tuwen.pipeline("text2image_generation", model_path=str(trained), max_generated_num=2, top_k="8")
    out = gen(["左上角有一个红色的圆形", "中间有一个蓝色的正方形"])
    assert len(out) == 2 and len(out[0]["gen_imgbase64"]) == 2 and out[0]["images"][0].size == (32, 32)
    again = gen(["左上角有一个红色的圆形", "中间有一个蓝色的正方形"])
    assert [o["gen_imgbase64"] for o in out] == [o["gen_imgbase64"] for o in again]   # seeded: same images
    with pytest.raises(TuwenError, match="unknown parameter 'colour'"):
        tuwen.pipeline("text2image_generation", model_path=str(trained), colour=1)


def test_generate_command(tmp_path, trained):
    assert main(["generate", "左上角有一个红色的圆形", "-n", "2", "--model", str(trained), "--seed", "0",
                 "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "prompt000_0.png").exists() and (tmp_path / "g" / "index.html").exists()


def test_bad_flags_and_rows(tmp_path, data_dir, vqgan_dir, capsys):
    base = seed_train_cmd(data_dir, tmp_path / "x", "size=32", ["--max_steps=1"])
    # unknown key, bad value, missing VQGAN, sequence_length mismatch, unknown flag
    cases = [
        ("size=32 colour=red", "unknown key 'colour'"),
        ("size=32 text_len=abc", "text_len: expected int"),
        ("size=32 random_crop=maybe", "random_crop: expected a boolean"),
        ("size=32 text_len=12", "vqgan_ckpt_path"),
        (f"vqgan_ckpt_path={vqgan_dir} size=32 text_len=20 n_layer=1 n_head=2 n_embd=32", "--sequence_length=28"),
    ]
    for udp, msg in cases:
        args = [a if not a.startswith("--user_defined_parameters") else f"--user_defined_parameters={udp}" for a in base]
        assert main(args) == 2
        assert msg in capsys.readouterr().err, msg
    assert main(base + ["--bogus_flag=1"]) == 2
    assert "--bogus_flag" in capsys.readouterr().err
    # bad rows are skipped and reported with file:line; --strict stops at the first
    bad = tmp_path / "bad.tsv"
    good = (data_dir / "train.tsv").read_text(encoding="utf-8").splitlines()[:16]
    bad.write_text("\n".join(good[:3] + ["x1\t文字\tnot-base64!!", "x2\tonly-two-columns", "x3\t\t" + good[0].split("\t")[2]]
                             + good[3:]) + "\n", encoding="utf-8")
    udp = f"vqgan_ckpt_path={vqgan_dir} size=32 text_len=12 n_layer=1 n_head=2 n_embd=32 random_crop=False"
    args = [f"--tables={bad}", f"--input_schema={SCHEMA}", "--first_sequence=text", "--second_sequence=imgbase64",
            f"--checkpoint_dir={tmp_path / 'y'}", "--app_name=text2image_generation", "--mode=train",
            "--micro_batch_size=4", "--max_steps=5", f"--user_defined_parameters={udp}", "--no_progress",
            "--data_threads=0"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipped 3 bad row(s)" in err
    assert f"{bad}:4: bad base64" in err and f"{bad}:5: expected 3 tab-separated columns" in err
    assert f"{bad}:6: empty text" in err
    assert main(args[:-1] + ["--strict", "--data_threads=0", f"--checkpoint_dir={tmp_path / 'z'}"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: {re.escape(str(bad))}:[456]: .*--strict stops at the first bad row", err), err


def test_predict_and_generate_rerank_keep_the_best_by_clip(tmp_path, trained, data_dir):
    """--rerank clip:DIR --keep 2 keeps the 2 candidates (same seeds as without reranking) that CLIP scores
    highest, best first, with their scores in the TSV and in the file names."""
    from tuwen.models.clip import CLIP
    from tuwen.rerank import load_scorer
    from tuwen.text.tokenizer import TextTokenizer
    tok = TextTokenizer.train([r.split("\t")[1] for r in
                               (data_dir / "test_prompts.tsv").read_text(encoding="utf-8").splitlines()],
                              vocab_size=200)
    torch.manual_seed(0)
    CLIP.build(tok).save_pretrained(tmp_path / "clip")
    rows = (data_dir / "test_prompts.tsv").read_text(encoding="utf-8").splitlines()[:2]
    inp = tmp_path / "in.tsv"
    inp.write_text("\n".join(rows) + "\n", encoding="utf-8")

    def predict(out, extra):
        assert main(["--mode=predict", f"--tables={inp}", "--input_schema=idx:str:1,text:str:1",
                     "--first_sequence=text", f"--outputs={out}", f"--checkpoint_dir={trained}",
                     "--app_name=text2image_generation", "--micro_batch_size=2",
                     "--user_defined_parameters=max_generated_num=4", *extra]) == 0
        return [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]

    plain = predict(tmp_path / "plain.tsv", ["--output_schema=idx,text,gen_imgbase64"])
    ranked = predict(tmp_path / "ranked.tsv", ["--output_schema=idx,text,gen_imgbase64,scores",
                                               f"--rerank=clip:{tmp_path / 'clip'}", "--keep=2",
                                               f"--output_dir={tmp_path / 'png'}"])
    scorer = load_scorer(f"clip:{tmp_path / 'clip'}", device="cpu")
    for (idx, text, imgs), (idx2, text2, kept, scores) in zip(plain, ranked):
        assert (idx, text) == (idx2, text2)
        cands = json.loads(imgs)
        want = scorer.score([text] * 4, [Image.open(io.BytesIO(base64.urlsafe_b64decode(b))) for b in cands])
        best = sorted(range(4), key=lambda i: -want[i])[:2]
        assert json.loads(kept) == [cands[i] for i in best]
        assert json.loads(scores) == pytest.approx([want[i] for i in best], abs=1e-5)
        assert sorted((tmp_path / "png").glob(f"{idx}_*_score*.png"))
    assert main(["generate", rows[0].split("\t")[1], "-n", "4", "--keep", "1", "--model", str(trained),
                 "--rerank", f"clip:{tmp_path / 'clip'}", "--out", str(tmp_path / "g")]) == 0
    assert len(list((tmp_path / "g").glob("prompt000_0_score*.png"))) == 1
