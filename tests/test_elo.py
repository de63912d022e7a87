import math

import numpy as np
import pytest

from cai_jax.eval.elo import (
    ELO_PER_NAT,
    Match,
    elo_win_probability,
    fit_bradley_terry,
    fit_elo,
    win_rate_matrix,
)

TRUE_ELO = {"m0": 0.0, "m1": 100.0, "m2": 250.0, "m3": -150.0}


def simulate(n, seed, true_elo=TRUE_ELO):
    """n matches between random distinct pairs, one prompt per match."""
    rng = np.random.default_rng(seed)
    names = list(true_elo)
    matches = []
    for k in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        p = 1.0 / (1.0 + 10.0 ** ((true_elo[names[j]] - true_elo[names[i]]) / 400.0))
        matches.append((names[i], names[j], float(rng.random() < p), k))
    return matches


def fisher_standard_errors(matches, true_elo, reference):
    """Asymptotic standard errors (Elo) of the MLE with the reference held at 0.

    Fisher information of Bradley-Terry: sum over matches of
    p(1-p) (e_a - e_b)(e_a - e_b)^T, in nats; drop the reference row/column.
    """
    names = sorted(true_elo)
    idx = {m: i for i, m in enumerate(names)}
    info = np.zeros((len(names), len(names)))
    for a, b, _, _ in matches:
        p = 1.0 / (1.0 + 10.0 ** ((true_elo[b] - true_elo[a]) / 400.0))
        e = np.zeros(len(names))
        e[idx[a]], e[idx[b]] = 1.0, -1.0
        info += p * (1 - p) * np.outer(e, e)
    keep = [i for i, m in enumerate(names) if m != reference]
    cov = np.linalg.inv(info[np.ix_(keep, keep)])
    se = 400.0 / math.log(10.0) * np.sqrt(np.diag(cov))
    return {names[i]: se[k] for k, i in enumerate(keep)}


def sequential_elo(matches, k_factor=32.0):
    """Classic online Elo updates: the answer depends on match order."""
    ratings = {}
    for a, b, y, _ in matches:
        ra, rb = ratings.get(a, 0.0), ratings.get(b, 0.0)
        expected = 1.0 / (1.0 + 10.0 ** ((rb - ra) / 400.0))
        ratings[a] = ra + k_factor * (y - expected)
        ratings[b] = rb - k_factor * (y - expected)
    return ratings


def test_elo_constant_matches_definition():
    # 400 * log10(e)
    assert ELO_PER_NAT == pytest.approx(400.0 * math.log10(math.e), rel=1e-14)
    assert elo_win_probability(100.0, 0.0) == pytest.approx(1 / (1 + 10 ** (-0.25)))


def test_recovers_known_strengths_within_fisher_error():
    matches = simulate(12000, seed=1)
    res = fit_elo(matches, "m0", n_bootstrap=150, seed=0)
    se = fisher_standard_errors(matches, TRUE_ELO, "m0")
    # ~6000 games per model against mixed opponents: SE is a few Elo points.
    assert all(3.0 < v < 10.0 for v in se.values())
    for m, true in TRUE_ELO.items():
        if m == "m0":
            continue
        # 4 SE: a false alarm under a correct fit has probability ~6e-5.
        assert abs(res.elo[m] - true) < 4 * se[m], (m, res.elo[m], true, se[m])
        # The prompt bootstrap should agree with asymptotic theory: the 95%
        # half-width is about 1.96 SE (150 replicates -> ~15% noise at the tails).
        half = 0.5 * (res.upper[m] - res.lower[m])
        assert 0.7 * 1.96 * se[m] < half < 1.4 * 1.96 * se[m], (m, half, se[m])
        assert res.lower[m] <= res.elo[m] <= res.upper[m]


