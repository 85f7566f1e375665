"""Finetuning CogView-format models with the shared trainer (``training/tasks/cogview.py``) and CogView's
``--txt-loss-scale``, on the tiny CogView fixtures of ``test_cogview.py`` (a Megatron folder in CogView's layout).
"""
from __future__ import annotations

import argparse
import base64
import io
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("sentencepiece")

from test_cogview import HEADS, cogview_dirs, picture, spm_file  # noqa: E402,F401  (module-scoped fixtures)
from tuwen.errors import TuwenError  # noqa: E402
from tuwen.models.cogview import CogView  # noqa: E402
from tuwen.training.tasks.cogview import DEFAULT_TXT_LOSS_SCALE, CogViewTask, cogview_lm_loss  # noqa: E402

SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"
TEXTS = ["一只红色的猫在草地上", "左上角有一个红色的圆形", "右下角有一个蓝色的正方形", "蓝天白云下的城市"]


def b64png(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A 4-row EasyNLP TSV (idx, text, base64 image)."""
    p = tmp_path_factory.mktemp("cvft") / "train.tsv"
    p.write_text("".join(f"{i}\t{t}\t{b64png(picture(20 + i, (280, 256)))}\n" for i, t in enumerate(TEXTS)),
                 encoding="utf-8")
    return p


def base_dir(cogview_dirs):  # noqa: F811
    return cogview_dirs["root"] / "cogview" / "cogview-base"


def easynlp_args(tables, ckpt="unused", **kw):
    a = dict(tables=str(tables), input_schema=SCHEMA, skip_first_line=False, first_sequence="text",
             second_sequence="imgbase64", checkpoint_dir=str(ckpt), random_seed=1234)
    a.update(kw)
    return argparse.Namespace(**a)


def udp_of(**kw):
    from tuwen.pipelines import TEXT2IMAGE_PARAMS

    u = {k: p.default for k, p in TEXT2IMAGE_PARAMS.items()}
    u.update(kw)
    return u


def task_for(cogview_dirs, table, **udp):  # noqa: F811
    return CogViewTask.from_udp(easynlp_args(table),
                                udp_of(pretrain_model_name_or_path=str(base_dir(cogview_dirs)), n_head=HEADS, **udp),
                                log=lambda m: None)


def fixed_batch(task):
    from tuwen.data.tables import collate_skip_bad

    ds = task.train_dataset()
    return collate_skip_bad([ds[i] for i in range(2)])


# ============================================================================================ the loss

def hand_loss(model: CogView, seq: torch.Tensor, lengths, scale: float) -> float:
    """CogView's forward_step written out position by position: CE of labels seq[t+1] from the inference forward
    (``CogView.logits``), weight 1 where the input token seq[t] is an image code, ``scale`` elsewhere, over
    labels inside the real sequence; sum(w * CE) / sum(w)."""
    num = den = 0.0
    for b in range(seq.shape[0]):
        n = int(lengths[b])
        logp = model.logits(seq[b, :n - 1].tolist())[0].log_softmax(-1)  # [n-1, V]
        for t in range(n - 1):
            w = 1.0 if int(seq[b, t]) < model.vocab.n_image else scale
            num += w * -float(logp[t, int(seq[b, t + 1])])
            den += w
    return num / den


def test_sequence_is_cogviews_template(cogview_dirs, table):  # noqa: F811
    task = task_for(cogview_dirs, table)
    assert task.txt_loss_scale == DEFAULT_TXT_LOSS_SCALE == 1.0  # CogView's arguments.py default
    model = CogView.from_pretrained(base_dir(cogview_dirs), n_head=HEADS, dtype=torch.float32)
    batch = fixed_batch(task)
    module = task.build_module()
    seq, lengths = module.sequences(batch)
    v = model.vocab
    codes = model.encode_image(picture(20, (280, 256)))  # CogView's Resize + CenterCrop + mean/std, same VQ-VAE
    want = v.parse_query(f"[ROI1] {TEXTS[0]} [BASE] [BOI1]") + codes + [v["[EOI1]"]]
    assert seq[0, :len(want)].tolist() == want and int(lengths[0]) == len(want)
    assert (seq[0, len(want):] == v["[PAD]"]).all()
    gen = model.parse("[ROI1] {} [BASE] [BOI1] [MASK]*1024", TEXTS[0])  # generation's query: the same prefix
    assert gen[:len(gen) - 1024] == want[:len(gen) - 1024] and len(gen) == len(want) - 1


@pytest.mark.parametrize("scale", [0.0, 1.0, 0.3])
def test_loss_equals_hand_computed_weighted_ce(cogview_dirs, table, scale):  # noqa: F811
    task = task_for(cogview_dirs, table, txt_loss_scale=scale)
    model = CogView.from_pretrained(base_dir(cogview_dirs), n_head=HEADS, dtype=torch.float32)
    module = task.build_module().eval()
    batch = fixed_batch(task)
    with torch.no_grad():
        out = module(batch)
    seq, lengths = module.sequences(batch)
    assert float(out["loss"]) == pytest.approx(hand_loss(model, seq, lengths, scale), rel=1e-4)
    if scale == 1.0:  # plain LM loss over every non-pad label
        logits = model.logits(seq[:, :-1])
        labels = seq[:, 1:].clone()
        labels[torch.arange(labels.shape[1])[None] >= (lengths[:, None] - 1)] = -100
        assert float(out["loss"]) == pytest.approx(float(F.cross_entropy(logits.flatten(0, 1), labels.flatten())),
                                                   rel=1e-4)
    if scale == 0.0:  # image positions only: inputs code_0 … code_1023 (labels code_1 … [EOI1])
        assert float(out["loss"]) == pytest.approx(float(out["img_loss"]), rel=1e-5)


def test_lm_loss_on_a_handmade_batch():
    # vocabulary: ids 0..3 image codes, 4.. text/commands; row 0 has 5 real tokens, row 1 has 3 (+ padding)
    seq = torch.tensor([[5, 6, 1, 2, 7], [5, 0, 7, 9, 9]])
    logits = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0))
    ce = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten(), reduction="none").view(2, 4)
    # row 0 inputs 5 6 1 2 → txt txt img img; row 1 inputs 5 0 (labels 0 7), the rest is padding
    out = cogview_lm_loss(logits, seq, torch.tensor([5, 3]), n_image=4, txt_loss_scale=0.5)
    want = (0.5 * (ce[0, 0] + ce[0, 1] + ce[1, 0]) + ce[0, 2] + ce[0, 3] + ce[1, 1]) / (0.5 * 3 + 3)
    assert float(out["loss"]) == pytest.approx(float(want), rel=1e-6)
    assert float(out["txt_loss"]) == pytest.approx(float((ce[0, 0] + ce[0, 1] + ce[1, 0]) / 3), rel=1e-6)
    assert float(out["img_loss"]) == pytest.approx(float((ce[0, 2] + ce[0, 3] + ce[1, 1]) / 3), rel=1e-6)


# ============================================================================================ training

@pytest.fixture(scope="module")
def finetuned(cogview_dirs, table, tmp_path_factory):  # noqa: F811
    """3 steps of `tuwen --mode=train --app_name=text2image_generation` from the CogView Megatron folder."""
    from tuwen.cli import main

    ck = tmp_path_factory.mktemp("cvft") / "ft"
    udp = f"pretrain_model_name_or_path={base_dir(cogview_dirs)} n_head={HEADS} txt_loss_scale=0.5 top_k=7"
    assert main(["--mode=train", f"--tables={table}", f"--input_schema={SCHEMA}", "--first_sequence=text",
                 "--second_sequence=imgbase64", f"--checkpoint_dir={ck}", "--learning_rate=5e-3", "--max_steps=3",
                 "--micro_batch_size=4", "--warmup_proportion=0", "--lr_schedule=constant", "--logging_steps=1",
                 "--app_name=text2image_generation", f"--user_defined_parameters={udp}", "--no_progress",
                 "--data_threads=0"]) == 0
    return ck


def test_finetune_lowers_the_loss_and_evaluate_reports_it(cogview_dirs, table, finetuned, capsys):  # noqa: F811
    from tuwen.cli import main
    from tuwen.data.tables import collate_skip_bad

    # the saved folder: a tuwen cogview folder (weights, config, cog-pretrain.model, vqvae/)
    tuned = CogView.from_pretrained(finetuned)
    assert tuned.config.sampling.top_k == 7 and tuned.vocab.text is not None and tuned.vqvae is not None
    before = CogView.from_pretrained(base_dir(cogview_dirs), n_head=HEADS, dtype=torch.float32)
    task = task_for(cogview_dirs, table, txt_loss_scale=0.5)
    ds = task.dataset([str(table)])
    batch = collate_skip_bad([ds[i] for i in range(4)])
    losses = []
    for m in (before, tuned):
        with torch.no_grad():
            losses.append(float(task.build_module(gpt=m.gpt).eval()(batch)["loss"]))
    assert losses[1] < losses[0] - 0.5, losses  # 7.16 → 3.34 when written
    # `--mode=evaluate` on the saved folder: the same weighted loss
    capsys.readouterr()
    assert main(["--mode=evaluate", f"--tables={table}", f"--input_schema={SCHEMA}", f"--checkpoint_dir={finetuned}",
                 "--app_name=text2image_generation", "--user_defined_parameters=txt_loss_scale=0.5", "--no_progress",
                 "--data_threads=0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rows"] == 4 and res["eval_loss"] == pytest.approx(losses[1], rel=1e-4)


def test_finetuned_folder_generates(finetuned, tmp_path):
    """`tuwen generate --model OUT` (CogView's text→image template, 32×32 codes → a 256² image)."""
    from tuwen.cli import main

    out = tmp_path / "gen"
    assert main(["generate", "--model", str(finetuned), TEXTS[1], "--debug", "--batch-size", "1",
                 "--top_k", "3", "--out", str(out)]) == 0
    (png,) = list(out.rglob("*.png"))
    assert min(Image.open(png).size) >= 256  # one 256² image in the --debug grid


# ============================================================================================ errors

def test_txt_loss_scale_needs_a_text_head(tmp_path, table):
    from tuwen.training.tasks.superres import SRTask
    from tuwen.training.tasks.text2image import T2ITask

    args = easynlp_args(table)
    for cls in (T2ITask, SRTask):
        with pytest.raises(TuwenError, match="head covers the text vocabulary"):
            cls.from_udp(args, udp_of(txt_loss_scale=2.0, vqgan_ckpt_path=str(tmp_path)), log=lambda m: None)


@pytest.mark.parametrize("udp,match", [
    (dict(txt_loss_scale=-1.0), "must be a number ≥ 0"),
    (dict(n_layer=4), "n_layer: the architecture"),
    (dict(cfg_drop_prob=0.1), "classifier-free guidance"),
    (dict(pkeep=0.5), "pkeep"),
    (dict(text_len=500), "at most .* text tokens fit"),
    (dict(size=128), "256 px"),
    (dict(sandwich_ln=False), "part of the architecture"),
])
def test_bad_combinations_are_tuwen_errors(cogview_dirs, table, udp, match):  # noqa: F811
    with pytest.raises(TuwenError, match=match):
        task_for(cogview_dirs, table, **udp)


def test_caption_model_is_refused(cogview_dirs, table, tmp_path):  # noqa: F811
    from test_cogview import write_deepspeed_folder

    root = cogview_dirs["root"]
    cap = write_deepspeed_folder(tmp_path / "cogview-caption", [cogview_dirs["gpt"]])
    udp = udp_of(pretrain_model_name_or_path=str(cap), n_head=HEADS,
                 vqgan_ckpt_path=str(root / "vqvae" / "vqvae_hard_biggerset_011.pt"),
                 vocab_path=str(root / "chinese_sentencepiece" / "cog-pretrain.model"))
    with pytest.raises(TuwenError, match="image2text model"):
        CogViewTask.from_udp(easynlp_args(table), udp, log=lambda m: None)


def test_bad_text_rows_are_skipped(cogview_dirs, table, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"0\t红色的 [MASK] 猫\t{b64png(picture(1))}\n1\t\t{b64png(picture(2))}\n", encoding="utf-8")
    task = task_for(cogview_dirs, table)
    ds = task.dataset([str(bad)])
    from tuwen.data.tables import BadRow
    assert all(isinstance(ds[i], BadRow) for i in range(2))
    assert "command tokens" in ds[0].reason and "empty text" in ds[1].reason
    assert task.max_text == 1089 + 1 - 4 - 1024  # [ROI1] text [BASE] [BOI1] codes [EOI1] in 1089 positions


def test_text2image_loader_points_a_megatron_folder_to_the_cogview_commands(cogview_dirs):  # noqa: F811
    from tuwen.models.text2image import TextToImage
    with pytest.raises(TuwenError, match="CogView .Megatron. checkpoint folder.*tuwen generate --model"):
        TextToImage.from_pretrained(base_dir(cogview_dirs))
