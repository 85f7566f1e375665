"""CogView (THUDM): a GPT over the unified vocabulary + CogView's VQ-VAE, with its query templates.

The transformer is tuwen's :class:`~tuwen.models.gpt.GPT` with CogView's options (Sandwich-LN, tanh GELU, the
head tied to the embedding, 1089 position embeddings) — the same cache, sampler and CUDA-graph decode as every
tuwen model. Sequences (``generate_samples.py``)::

    text→image        [ROI1] text [BASE] [BOI1] [MASK]*1024                        (cogview-base)
    image→text        [BASE] [BOI1] [Image]img [EOI1] [ROI1] [MASK]*20             (cogview-caption)
    post-selection    [BASE] [BOI1] [Image]img [EOI1] [ROI1] text  → sum log p(text | image)
    super-resolution  [ROI1] text [BASE] [BOI1] code16² [EOI1] [ROI2] [POS0] [BASE] [BOI2] window  (cogview-sr)

Position ids (``filling_sequence``): 0, 1, 2, … except that after a ``[ROI2]`` at index o every id greater
than o is reduced by o (so the tokens after [ROI2] count from 1 again; [ROI2] itself keeps o).
What may be sampled (``invalid_slices``): before any ``[BOI*]``/``[EOI*]`` everything but image codes; after
``[BOI1]``/``[BOI2]`` only image codes; after ``[EOI1]``/``[EOI2]`` only text tokens.

Sampling: CogView draws ``--batch-size`` samples per query with temperature, top-k (200) and top-p; tuwen draws
each sample with its own seed (derived from seed, query and sample index), so a sample does not depend on
``--max-inference-batch-size`` or on the number of processes; the distribution is the same.

``CogView.from_pretrained`` reads a tuwen folder (``config.json`` model_type ``cogview`` + ``model.safetensors``
+ ``cog-pretrain.model`` + ``vqvae/``) or CogView's own checkpoint folder (``cogview-base`` …) as it is, with
the VQ-VAE file and the SentencePiece model given or found where CogView keeps them
(``pretrained/vqvae/vqvae_hard_biggerset_011.pt``, ``pretrained/chinese_sentencepiece/cog-pretrain.model``).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch

from ..config import BaseConfig
from ..convert import cogview as cv
from ..errors import TuwenError
from ..hub import CONFIG_NAME, WEIGHTS_NAME, PretrainedModel, load_state_dict_checked, load_weights, \
    resolve_model_path
from ..sampling import SamplingParams, generate as sample_tokens_cached
from ..text.cogview import SPM_NAME, CogViewVocab, SentencePieceTokenizer, pad_vocab_size
from .cogview_vqvae import CogViewVQVAE
from .gpt import GPT, GPTConfig
from .text2image import image_seed

__all__ = ["CogView", "CogViewConfig", "TEMPLATES", "SR_WINDOWS", "sr_windows", "cogview_position_ids",
           "find_cogview_file"]

MODEL_TYPE = "cogview"
TEMPLATES = {
    "text2image": "[ROI1] {} [BASE] [BOI1] [MASK]*1024",
    "image2text": "[BASE] [BOI1] [Image]{} [EOI1] [ROI1] [MASK]*20",
    "post-selection": "[BASE] [BOI1] [Image]{} [EOI1] [ROI1] {}",
    "super-resolution": "[ROI1] {} [BASE] [BOI1] [Image]{}",
    "low-level super-resolution": "[ROI1] {} [BASE] [BOI1] [Image]{} [EOI1] [ROI2] [POS0] [BASE] [BOI2] [MASK]*1024",
}
#: CogView's magnify(): (i, j, rows) — window (i, j) reads source codes [8i:8i+16, 8j:8j+16] of the 32×32 grid
#: and fills target rows [16i:16i+rows], columns [16j:16j+32] of the 64×64 grid, in this order
SR_WINDOWS = ((0, 0, 18), (0, 1, 30), (0, 2, 30), (1, 1, 30), (1, 0, 30), (1, 2, 30), (2, 0, 32), (2, 1, 32),
              (2, 2, 32))


@dataclasses.dataclass
class CogViewConfig(BaseConfig):
    """A CogView model: the GPT's sizes, the vocabulary split and generation defaults (the VQ-VAE's own config
    lives in ``vqvae/``)."""

    model_type: ClassVar[str] = MODEL_TYPE

    gpt: GPTConfig | None = None
    n_image: int = 8192            # image codes (the VQ-VAE's n_embed)
    n_text: int = 50000            # SentencePiece pieces
    task: str = "text2image"       # what the checkpoint was trained for: text2image, image2text, super-resolution
    image_size: int = 256
    sampling: SamplingParams = dataclasses.field(
        default_factory=lambda: SamplingParams(top_k=200, temperature=1.0))  # scripts/text2image.sh

    def validate(self) -> None:
        if self.gpt is None:
            raise TuwenError("cogview config: gpt is required")
        n = self.n_image + self.n_text + 27
        if self.gpt.vocab_size < n:
            raise TuwenError(f"cogview config: gpt.vocab_size {self.gpt.vocab_size} < {n} "
                             f"(n_image + n_text + 27 command tokens)")
        if self.task not in ("text2image", "image2text", "super-resolution"):
            raise TuwenError(f"cogview config: task must be text2image, image2text or super-resolution, got "
                             f"{self.task!r}")


def cogview_position_ids(seq: Sequence[int], roi2_id: int) -> torch.Tensor:
    """CogView's inference position ids of a sequence (see the module docstring) → LongTensor [len(seq)]."""
    pos = torch.arange(len(seq))
    offsets = [i for i, t in enumerate(seq) if int(t) == roi2_id]
    if offsets:
        o = offsets[-1]
        pos = torch.where(pos > o, pos - o, pos)
    return pos


