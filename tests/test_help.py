"""Every help text says what is true (issue 12 item 7): each flag that any ``--help`` mentions is a flag of that
command (or of the command the sentence names: ``tuwen vq tokenize --model``, EasyNLP's ``--mode=...``), and
argparse accepts it as written; every command's --help runs."""
import argparse
import re

import pytest

from tuwen.cli import SUBCOMMANDS, build_parser, main
from tuwen.cli import easynlp

FLAG = re.compile(r"(?<![\w/-])(--[A-Za-z][\w-]*)")
GLOBAL = {"--max_image_pixels", "--local_rank", "--local-rank", "--help", "--version"}
# flags of another program / of the training run a help text talks about (command, flag): why
ELSEWHERE = {("tuwen export", "--checkpoint_dir"): "the training run's folder (tuwen --mode=train)"}


def all_parsers():
    """(name, parser) for tuwen, every subcommand (recursively) and the EasyNLP entry point."""
    out = []

    def walk(name, p):
        out.append((name, p))
        for act in p._actions:
            if isinstance(act, argparse._SubParsersAction):
                for sub_name, sub in act.choices.items():
                    walk(f"{name} {sub_name}", sub)

    walk("tuwen", build_parser())
    out.append(("tuwen --mode", easynlp.build_parser()))
    return out


PARSERS = all_parsers()
BY_NAME = {n: p for n, p in PARSERS}


def owners(text: str, pos: int, own: str) -> list[argparse.ArgumentParser]:
    """The parsers a flag mentioned at ``pos`` may belong to: its own, the commands named earlier in its sentence
    (``tuwen X [Y] ... --flag``), and the EasyNLP entry point when the sentence is about ``--mode``/``--app_name``."""
    start = max(text.rfind(". ", 0, pos), text.rfind("\n\n", 0, pos), text.rfind(";", 0, pos), 0)
    sentence = text[start:pos]
    cands = [BY_NAME[own]]
    for m in re.finditer(r"tuwen ([a-z][\w-]*)(?: ([a-z][\w-]*))?", sentence):
        for n in (f"tuwen {m.group(1)} {m.group(2)}", f"tuwen {m.group(1)}"):
            if n in BY_NAME:
                cands.append(BY_NAME[n])
    if "--mode" in sentence or "--app_name" in sentence or "EasyNLP" in sentence:
        cands.append(BY_NAME["tuwen --mode"])
    return cands


@pytest.mark.parametrize("name", [n for n, _ in PARSERS])
def test_every_flag_a_help_mentions_exists(name):
    p = BY_NAME[name]
    text = p.format_help()
    wrong = []
    for m in FLAG.finditer(text):
        flag = m.group(1).rstrip("-")
        if flag in GLOBAL or flag in ("--mode", "--app_name") or (name, flag) in ELSEWHERE:
            continue
        if re.search(r"(torchrun|python -m torch\.distributed\.launch)\s+$", text[max(0, m.start() - 40):m.start()]):
            continue  # the launcher's own flags
        if not any(flag in q._option_string_actions for q in owners(text, m.start(), name)):
            wrong.append(f"{flag} (…{text[max(0, m.start() - 60):m.end()]!r})")
    assert not wrong, f"{name} --help mentions flag(s) it does not have: " + "; ".join(wrong)


@pytest.mark.parametrize("name", [n for n, _ in PARSERS])
def test_every_flag_parses_as_written(name):
    """Each option string of the command is accepted by argparse exactly as its help spells it (no abbreviation
    needed, none allowed)."""
    p = BY_NAME[name]
    assert p.allow_abbrev is False, f"{name}: allow_abbrev must be False"
    for act in p._actions:
        if isinstance(act, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        for opt in act.option_strings:
            value = [] if act.nargs == 0 else (["1"] * act.nargs if isinstance(act.nargs, int) else ["1"])
            if act.choices is not None and act.nargs != 0:
                value = [str(next(iter(act.choices)))] * len(value)
            positional_free = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
            positional_free._add_action(act)
            ns, rest = positional_free.parse_known_args([opt, *value])
            assert not rest, f"{name}: {opt} {value} not consumed: {rest}"


@pytest.mark.parametrize("cmd", sorted(SUBCOMMANDS))
def test_every_command_help_runs(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: tuwen")


def test_output_dir_help_promises_what_predict_writes():
    h = BY_NAME["tuwen --mode"].format_help()
    assert "index.html" not in h.split("--output_dir", 1)[1].split("--rerank", 1)[0]
