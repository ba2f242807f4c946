"""Count and time flags of ``veil demo`` and ``veil serve`` refuse values that silently did nothing (one line,
status 2, from argparse: nothing is trained, loaded or started)."""

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
])
def test_bad_counts_and_times_are_one_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert len(err.strip().splitlines()) == 1 and f"argument {flag}:" in err, err
    assert "_positive" not in err  # the type function's name is not the message


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