def sr_windows(grid: int = 32):
    """The 9 windows of CogView's magnify for a ``grid``² source (32 → 64): yields (i, j, source slices,
    target slices) in CogView's order."""
    q = grid // 4  # 8
    for i, j, rows in SR_WINDOWS:
        rows = rows * grid // 32
        yield i, j, (slice(q * i, q * (i + 2)), slice(q * j, q * (j + 2))), \
            (slice(2 * q * i, 2 * q * i + rows), slice(2 * q * j, 2 * q * (j + 2)))


def find_cogview_file(name: str, given: str | os.PathLike | None, folder: Path, sub: str, what: str) -> Path:
    """``given``, else ``folder/name``, else CogView's repository layout (``folder/../../{sub}/{name}``)."""
    if given is not None:
        p = Path(given).expanduser()
        if p.is_dir():
            p = p / name
        if not p.is_file():
            raise TuwenError(f"{what} {p}: file not found")
        return p
    candidates = [folder / name, folder.parent / name, folder.parent.parent / sub / name]
    for c in candidates:
        if c.is_file():
            return c
    raise TuwenError(f"{folder}: {what} not found (looked at {', '.join(str(c) for c in candidates)}); "
                     f"give its path")


class CogView(PretrainedModel):
    """GPT (``self.gpt``) + CogView's VQ-VAE (``self.vqvae``) + the unified vocabulary (``self.vocab``)."""

    config_class: ClassVar[type[BaseConfig]] = CogViewConfig

    def __init__(self, config: CogViewConfig, vqvae: CogViewVQVAE | None, vocab: CogViewVocab, gpt: GPT | None = None):
        super().__init__(config)
        config.validate()
        self.gpt = gpt if gpt is not None else GPT(config.gpt)
        self.vqvae = vqvae
        if vqvae is not None:
            vqvae.requires_grad_(False)
        self.vocab = vocab

    # ============================================================================================ folders
    def _weights_for_save(self) -> dict[str, torch.Tensor]:
        sd = self.gpt.state_dict()
        if self.config.gpt.tie_head:
            sd.pop("head.weight", None)  # tied: stored once
        return sd

    def _save_extra(self, path: Path) -> None:
        if self.vocab.text is not None:
            dst = path / SPM_NAME
            if self.vocab.text.path.resolve() != dst.resolve():
                shutil.copyfile(self.vocab.text.path, dst)
        if self.vqvae is not None:
            self.vqvae.save_pretrained(path / "vqvae")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None, *,
                        vqvae: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                        n_head: int | None = None, dtype: torch.dtype | None = None, task: str | None = None,
                        offload: bool = False, **_ignored) -> "CogView":
        """A tuwen ``cogview`` folder or CogView's checkpoint folder. ``vqvae``: ``vqvae_hard_biggerset_011.pt``
        (or a tuwen ``vqvae/`` folder); ``tokenizer``: ``cog-pretrain.model``; ``n_head``: attention heads of a
        CogView checkpoint (default hidden/64); ``dtype``: cast the GPT while reading (e.g. torch.bfloat16);
        ``task``: text2image / image2text / super-resolution (CogView folders: guessed from the folder name).
        ``offload`` (CogView's ``--offload``, for GPUs smaller than the model): the weights are read into CPU memory
        (bf16 when ``device`` is CUDA and no ``dtype`` is given) and each transformer block visits ``device`` only
        while it runs (:mod:`tuwen.models.offload`); embeddings, head, VQ-VAE and the KV cache stay on ``device``
        (default: auto)."""
        if offload and dtype is None:
            from ..runtime import resolve_device
            if resolve_device(device).type == "cuda":
                dtype = torch.bfloat16
        path = resolve_model_path(name_or_path, what="CogView model",
                                  expect="config.json (model_type cogview) + model.safetensors, or CogView's "
                                         "latest_checkpointed_iteration.txt + NNN/mp_rank_00_model_states.pt")
        if cv.is_checkpoint_folder(path) and not (path / CONFIG_NAME).is_file():
            model = cls._from_checkpoint_folder(path, vqvae, tokenizer, n_head, dtype, task)
        else:
            model = cls._from_tuwen_folder(path, vqvae, tokenizer, dtype, task)
        model.eval()
        if offload:
            return model.offload(device)
        return model.to(device) if device is not None else model

    def offload(self, device: str | torch.device | None = None) -> "CogView":
        """Sequential block offload onto ``device`` (in place; see ``from_pretrained(..., offload=True)``)."""
        from ..runtime import resolve_device
        from .offload import offload

        return offload(self, self.gpt.blocks, resolve_device(device))

    @property
    def offloaded(self) -> bool:
        from .offload import is_offloaded

        return is_offloaded(self.gpt)

    @classmethod
    def _load_vqvae(cls, given, folder: Path, required: bool) -> CogViewVQVAE | None:
        if given is not None and Path(given).is_dir() and (Path(given) / CONFIG_NAME).is_file():
            return CogViewVQVAE.from_pretrained(given)
        if given is None and (folder / "vqvae" / CONFIG_NAME).is_file():
            return CogViewVQVAE.from_pretrained(folder / "vqvae")
        try:
            f = find_cogview_file(cv.VQVAE_NAME, given, folder, "vqvae", "image tokenizer (VQ-VAE)")
        except TuwenError:
            if required:
                raise
            return None
        cfg, sd = cv.read_vqvae(f)
        model = CogViewVQVAE(cfg)
        load_state_dict_checked(model, sd, str(f))
        return model.eval()

    @classmethod
    def _from_checkpoint_folder(cls, path, vqvae, tokenizer, n_head, dtype, task) -> "CogView":
        spm = SentencePieceTokenizer(find_cogview_file(SPM_NAME, tokenizer, path, "chinese_sentencepiece",
                                                       "SentencePiece model"))
        vq = cls._load_vqvae(vqvae, path, required=True)
        gcfg, sd, info = cv.read_checkpoint_folder(path, n_head=n_head, dtype=dtype)
        n_image, n_text = vq.n_embed, spm.vocab_size
        n = n_image + n_text + 27
        if gcfg.vocab_size < n or gcfg.vocab_size % 128:
            raise TuwenError(f"{path}: the embedding has {gcfg.vocab_size} rows, but {n_image} image codes + "
                             f"{n_text} text tokens + 27 command tokens padded to a multiple of 128 is "
                             f"{pad_vocab_size(n)}: wrong VQ-VAE or SentencePiece model?")
        name = path.name.lower()
        task = task or ("image2text" if "caption" in name else "super-resolution" if "sr" in name.split("-")
                        else "text2image")
        sampling = SamplingParams(top_k=200, temperature=1.02 if task == "super-resolution" else 1.0)
        config = CogViewConfig(gpt=gcfg, n_image=n_image, n_text=n_text, task=task, sampling=sampling)
        with torch.device("meta"):
            gpt = GPT(gcfg)
        missing = set(gpt.state_dict()) - set(sd)
        unexpected = set(sd) - set(gpt.state_dict())
        if missing or unexpected:
            raise TuwenError(f"{path}: weights do not match CogView's GPT (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]})")
        gpt.load_state_dict(sd, assign=True)  # no second copy of the weights
        if gcfg.tie_head:
            gpt.head.weight = gpt.tok_emb.weight
        return cls(config, vq, CogViewVocab(spm, n_image, n_text), gpt=gpt)

    @classmethod
    def _from_tuwen_folder(cls, path, vqvae, tokenizer, dtype, task) -> "CogView":
        config = cls._read_config(path)
        if task:
            config.task = task
        spm_file = Path(tokenizer) if tokenizer else path / SPM_NAME
        spm = SentencePieceTokenizer(spm_file) if spm_file.is_file() or tokenizer else None
        vq = cls._load_vqvae(vqvae, path, required=False)
        with torch.device("meta"):
            gpt = GPT(config.gpt)
        sd = load_weights(path / WEIGHTS_NAME)
        if config.gpt.tie_head:
            sd["head.weight"] = sd["tok_emb.weight"]
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        own = gpt.state_dict()
        bad = sorted(set(own) ^ set(sd)) + [k for k in own if k in sd and own[k].shape != sd[k].shape]
        if bad:
            raise TuwenError(f"{path / WEIGHTS_NAME}: weights do not match config.json ({', '.join(bad[:6])})")
        gpt.load_state_dict(sd, assign=True)
        if config.gpt.tie_head:
            gpt.head.weight = gpt.tok_emb.weight
        return cls(config, vq, CogViewVocab(spm, config.n_image, config.n_text), gpt=gpt)

    # ============================================================================================ sequences
    def _need_vqvae(self) -> CogViewVQVAE:
        if self.vqvae is None:
            raise TuwenError("this CogView model has no image tokenizer; give vqvae=vqvae_hard_biggerset_011.pt")
        return self.vqvae

    def encode_image(self, image) -> list[int]:
        """A path / PIL image → its codes (CogView's read_img + img2code), raster order."""
        from ..data.images import open_any_image

        img = open_any_image(image) if not hasattr(image, "mode") else image
        return self._need_vqvae().encode([img], size=self.config.image_size)[0].reshape(-1).tolist()

    def parse(self, template: str, *fields: str) -> list[int]:
        """Fill a template (``TEMPLATES[...]`` or your own) with ``fields`` and parse it (-1 = to generate)."""
        return self.vocab.parse_query(template.format(*fields), encode_image=self.encode_image)

    def position_ids(self, seq: Sequence[int]) -> torch.Tensor:
        return cogview_position_ids(seq, self.vocab["[ROI2]"])

    def allowed_after(self, context: Sequence[int]) -> tuple[int, int] | torch.Tensor:
        """CogView's ``invalid_slices`` → what may be sampled after ``context`` (a range or a bool mask)."""
        v = self.vocab
        state = None
        for t in context:
            if t in (v["[BOI1]"], v["[BOI2]"]):
                state = "image"
            elif t in (v["[EOI1]"], v["[EOI2]"]):
                state = "text"
        if state == "image":
            return v.image_range
        if state == "text":
            return v.text_range
        mask = torch.ones(self.config.gpt.n_out, dtype=torch.bool)
        mask[: v.n_image] = False
        return mask

    @torch.inference_mode()
    def logits(self, seq: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Full forward of complete sequences [B, T] (or one list) with CogView's position ids → [B, T, V]."""
        x = torch.as_tensor(seq, dtype=torch.long, device=self.gpt.tok_emb.weight.device)
        x = x.unsqueeze(0) if x.dim() == 1 else x
        with self.gpt.position_map(self.position_ids(x[0].tolist())):
            return self.gpt(x).float()

    @torch.inference_mode()
    def fill(self, seq: Sequence[int], num: int = 1, *, seed: int | Sequence[int] = 0, key: str = "",
             top_k: int | None = None,
             top_p: float | None = None, temperature: float | None = None, max_inference_batch_size: int = 12,
             amp_dtype: torch.dtype | None = None) -> torch.Tensor:
        """CogView's ``filling_sequence``: complete the -1 positions of ``seq`` for ``num`` samples →
        LongTensor [num, len(seq)]. Known tokens after the first -1 are kept and fed through the KV cache.
        ``seed``: an int (sample k gets a seed derived from it, ``key`` and k) or one seed per sample. Rows are decoded
        ``max_inference_batch_size`` at a time; a sample does not depend on that split."""
        seq = [int(t) for t in seq]
        if -1 not in seq:
            return torch.tensor([seq] * num)
        first = seq.index(-1)
        if first == 0:
            raise TuwenError("a query must start with at least one known token")
        p = self.config.sampling.replace(**{k: v for k, v in (("top_k", top_k), ("top_p", top_p),
                                                               ("temperature", temperature)) if v is not None})
        if p.top_k == 0:  # CogView's "0 = off"
            p = p.replace(top_k=None)
        if p.top_p == 0:
            p = p.replace(top_p=None)
        seeds = ([image_seed(seed, key, k) for k in range(num)] if isinstance(seed, int)
                 else [int(s) for s in seed])
        if len(seeds) != num:
            raise TuwenError(f"give one seed per sample ({num}), got {len(seeds)}")
        dev = self.gpt.tok_emb.weight.device
        prefix = torch.tensor([seq[:first]], device=dev)
        forced = torch.tensor(seq[first:], device=dev)
        allowed = self.allowed_after(seq[:first])  # the span to fill is all image codes or all text
        outs = []
        mbz = max(1, int(max_inference_batch_size))
        with self.gpt.position_map(self.position_ids(seq)):
            for i in range(0, num, mbz):
                s = seeds[i:i + mbz]
                toks = sample_tokens_cached(self.gpt, prefix_ids=prefix.expand(len(s), -1), num_tokens=len(seq) - first,
                                            seeds=s, top_k=p.top_k, top_p=p.top_p, temperature=p.temperature,
                                            allowed=allowed, forced=forced, amp_dtype=amp_dtype,
                                            use_cuda_graph=False if self.offloaded else "auto")
                outs.append(torch.cat([prefix.expand(len(s), -1), toks], dim=1))
        return torch.cat(outs).cpu()

    # ============================================================================================ tasks
    def text2image(self, text: str, num: int = 1, *, return_codes: bool = False, **kw):
        """``[ROI1] text [BASE] [BOI1] [MASK]*1024`` → ``num`` images (PIL) or codes [num, 32, 32]."""
        kw.setdefault("key", text)
        out = self.fill(self.parse(TEMPLATES["text2image"], text), num, **kw)
        codes = out[:, -1024:].reshape(num, 32, 32)
        return codes if return_codes else self._need_vqvae().decode_to_pil(codes)

    def image2text(self, image, num: int = 1, **kw) -> list[str]:
        """``[BASE] [BOI1] [Image]img [EOI1] [ROI1] [MASK]*20`` → ``num`` captions (20 text tokens each)."""
        seq = self.vocab.parse_query("[BASE] [BOI1]") + self.encode_image(image) + \
            self.vocab.parse_query("[EOI1] [ROI1] [MASK]*20")
        out = self.fill(seq, num, **kw)
        return [self.vocab.decode_text(row[-20:].tolist()) for row in out]

    @torch.inference_mode()
    def post_selection_scores(self, text: str, images: Sequence, max_inference_batch_size: int = 12,
                              amp_dtype: torch.dtype | None = None) -> list[float]:
        """CogView's ``inverse_prompt_score``: for each image, sum over the text tokens of log p(token | image,
        text before it), with image codes excluded from the softmax (use the caption model)."""
        from ..runtime import autocast

        head = self.vocab.parse_query("[BASE] [BOI1]")
        tail = self.vocab.parse_query("[EOI1] [ROI1]") + self.vocab.encode_text(text)
        rows = [head + self.encode_image(im) + tail for im in images]
        if not rows:
            return []
        bot = len(rows[0]) - len(tail) + 1  # index of [ROI1]; the text follows it
        dev = self.gpt.tok_emb.weight.device
        scores = []
        with self.gpt.position_map(self.position_ids(rows[0])), autocast(dev, amp_dtype):
            for i in range(0, len(rows), max(1, max_inference_batch_size)):
                x = torch.tensor(rows[i:i + max_inference_batch_size], device=dev)
                logits = self.gpt(x, logits_start=bot).float()[:, :-1]  # predicts x[:, bot+1:]
                logits[..., : self.vocab.n_image] = float("-inf")
                logp = logits.log_softmax(-1).gather(2, x[:, bot + 1:, None])[..., 0]
                scores += logp.sum(-1).tolist()
        return scores

    def super_resolution(self, text: str, codes: torch.Tensor, *, seed: int = 0,
                         progress: Callable[[int, int], None] | None = None, **kw) -> torch.Tensor:
        """CogView's ``magnify``: a 32×32 code grid (+ its text) → a 64×64 grid by 9 overlapping windows
        (:data:`SR_WINDOWS`), each seeing 16×16 source codes and the target codes already filled."""
        codes = torch.as_tensor(codes).reshape(32, 32).cpu()
        v = self.vocab
        text_part = self.vocab.parse_query(f"[ROI1] {text} [BASE] [BOI1]")
        midfix = [v["[EOI1]"], v["[ROI2]"], v["[POS0]"], v["[BASE]"], v["[BOI2]"]]
        big = torch.full((64, 64), -1, dtype=torch.long)
        for n, (i, j, src, dst) in enumerate(sr_windows(32)):
            seq = text_part + codes[src].reshape(-1).tolist() + midfix + big[dst].reshape(-1).tolist()
            out = self.fill(seq, 1, seed=[image_seed(seed, f"sr{i}{j}", 0)], **kw)[0]
            rows = dst[0].stop - dst[0].start
            big[dst] = out[len(seq) - rows * 32:].view(rows, 32)
            if progress is not None:
                progress(n + 1, len(SR_WINDOWS))
        return big
