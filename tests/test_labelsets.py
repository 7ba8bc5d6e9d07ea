"""Multi-label scores: metrics against scikit-learn, thresholds that
maximise F1, per-label temperatures, the weighted loss, gates."""

import numpy as np
import pytest

from finetune_cli.errors import ConfigError
from finetune_cli.errors import GateError
from finetune_cli.evaluate import gates
from finetune_cli.evaluate import labelsets


def planted(n=400, labels=4, seed=0, sharpness=3.0):
    """Labels, and probabilities that carry them but are over-confident by
    `sharpness` (logits multiplied)."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, labels)) < np.linspace(0.15, 0.6, labels)
    z = np.where(y, 1.0, -1.0) + rng.normal(0, 1.2, (n, labels))
    return y, 1 / (1 + np.exp(-sharpness * z))


def test_metrics_equal_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    y, p = planted()
    y[:, 3] = False  # a label with no positive: no AP, left out of mAP
    th = np.array([0.3, 0.5, 0.6, 0.5])
    m = labelsets.compute(y, p, th, ["a", "b", "c", "d"])
    pred = p >= th
    s = m["summary"]
    assert s["micro_f1"] == pytest.approx(sk.f1_score(y, pred, average="micro"))
    assert s["subset_accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert s["hamming_loss"] == pytest.approx(sk.hamming_loss(y, pred))
    for c, name in enumerate("abc"):
        ap = sk.average_precision_score(y[:, c], p[:, c])
        assert m["per_class"][name]["ap"] == pytest.approx(ap)
        assert m["per_class"][name]["f1"] == pytest.approx(
            sk.f1_score(y[:, c], pred[:, c])
        )
    assert m["per_class"]["d"]["ap"] is None
    aps = [sk.average_precision_score(y[:, c], p[:, c]) for c in range(3)]
    assert s["map"] == pytest.approx(np.mean(aps))
    f1 = sk.f1_score(y[:, :3], pred[:, :3], average=None)
    assert s["macro_f1"] == pytest.approx(np.mean(f1))
    # Ties in the scores are one step, as scikit-learn counts them.
    yt, st = np.array([1, 0, 1, 0, 1]), np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    assert labelsets.average_precision(yt, st) == pytest.approx(
        sk.average_precision_score(yt, st)
    )


def test_each_threshold_is_the_best_f1_on_its_label():
    y, p = planted(seed=3)
    chosen = labelsets.choose_thresholds(y, p)
    for c, t in enumerate(chosen):
        best = labelsets.f1_at(y[:, c], p[:, c], t)
        grid = [labelsets.f1_at(y[:, c], p[:, c], g) for g in np.linspace(0, 1, 501)]
        assert best >= max(grid) - 1e-12
        # better than the plain 0.5 on a label whose best is elsewhere
        assert best >= labelsets.f1_at(y[:, c], p[:, c], 0.5)
    rec = labelsets.thresholds_record(
        np.zeros((5, 1), bool), np.full((5, 1), 0.7), ["x"]
    )
    assert rec["labels"]["x"]["threshold"] == 0.5  # no positive: 0.5


def test_per_label_temperatures_fix_an_over_confident_model():
    # Labels drawn from calibrated logits; the model's logits are those
    # times 3 for one label, 1.5 and 0.5 (under-confident) for the others.
    rng = np.random.default_rng(5)
    z = rng.normal(0.0, 2.0, (2000, 3)) + np.array([-1.0, 0.0, 0.5])
    y = rng.random(z.shape) < 1 / (1 + np.exp(-z))
    scale = np.array([3.0, 1.5, 0.5])
    p = 1 / (1 + np.exp(-z * scale))
    temps = labelsets.fit_temperatures(y[:1000], p[:1000])
    np.testing.assert_allclose(temps, scale, rtol=0.2)
    held_y, held_p = y[1000:], p[1000:]
    after = labelsets.with_temperatures(held_p, temps)
    assert (
        labelsets.binary_ece(held_y, after) < labelsets.binary_ece(held_y, held_p) / 2
    )
    assert labelsets.binary_log_loss(held_y, after) < labelsets.binary_log_loss(
        held_y, held_p
    )
    back = labelsets.with_temperatures(after, 1 / np.asarray(temps))
    np.testing.assert_allclose(back, held_p, atol=1e-6)


def test_folding_the_temperatures_equals_tempering_the_outputs():
    import keras

    inputs = keras.Input((6,))
    out = keras.layers.Dense(3, activation="sigmoid", name="predictions")(inputs)
    model = keras.Model(inputs, out)
    x = np.random.default_rng(1).normal(size=(20, 6)).astype("float32") * 3
    before = model.predict(x, verbose=0)
    temps = [0.5, 2.0, 4.0]
    from finetune_cli.evaluate import calibration

    calibration.fold_into(model, temps)
    after = model.predict(x, verbose=0)
    np.testing.assert_allclose(
        after, labelsets.with_temperatures(before, temps), atol=1e-5
    )


def test_the_label_weighted_loss():
    import keras

    from finetune_cli.train.losses import LabelWeightedBinaryCrossentropy

    y = np.array([[1, 0, 1], [0, 1, 0]], "float32")
    p = np.array([[0.8, 0.3, 0.6], [0.1, 0.7, 0.2]], "float32")
    plain = keras.losses.BinaryCrossentropy()(y, p)
    ones = LabelWeightedBinaryCrossentropy([1, 1, 1])(y, p)
    assert float(ones) == pytest.approx(float(plain), rel=1e-5)
    w = np.array([3.0, 1.0, 0.5])
    by_hand = -(w * y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    weighted = LabelWeightedBinaryCrossentropy(w)(y, p)
    assert float(weighted) == pytest.approx(by_hand, rel=1e-5)
    again = LabelWeightedBinaryCrossentropy.from_config(
        LabelWeightedBinaryCrossentropy(w, 0.1).get_config()
    )
    assert again.pos_weight == list(w) and again.label_smoothing == 0.1


def test_gates_read_multi_label_metrics_and_name_the_ones_missing():
    summary = {"map": 0.7, "micro_f1": 0.6, "hamming_loss": 0.2}
    assert gates.parse_gates(["map=0.8"], "--fail-under") == {"map": 0.8}
    with pytest.raises(ConfigError, match="lower is better"):
        gates.parse_gates(["hamming_loss=0.1"], "--fail-under")
    assert gates.check_gates(summary, {"map": 0.8}, {}) == [
        "map 0.7000 < 0.8 (short by 0.1000)"
    ]
    assert gates.check_gates(summary, {}, {"hamming_loss": 0.1})
    with pytest.raises(ConfigError, match="accuracy: not measured for this multi"):
        gates.check_gates(summary, {"accuracy": 0.5}, {})
    assert issubclass(GateError, Exception)


def test_a_multi_label_probe_scores_planted_features_by_map():
    from finetune_cli.cache import heads

    rng = np.random.default_rng(0)
    y = (rng.random((300, 3)) < 0.4).astype("float32")
    x = (y @ rng.normal(size=(3, 16)) + rng.normal(0, 0.3, (300, 16))).astype("float32")
    _, train_map, val_map = heads.train_probe(x[:200], y[:200], x[200:], y[200:], 3, 0)
    assert val_map > 0.9 and train_map > 0.9
    shuffled = y[200:][rng.permutation(100)]
    _, _, chance = heads.train_probe(x[:200], y[:200], x[200:], shuffled, 3, 0)
    assert chance < 0.65
