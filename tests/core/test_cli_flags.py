"""Count and time flags of ``veil demo``, ``veil serve`` and ``veil worker`` refuse values that silently did
nothing or were changed behind the user's back (one line, status 2, from argparse: nothing is trained, loaded
or started); ``veil demo --out`` names a folder it cannot write before it trains; the admin commands' errors
say ``error:`` and name the worker by the address given."""

from __future__ import annotations

import pytest

from veil.cli import main


@pytest.mark.parametrize("argv, flag", [
    (["demo", "--epochs", "0"], "--epochs"),  # trained nothing, plotted empty curves and exited 0
    (["demo", "--epochs", "-1"], "--epochs"),
    (["demo", "--epochs", "ten"], "--epochs"),
    (["serve", "m.pt", "--auto", "1,2,3", "--num-requests", "-3"], "--num-requests"),  # served 0, exited 0
    (["serve", "m.pt", "--auto", "1,2,3", "--num-requests", "0"], "--num-requests"),
    (["serve", "m.pt", "--auto", "1,2,3", "--max-batch", "0"], "--max-batch"),  # lifted the batch cap
    (["serve", "m.pt", "--auto", "1,2,3", "--max-batch-rows", "abc"], "--max-batch-rows"),
    (["serve", "m.pt", "--auto", "1,2,3", "--fetch-timeout", "-5"], "--fetch-timeout"),
    (["serve", "m.pt", "--auto", "1,2,3", "--fetch-timeout", "nan"], "--fetch-timeout"),
    (["worker", "--id", "a", "--max-memory-mb", "-5"], "--max-memory-mb"),  # a typo left the memory cap off
    (["worker", "--id", "a", "--max-memory-mb", "inf"], "--max-memory-mb"),
    (["worker", "--id", "a", "--review-failures", "-1"], "--review-failures"),  # was raised to 1 silently
    (["worker", "--id", "a", "--auth-free-failures", "-2"], "--auth-free-failures"),  # was raised to 0
    (["worker", "--id", "a", "--dp-max-bins", "0"], "--dp-max-bins"),
    (["worker", "--id", "a", "--audit-max-rows", "-5"], "--audit-max-rows"),
    (["worker", "--id", "a", "--max-sessions-per-principal", "0"], "--max-sessions-per-principal"),
    (["worker", "--id", "a", "--max-sessions-per-client", "-1"], "--max-sessions-per-client"),
])
def test_bad_counts_and_times_are_one_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert len(err.strip().splitlines()) == 1 and f"argument {flag}:" in err, err
    assert "_positive" not in err and "parse" not in err  # the type function's name is not the message


def test_good_counts_and_times_still_parse(monkeypatch):
    import veil.cli as cli

    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "demo", (*cli.COMMANDS["demo"][:2], lambda a: seen.update(vars(a)) or 0))
    monkeypatch.setitem(cli.COMMANDS, "serve", (*cli.COMMANDS["serve"][:2], lambda a: seen.update(vars(a)) or 0))
    monkeypatch.setitem(cli.COMMANDS, "worker", (*cli.COMMANDS["worker"][:2], lambda a: seen.update(vars(a)) or 0))
    assert main(["demo", "--epochs", "3"]) == 0 and seen["epochs"] == 3
    assert main(["serve", "m.pt", "--auto", "1,2,3", "--num-requests", "2", "--max-batch", "4",
                 "--fetch-timeout", "0"]) == 0
    assert (seen["num_requests"], seen["max_batch"], seen["fetch_timeout"]) == (2, 4, 0.0)
    assert main(["worker", "--id", "a", "--max-memory-mb", "0"]) == 0 and seen["max_memory_mb"] == 0.0
    assert main(["worker", "--id", "a", "--review-failures", "1", "--auth-free-failures", "0"]) == 0
    assert (seen["review_failures"], seen["auth_free_failures"]) == (1, 0)


def test_demo_refuses_an_unwritable_out_folder_before_training(tmp_path, monkeypatch, capsys):
    import veil.demo

    trained = []
    monkeypatch.setattr(veil.demo, "run_demo", lambda **kw: trained.append(kw) or 0)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "plots")]) == 2
    err = capsys.readouterr().err
    assert not trained and err.startswith("veil demo: error: ") and len(err.strip().splitlines()) == 1, err
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path / "plots")]) == 0 and trained
    assert (tmp_path / "plots").is_dir()


@pytest.mark.parametrize("argv", [["requests", "list"], ["users", "list"]])
def test_admin_commands_errors_say_error_and_name_the_address(argv, capsys, monkeypatch):
    monkeypatch.delenv("VEIL_ADMIN_TOKEN", raising=False)
    assert main([*argv, "--worker", "127.0.0.1:1"]) == 2
    assert f"veil {argv[0]}: error: needs --admin-token" in capsys.readouterr().err
    assert main([*argv, "--worker", "127.0.0.1:1", "--admin-token", "x" * 24]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"veil {argv[0]}: error: ") and "'127.0.0.1:1'" in err and "admin-cli" not in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, prog", [(["demo", "--bogus"], "veil demo"), (["worker", "--id", "a", "--zz", "1"], "veil worker")])
def test_an_unknown_flag_is_named_by_its_command(argv, prog, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and f"{prog}: error: unrecognized arguments: " in err, err
