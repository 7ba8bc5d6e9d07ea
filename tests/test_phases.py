"""Phases really do what they declare: weights that must not move do not."""

import numpy as np
import pytest

from finetune_cli import config as config_lib
from finetune_cli.data import index as data_lib
from finetune_cli.model import build as model_lib
from finetune_cli.train import phases as phases_lib

from conftest import make_config


def snapshot(layers):
    return {la.name: [w.numpy().copy() for w in la.weights] for la in layers}


def changed(before, after_layers):
    return {
        la.name: [
            not np.array_equal(a, w.numpy())
            for a, w in zip(before[la.name], la.weights, strict=True)
        ]
        for la in after_layers
    }


def fit_phase(cfg, phase_index, model, base, steps=3):
    import keras

    phase = cfg.phases[phase_index]
    names = model_lib.select_layers(base, phase.trainable, "t")
    model_lib.apply_trainable(model, base, names, phase.batchnorm)
    phases_lib.compile_phase(model, phase, steps, 4, jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8 * steps, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 4, 8 * steps), 4)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return names


@pytest.fixture
def built(shapes_dir, tmp_path):
    def build(phases, **sections):
        cfg = make_config(shapes_dir, tmp_path, phases=phases, **sections)
        model, base = model_lib.build_model(cfg, 4)
        return cfg, model, base

    return build


def test_frozen_base_is_bit_identical_and_head_trains(built):
    cfg, model, base = built(
        [{"name": "head", "epochs": 1, "trainable": "none", "learning_rate": 1e-2}],
        head=[{"type": "dense", "units": 8}],
    )
    base_before = snapshot(model_lib.base_layers(base))
    head = [model.get_layer("head_0_dense"), model.get_layer("predictions")]
    head_before = snapshot(head)
    fit_phase(cfg, 0, model, base)
    for name, flags in changed(base_before, model_lib.base_layers(base)).items():
        assert not any(flags), f"base layer {name} moved"
    for name, flags in changed(head_before, head).items():
        assert all(flags), f"head layer {name} did not train"


def test_top_n_trains_exactly_the_top_layers(built):
    import keras

    n = 12
    cfg, model, base = built(
        [{"name": "ft", "epochs": 1, "trainable": {"top": n}, "learning_rate": 1e-2}]
    )
    layers = model_lib.base_layers(base)
    before = snapshot(layers)
    names = fit_phase(cfg, 0, model, base)
    assert names == [la.name for la in layers[-n:]]
    diff = changed(before, layers)
    top = {la.name for la in layers[-n:]}
    trained_some = False
    for layer in layers:
        flags = diff[layer.name]
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        if layer.name in top and layer.weights and not is_bn:
            assert all(flags), f"{layer.name} is in the top {n} but did not train"
            trained_some = True
        else:
            # Earlier layers, and every BN layer (moving statistics
            # included) under the default `batchnorm: frozen` policy.
            assert not any(flags), f"{layer.name} moved"
    assert trained_some


def test_batchnorm_train_policy_updates_bn_in_range_only(built):
    import keras

    cfg, model, base = built(
        [
            {
                "name": "ft",
                "epochs": 1,
                "trainable": {"top": 12},
                "batchnorm": "train",
                "learning_rate": 1e-2,
            }
        ]
    )
    layers = model_lib.base_layers(base)
    bns = [la for la in layers if isinstance(la, keras.layers.BatchNormalization)]
    before = snapshot(bns)
    fit_phase(cfg, 0, model, base)
    top = {la.name for la in layers[-12:]}
    for layer in bns:
        flags = changed(before, [layer])[layer.name]
        if layer.name in top:
            assert all(flags), f"{layer.name} (gamma, beta, moving stats) frozen"
        else:
            assert not any(flags), f"{layer.name} moved"


def test_schedules_warmup_and_cosine():
    import keras

    phase = config_lib.Phase(
        name="p",
        epochs=4,
        learning_rate=1e-3,
        schedule={"name": "cosine", "warmup_epochs": 1},
    )
    lr = phases_lib.build_learning_rate(phase, steps_per_epoch=10)
    assert isinstance(lr, keras.optimizers.schedules.CosineDecay)
    values = [float(lr(s)) for s in (0, 5, 10, 25, 39)]
    assert values[0] == 0.0 and values[1] == pytest.approx(5e-4)
    assert values[2] == pytest.approx(1e-3) and values[4] < values[3] < 1e-3
    flat = phases_lib.build_learning_rate(
        config_lib.Phase(name="p", epochs=3, schedule="warmup"), 10
    )
    assert float(flat(10)) == pytest.approx(1e-3) == float(flat(29))
    exp = phases_lib.build_learning_rate(
        config_lib.Phase(
            name="p", epochs=3, schedule={"name": "exponential", "decay_rate": 0.5}
        ),
        10,
    )
    assert float(exp(20)) == pytest.approx(2.5e-4)
    assert (
        phases_lib.build_learning_rate(config_lib.Phase(name="p", epochs=1), 5) == 1e-3
    )


def test_class_weight_auto_and_by_name(shapes_dir, tmp_path):
    cfg = make_config(shapes_dir, tmp_path)
    index = data_lib.index_data(cfg.data, 0)
    index.splits["train"] = index.splits["train"][:-2]  # two fewer triangles
    auto = phases_lib.resolve_class_weight(
        config_lib.Phase(name="p", epochs=1, class_weight="auto"), 0, index
    )
    counts = index.counts("train")
    assert auto[3] > auto[0]
    assert sum(auto[i] * c for i, c in enumerate(counts)) == pytest.approx(sum(counts))
    named = phases_lib.resolve_class_weight(
        config_lib.Phase(name="p", epochs=1, class_weight={"star": 3}), 0, index
    )
    assert named == {0: 1.0, 1: 1.0, 2: 3.0, 3: 1.0}
    from finetune_cli.errors import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"phases.2.class_weight: unknown "
        r"classes \['stra'\]",
    ):
        phases_lib.resolve_class_weight(
            config_lib.Phase(name="p", epochs=1, class_weight={"stra": 3}), 2, index
        )


def test_cutmix_on_a_cached_phase_is_a_config_error_naming_it(built):
    from finetune_cli.errors import ConfigError

    phases = [{"name": "head", "epochs": 1}]
    aug = [{"type": "flip"}, {"type": "cutmix"}]
    cfg, model, base = built(phases, augmentation=aug)
    with pytest.raises(
        ConfigError, match=r"augmentation\.1: cutmix .* phase 1 \(head\)"
    ):
        phases_lib.plan_phases(model, base, cfg)
    cfg, model, base = built(
        phases, augmentation=aug, feature_cache={"augmented": "faithful"}
    )
    assert [p.path for p in phases_lib.plan_phases(model, base, cfg)] == ["base"]
    cfg, model, base = built(phases, augmentation=[{"type": "mixup"}])
    assert [p.path for p in phases_lib.plan_phases(model, base, cfg)] == ["features"]
