import os

import numpy as np
import pytest
from PIL import Image

from cai_jax.eval import plots


def check_png(path, size):
    assert os.path.getsize(path) > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        # figsize (inches) * 100 dpi
        assert im.size == size
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.std() > 1.0  # something was drawn, not a blank canvas
    # the temp file was moved into place, nothing left behind
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp-")]


FIG2_POINTS = [
    {"method": "RL-CAI", "label": "step 0", "helpful_elo": 0, "harmless_elo": 0,
     "helpful_lo": -20, "helpful_hi": 20, "harmless_lo": -15, "harmless_hi": 15},
    {"method": "RL-CAI", "label": "step 100", "helpful_elo": 40, "harmless_elo": 90,
     "helpful_lo": 20, "helpful_hi": 60, "harmless_lo": 70, "harmless_hi": 110},
    {"method": "Helpful RLHF", "label": "step 100", "helpful_elo": 120, "harmless_elo": -50},
    {"method": "Helpful RLHF", "label": "step 200", "helpful_elo": 150, "harmless_elo": -80},
]


def test_harmless_vs_helpful(tmp_path):
    path = tmp_path / "fig2.png"
    out = plots.plot_harmless_vs_helpful(FIG2_POINTS, path)
    assert out == str(path)
    check_png(path, (600, 450))


def test_harmless_vs_helpful_overwrites_existing_file(tmp_path):
    path = tmp_path / "fig2.png"
    path.write_bytes(b"old")
    plots.plot_harmless_vs_helpful(FIG2_POINTS, path)
    check_png(path, (600, 450))


def test_harmless_vs_helpful_errors(tmp_path):
    with pytest.raises(ValueError, match="no points"):
        plots.plot_harmless_vs_helpful([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="harmless_elo"):
        plots.plot_harmless_vs_helpful([{"method": "a", "helpful_elo": 1}], tmp_path / "x.png")
    bad = [{"method": "a", "helpful_elo": 0, "harmless_elo": 5, "harmless_lo": 6, "harmless_hi": 9}]
    with pytest.raises(ValueError, match="contain"):
        plots.plot_harmless_vs_helpful(bad, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_elo_vs_params(tmp_path):
    points = []
    for method, slope in [("RL-CAI", 30), ("HH RLHF", 10)]:
        for n in [1.3e7, 5.2e7, 8.1e8]:
            e = slope * np.log10(n / 1e7)
            points.append({"method": method, "n_params": n, "helpful_elo": e, "harmless_elo": 2 * e,
                           "harmless_lo": 2 * e - 10, "harmless_hi": 2 * e + 10})
    path = tmp_path / "sub" / "fig3.png"  # missing directory is created
    plots.plot_elo_vs_params(points, path)
    check_png(path, (1000, 400))  # two panels, 5 inches each

    only_harmless = [{k: v for k, v in p.items() if not k.startswith("helpful")} for p in points]
    plots.plot_elo_vs_params(only_harmless, tmp_path / "one.png")
    check_png(tmp_path / "one.png", (500, 400))


def test_elo_vs_params_errors(tmp_path):
    with pytest.raises(ValueError, match="no points"):
        plots.plot_elo_vs_params([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="helpful_elo"):
        plots.plot_elo_vs_params([{"method": "a", "n_params": 10}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="positive"):
        plots.plot_elo_vs_params([{"method": "a", "n_params": 0, "helpful_elo": 1}], tmp_path / "x.png")


def test_accuracy_vs_params(tmp_path):
    points = [
        {"method": "PM", "n_params": 1e7, "accuracy": 0.55, "accuracy_lo": 0.5, "accuracy_hi": 0.6},
        {"method": "PM", "n_params": 1e8, "accuracy": 0.65, "accuracy_lo": 0.6, "accuracy_hi": 0.7},
        {"method": "CoT", "n_params": 1e7, "accuracy": 0.52},
        {"method": "CoT", "n_params": 1e8, "accuracy": 0.7},
    ]
    plots.plot_accuracy_vs_params(points, tmp_path / "fig4.png")
    check_png(tmp_path / "fig4.png", (600, 450))
    with pytest.raises(ValueError, match="accuracy"):
        plots.plot_accuracy_vs_params([{"method": "PM", "n_params": 1e7}], tmp_path / "x.png")


def test_score_vs_revisions(tmp_path):
    rng = np.random.default_rng(0)
    scores = {
        "small": rng.normal(size=(20, 5)) + np.arange(5),
        "large": rng.normal(size=(20, 5)) + 2 * np.arange(5),
    }
    plots.plot_score_vs_revisions(scores, tmp_path / "fig5.png")
    check_png(tmp_path / "fig5.png", (600, 450))
    with pytest.raises(ValueError, match="no series"):
        plots.plot_score_vs_revisions({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        plots.plot_score_vs_revisions({"a": [1.0, 2.0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        plots.plot_score_vs_revisions({"a": np.zeros((0, 3))}, tmp_path / "x.png")


def test_ppo_curves(tmp_path):
    history = [{"iteration": i, "reward_mean": np.tanh(i / 10), "kl": 0.1 * i} for i in range(30)]
    plots.plot_ppo_curves(history, tmp_path / "ppo.png", kl_target=2.0)
    check_png(tmp_path / "ppo.png", (600, 600))
    # no iteration key and no target also work
    plots.plot_ppo_curves([{"reward_mean": 1.0, "kl": 0.0}, {"reward_mean": 2.0, "kl": 0.5}],
                          tmp_path / "ppo2.png")
    check_png(tmp_path / "ppo2.png", (600, 600))


def test_ppo_curves_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plots.plot_ppo_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="'kl'"):
        plots.plot_ppo_curves([{"reward_mean": 1.0}], tmp_path / "x.png")


def test_reliability_bins_by_hand():
    probs = [0.05, 0.15, 0.12, 0.95, 1.0, 0.55]
    labels = [0, 1, 0, 1, 1, 0]
    mean_pred, observed, counts, ece = plots.reliability_bins(probs, labels, n_bins=10)
    np.testing.assert_array_equal(counts, [1, 2, 0, 0, 0, 1, 0, 0, 0, 2])
    np.testing.assert_allclose(mean_pred[[0, 1, 5, 9]], [0.05, 0.135, 0.55, 0.975])
    np.testing.assert_allclose(observed[[0, 1, 5, 9]], [0.0, 0.5, 0.0, 1.0])
    assert np.isnan(observed[2]) and np.isnan(mean_pred[2])
    # ECE = (1*0.05 + 2*0.365 + 1*0.55 + 2*0.025) / 6
    assert ece == pytest.approx((0.05 + 0.73 + 0.55 + 0.05) / 6)


def test_reliability_plot(tmp_path):
    rng = np.random.default_rng(1)
    probs = rng.random(500)
    labels = (rng.random(500) < probs).astype(float)
    plots.plot_reliability(probs, labels, tmp_path / "rel.png")
    check_png(tmp_path / "rel.png", (500, 600))


def test_reliability_errors(tmp_path):
    with pytest.raises(ValueError, match="3 probabilities but 2 labels"):
        plots.plot_reliability([0.1, 0.2, 0.3], [0, 1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no predictions"):
        plots.plot_reliability([], [], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.plot_reliability([0.1, 1.5], [0, 1], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
