import pytest

from mtnlg import cli
from mtnlg.cli import main

pytestmark = pytest.mark.unit

STEPS = ("extract", "tokenize", "train", "fuse", "reshard", "evaluate", "generate", "run", "compile", "job",
         "submit")


def test_help_lists_every_step(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    # each subcommand in the command list, followed by its one-line help (wrapped or not)
    flat = " ".join(out.split())
    for cmd in STEPS:
        assert f" {cmd} {cli.COMMANDS[cmd][1]}" in flat, cmd


def test_a_missing_subcommand_module_is_an_error_not_a_silent_gap(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("mtnlg.no_such_module", "never listed"))
    with pytest.raises(ModuleNotFoundError, match="mtnlg.no_such_module"):
        cli.build_parser()


def test_overrides_may_follow_options(capsys):
    # Options between overrides: the trailing key=value must still reach the config.
    rc = main(["train", "--recipe", "debug", "train.steps=3", "--print-config", "train.log_every=7"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "log_every: 7" in out


def test_config_errors_exit_2_and_name_the_key(capsys):
    assert main(["train", "--recipe", "debug", "train.setps=3", "--print-config"]) == 2
    assert "train.setps" in capsys.readouterr().err


def test_unknown_option_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "-o", str(tmp_path / "x.yaml"), "--bogus"])
    assert e.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert err.startswith("usage: mtnlg") and err.endswith("mtnlg: error: unrecognized arguments: --bogus\n"), err
    assert not (tmp_path / "x.yaml").exists()
