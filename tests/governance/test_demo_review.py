"""``veil demo --review`` runs, and both sides' lines are printed."""

from veil.governance.demo import run_review_demo


def test_review_demo_prints_both_sides(capsys):
    assert run_review_demo() == 0
    out = capsys.readouterr().out
    assert "[scientist] get() -> ReviewPendingError" in out
    assert "[owner    ] approved req-" in out and "Tensor.div(t4, t5)" in out
    assert "RequestDeniedError" in out and "row-level values stay in the hospital" in out
    assert "released" in out and "denied" in out.rsplit("my requests:", 1)[1]
