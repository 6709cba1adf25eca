"""mAP against hand-computed cases (Revisited Oxford/Paris conventions)."""

import pytest

from delf_es.eval.metrics import compute_ap, mean_scores, score_ranking


def test_perfect_ranking_has_ap_one():
    assert compute_ap([0, 1, 2], 3) == pytest.approx(1.0)


def test_hand_computed_ap_with_a_gap():
    # positives at ranks 0 and 2 of 2 positives:
    # j=0, r=0: (1 + 1/1)/2 * 1/2 = 0.5 ; j=1, r=2: (1/2 + 2/3)/2 * 1/2 = 0.291666...
    assert compute_ap([0, 2], 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)


def test_unretrieved_positives_count_as_missed():
    assert compute_ap([0], 2) == pytest.approx(0.5)
    assert compute_ap([], 3) == 0.0


def test_junk_is_removed_before_ranks_are_counted():
    ranking = ["junk1", "p1", "n1", "junk2", "p2"]
    score = score_ranking("q", ranking, positives={"p1", "p2"}, junk={"junk1", "junk2"})
    # after removing junk: p1 at 0, n1 at 1, p2 at 2
    assert score.ap == pytest.approx(compute_ap([0, 2], 2))
    assert score.first_positive_rank == 0 and score.hit_at[1]


def test_query_with_no_positive_retrieved_scores_zero():
    score = score_ranking("q", ["n1", "n2"], positives={"p1"}, junk=set())
    assert score.ap == 0.0 and score.first_positive_rank is None and not score.hit_at[10]


def test_query_without_positives_in_the_database_is_an_error():
    with pytest.raises(ValueError):
        compute_ap([], 0)


def test_mean_scores_in_percent():
    a = score_ranking("a", ["p"], {"p"}, set())
    b = score_ranking("b", ["n", "p"], {"p"}, set())
    out = mean_scores([a, b])
    assert out["mAP"] == pytest.approx(100 * (1.0 + compute_ap([1], 1)) / 2)
    assert out["R@1"] == 50.0 and out["R@5"] == 100.0
