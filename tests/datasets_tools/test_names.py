"""File names with newlines or terminal escapes are printed escaped (repr-style) by both CLIs, one line each."""

import json

from data_helpers import shape
from datasets_tools.cli import main
from imglora.cli import main as imglora_main
from imglora.errors import ImgloraError, shown

NEWLINE, ESCAPE = "new\nline.png", "\x1b[31mred\x1b[0m.png"


def hostile_folder(root):
    root.mkdir()
    shape(seed=1).save(root / NEWLINE)
    (root / NEWLINE).with_suffix(".txt").write_text("a picture")
    (root / ESCAPE).write_bytes(b"not an image at all")  # an error, reported with its name
    (root / ESCAPE).with_suffix(".txt").write_text("a picture")
    (root / "we\nird").mkdir()
    shape(seed=2).save(root / "we\nird" / "a.png")  # no caption: reported
    return root


def no_raw_controls(text: str) -> None:
    assert "\x1b" not in text and "new\nline" not in text and "we\nird" not in text, text


def test_shown_is_repr_only_where_needed():
    assert shown("/data/plain name.png") == "/data/plain name.png"
    assert shown("/data/" + NEWLINE) == repr("/data/" + NEWLINE)
    assert shown("caf\udce9.png") == repr("caf\udce9.png")  # a non-UTF-8 name cannot even be printed raw
    line = ImgloraError("bad\x1b[2J thing", "fix\nit", path="a\nb").line()
    assert line == "'a\\nb': bad\\x1b[2J thing — fix\\nit" and line.isprintable()


def test_check_stats_and_resize_print_escaped_names(tmp_path, capsys):
    root = hostile_folder(tmp_path / "d")
    assert main(["check", str(root), "--quiet", "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert {p["path"].rsplit("/", 1)[-1] for p in problems} >= {ESCAPE, "a.png"}
    assert main(["check", str(root), "--quiet"]) == 1
    out = capsys.readouterr()
    no_raw_controls(out.out + out.err)
    lines = out.out.splitlines()
    assert len(lines) == len(problems)  # one line per problem, none broken in two
    assert any(line.startswith(repr(str(root / ESCAPE)) + ": error: not a supported image") for line in lines)
    assert any(line.startswith(repr(str(root / "we\nird" / "a.png")) + ": error: missing caption") for line in lines)

    assert main(["stats", str(root), "--quiet"]) == 0
    out = capsys.readouterr()
    no_raw_controls(out.out + out.err)
    assert f"skipped {repr(str(root / ESCAPE))}: not a supported image" in out.out

    assert main(["resize", str(root), str(tmp_path / "out\x1b[0m"), "--quiet"]) == 0
    out = capsys.readouterr()
    no_raw_controls(out.out + out.err)
    assert f"skipped {repr(str(root / ESCAPE))}: not a supported image" in out.err
    assert (tmp_path / "out\x1b[0m" / NEWLINE).is_file()  # the name itself is kept as it is


def test_imglora_errors_name_the_file_escaped(tmp_path, capsys):
    missing = tmp_path / "lora\n\x1b[31m.safetensors"
    assert imglora_main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    no_raw_controls(err)
    assert err.count("\n") == 1 and err.startswith(f"imglora: {repr(str(missing))}: cannot read")
    out = tmp_path / "taken\n.png"
    out.write_bytes(b"x")
    assert imglora_main(["generate", "--prompt", "a", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and repr(str(out)) in err


def test_every_command_reports_an_unreadable_folder(tmp_path, monkeypatch, capsys):
    import os

    root = tmp_path / "d"
    for sub in ("ok", "locked"):
        (root / sub).mkdir(parents=True)
        shape(seed=len(sub)).save(root / sub / "a.png")
        (root / sub / "a.txt").write_text("a picture")
    real = os.scandir

    def scandir(path="."):  # tests run as root, which chmod cannot lock out
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    said = f"{root / 'locked'}: unreadable folder (Permission denied)"
    assert main(["check", str(root), "--quiet"]) == 1
    assert f"{root / 'locked'}: warning: unreadable folder (Permission denied) — check its permissions" in \
        capsys.readouterr().out
    for argv in (["stats", str(root), "--quiet"], ["resize", str(root), str(tmp_path / "r"), "--quiet"],
                 ["convert", str(root), "--to", "jsonl", "--out", str(tmp_path / "c")],
                 ["convert", str(root), "--to", "jsonl"], ["caption", str(root), "--trigger", "x"]):
        assert main(argv) == 0, argv
        err = capsys.readouterr().err
        assert f"folder {root / 'locked'}: skipped, unreadable folder (Permission denied)" in err or \
            f"skipped {said}" in err, (argv, err)
