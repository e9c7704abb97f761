import pytest

from mtnlg.cli import main


def test_help_lists_every_step(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("extract", "tokenize", "train", "fuse", "reshard", "evaluate", "generate", "run", "compile",
                "pytorchjob"):
        assert cmd in out


def test_overrides_may_follow_options(capsys):
    # Options between overrides: the trailing key=value must still reach the config.
    rc = main(["train", "--recipe", "debug", "train.steps=3", "--print-config", "train.log_every=7"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "log_every: 7" in out


def test_config_errors_exit_2_and_name_the_key(capsys):
    assert main(["train", "--recipe", "debug", "train.setps=3", "--print-config"]) == 2
    assert "train.setps" in capsys.readouterr().err


def test_unknown_option_is_an_error():
    with pytest.raises(SystemExit):
        main(["compile", "-o", "x.yaml", "--bogus"])
