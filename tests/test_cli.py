"""The command line: every command parses, and errors map to exit codes in one place."""

import pytest

from qkweights.cli import COMMANDS, build_parser, main


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
