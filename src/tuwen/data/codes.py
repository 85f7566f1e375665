"""Pre-tokenized image codes: the output of ``tuwen vq tokenize`` and its reader ``CodeShards``.

A data set is a folder::

    meta.json            written last (by rank 0): grid, n_embed, dtype, count, shards, source tables, model
    shard-00000.npy      codes [n, h*w], uint16 (int32 when n_embed > 65535), rows in input order
    shard-00000.tsv      one line per row of the .npy: ``idx \\t text``
    shard-00000.json     written after the two files above: row range, count, bad rows, argument fingerprint

Shard *k* covers input rows ``[k*shard_size, (k+1)*shard_size)``; rows that cannot be used (bad base64, truncated
image, missing column) are skipped and listed as ``file:line: reason``. A shard is complete when its ``.json``
exists with the same fingerprint (same tables, model and options), so a rerun skips finished shards and redoes a
half-written one. Under ``torchrun`` rank *r* does shards r, r+world, …; rank 0 waits for all of them and writes
``meta.json`` last. Every file is written atomically (temporary name + rename).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import TuwenError
from ..hub import atomic_write, atomic_write_text
from .tables import BadRow, BadRowError, BadRowReport, RowDataset, RowSource, collate_skip_bad

FORMAT = "tuwen-codes"
VERSION = 1
META_NAME = "meta.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.(npy|tsv|json)$")
MAX_BAD_PER_SHARD = 50


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def code_dtype(n_embed: int) -> np.dtype:
    """uint16 while every code fits (n_embed ≤ 65535), else int32."""
    return np.dtype(np.uint16) if n_embed <= 65535 else np.dtype(np.int32)


def clean_field(s: Any) -> str:
    """A value safe for one TSV field: tabs and line breaks become spaces."""
    return str(s).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def file_signature(path: str | os.PathLike) -> dict:
    """Absolute path + size + mtime: cheap identity of an input file for resume checks."""
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"path": str(p)}


def plan_shards(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    if shard_size < 1:
        raise TuwenError("--shard_size must be ≥ 1")
    return [(s, min(s + shard_size, n_rows)) for s in range(0, n_rows, shard_size)]


# ----------------------------------------------------------------------------------------------- shard files

def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)
    atomic_write(path, write)


def write_shard(out_dir: Path, k: int, codes: np.ndarray, ids: Sequence[str], texts: Sequence[str],
                info: dict) -> None:
    """Write ``.npy`` and ``.tsv`` of shard k, then its ``.json`` (which marks it complete)."""
    if len(codes) != len(ids) or len(ids) != len(texts):
        raise ValueError("write_shard: codes, ids and texts differ in length")
    name = shard_name(k)
    _save_npy(out_dir / f"{name}.npy", codes)
    atomic_write_text(out_dir / f"{name}.tsv",
                      "".join(f"{clean_field(i)}\t{clean_field(t)}\n" for i, t in zip(ids, texts)))
    atomic_write_text(out_dir / f"{name}.json", json.dumps({**info, "count": len(codes)}, ensure_ascii=False) + "\n")


def read_shard_info(out_dir: Path, k: int, fp: str | None = None) -> dict | None:
    """The ``.json`` of a complete shard (with matching fingerprint ``fp`` when given), else None."""
    name = shard_name(k)
    try:
        info = json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if fp is not None and info.get("fingerprint") != fp:
        return None
    if not (out_dir / f"{name}.npy").exists() or not (out_dir / f"{name}.tsv").exists():
        return None
    return info


# ----------------------------------------------------------------------------------------------- encoding rows

def image_transform(image_col: str, size: int, text_col: str | None = None,
                    id_col: str | None = "idx") -> Callable[[dict, int], dict]:
    """RowDataset transform: decode + resize/crop the image (uint8 HWC), keep id and text as strings."""
    from .images import load_image

    def transform(row: dict, i: int) -> dict:
        if image_col not in row:
            raise KeyError(image_col)
        img = load_image(row[image_col], size)
        idx = row[id_col] if id_col and id_col in row else i
        text = row.get(text_col, "") if text_col else ""
        return {"image": img, "idx": str(idx), "text": str(text)}

    return transform


def encode_batches(vq, source: RowSource, batches: Sequence[Sequence[int]], transform, *, size: int | None = None,
                   num_workers: int = 0, dtype=None, strict: bool = False, report: BadRowReport | None = None,
                   on_bad: Callable[[BadRow], None] | None = None) -> Iterator[tuple[dict, np.ndarray]]:
    """For each list of row indices in ``batches`` yield (batch dict with ``idx``/``text``/``bad_rows``, codes
    [n_good, h*w] as int64 numpy). ``size``: the image size ``transform`` produces (for the grid of an all-bad
    batch). Bad rows are added to ``report`` (``strict``: BadRowError at the first)."""
    import torch
    from torch.utils.data import DataLoader

    ds = RowDataset(source, transform)
    if not batches:
        return
    loader = DataLoader(ds, batch_sampler=[list(b) for b in batches], num_workers=num_workers,
                        collate_fn=collate_skip_bad, pin_memory=vq.device.type == "cuda")
    for batch in loader:
        for bad in batch["bad_rows"]:
            if strict:
                raise BadRowError(f"{bad} (--strict stops at the first bad row; without it bad rows are skipped)")
            if report is not None:
                report.add(bad)
            if on_bad is not None:
                on_bad(bad)
        if batch["size"]:
            codes = vq.encode(batch["image"], dtype=dtype)          # [n, h, w]
            codes = codes.flatten(1).to("cpu", torch.int64).numpy()
        else:
            h, w = vq.grid_size(size)
            codes = np.zeros((0, h * w), np.int64)
            batch.setdefault("idx", [])
            batch.setdefault("text", [])
        yield batch, codes


# ----------------------------------------------------------------------------------------------- tokenize

def _rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def _wait_for_shards(out_dir: Path, n_shards: int, fp: str, log: Callable[[str], None], poll: float = 1.0) -> None:
    """Rank 0's barrier: wait until every shard's ``.json`` with this fingerprint exists (a process-group barrier
    is used first when torch.distributed is initialised)."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    except ImportError:  # pragma: no cover
        pass
    last = time.monotonic()
    while True:
        missing = [k for k in range(n_shards) if read_shard_info(out_dir, k, fp) is None]
        if not missing:
            return
        if time.monotonic() - last > 60:
            log(f"rank 0: waiting for {len(missing)} shard(s) from the other ranks (e.g. {shard_name(missing[0])})")
            last = time.monotonic()
        time.sleep(poll)


