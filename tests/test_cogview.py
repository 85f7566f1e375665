"""CogView: its VQ-VAE, SentencePiece vocabulary, Megatron/DeepSpeed checkpoint folders, templates, generation.

Fixtures are built here in CogView's own layouts (from ``vqvae/vqvae_zc.py``, ``mpu/``, ``model/gpt2_modeling.py``,
``data_utils/unified_tokenizer.py``, ``generation/``) with tiny random weights, and the outputs are checked
against independent reference computations written in this file.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

spm = pytest.importorskip("sentencepiece")

from tuwen.convert import cogview as cv  # noqa: E402
from tuwen.errors import TuwenError  # noqa: E402
from tuwen.models.cogview import SR_WINDOWS, TEMPLATES, CogView, cogview_position_ids, sr_windows  # noqa: E402
from tuwen.models.cogview_vqvae import MEAN, STD, CogViewVQVAE, cogview_resize_crop  # noqa: E402
from tuwen.text.cogview import COMMAND_TOKENS, CogViewVocab, SentencePieceTokenizer, pad_vocab_size  # noqa: E402

N_IMAGE, CH, EMB = 64, 8, 8          # tiny VQ-VAE: 64 codes of 8 dims, 8 channels (CogView: 8192, 512, 256)
HID, LAYERS, HEADS, NPOS = 32, 2, 2, 1089

CORPUS = ["一只红色的猫在草地上", "左上角有一个红色的圆形", "右下角有一个蓝色的正方形", "a red cat on the grass",
          "一个漂亮的女孩", "蓝天白云下的城市", "the quick brown fox", "黄色的三角形和绿色的长方形"] * 20


# ============================================================================================ fixtures

@pytest.fixture(scope="module")
def spm_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(d / "cog-pretrain"),
                                   vocab_size=60, model_type="unigram", character_coverage=1.0,
                                   minloglevel=2, num_threads=1)
    return d / "cog-pretrain.model"


def vqvae_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """``VQVAE(channel=CH, n_res_block=0, embed_dim=EMB, n_embed=N_IMAGE, stride=6).state_dict()`` names/shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.2: torch.randn(*s, generator=g) * std  # noqa: E731
    embed = r(EMB, N_IMAGE, std=1.0)
    return {
        "enc_b.blocks.0.weight": r(CH, 3, 4, 4), "enc_b.blocks.0.bias": r(CH),
        "enc_b.blocks.2.weight": r(CH, CH, 4, 4), "enc_b.blocks.2.bias": r(CH),
        "enc_b.blocks.4.weight": r(CH, CH, 4, 4), "enc_b.blocks.4.bias": r(CH),
        "enc_b.blocks.6.weight": r(EMB, CH, 1, 1), "enc_b.blocks.6.bias": r(EMB),
        "quantize_t.embed": embed, "quantize_t.cluster_size": torch.rand(N_IMAGE, generator=g),
        "quantize_t.embed_avg": embed.clone(),
        "dec.blocks.0.weight": r(EMB, CH, 4, 4), "dec.blocks.0.bias": r(CH),   # ConvTranspose2d: [in, out, k, k]
        "dec.blocks.2.weight": r(CH, CH, 4, 4), "dec.blocks.2.bias": r(CH),
        "dec.blocks.4.weight": r(CH, CH, 4, 4), "dec.blocks.4.bias": r(CH),
        "dec.blocks.6.weight": r(3, CH, 1, 1), "dec.blocks.6.bias": r(3),
    }


