"""docs/your_own_data.md, followed literally: its python blocks run in order in one namespace (as a user pasting them
into one session would), and each bash block's ``mmer-ext`` commands run, as written, after the python block before it,
in the same working directory."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mmer_ext.cli import main
from mmer_ext.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "your_own_data.md"


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in re.findall(r"^```(\w+)\n(.*?)^```$", text, re.S | re.M)]


def test_readme_links_the_guide():
    assert "(docs/your_own_data.md)" in (REPO / "README.md").read_text()


def test_guide_has_code_for_every_data_kind():
    text = GUIDE.read_text()
    blocks = _blocks(text)
    assert [lang for lang, _ in blocks] == ["python", "bash"] * 3
    commands = " ".join(body for lang, body in blocks if lang == "bash")
    for spec in ("cache:my_utterances", "mmsa-cache:my_sequences", "dialogues:my_dialogues"):
        assert f"--data {spec}" in commands


@pytest.mark.timeout(1800)
def test_follow_the_guide(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__guide__"}
    ran = []
    for lang, body in _blocks(GUIDE.read_text()):
        if lang == "python":
            exec(compile(body, str(GUIDE), "exec"), namespace)  # noqa: S102 - our own documentation
            continue
        for line in body.splitlines():
            if not line.strip():
                continue
            argv = shlex.split(line)
            assert argv[0] == "mmer-ext", line
            code = main(argv[1:])
            out, err = capsys.readouterr()
            assert code == 0, f"{line}\n{out}\n{err}"
            ran.append((argv[1], out))
    assert [command for command, _ in ran] == ["train", "evaluate"] * 3

    # What the guide wrote is what the sources read back.
    utterances = load_dataset("cache:my_utterances")
    assert {k: len(v) for k, v in utterances.items()} == {"train": 84, "val": 12, "test": 24}
    assert tuple(utterances["train"].dims) == (12, 10, 16)
    sequences = load_dataset("mmsa-cache:my_sequences")
    assert {k: len(v) for k, v in sequences.items()} == {"train": 48, "val": 16, "test": 16}
    dialogues = load_dataset("dialogues:my_dialogues")
    assert {k: len(v) for k, v in dialogues.items()} == {"train": 16, "val": 4, "test": 4}

    for run in ("my-mmin", "my-imder", "my-mmgcn"):
        assert (tmp_path / "runs" / run / "model.safetensors").is_file(), run
    # evaluate printed the per-condition table (utterances, dialogues) and the missing-rate sweep (sequences).
    evaluations = [out for command, out in ran if command == "evaluate"]
    assert "{a,v,l}" in evaluations[0] and "{a,v,l}" in evaluations[2]
    assert "MR=0.3" in evaluations[1] and "MR=0.7" in evaluations[1]
