import numpy as np
import pytest

from finetune_cli import config as config_lib
from finetune_cli.model import build as model_lib
from finetune_cli.errors import ConfigError


def model_cfg(**kw):
    kw.setdefault("name", "MobileNetV2")
    kw.setdefault("weights", "none")
    kw.setdefault("options", {"alpha": 0.35})
    return config_lib.Model(**kw)


def test_weights_from_path_load_exactly(tmp_path):
    import keras

    keras.utils.set_random_seed(1)
    source = model_lib.build_base(model_cfg(), (32, 32))
    path = tmp_path / "base.weights.h5"
    source.save_weights(str(path))
    keras.utils.set_random_seed(2)
    fresh = model_lib.build_base(model_cfg(weights=str(path)), (32, 32))
    other = model_lib.build_base(model_cfg(), (32, 32))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(source(x)))
    assert not np.array_equal(np.asarray(other(x)), np.asarray(source(x)))


def test_legacy_h5_weights_load(tmp_path):
    import keras

    source = model_lib.build_base(model_cfg(), (32, 32))
    path = tmp_path / "legacy.h5"
    import h5py

    with h5py.File(path, "w") as f:
        keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group(f, source)
    fresh = model_lib.build_base(model_cfg(weights=str(path)), (32, 32))
    for a, b in zip(source.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_mismatched_weights_file_is_a_clear_error(tmp_path):
    wide = model_lib.build_base(model_cfg(options={"alpha": 0.5}), (32, 32))
    path = tmp_path / "wide.weights.h5"
    wide.save_weights(str(path))
    with pytest.raises(
        ConfigError,
        match=r"model.weights: .*wide.weights.h5 "
        r"does not fit MobileNetV2",
    ):
        model_lib.build_base(model_cfg(weights=str(path)), (32, 32))
    with pytest.raises(ConfigError, match="model.weights: file not found"):
        model_lib.build_base(model_cfg(weights=str(tmp_path / "no.h5")), (32, 32))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ConfigError, match="expected imagenet, none or a .h5"):
        model_lib.build_base(model_cfg(weights=str(tmp_path / "w.txt")), (32, 32))


def test_weights_file_missing_one_layer_is_refused(tmp_path):
    # Loading must not leave that layer at its random initialisation.
    import h5py

    source = model_lib.build_base(model_cfg(), (32, 32))
    path = tmp_path / "partial.weights.h5"
    source.save_weights(str(path))
    with h5py.File(path, "a") as f:
        groups = []
        f.visit(lambda name: groups.append(name) if name.endswith("/vars") else None)
        deleted = next(g for g in groups if len(f[g]) > 0)
        del f[deleted]
    with pytest.raises(ConfigError, match=r"model.weights: .*partial.weights.h5 does"):
        model_lib.build_base(model_cfg(weights=str(path)), (32, 32))


def test_bad_constructor_option_names_model_options():
    with pytest.raises(ConfigError, match="model.options"):
        model_lib.build_base(model_cfg(options={"alpha": 0.35, "depth": 3}), (32, 32))


def test_model_takes_raw_pixels_and_outputs_probabilities(shapes_dir, tmp_path):
    from conftest import make_config

    cfg = make_config(
        shapes_dir,
        tmp_path,
        head=[
            {"type": "dense", "units": 8, "l2": 1e-4},
            {"type": "dropout", "rate": 0.1},
            {"type": "batchnorm"},
        ],
    )
    model, base = model_lib.build_model(cfg, 4)
    assert model_lib.find_base(model) is base
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    p = np.asarray(model(x))
    assert p.shape == (3, 4)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)
    assert (
        model.get_layer(model_lib.OUTPUT_NAME).dtype_policy.compute_dtype == "float32"
    )


def test_layer_selection_and_errors():
    base = model_lib.build_base(model_cfg(), (32, 32))
    names = [la.name for la in model_lib.base_layers(base)]
    top = config_lib.TrainableLayers(top=5)
    assert model_lib.select_layers(base, top, "k") == names[-5:]
    frm = config_lib.TrainableLayers(from_layer="block_16_expand")
    assert model_lib.select_layers(base, frm, "k")[0] == "block_16_expand"
    rx = config_lib.TrainableLayers(regex="^block_16_")
    chosen = model_lib.select_layers(base, rx, "k")
    assert chosen and all(n.startswith("block_16_") for n in chosen)
    assert model_lib.select_layers(base, "all", "k") == names
    assert model_lib.select_layers(base, "none", "k") == []
    with pytest.raises(
        ConfigError,
        match=r"phases.1.trainable.from_layer: no "
        r"layer named 'block_16_expnd'.*did "
        r"you mean 'block_16_expand'",
    ):
        model_lib.select_layers(
            base,
            config_lib.TrainableLayers(from_layer="block_16_expnd"),
            "phases.1.trainable",
        )
    with pytest.raises(ConfigError, match=r"k.top: .* has \d+ layers"):
        model_lib.select_layers(base, config_lib.TrainableLayers(top=10_000), "k")
    with pytest.raises(ConfigError, match=r"k.regex: matches no layer"):
        model_lib.select_layers(base, config_lib.TrainableLayers(regex="^zzz"), "k")


def test_mixed_precision_keeps_output_float32(shapes_dir, tmp_path):
    import keras

    from conftest import make_config

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, base = model_lib.build_model(make_config(shapes_dir, tmp_path), 4)
        assert base.dtype_policy.name == "mixed_float16"
        out = model(np.zeros((1, 32, 32, 3), "float32"))
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_bn_momentum_reaches_every_batchnorm_layer():
    import keras

    def momenta(base):
        return {
            layer.momentum
            for layer in base.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        }

    assert momenta(model_lib.build_base(model_cfg(), (32, 32))) == {0.999}
    tuned = model_lib.build_base(model_cfg(bn_momentum=0.9), (32, 32))
    assert momenta(tuned) == {0.9}