def gpt_state_dict(vocab_rows: int, seed=0) -> dict[str, torch.Tensor]:
    """``GPT2Model(num_layers=LAYERS, hidden_size=HID, max_sequence_length=NPOS).state_dict()`` (mp size 1)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.1: torch.randn(*s, generator=g) * std  # noqa: E731
    sd = {"word_embeddings.weight": r(vocab_rows, HID, std=0.5),
          "transformer.position_embeddings.weight": r(NPOS, HID, std=0.3)}
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm", "third_layernorm", "fourth_layernorm"):
            sd[p + ln + ".weight"] = 1 + r(HID)
            sd[p + ln + ".bias"] = r(HID)
        sd[p + "attention.query_key_value.weight"] = r(3 * HID, HID, std=0.3)
        sd[p + "attention.query_key_value.bias"] = r(3 * HID)
        sd[p + "attention.dense.weight"] = r(HID, HID, std=0.3)
        sd[p + "attention.dense.bias"] = r(HID)
        sd[p + "mlp.dense_h_to_4h.weight"] = r(4 * HID, HID, std=0.3)
        sd[p + "mlp.dense_h_to_4h.bias"] = r(4 * HID)
        sd[p + "mlp.dense_4h_to_h.weight"] = r(HID, 4 * HID, std=0.3)
        sd[p + "mlp.dense_4h_to_h.bias"] = r(HID)
    sd["transformer.final_layernorm.weight"] = 1 + r(HID)
    sd["transformer.final_layernorm.bias"] = r(HID)
    return {k: v.half() for k, v in sd.items()}  # the released checkpoints are fp16 (--fp16, model.half())


def split_model_parallel(sd: dict[str, torch.Tensor], p: int) -> list[dict[str, torch.Tensor]]:
    """What mpu's layers hold on each of ``p`` ranks (``_initialize_affine_weight`` with its strides)."""
    out = [dict() for _ in range(p)]
    for k, v in sd.items():
        for r in range(p):
            if k == "word_embeddings.weight" or k.endswith(("dense_h_to_4h.weight", "dense_h_to_4h.bias")):
                out[r][k] = v.chunk(p, 0)[r].clone()                        # VocabParallel / ColumnParallel
            elif "query_key_value" in k:                                      # ColumnParallel, stride 3
                out[r][k] = torch.cat(v.split(v.shape[0] // (3 * p), 0)[r::p]).clone()
            elif k.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
                out[r][k] = v.chunk(p, 1)[r].clone()                        # RowParallel
            else:
                out[r][k] = v.clone()
    return out


def write_deepspeed_folder(folder: Path, shards: list[dict], iteration: int = 3000) -> Path:
    """``model.save_checkpoint(args.save, str(iteration), client_state=sd)`` of DeepSpeed 0.4 + the tracker."""
    (folder / str(iteration)).mkdir(parents=True)
    for r, sd in enumerate(shards):
        torch.save({"module": sd, "iteration": iteration, "dp_world_size": 1, "mp_world_size": len(shards),
                    "global_steps": iteration, "skipped_steps": 0, "optimizer": None, "lr_scheduler": None,
                    "csr_tensor_module_names": set(), "random_rng_state": random.getstate(),
                    "np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()},
                   folder / str(iteration) / f"mp_rank_{r:02d}_model_states.pt")
    (folder / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return folder


@pytest.fixture(scope="module")
def cogview_dirs(tmp_path_factory, spm_file):
    """CogView's repository layout: pretrained/{vqvae,chinese_sentencepiece,cogview/cogview-base}."""
    root = tmp_path_factory.mktemp("cogview") / "pretrained"
    (root / "vqvae").mkdir(parents=True)
    vq = vqvae_state_dict()
    torch.save({"module." + k: v for k, v in vq.items()}, root / "vqvae" / "vqvae_hard_biggerset_011.pt")
    (root / "chinese_sentencepiece").mkdir()
    (root / "chinese_sentencepiece" / "cog-pretrain.model").write_bytes(spm_file.read_bytes())
    rows = pad_vocab_size(N_IMAGE + 60 + len(COMMAND_TOKENS))
    sd = gpt_state_dict(rows)
    write_deepspeed_folder(root / "cogview" / "cogview-base", [sd])
    write_deepspeed_folder(root / "cogview" / "cogview-mp2", split_model_parallel(sd, 2))
    return {"root": root, "gpt": sd, "vq": vq, "rows": rows}


@pytest.fixture(scope="module")
def model(cogview_dirs) -> CogView:
    m = CogView.from_pretrained(cogview_dirs["root"] / "cogview" / "cogview-base", n_head=HEADS, dtype=torch.float32)
    return m


# ============================================================================================ references

def ref_layer_norm(x, w, b):
    """CogView's mpu LayerNorm: FusedLayerNorm(x / (max|x| / 8)), the max over the whole tensor."""
    x = x / (x.abs().max() / 8)
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def ref_logits(sd: dict, tokens: torch.Tensor, position_ids: torch.Tensor, n_head: int) -> torch.Tensor:
    """GPT2Model.forward (mp 1, is_sparse 0, no mems), written from CogView's code in plain tensor ops."""
    sd = {k: v.float() for k, v in sd.items()}
    h = sd["word_embeddings.weight"][tokens] + sd["transformer.position_embeddings.weight"][position_ids]
    B, T, H = h.shape
    d = H // n_head
    mask = torch.ones(T, T).tril()
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        ln = lambda x, n: ref_layer_norm(x, sd[p + n + ".weight"], sd[p + n + ".bias"])  # noqa: E731
        qkv = ln(h, "input_layernorm") @ sd[p + "attention.query_key_value.weight"].T + sd[p + "attention.query_key_value.bias"]
        q, k, v = (t.view(B, T, n_head, d).permute(0, 2, 1, 3) for t in qkv.chunk(3, -1))
        scores = torch.matmul(q / math.sqrt(d), k.transpose(-1, -2))
        scores = scores * mask - 10000.0 * (1.0 - mask)
        ctx = scores.softmax(-1) @ v
        ctx = ctx.permute(0, 2, 1, 3).reshape(B, T, H)
        a = ctx @ sd[p + "attention.dense.weight"].T + sd[p + "attention.dense.bias"]
        h = h + ln(a, "third_layernorm")
        x = ln(h, "post_attention_layernorm") @ sd[p + "mlp.dense_h_to_4h.weight"].T + sd[p + "mlp.dense_h_to_4h.bias"]
        x = 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))
        m = x @ sd[p + "mlp.dense_4h_to_h.weight"].T + sd[p + "mlp.dense_4h_to_h.bias"]
        h = h + ln(m, "fourth_layernorm")
    h = ref_layer_norm(h, sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"])
    return h @ sd["word_embeddings.weight"].T


def ref_vq_encode(sd, x):
    for i in (0, 2, 4):
        x = F.relu(F.conv2d(x, sd[f"enc_b.blocks.{i}.weight"], sd[f"enc_b.blocks.{i}.bias"], stride=2, padding=1))
    z = F.conv2d(x, sd["enc_b.blocks.6.weight"], sd["enc_b.blocks.6.bias"]).permute(0, 2, 3, 1)
    flat = z.reshape(-1, z.shape[-1])
    e = sd["quantize_t.embed"]
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e + e.pow(2).sum(0, keepdim=True)
    return (-dist).max(1).indices.view(z.shape[:-1])


def ref_vq_decode(sd, codes):
    z = F.embedding(codes, sd["quantize_t.embed"].T).permute(0, 3, 1, 2)
    for i in (0, 2, 4):
        z = F.relu(F.conv_transpose2d(z, sd[f"dec.blocks.{i}.weight"], sd[f"dec.blocks.{i}.bias"], stride=2, padding=1))
    out = F.conv2d(z, sd["dec.blocks.6.weight"], sd["dec.blocks.6.bias"])
    return out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def picture(seed=0, size=(300, 260)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ============================================================================================ tokenizers

def test_sentencepiece_and_unified_vocabulary(spm_file):
    tok = SentencePieceTokenizer(spm_file)
    ids = tok.encode("一只红色的猫")
    assert ids and tok.decode(ids) == "一只红色的猫"
    vocab = CogViewVocab(tok, n_image=8192)
    n_text = tok.vocab_size
    assert vocab["[PAD]"] == 8192 + n_text and vocab["[POS8]"] == 8192 + n_text + 26 and len(vocab) == 8192 + n_text + 27
    # CogView's numbers: 8192 + 50000 + 27 = 58219 → 58240 rows
    assert pad_vocab_size(8192 + 50000 + 27) == 58240
    assert vocab.encode_text("红色的猫") == [i + 8192 for i in tok.encode("红色的猫")]
    q = vocab.parse_query("[ROI1] 一只 红色的猫 [BASE] [BOI1] [MASK]*5")
    assert q[0] == vocab["[ROI1]"] and q[-7:] == [vocab["[BASE]"], vocab["[BOI1]"]] + [-1] * 5
    assert q[1:-7] == vocab.encode_text("一只 红色的猫")  # text parts joined with single spaces
    dec = vocab.decode([vocab["[ROI1]"], *vocab.encode_text("红色的猫"), vocab["[BOI1]"], 3, 4, vocab["[EOI1]"]])
    assert dec == ["[ROI1]", "红色的猫", "[BOI1]", [3, 4], "[EOI1]"]
    img = vocab.parse_query("[BASE] [Image2]x.png", encode_image=lambda p: [7, 8, 9, 10])
    assert img == [vocab["[BASE]"], 7, 8, -1, -1]
    with pytest.raises(TuwenError, match=r"\[MASK\]\*N"):
        vocab.parse_query("[MASK]*x")
    with pytest.raises(TuwenError, match="no image"):
        vocab.parse_query("[Image]a.png")
    with pytest.raises(TuwenError, match="not a SentencePiece model"):
        SentencePieceTokenizer(Path(__file__))


# ============================================================================================ VQ-VAE

def test_vqvae_reads_cogview_file_and_matches_reference(cogview_dirs):
    f = cogview_dirs["root"] / "vqvae" / "vqvae_hard_biggerset_011.pt"
    cfg, sd = cv.read_vqvae(f)
    assert (cfg.channel, cfg.embed_dim, cfg.n_embed) == (CH, EMB, N_IMAGE)
    vq = CogViewVQVAE(cfg)
    vq.load_state_dict(sd)
    vq.eval()
    assert vq.grid_size() == (32, 32) and vq.n_embed == N_IMAGE
    pics = [picture(0), picture(1, (256, 400))]
    codes = vq.encode(pics)
    assert codes.shape == (2, 32, 32)
    # reference: torchvision Resize(256) + CenterCrop(256) + ToTensor + Normalize, then CogView's encoder
    x = torch.stack([torch.from_numpy(np.asarray(cogview_resize_crop(p), dtype=np.float32) / 255).permute(2, 0, 1)
                     for p in pics])
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    ref = ref_vq_encode(cogview_dirs["vq"], x)
    assert torch.equal(codes, ref)
    out = vq.decode_normalized(codes)
    torch.testing.assert_close(out, ref_vq_decode(cogview_dirs["vq"], codes), atol=1e-5, rtol=1e-5)
    img = vq.decode(codes.view(2, -1))  # protocol: [-1, 1], flat codes accepted
    assert img.shape == (2, 3, 256, 256) and img.min() >= -1 and img.max() <= 1
    # resize rule: short side 256 (long side int(256·long/short)), centre crop with round()
    assert cogview_resize_crop(picture(2, (300, 260))).size == (256, 256)


def test_vqvae_wrong_files_are_clear_errors(tmp_path):
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "taming.pt")
    with pytest.raises(TuwenError, match="taming VQGAN"):
        cv.read_vqvae(tmp_path / "taming.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(TuwenError, match="not CogView's VQ-VAE"):
        cv.read_vqvae(tmp_path / "other.pt")


# ============================================================================================ transformer

def test_checkpoint_folder_logits_match_reference(model, cogview_dirs):
    cfg = model.config.gpt
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_positions) == (LAYERS, HID, HEADS,
                                                                                        cogview_dirs["rows"], NPOS)
    assert cfg.sandwich_ln and cfg.tie_head and cfg.gelu == "tanh" and model.gpt.head.weight is model.gpt.tok_emb.weight
    v = model.vocab
    seq = [v["[ROI1]"], *v.encode_text("一只红色的猫"), v["[BASE]"], v["[BOI1]"], 5, 17, 63, 0, 9]
    got = model.logits(seq)
    ref = ref_logits(cogview_dirs["gpt"], torch.tensor([seq]), torch.arange(len(seq))[None], HEADS)
    # CogView's PB-relax LayerNorm divides by the max over the whole tensor, tuwen's per position: equal up to
    # LayerNorm's eps (1e-5), i.e. ~1e-4 here
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    # [ROI2] restarts the position ids (filling_sequence: ids > o lose o)
    seq2 = seq + [v["[EOI1]"], v["[ROI2]"], v["[POS0]"], v["[BASE]"], v["[BOI2]"], 3, 4]
    pos = cogview_position_ids(seq2, v["[ROI2]"])
    o = seq2.index(v["[ROI2]"])
    assert pos[o] == o and pos[o + 1] == 1 and pos[-1] == len(seq2) - 1 - o
    torch.testing.assert_close(model.logits(seq2), ref_logits(cogview_dirs["gpt"], torch.tensor([seq2]), pos[None], HEADS),
                               atol=1e-3, rtol=1e-3)


def test_model_parallel_shards_merge_to_the_same_model(model, cogview_dirs):
    cfg2, sd2, info = cv.read_checkpoint_folder(cogview_dirs["root"] / "cogview" / "cogview-mp2", n_head=HEADS,
                                                dtype=torch.float32)
    assert info["shards"] == 2 and info["iteration"] == "3000"
    own = model.gpt.state_dict()
    assert set(sd2) == set(own)
    for k in own:
        assert torch.equal(sd2[k], own[k]), k


def test_checkpoint_folder_errors(tmp_path, cogview_dirs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TuwenError, match="latest_checkpointed_iteration.txt"):
        cv.checkpoint_files(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "latest_checkpointed_iteration.txt").write_text("42")
    with pytest.raises(TuwenError, match="missing"):
        cv.checkpoint_files(tmp_path / "bad")
    # a pickled object that is not a tensor/container is refused (weights_only)
    (tmp_path / "evil" / "1").mkdir(parents=True)
    torch.save({"module": {}, "x": Path("/")}, tmp_path / "evil" / "1" / "mp_rank_00_model_states.pt")
    (tmp_path / "evil" / "latest_checkpointed_iteration.txt").write_text("1")
    with pytest.raises(TuwenError, match="weights_only"):
        cv.read_checkpoint_folder(tmp_path / "evil")
    # no tokenizer next to the folder: the error says where it looked
    (tmp_path / "lone").mkdir()
    for f in (cogview_dirs["root"] / "cogview" / "cogview-base").rglob("*"):
        dst = tmp_path / "lone" / f.relative_to(cogview_dirs["root"] / "cogview" / "cogview-base")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f.is_file():
            dst.write_bytes(f.read_bytes())
    with pytest.raises(TuwenError, match="SentencePiece model not found"):
        CogView.from_pretrained(tmp_path / "lone")


def test_save_and_reload_in_tuwen_format(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "cog-pretrain.model").is_file() and (tmp_path / "m" / "vqvae" / "config.json").is_file()
    again = CogView.from_pretrained(tmp_path / "m")
    v = model.vocab
    seq = [v["[ROI1]"], *v.encode_text("红色"), v["[BASE]"], v["[BOI1]"], 1, 2, 3]
    torch.testing.assert_close(again.logits(seq), model.logits(seq))
    assert again.gpt.head.weight is again.gpt.tok_emb.weight


# ============================================================================================ generation

def ref_greedy_fill(model: CogView, sd: dict, seq: list[int]) -> list[int]:
    """CogView's filling_sequence with top-k 1, no mems: a full forward of the whole prefix for every token."""
    seq = list(seq)
    for t in range(seq.index(-1), len(seq)):
        if seq[t] >= 0:
            continue
        ctx = seq[:t]
        pos = cogview_position_ids(seq[:t], model.vocab["[ROI2]"])
        logits = ref_logits(sd, torch.tensor([ctx]), pos[None], HEADS)[0, -1]
        allowed = model.allowed_after(ctx)
        if isinstance(allowed, tuple):
            masked = torch.full_like(logits, float("-inf"))
            masked[allowed[0]:allowed[1]] = logits[allowed[0]:allowed[1]]
        else:
            masked = logits.masked_fill(~allowed, float("-inf"))
        seq[t] = int(masked.argmax())
    return seq


def test_greedy_fill_matches_reference_with_known_codes_and_roi2(model, cogview_dirs):
    v = model.vocab
    # text→image template (shortened), greedy
    seq = model.vocab.parse_query("[ROI1] 红色的猫 [BASE] [BOI1] [MASK]*12")
    got = model.fill(seq, 2, top_k=1)
    ref = ref_greedy_fill(model, cogview_dirs["gpt"], seq)
    assert got[0].tolist() == ref and got[1].tolist() == ref
    assert all(0 <= c < N_IMAGE for c in got[0, -12:].tolist())
    # an SR-like window: [ROI2] restarts positions, known codes inside the span are kept and fed
    seq = seq[:-12] + [5, 6, 7, 8] + [v["[EOI1]"], v["[ROI2]"], v["[POS0]"], v["[BASE]"], v["[BOI2]"],
                                      11, 12, -1, -1, 13, 14, -1, -1]
    got = model.fill(seq, 1, top_k=1)[0].tolist()
    assert got == ref_greedy_fill(model, cogview_dirs["gpt"], seq)
    assert got[-8:-6] == [11, 12] and got[-4:-2] == [13, 14]


def test_image2text_restricts_to_text(model):
    caps = model.image2text(picture(3), num=2, top_k=5, seed=1)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    v = model.vocab
    seq = v.parse_query("[BASE] [BOI1]") + [1] * 1024 + v.parse_query("[EOI1] [ROI1] [MASK]*6")
    out = model.fill(seq, 3, top_k=20, seed=0)
    lo, hi = v.text_range
    assert ((out[:, -6:] >= lo) & (out[:, -6:] < hi)).all()


def test_samples_do_not_depend_on_max_inference_batch_size(model):
    seq = model.vocab.parse_query("[ROI1] 蓝天 [BASE] [BOI1] [MASK]*8")
    a = model.fill(seq, 5, seed=3, top_k=10, max_inference_batch_size=2)
    b = model.fill(seq, 5, seed=3, top_k=10, max_inference_batch_size=12)
    assert torch.equal(a, b) and len({tuple(r) for r in a.tolist()}) > 1


def test_post_selection_scores_match_reference(model, cogview_dirs):
    pics = [picture(4), picture(5)]
    text = "红色的猫"
    got = model.post_selection_scores(text, pics, max_inference_batch_size=1)
    v = model.vocab
    for p, s in zip(pics, got):  # inverse_prompt_score: image codes masked, sum log p of the text tokens
        seq = model.parse(TEMPLATES["post-selection"], "x", text) if False else \
            v.parse_query("[BASE] [BOI1]") + model.encode_image(p) + v.parse_query("[EOI1] [ROI1]") + v.encode_text(text)
        botext = 2 + 1024 + 1
        assert seq[botext] == v["[ROI1]"]
        logits = ref_logits(cogview_dirs["gpt"], torch.tensor([seq]), torch.arange(len(seq))[None], HEADS)
        logits[..., :N_IMAGE] = float("-inf")
        logp = torch.log(F.softmax(logits, dim=-1))
        ref = logp[0, botext:-1].gather(1, torch.tensor(seq[botext + 1:])[:, None]).sum()
        assert abs(s - float(ref)) < 1e-3


def test_super_resolution_windows_in_cogviews_order(model, monkeypatch):
    assert [(i, j) for i, j, _ in SR_WINDOWS] == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    wins = list(sr_windows(32))
    assert wins[0][2] == (slice(0, 16), slice(0, 16)) and wins[0][3] == (slice(0, 18), slice(0, 32))
    assert wins[8][2] == (slice(16, 32), slice(16, 32)) and wins[8][3] == (slice(32, 64), slice(32, 64))
    # every target code is covered
    cover = torch.zeros(64, 64, dtype=torch.bool)
    for *_, dst in wins:
        cover[dst] = True
    assert cover.all()
    calls = []

    def fake_fill(seq, num=1, **kw):  # fill -1s with a code naming the window, keep the known ones
        calls.append(list(seq))
        n = len(calls)
        return torch.tensor([[t if t >= 0 else n for t in seq]])

    monkeypatch.setattr(model, "fill", fake_fill)
    src = torch.arange(1024).remainder(N_IMAGE).view(32, 32)
    big = model.super_resolution("红色的猫", src)
    assert len(calls) == 9 and (big >= 1).all()
    v = model.vocab
    mid = [v["[EOI1]"], v["[ROI2]"], v["[POS0]"], v["[BASE]"], v["[BOI2]"]]
    text_part = v.parse_query("[ROI1] 红色的猫 [BASE] [BOI1]")
    for n, (i, j, rows) in enumerate(SR_WINDOWS):
        seq = calls[n]
        assert seq[:len(text_part)] == text_part
        assert seq[len(text_part):len(text_part) + 256] == src[8 * i:8 * i + 16, 8 * j:8 * j + 16].reshape(-1).tolist()
        assert seq[len(text_part) + 256:len(text_part) + 261] == mid
        assert len(seq) == len(text_part) + 261 + rows * 32
    # window (0,1) sees the codes window (0,0) wrote in its overlap (rows 0-17, columns 16-31) as known
    w01 = torch.tensor(calls[1][len(text_part) + 261:]).view(30, 32)
    assert (w01[:18, :16] == 1).all() and (w01[:18, 16:] == -1).all() and (w01[18:] == -1).all()
    # a code, once generated, is kept by the later windows (they see it as known): the first window wins
    assert big[0, 0] == 1 and big[63, 63] == 9 and big[20, 20] == 2 and big[40, 10] == 5


# ============================================================================================ command line

@pytest.mark.slow  # ~6 s: three text→image queries of 1024 codes
def test_cli_with_id_and_debug_layouts(cogview_dirs, tmp_path, capsys):
    from tuwen.cli import main

    folder = str(cogview_dirs["root"] / "cogview" / "cogview-base")
    q = tmp_path / "input.txt"
    q.write_text("001\t红色的猫\n\n002\t蓝天白云下的城市\n", encoding="utf-8")
    base = ["generate", "--model", folder, "--num-attention-heads", str(HEADS), "--top_k", "5",
            "--batch-size", "2", "--max-inference-batch-size", "1"]
    assert main(base + ["--input-source", str(q), "--with-id", "--output-path", str(tmp_path / "ids")]) == 0
    for ident in ("001", "002"):
        names = sorted(p.name for p in (tmp_path / "ids" / ident).iterdir())
        assert names == ["0.png", "1.png", "concat.png"]
        assert Image.open(tmp_path / "ids" / ident / "0.png").size == (256, 256)
    assert main(base + ["红色的猫/狗", "--debug", "--out", str(tmp_path / "dbg")]) == 0
    (f,) = list((tmp_path / "dbg").iterdir())
    assert f.name.startswith("红色的猫狗-") and len(f.name) == len("红色的猫狗-01-02-03-04-05.png")
    capsys.readouterr()
    assert main(base + ["--input-source", str(q), "--with-id", "--debug"]) == 2
    assert "conflicts" in capsys.readouterr().err


def test_cli_post_selection_scores_file(cogview_dirs, tmp_path):
    from tuwen.cli import main

    folder = str(cogview_dirs["root"] / "cogview" / "cogview-base")
    # post-selection: text \t img1 \t img2 → {output_path}/scores.txt, the line then its scores
    pics = []
    for i in range(2):
        pics.append(tmp_path / f"p{i}.png")
        picture(10 + i).save(pics[-1])
    sel = tmp_path / "input_select.txt"
    sel.write_text(f"红色的猫\t{pics[0]}\t{pics[1]}\n蓝天\t{pics[1]}\n", encoding="utf-8")
    assert main(["generate", "--model", folder, "--num-attention-heads", str(HEADS), "--generation-task",
                 "post-selection", "--input-source", str(sel), "--out", str(tmp_path / "ps")]) == 0
    lines = (tmp_path / "ps" / "scores.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == f"红色的猫\t{pics[0]}\t{pics[1]}" and lines[2] == f"蓝天\t{pics[1]}" and len(lines) == 4
    model = CogView.from_pretrained(folder, n_head=HEADS, dtype=torch.float32)
    want = model.post_selection_scores("红色的猫", [Image.open(p) for p in pics])
    got = [float(x) for x in lines[1].split("\t")]
    assert len(got) == 2 and np.allclose(got, want, atol=1e-4)
    assert main(["generate", "--model", folder, "--generation-task", "post-selection", "--input-source",
                 "interactive"]) == 2


def test_interactive_mode_through_a_pipe(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "tuwen", "generate", "--input-source", "interactive", "-n", "1",
                        "--out", str(tmp_path / "o"), "--top_k", "1"],
                       input="左上角有一个红色的圆形\n\n右下角有一个蓝色的正方形\nstop\nnot read\n", text=True,
                       capture_output=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("Please Input Query (stop to exit) >>>") == 4
    assert "Query should not be empty!" in r.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0", "1"]
    assert (tmp_path / "o" / "0" / "0.png").is_file() and (tmp_path / "o" / "1" / "concat.png").is_file()
    assert "not read" not in r.stdout


def test_convert_cogview_folder_and_vqvae(cogview_dirs, tmp_path):
    from tuwen.cli import main

    root = cogview_dirs["root"]
    assert main(["convert", str(root / "cogview" / "cogview-mp2"), str(tmp_path / "m"), "--num-attention-heads",
                 str(HEADS)]) == 0
    m = CogView.from_pretrained(tmp_path / "m")
    assert m.config.gpt.n_head == HEADS and m.vqvae is not None and m.vocab.text is not None
    assert main(["convert", str(root / "vqvae" / "vqvae_hard_biggerset_011.pt"), str(tmp_path / "vq")]) == 0
    vq = CogViewVQVAE.from_pretrained(tmp_path / "vq")
    assert torch.equal(vq.quantize_t.embed, cogview_dirs["vq"]["quantize_t.embed"])