def test_exactly_invariant_to_match_order_unlike_sequential_elo():
    matches = simulate(600, seed=2)
    shuffled = list(matches)
    np.random.default_rng(3).shuffle(shuffled)
    r1 = fit_elo(matches, "m0", n_bootstrap=30, seed=5)
    r2 = fit_elo(shuffled, "m0", n_bootstrap=30, seed=5)
    assert r1.elo == r2.elo  # bit-for-bit, not approximately
    assert r1.lower == r2.lower and r1.upper == r2.upper
    assert r1.n_matches == r2.n_matches

    # Online Elo updates on the same two orderings disagree noticeably.
    s1, s2 = sequential_elo(matches), sequential_elo(shuffled)
    assert max(abs(s1[m] - s2[m]) for m in TRUE_ELO) > 5.0


def test_intervals_shrink_with_more_data():
    small = fit_elo(simulate(1000, seed=4), "m0", n_bootstrap=150, seed=0)
    large = fit_elo(simulate(4000, seed=4), "m0", n_bootstrap=150, seed=0)
    for m in ["m1", "m2", "m3"]:
        w_small = small.upper[m] - small.lower[m]
        w_large = large.upper[m] - large.lower[m]
        # 4x the data should roughly halve the width (1/sqrt(n)).
        assert w_large < 0.75 * w_small, (m, w_small, w_large)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.8, 0.99])
def test_single_soft_outcome_gives_logit_difference(p):
    # With one match a-vs-b and no prior, the MLE solves sigmoid(d) = p, so
    # elo_a - elo_b = 400 * log10(p / (1 - p)).
    res = fit_elo([("a", "b", p, "x")], "b", n_bootstrap=0, prior=1e-12)
    assert res.elo["a"] == pytest.approx(400.0 * math.log10(p / (1 - p)), abs=1e-6)


def test_soft_outcomes_on_one_pair_average():
    # Stationarity for one pair: sum_i (y_i - sigmoid(d)) = 0, so sigmoid(d) = mean(y).
    matches = [("a", "b", 0.3, 1), ("b", "a", 0.1, 2), ("a", "b", 0.6, 3)]
    # From a's side the outcomes are 0.3, 0.9, 0.6 -> mean 0.6.
    res = fit_elo(matches, "b", n_bootstrap=0, prior=1e-12)
    assert res.elo["a"] == pytest.approx(400.0 * math.log10(0.6 / 0.4), abs=1e-6)


def test_perfect_record_stays_finite_at_prior_optimum():
    # a wins all n games. Strengths are +-d/2 and the gradient of
    # n*log(1+e^-d) + prior/2 * 2*(d/2)^2 vanishes where n*sigmoid(-d) = prior*d/2.
    n, prior = 5, 1e-3
    strengths = fit_bradley_terry([("a", "b", 1.0, i) for i in range(n)], prior=prior)
    d = strengths["a"] - strengths["b"]
    assert np.isfinite(d) and d > 5
    assert strengths["a"] == pytest.approx(-strengths["b"], abs=1e-12)
    assert n / (1 + math.exp(d)) == pytest.approx(prior * d / 2, rel=1e-7)


def test_anchor_is_exactly_zero_and_differences_do_not_depend_on_it():
    matches = simulate(400, seed=6)
    results = {ref: fit_elo(matches, ref, n_bootstrap=20) for ref in TRUE_ELO}
    for ref, res in results.items():
        assert res.elo[ref] == 0.0
        assert res.lower[ref] == 0.0 and res.upper[ref] == 0.0
        diff = res.elo["m2"] - res.elo["m3"]
        assert diff == pytest.approx(results["m0"].elo["m2"] - results["m0"].elo["m3"], abs=1e-8)


def test_bootstrap_moves_whole_prompts():
    # Every match shares one prompt, so every resample is the full data set
    # and the interval collapses onto the point estimate.  Resampling single
    # matches instead would give a wide interval.
    matches = [("a", "b", float(i % 3 == 0), "only") for i in range(30)]
    res = fit_elo(matches, "b", n_bootstrap=50)
    assert res.lower["a"] == pytest.approx(res.elo["a"], abs=1e-6)
    assert res.upper["a"] == pytest.approx(res.elo["a"], abs=1e-6)

    per_match = [("a", "b", y, i) for i, (_, _, y, _) in enumerate(matches)]
    res2 = fit_elo(per_match, "b", n_bootstrap=50)
    assert res2.upper["a"] - res2.lower["a"] > 100.0


