"""The command line: every command parses, and errors map to exit codes in one place."""

from pathlib import Path

import pytest
from conftest import MODELS

import qkweights.cli.o3
import qkweights.cli.profile
from qkweights.cli import COMMANDS, build_parser, main
from qkweights.cli.common import parse_indices
from qkweights.errors import InputError


@pytest.mark.parametrize("name", [name for name, _ in COMMANDS])
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m qkweights {name}")


def test_top_level_help_lists_every_command():
    text = build_parser().format_help()
    assert all(name in text for name, _ in COMMANDS)


def test_unknown_command_and_bad_option_exit_2(capsys):
    for argv in (["nope"], ["profile", "--no-such-option"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    capsys.readouterr()


def test_specs_lists_every_family(capsys):
    assert main(["specs"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("hf-bert ") and "google/vit-base-patch16-224" in out


IMAGE = Path(__file__).parents[1] / "qkweights" / "demo_model" / "demo.jpg"


@pytest.mark.parametrize(
    "argv, where, problem",
    [
        (
            ["profile", "{vit}", "--out", "{file}", "--no-plots"],
            "{file}",
            "is a file, not a folder; remove it or choose another output folder",
        ),
        (["profile", "{vit}", "--out", "{file}/sub", "--no-plots"], "{file}/sub", "{file} is a file, not a folder"),
        (["diff", "{vit}", "{vit}", "--out", "{file}", "--no-plots"], "{file}", "is a file, not a folder"),
        (["compare", "{vit}", "--out", "{file}"], "{file}", "is a file, not a folder"),
        (
            ["maps", "{vit}", str(IMAGE), "--layer", "0", "--head", "0", "--out", "{file}"],
            "{file}",
            "is a file, not a folder",
        ),
        (
            ["check", "{vit}", "--baseline", "{vit}/config.json", "--report", "{tmp}"],
            "{tmp}",
            "is a folder; give a file name",
        ),
        (
            ["check", "{vit}", "--baseline", "{vit}/config.json", "--junit", "{file}/j.xml"],
            "{file}",
            "is a file, not a folder",
        ),
        (["make-o3", "{file}", "--n", "1"], "{file}", "is a file; give the path of a new folder (or of an empty one)"),
        (["make-o3", "{file}/o3", "--n", "1"], "{file}", "is a file, not a folder"),
    ],
)
def test_every_output_path_error_is_one_line_naming_the_path(tmp_path, capsys, argv, where, problem):
    names = {"vit": MODELS / "vit", "file": tmp_path / "afile", "tmp": tmp_path}
    (tmp_path / "afile").write_text("not a folder")
    assert main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qkweights: error: {where.format(**names)}: {problem.format(**names)}")
    assert err.count("\n") == 1 and "internal error" not in err


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (qkweights.cli.profile, ["profile", "m"], "qkweights: interrupted\n"),
        (
            qkweights.cli.o3,
            ["o3", "m", "d"],
            "qkweights: interrupted; re-run the same command to resume where it stopped\n",
        ),
    ],
)
def test_interrupted_says_whether_a_rerun_resumes(monkeypatch, capsys, module, argv, message):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err == message


def test_out_of_range_index_says_of_what():
    with pytest.raises(InputError, match=r"^--modes '0-12': mode 12 is out of range: a head has 8 modes \(0–7\)$"):
        parse_indices("0-12", 8, "modes")
    with pytest.raises(InputError, match=r"^--layers '3': layer 3 is out of range: the model has 1 layer \(0–0\)$"):
        parse_indices("3", 1, "layers")


@pytest.mark.parametrize("command", ["top-images", "o3", "same-object"])
def test_image_analyses_refuse_an_out_that_is_a_file(tmp_path, capsys, command):
    from qkweights.datasets.synthetic_o3 import make_o3

    data = make_o3(tmp_path / "data", n=2, seed=1, size=(48, 48), instances=True)
    (tmp_path / "afile").write_text("not a folder")
    source = data / "images" if command == "top-images" else data
    assert main([command, str(MODELS / "vit"), str(source), "--out", str(tmp_path / "afile"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qkweights: error: {tmp_path / 'afile'}: is a file, not a folder")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "text, words",
    [
        ("part=encoder; fold_ln=True; revision=…", "--part encoder; --fold-ln; --revision"),
        ("spec folder x (from spec_dir) does not exist", "spec folder x (from --spec-dir) does not exist"),
        ("give tol_ov, or tol_symmetry.", "give --tol-ov, or --tol-symmetry."),
        # not an option: a path, a quoted key, a longer name, a file name, an English word without an underscore
        ("/tmp/spec_dir/a.toml 'max_images' my_fold_ln spec_dir.toml the top heads", None),
    ],
)
def test_flag_words(text, words):
    from qkweights.cli.words import flag_words

    assert flag_words(text) == (text if words is None else words)


def test_a_missing_spec_folder_is_named_by_its_flag(tmp_path, capsys):
    assert main(["specs", "--spec-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"qkweights: error: spec folder {tmp_path / 'none'} (from --spec-dir) does not exist or is not a folder; "
        "give a folder of .toml spec files\n"
    )
