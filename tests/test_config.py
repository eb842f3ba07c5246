"""Config loading: YAML + overrides, did-you-mean errors, type checks, validation, save round trip."""

import pytest

from avflow.config import Config, ConfigError, load_config


def test_defaults_are_the_published_system():
    cfg = load_config()
    assert (cfg.model.d_model, cfg.model.n_blocks, cfg.model.n_heads, cfg.model.ffn_hidden) == (512, 8, 4, 1024)
    assert (cfg.model.window_back, cfg.model.window_ahead) == (16, 8)
    assert cfg.mel.frame_rate == 22050 / 256
    assert (cfg.flow.head_weight, cfg.flow.mel_weight, cfg.sample.nfe) == (0.2, 3.0, 16)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 0.001\n  steps: 5\nmodel:\n  d_model: 64\n")
    cfg = load_config(path, ["trainer.lr=3e-4", "sample.method=midpoint"])
    assert cfg.trainer.lr == 3e-4 and cfg.trainer.steps == 5 and cfg.model.d_model == 64
    assert cfg.sample.method == "midpoint"


@pytest.mark.parametrize("text, message", [
    ("trainer:\n  lrr: 1\n", "unknown config key 'trainer.lrr' (did you mean 'lr'?)"),
    ("trainr:\n  lr: 1\n", "unknown config key 'trainr' (did you mean 'trainer'?)"),
    ("model:\n  d_model: big\n", "model.d_model: expected an integer, got 'big'"),
    ("model:\n  dyadic: 3\n", "model.dyadic: expected true or false, got 3"),
    ("- a\n- b\n", "expected a mapping of config sections"),
    ("model:\n  d_model: 100\n  n_heads: 3\n", "model.d_model: expected divisible by model.n_heads=3, got 100"),
    ("sample:\n  method: heun\n", "sample.method: expected one of euler, midpoint, got 'heun'"),
    ("sample:\n  method: midpoint\n  nfe: 5\n", "sample.nfe: expected even"),
])
def test_bad_files_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)


def test_bad_overrides():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.setps' \(did you mean 'steps'\?\)"):
        load_config(None, ["trainer.setps=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["trainer.steps"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["trainer.steps.x=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["model.dyadic=true", "data.val_patterns=[abc]", "trainer.betas=[0.8, 0.95]"])
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert isinstance(Config().validate(), Config)


def _numeric_fields():
    """(dotted key, type) of every int and float key of every section."""
    import dataclasses

    defaults = Config()
    for section in dataclasses.fields(defaults):
        values = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for item in dataclasses.fields(values):
            value = getattr(values, item.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield f"{section.name}.{item.name}", type(value)


# Keys where a huge negative value is meaningful (a normalization offset); every other numeric key has a
# lower bound, and every float key must be finite.
UNBOUNDED_BELOW = {"mel.norm_mean"}


@pytest.mark.parametrize("key, kind", list(_numeric_fields()), ids=[key for key, _ in _numeric_fields()])
def test_every_numeric_key_is_range_checked(key, kind):
    if key not in UNBOUNDED_BELOW:
        with pytest.raises(ConfigError):
            load_config(None, [f"{key}=-1000000"])
    if kind is float:
        for value in (".inf", "-.inf", ".nan"):
            with pytest.raises(ConfigError, match=f"{key}: expected a finite number"):
                load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("override, message", [
    ("trainer.min_lr_ratio=-3", "trainer.min_lr_ratio: expected in [0, 1], got -3.0"),
    ("trainer.warmup_steps=-10", "trainer.warmup_steps: expected non-negative, got -10"),
    ("trainer.grad_clip=-1", "trainer.grad_clip: expected positive"),
    ("mel.hop_length=0", "mel.hop_length: expected a positive integer, got 0"),
    ("head_vae.batch_size=0", "head_vae.batch_size: expected at least 1, got 0"),
    ("data.max_chunk_seconds=.inf", "data.max_chunk_seconds: expected a finite number, got inf"),
    ("mel.fmax=20000", "mel.fmin/fmax: expected 0 <= fmin < fmax <= sample_rate / 2"),
    ("text2tokens.duration_kernel=-1", "text2tokens.duration_kernel: expected an odd kernel size"),
    ("trainer.betas=[0.9,", "override 'trainer.betas=[0.9,': the value is not valid YAML"),
])
def test_audit_overrides_are_refused_by_name(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_every_choice_is_a_literal_whose_error_lists_the_allowed_values():
    """Each Literal key refuses another value, from an override and when set in code, naming every choice."""
    import dataclasses
    import typing

    def choice_keys(cls, prefix=""):
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint):
                yield from choice_keys(hint, f"{prefix}{name}.")
            elif typing.get_origin(hint) is typing.Literal:
                yield f"{prefix}{name}", typing.get_args(hint)

    keys = dict(choice_keys(Config))
    assert {"model.attention", "sample.method", "parallel.strategy", "trainer.precision", "task"} <= set(keys)
    for key, choices in keys.items():
        expected = f"{key}: expected one of {', '.join(choices)}, got 'bogus'"
        with pytest.raises(ConfigError) as raised:
            load_config(None, [f"{key}=bogus"])
        assert str(raised.value) == expected
        cfg = load_config(None, [])
        section, _, field = key.rpartition(".")
        setattr(cfg if not section else getattr(cfg, section), field, "bogus")
        with pytest.raises(ConfigError) as raised:
            cfg.validate()
        assert str(raised.value) == expected


def test_metric_names_are_those_evaluate_defines_and_unknown_ones_are_refused():
    import typing

    from avflow.config import MetricName
    from avflow.evaluate.metrics import METRICS

    assert set(typing.get_args(MetricName)) == set(METRICS)
    with pytest.raises(ConfigError, match=r"evaluate.val_metrics\[1\]: expected one of mel_l1, .*got 'mel_l3'"):
        load_config(None, ["evaluate.val_metrics=[mel_l1, mel_l3]"])
    cfg = load_config(None, [])
    cfg.evaluate.val_metrics.append("mel_l3")
    with pytest.raises(ConfigError, match=r"evaluate.val_metrics: expected names among mel_l1, .*got \['mel_l3'\]"):
        cfg.validate()