def tokenize_source(vq, source: RowSource, out_dir: str | os.PathLike, *, image_col: str, text_col: str | None,
                    id_col: str | None = "idx", image_size: int | None = None, batch_size: int = 32,
                    shard_size: int = 10000, num_workers: int = 0, strict: bool = False, dtype=None,
                    fingerprint_extra: Any = None, meta_extra: dict | None = None, rank: int | None = None,
                    world: int | None = None, progress: bool | None = None,
                    log: Callable[[str], None] | None = None) -> dict | None:
    """Encode every row of ``source`` into a code-shard folder (see the module docstring).

    Returns the meta dict on rank 0 (None on other ranks). ``fingerprint_extra``: anything identifying the input
    and model (file signatures, model path) — shards made with a different fingerprint are redone.
    """
    log = log or (lambda m: print(m, file=sys.stderr))
    if rank is None or world is None:
        rank, world = _rank_world()
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TuwenError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    size = image_size or vq.config.resolution
    h, w = vq.grid_size(size)
    n_embed = vq.config.n_embed
    dt = code_dtype(n_embed)
    n_rows = len(source)
    shards = plan_shards(n_rows, shard_size)
    fp = fingerprint({"extra": fingerprint_extra, "rows": n_rows, "shard_size": shard_size, "size": size,
                      "image_col": image_col, "text_col": text_col, "id_col": id_col, "grid": [h, w],
                      "n_embed": n_embed, "dtype": str(dtype), "format": VERSION})
    if rank == 0 and (out / META_NAME).exists():
        try:
            old = json.loads((out / META_NAME).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("fingerprint") != fp:  # the folder is being rewritten: it is not a finished data set now
            (out / META_NAME).unlink()

    mine = list(range(rank, len(shards), world))
    todo, done = [], 0
    for k in mine:
        if read_shard_info(out, k, fp) is not None:
            done += 1
        else:
            todo.append(k)
    if done:
        log(f"rank {rank}: {done} shard(s) already complete, skipping them")

    transform = image_transform(image_col, size, text_col, id_col)
    batches, batch_shard = [], []
    for k in todo:
        s, e = shards[k]
        for b in range(s, e, batch_size):
            batches.append(range(b, min(b + batch_size, e)))
            batch_shard.append(k)
    n_batches_left = collections.Counter(batch_shard)

    pbar = None
    if progress is None:
        progress = sys.stderr.isatty()
    if progress and rank == 0:
        from tqdm import tqdm
        pbar = tqdm(total=sum(shards[k][1] - shards[k][0] for k in todo), desc="tokenize", unit="img")

    acc: dict[int, dict] = {}
    for (batch, codes), k in zip(encode_batches(vq, source, batches, transform, size=size, num_workers=num_workers,
                                                dtype=dtype, strict=strict), batch_shard):
        a = acc.setdefault(k, {"codes": [], "ids": [], "texts": [], "bad": [], "bad_count": 0})
        a["codes"].append(codes)
        a["ids"] += batch["idx"]
        a["texts"] += batch["text"]
        for bad in batch["bad_rows"]:
            a["bad_count"] += 1
            if len(a["bad"]) < MAX_BAD_PER_SHARD:
                a["bad"].append([bad.file, bad.line, bad.reason])
        if pbar is not None:
            pbar.update(len(codes) + len(batch["bad_rows"]))
        n_batches_left[k] -= 1
        if n_batches_left[k] == 0:
            a = acc.pop(k)
            arr = np.concatenate(a["codes"]) if a["codes"] else np.zeros((0, h * w), np.int64)
            write_shard(out, k, arr.astype(dt), a["ids"], a["texts"],
                        {"fingerprint": fp, "rows": list(shards[k]), "bad_rows": a["bad"],
                         "bad_count": a["bad_count"]})
    if pbar is not None:
        pbar.close()
    # shards whose every batch was empty cannot occur (a shard has ≥ 1 row), but keep the folder consistent anyway
    for k in todo:
        if read_shard_info(out, k, fp) is None:
            raise RuntimeError(f"tokenize: {shard_name(k)} was not written")

    if rank != 0:
        return None
    if world > 1:
        _wait_for_shards(out, len(shards), fp, log)
    # stale shard files from an earlier run with more shards
    for p in out.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and int(m.group(1)) >= len(shards):
            p.unlink()
    infos = [read_shard_info(out, k, fp) for k in range(len(shards))]
    total_bad = BadRowReport()
    for info in infos:
        for b in info["bad_rows"]:
            total_bad.add(BadRow(*b))
        total_bad.count += info["bad_count"] - len(info["bad_rows"])
    meta = {
        "format": FORMAT, "version": VERSION, "grid": [h, w], "seq_len": h * w, "n_embed": n_embed,
        "dtype": dt.name, "count": sum(i["count"] for i in infos), "image_size": size,
        "num_shards": len(shards), "shard_size": shard_size,
        "shards": [{"name": shard_name(k), "count": i["count"], "rows": i["rows"]} for k, i in enumerate(infos)],
        "rows_in": n_rows, "bad_rows": total_bad.count, "fingerprint": fp,
        **(meta_extra or {}),
    }
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    meta["_report"] = total_bad
    return meta


# ----------------------------------------------------------------------------------------------- reader

class CodeShards:
    """Map-style dataset over a tokenized folder: ``ds[i] -> {"idx": str, "text": str, "codes": LongTensor[h*w]}``.

    Codes are memory-mapped; ``idx``/``text`` are read by byte offset from the shard's TSV. Safe to use with
    DataLoader workers (file handles and maps are reopened in each process).
    """

    def __init__(self, path: str | os.PathLike, max_open: int = 32):
        self.path = Path(path).expanduser()
        meta_path = self.path / META_NAME
        if not meta_path.exists():
            hint = (" (shard files are there: the tokenize run has not finished; rerun the same "
                    "tuwen vq tokenize command to complete it)") if any(self.path.glob("shard-*.npy")) else ""
            raise TuwenError(f"{self.path}: not a tokenized data set, no {META_NAME}{hint}")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TuwenError(f"{meta_path}: not valid JSON ({e})") from None
        if self.meta.get("format") != FORMAT or int(self.meta.get("version", 0)) > VERSION:
            raise TuwenError(f"{meta_path}: not a {FORMAT} v{VERSION} meta file")
        self.grid = tuple(self.meta["grid"])
        self.seq_len = int(self.meta["seq_len"])
        self.n_embed = int(self.meta["n_embed"])
        self.names = [s["name"] for s in self.meta["shards"]]
        counts = [int(s["count"]) for s in self.meta["shards"]]
        self._cum = np.cumsum([0] + counts)
        self.max_open = max_open
        for name in self.names:
            for ext in ("npy", "tsv"):
                if not (self.path / f"{name}.{ext}").exists():
                    raise TuwenError(f"{self.path}: {name}.{ext} is missing; rerun tuwen vq tokenize with the same "
                                     f"arguments to rebuild it")
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._codes: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._offsets: dict[int, np.ndarray] = {}
        self._files: collections.OrderedDict[int, Any] = collections.OrderedDict()

    def __getstate__(self):
        st = self.__dict__.copy()
        for k in ("_codes", "_offsets", "_files"):
            st[k] = type(st[k])()
        return st

    def __len__(self) -> int:
        return int(self._cum[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        k = int(np.searchsorted(self._cum, i, side="right") - 1)
        return k, i - int(self._cum[k])

    def _shard_codes(self, k: int) -> np.ndarray:
        if self._pid != os.getpid():
            self._reset()
        arr = self._codes.get(k)
        if arr is None:
            p = self.path / f"{self.names[k]}.npy"
            arr = np.load(p, mmap_mode="r")
            want = int(self._cum[k + 1] - self._cum[k])
            if arr.ndim != 2 or arr.shape != (want, self.seq_len):
                raise TuwenError(f"{p}: shape {arr.shape}, but {META_NAME} says ({want}, {self.seq_len}); the folder "
                                 f"was modified — rerun tuwen vq tokenize")
            self._codes[k] = arr
            if len(self._codes) > self.max_open:
                self._codes.popitem(last=False)
        else:
            self._codes.move_to_end(k)
        return arr

    def _line(self, k: int, j: int) -> str:
        if self._pid != os.getpid():
            self._reset()
        p = self.path / f"{self.names[k]}.tsv"
        offs = self._offsets.get(k)
        if offs is None:
            data = np.fromfile(p, dtype=np.uint8)
            offs = np.concatenate([[0], np.flatnonzero(data == 10) + 1]).astype(np.int64)
            if len(offs) - 1 != int(self._cum[k + 1] - self._cum[k]):
                raise TuwenError(f"{p}: {len(offs) - 1} lines, but {META_NAME} says {int(self._cum[k + 1] - self._cum[k])}"
                                 f"; rerun tuwen vq tokenize")
            self._offsets[k] = offs
        f = self._files.get(k)
        if f is None:
            f = self._files[k] = open(p, "rb")
            if len(self._files) > self.max_open:
                self._files.popitem(last=False)[1].close()
        f.seek(int(offs[j]))
        return f.read(int(offs[j + 1] - offs[j])).decode("utf-8").rstrip("\n")

    def codes(self, i: int) -> np.ndarray:
        """Codes of row i as a numpy array [h*w] (int64)."""
        k, j = self._locate(i)
        return np.asarray(self._shard_codes(k)[j], dtype=np.int64)

    def text(self, i: int) -> tuple[str, str]:
        """(idx, text) of row i."""
        k, j = self._locate(i)
        idx, _, text = self._line(k, j).partition("\t")
        return idx, text

    def __getitem__(self, i: int) -> dict:
        import torch

        idx, text = self.text(i)
        return {"idx": idx, "text": text, "codes": torch.from_numpy(self.codes(i))}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._reset()
