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


# The `data` and `pack` sections as avflow wrote them before `data` held only what shards are made of (every field
# of the old DataConfig and PackConfig, none at its default).
OLD_DATA = {"layout": "50h", "root": "/data/50h", "subject": "", "segment_length": 172,
            "val_patterns": ["20240408"], "visual_fps": 30.0, "token_fps": 50.0, "val_last_scenes": 3,
            "participant_mel": False, "canonical_quaternion_sign": True, "head_vae": "/runs/vae.pt",
            "shards": "/shards/50h", "num_workers": 4, "shuffle_buffer": 16, "max_bad_fraction": 0.02,
            "avatar": "/data/50h-release", "avatar_pose": "relative"}
OLD_PACK = {"name": "50h", "segments_per_shard": 8, "max_chunk_seconds": 30.0, "workers": 8, "skip_bad": True}
MOVES = ["data.segment_length -> loader.segment_length", "data.shards -> loader.shards",
         "data.num_workers -> loader.num_workers", "data.shuffle_buffer -> loader.shuffle_buffer",
         "data.max_bad_fraction -> loader.max_bad_fraction", "data.head_vae -> trainer.head_vae",
         "data.avatar -> evaluate.avatar", "data.avatar_pose -> evaluate.avatar_pose"]
PACK_MOVES = ["pack.segments_per_shard -> data.segments_per_shard", "pack.max_chunk_seconds -> data.max_chunk_seconds"]


def assert_old_values_in_new_places(cfg, pack=True):
    assert (cfg.data.root, cfg.data.val_patterns, cfg.data.val_last_scenes) == ("/data/50h", ["20240408"], 3)
    assert (cfg.loader.segment_length, cfg.loader.shards, cfg.loader.num_workers, cfg.loader.shuffle_buffer,
            cfg.loader.max_bad_fraction) == (172, "/shards/50h", 4, 16, 0.02)
    assert cfg.trainer.head_vae == "/runs/vae.pt"
    assert (cfg.evaluate.avatar, cfg.evaluate.avatar_pose) == ("/data/50h-release", "relative")
    if pack:
        assert (cfg.data.segments_per_shard, cfg.data.max_chunk_seconds) == (8, 30.0)
        assert (cfg.pack.name, cfg.pack.workers, cfg.pack.skip_bad) == ("50h", 8, True)


def moved_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "avflow.config.loading"]


def test_a_config_dict_of_the_old_shape_loads_with_one_warning_naming_every_move(caplog):
    from avflow.config import config_from_dict

    with caplog.at_level("WARNING", logger="avflow.config"):
        cfg = config_from_dict({"data": dict(OLD_DATA), "pack": dict(OLD_PACK)}, "old.yaml")
    assert_old_values_in_new_places(cfg)
    (warning,) = moved_warnings(caplog)
    assert warning.startswith("old.yaml: ")
    for move in MOVES + PACK_MOVES:
        assert move in warning


def test_an_old_config_file_and_old_overrides_load_with_one_warning(tmp_path, caplog):
    import yaml

    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"data": {key: OLD_DATA[key] for key in ("layout", "root", "shards", "num_workers")},
                                    "pack": {"name": "50h", "workers": 8}}))
    overrides = ["data.avatar=/data/50h-release", "pack.max_chunk_seconds=30", "loader.shuffle_buffer=16"]
    with caplog.at_level("WARNING", logger="avflow.config"):
        cfg = load_config(path, overrides)
    assert (cfg.loader.shards, cfg.loader.num_workers, cfg.loader.shuffle_buffer) == ("/shards/50h", 4, 16)
    assert (cfg.evaluate.avatar, cfg.data.max_chunk_seconds, cfg.pack.workers) == ("/data/50h-release", 30.0, 8)
    (warning,) = moved_warnings(caplog)
    for move in ("data.shards -> loader.shards", "data.num_workers -> loader.num_workers",
                 "data.avatar -> evaluate.avatar (override)", "pack.max_chunk_seconds -> data.max_chunk_seconds"):
        assert move in warning
    assert "shuffle_buffer" not in warning and "pack.workers" not in warning

    caplog.clear()
    with caplog.at_level("WARNING", logger="avflow.config"):
        load_config(None, ["loader.num_workers=2", "evaluate.avatar=/x"])
        Config().validate()
    assert moved_warnings(caplog) == []


def test_a_key_given_in_its_old_and_its_new_place_is_refused(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("data:\n  num_workers: 4\nloader:\n  num_workers: 2\n")
    with pytest.raises(ConfigError, match="data.num_workers and loader.num_workers are both set"):
        load_config(path)


def test_a_checkpoint_config_of_the_old_shape_loads(tmp_path, caplog):
    """What checkpoints and model files written before the move store: `Config.checkpoint_dict()` of the old
    sections (no `pack`, `corpus` or `loader`; the loader keys, head-VAE path and avatar inside `data`)."""
    from avflow.model.io import checkpoint_config

    stored = Config().checkpoint_dict()
    del stored["loader"]
    del stored["trainer"]["head_vae"]
    del stored["evaluate"]["avatar"], stored["evaluate"]["avatar_pose"]
    stored["data"] = dict(OLD_DATA)
    with caplog.at_level("WARNING", logger="avflow.config"):
        cfg = checkpoint_config({"config": stored}, tmp_path / "checkpoint-1000")
    assert_old_values_in_new_places(cfg, pack=False)
    (warning,) = moved_warnings(caplog)
    assert warning.startswith(f"{tmp_path / 'checkpoint-1000'}: ") and all(move in warning for move in MOVES)


def test_each_section_validates_its_own_keys():
    """A section checks its values alone (no Config around it), with the same `section.key: expected` message."""
    from avflow.config import DataConfig, LoaderConfig, PackConfig

    for section, message in ((LoaderConfig(num_workers=-1), "loader.num_workers/shuffle_buffer: expected"),
                             (DataConfig(segments_per_shard=0), "data.segments_per_shard: expected at least 1"),
                             (PackConfig(workers=0), "pack.workers: expected at least 1, got 0")):
        with pytest.raises(ConfigError, match=message):
            section.validate()
    with pytest.raises(ConfigError, match="evaluate.avatar: expected empty unless head poses are 7-d"):
        load_config(None, ["evaluate.avatar=/data/50h", "head_vae.pose_dim=4"])
