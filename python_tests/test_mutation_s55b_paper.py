"""Tests that kill mutants of paper_comparison_table's case-blind attack match (exact first) landed in session 55,
which the other tests let live (mut55b helper, session 55)."""

from robust_ops import report


def test_a_row_of_ours_named_as_the_paper_row_wins_wherever_it_stands():
    """Ours hold "FGSM" and "fgsm" rows: the paper row "FGSM" takes the one in its own case, first or last."""
    exact = {"method": "AT", "attack": "FGSM", "norm": "linf", "eps": 1 / 255, "n": 4, "accuracy": 0.25}
    other = dict(exact, attack="fgsm", accuracy=0.625)
    paper = [{"method": "AT", "attack": "FGSM", "eps": 1 / 255, "source": "T1", "accuracy": 0.7}]
    for rows in ([exact, other], [other, exact]):
        assert report.paper_comparison_table(rows, paper, ["accuracy"]).splitlines()[2].endswith("| 0.250 |")
