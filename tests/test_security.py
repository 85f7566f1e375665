"""No code from model files: TorchScript archives are read without torch.jit.load, and nothing in tuwen calls
``torch.jit.load``, ``pickle.load`` or ``torch.load`` without ``weights_only=True``."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from tuwen.convert.torchscript import is_torchscript, read_torchscript_state_dict
from tuwen.errors import TuwenError

SRC = Path(__file__).resolve().parents[1] / "src" / "tuwen"


# ----------------------------------------------------------------------------------------------- archives

class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(3, 4)
        self.ln = torch.nn.LayerNorm(4)
        self.register_buffer("buf", torch.arange(2.0))
        self.mask = torch.ones(2, 2)        # a plain tensor attribute: not in state_dict()

    def forward(self, x):
        return self.ln(self.l(x)) + self.buf.sum() + self.mask.sum()


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _Block(), _Block()
        self.head = torch.nn.Linear(4, 2, bias=False).half()
        self.scale = torch.nn.Parameter(torch.tensor([2.5]))
        self.register_buffer("ids", torch.arange(5))

    def forward(self, x):
        return self.head((self.a(x) + self.b(x)).half()).float() * self.scale + self.ids.sum()


class _Evil(torch.nn.Module):
    """Its TorchScript ``__setstate__`` creates a file (``torch.from_file(..., shared=True)``) when loaded."""

    def __init__(self, target: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.target = target

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]):
        t = torch.from_file(state[1], True, 16)
        self.w = state[0]
        self.target = state[1]
        self.training = bool(t.numel() > 0) and state[2]


class _EvilCLIP(torch.nn.Module):
    """A CLIP-shaped archive (``visual.*`` tensors that load) with a malicious sub-module."""

    def __init__(self, visual: torch.nn.Module, target: str):
        super().__init__()
        self.visual = visual
        self.hook = _Evil(target)

    def forward(self, x):
        return self.visual(x) + self.hook(x).sum()


def save_archive(module: torch.nn.Module, path: Path, trace_input=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sm = torch.jit.trace(module, trace_input) if trace_input is not None else torch.jit.script(module)
    sm.save(str(path))
    return path


def evil_archive(path: Path, target: Path) -> Path:
    return save_archive(_Evil(str(target)), path)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_archive_weights_equal_torch_jit_load(tmp_path, how):
    torch.manual_seed(0)
    path = save_archive(_Net().eval(), tmp_path / "net.pt", torch.randn(2, 3) if how == "trace" else None)
    assert is_torchscript(path)
    want = torch.jit.load(str(path)).state_dict()   # a file this test made itself
    got = read_torchscript_state_dict(path)
    assert list(got) == list(want) or set(got) == set(want)
    assert "a.mask" not in got and "a.buf" in got and "ids" in got
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_malicious_archive_runs_nothing(tmp_path):
    target = tmp_path / "PWNED"
    path = evil_archive(tmp_path / "evil.pt", target)
    with pytest.raises(TuwenError, match="custom __setstate__|no parameters"):
        read_torchscript_state_dict(path)
    assert not target.exists()
    # the same file does run code under torch.jit.load: the test's archive is a real exploit
    torch.jit.load(str(path))
    assert target.exists()


def test_malicious_submodule_is_skipped_and_the_rest_reads(tmp_path):
    target = tmp_path / "PWNED"
    inner = torch.nn.Linear(2, 2)
    path = save_archive(_EvilCLIP(inner, str(target)), tmp_path / "clip.pt")
    sd = read_torchscript_state_dict(path)
    assert not target.exists()
    assert set(sd) == {"visual.weight", "visual.bias"}
    assert torch.equal(sd["visual.weight"], inner.weight)


def test_refuses_other_globals(tmp_path):
    import pickle
    import zipfile

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "PWNED"),))

    with zipfile.ZipFile(tmp_path / "x.pt", "w") as z:
        z.writestr("x/data.pkl", pickle.dumps(Boom(), protocol=2))
        z.writestr("x/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(TuwenError, match="refusing to load"):
        read_torchscript_state_dict(tmp_path / "x.pt")
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------------------------- the source

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = ""
            if isinstance(f, ast.Attribute):
                v = f.value
                owner = v.attr if isinstance(v, ast.Attribute) else v.id if isinstance(v, ast.Name) else ""
            yield node, owner, name


def test_no_unsafe_loaders_in_the_source():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            if owner == "jit" and name == "load":
                bad.append(f"{where}: torch.jit.load")
            if owner in ("pickle", "cPickle", "dill") and name in ("load", "loads"):
                bad.append(f"{where}: pickle.{name}")
            if owner == "torch" and name == "load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{where}: torch.load without weights_only=True")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------------------------- every path

@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    from tuwen.cli import main

    d = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--out", str(d), "--size", "32", "--n", "40", "--workers", "0"]) == 0
    from tuwen.text import TextTokenizer
    TextTokenizer.train(["红色的圆形", "蓝色的正方形"], vocab_size=100).save_pretrained(d / "vocab")
    return d


def _evil_clip_archive(path: Path, target: Path) -> Path:
    return save_archive(_EvilCLIP(torch.nn.Linear(2, 2), str(target)), path)


SCHEMA = "--input_schema=idx:str:1,text:str:1,imgbase64:str:1"


@pytest.mark.parametrize("app,udp_key", [
    ("image2text_generation", "vit_ckpt_path"),   # a path
    ("image2text_generation", "name"),            # EasyNLP's vit_ckpt_path=ViT-L/14 under $TUWEN_HOME/models
    ("clip", "vit_ckpt_path"),
    ("clip", "bert_ckpt_path"),
    ("clip", "cnclip_ckpt_path"),
])
def test_malicious_archive_through_every_command_path(tables, tmp_path, monkeypatch, capsys, app, udp_key):
    from tuwen.cli import main

    target = tmp_path / "PWNED"
    home = tmp_path / "home"
    if udp_key == "name":
        _evil_clip_archive(home / "models" / "ViT-L-14.pt", target)
        monkeypatch.setenv("TUWEN_HOME", str(home))
        udp = "vit_ckpt_path=ViT-L/14"
    else:
        evil = _evil_clip_archive(tmp_path / "evil.pt", target)
        udp = f"{udp_key}={evil}"
    if app == "clip" and udp_key != "vit_ckpt_path":
        udp += f" vocab={tables / 'vocab' / 'vocab.txt'}"
    seqs = (["--first_sequence=imgbase64", "--second_sequence=text"] if app != "clip" else
            ["--first_sequence=text", "--second_sequence=imgbase64"])
    rc = main(["--mode=train", f"--app_name={app}", f"--tables={tables / 'train.tsv'},{tables / 'val.tsv'}",
               SCHEMA, *seqs, f"--checkpoint_dir={tmp_path / 'ck'}", "--max_steps=1", "--data_threads=0",
               "--no_progress", f"--user_defined_parameters={udp} img_size=32"
               if app != "clip" else f"--user_defined_parameters={udp}"])
    err = capsys.readouterr().err
    assert not target.exists(), "the archive's code ran"
    assert rc == 2 and "Traceback" not in err, err
    assert "visual.weight" in err or "the visual.* tensors" in err, err   # the archive was read, and refused
