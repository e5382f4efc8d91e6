import argparse
import json
import re

import pytest

from training import cli
from training.cli import evaluate_parser, main, train_parser

FLAGS = ["--dataset", "--data", "--arch", "--latent-dim", "--hidden", "--likelihood", "--epochs", "--batch-size",
         "--lr", "--beta", "--warmup-epochs", "--seed", "--device", "--name", "--output", "--resume",
         "--label-column"]


def test_help_documents_every_flag():
    text = train_parser().format_help()
    for flag in FLAGS:
        assert re.search(rf"{flag}\b.*\n?.*\S", text), flag
    assert "evaluate" in text
    assert "--samples" in evaluate_parser().format_help()


PARSERS = [getattr(cli, name) for name in dir(cli) if name.endswith("_parser")]


@pytest.mark.parametrize("make", PARSERS, ids=lambda f: f.__name__)
def test_every_flag_has_help_and_one_default(make):
    parser = make()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help"
        shown = formatter._expand_help(action) if action.help else ""
        assert shown.count("default") <= 1, f"{parser.prog} {action.option_strings}: {shown}"


def test_vae_serve_help_lists_every_setting(capsys):
    from service.__main__ import main as serve_main
    from service.settings import Settings

    with pytest.raises(SystemExit) as done:
        serve_main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"VAE_{name.upper()} " in text, name
    assert "--port" in text and "--host" in text
    with pytest.raises(SystemExit) as done:
        serve_main(["--bogus"])
    assert done.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--dataset", "csv"], "needs --data PATH"),
    (["--dataset", "csv", "--data", "/nonexistent.csv"], "data file not found"),
    (["--dataset", "mnist", "--data", "/nonexistent"], "MNIST data not found"),
    (["--batch-size", "5000"], "fewer than the batch size 5000"),
    (["--dataset", "npy", "--data", "/nonexistent.npy", "--arch", "conv"], "not found"),
])
def test_errors_are_clear_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_flag_values_are_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["--hidden", "a,b"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_evaluate_reports_elbo_and_importance_weighted_nll(tiny_model, capsys):
    assert main(["evaluate", str(tiny_model), "--samples", "20", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 270 and result["samples"] == 20
    # The importance-weighted bound is tighter: -log p(x) <= negative ELBO (up to noise in the estimate).
    assert 0 < result["iw_nll"] <= result["negative_elbo"] + 0.5
    assert result["negative_elbo"] == pytest.approx(result["reconstruction"] + result["kl"], rel=1e-6)