def test_bootstrap_is_seeded():
    matches = simulate(300, seed=7)
    a = fit_elo(matches, "m0", n_bootstrap=20, seed=11)
    b = fit_elo(matches, "m0", n_bootstrap=20, seed=11)
    c = fit_elo(matches, "m0", n_bootstrap=20, seed=12)
    assert a.lower == b.lower and a.upper == b.upper
    assert a.lower != c.lower


def test_level_controls_width():
    matches = simulate(500, seed=8)
    wide = fit_elo(matches, "m0", n_bootstrap=100, level=0.95)
    narrow = fit_elo(matches, "m0", n_bootstrap=100, level=0.5)
    for m in ["m1", "m2", "m3"]:
        assert narrow.upper[m] - narrow.lower[m] < wide.upper[m] - wide.lower[m]


def test_inputs_accepted_as_tuples_dicts_and_matches():
    tuples = [("a", "b", 0.7, 0), ("b", "c", 0.4, 1)]
    dicts = [dict(model_a=a, model_b=b, outcome=y, prompt_id=p) for a, b, y, p in tuples]
    named = [Match(*t) for t in tuples]
    ref = fit_elo(tuples, "a", n_bootstrap=0).elo
    assert fit_elo(dicts, "a", n_bootstrap=0).elo == ref
    assert fit_elo(named, "a", n_bootstrap=0).elo == ref


def test_match_counts():
    matches = [("a", "b", 1, 0), ("a", "c", 0, 0), ("b", "c", 0.5, 1), ("a", "b", 0, 2)]
    res = fit_elo(matches, "a", n_bootstrap=0)
    assert res.n_matches == {"a": 3, "b": 3, "c": 2}


def test_errors():
    with pytest.raises(ValueError, match="unknown reference"):
        fit_elo([("a", "b", 1.0, 0)], "zzz")
    for bad in [1.2, -0.1, float("nan")]:
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fit_elo([("a", "b", 0.5, 0), ("a", "b", bad, 1)], "a")
    with pytest.raises(ValueError, match="itself"):
        fit_elo([("a", "a", 0.5, 0)], "a")
    with pytest.raises(ValueError, match="no matches"):
        fit_elo([], "a")
    with pytest.raises(ValueError, match="prior"):
        fit_elo([("a", "b", 1.0, 0)], "a", prior=0.0)
    with pytest.raises(ValueError):
        fit_elo([("a", "b", 1.0)], "a")


def test_markdown_table():
    res = fit_elo([("a", "b", 0.8, 0), ("c", "a", 0.9, 1)], "a", n_bootstrap=0, prior=1e-9)
    md = res.to_markdown()
    lines = md.strip().splitlines()
    assert lines[0] == "| Model | Elo | 95% CI | Matches |"
    # strongest first: c (+382) > a (0) > b (-241)
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["c", "a (ref)", "b"]
    assert "| 381.7 |" in lines[2]
    assert "n/a" in lines[2]  # no bootstrap -> no interval


def test_win_rate_matrix_by_hand():
    matches = [("a", "b", 1.0, 0), ("b", "a", 0.25, 1), ("a", "c", 0.5, 2)]
    wr = win_rate_matrix(matches)
    assert wr.models == ("a", "b", "c")
    # a vs b: outcomes for a are 1.0 and 0.75 -> 0.875
    np.testing.assert_allclose(wr.rates[0, 1], 0.875)
    np.testing.assert_allclose(wr.rates[1, 0], 0.125)
    np.testing.assert_allclose(wr.rates[0, 2], 0.5)
    assert np.isnan(wr.rates[1, 2]) and np.isnan(wr.rates[0, 0])
    np.testing.assert_array_equal(wr.counts, [[0, 2, 1], [2, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError):
        win_rate_matrix(matches, models=["a", "b"])
