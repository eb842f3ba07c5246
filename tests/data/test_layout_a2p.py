"""The Audio2Photoreal layout reader on synthetic subject folders: streams, masks, split, wrap, errors."""

import numpy as np
import pytest
import soundfile
import torch

from avflow.config import DataConfig
from avflow.data.layouts import list_segment_names, read_segment_record
from avflow.data.layouts.a2p import list_scenes, read_body_pose, read_record, validation_scenes

TOKEN_DIR = "wav2vec2_fairseq_base_ls960_asr_ls960_vad100"
SCENE_FRAMES = {"scene01": 30, "scene02": 45, "scene03": 36, "scene04": 60}
MISSING = {"scene01": np.array([3, 4, 5, 29]), "scene02": np.array([], dtype=np.int64),
           "scene03": np.array([0]), "scene04": np.array([], dtype=np.float64)}  # np.save([]) stores float64


def write_scene(subject, name, frames, missing, seed):
    rng = np.random.default_rng(seed)
    soundfile.write(subject / f"{name}_audio.wav", rng.uniform(-0.5, 0.5, (frames * 1600, 2)), 48000, subtype="FLOAT")
    np.save(subject / f"{name}_body_pose.npy", rng.uniform(-3, 3, (frames, 104)).astype(np.float32))
    np.save(subject / f"{name}_face_expression.npy", rng.standard_normal((frames, 256)).astype(np.float32))
    np.save(subject / f"{name}_missing_face_frames.npy", missing)
    (subject / TOKEN_DIR).mkdir(exist_ok=True)
    np.save(subject / TOKEN_DIR / f"{name}.npy",
            rng.standard_normal((2, round(frames * 50 / 30), 29)).astype(np.float32))


def write_subject(root, subject_name):
    subject = root / subject_name
    subject.mkdir(parents=True)
    for seed, (name, frames) in enumerate(SCENE_FRAMES.items()):
        write_scene(subject, name, frames, MISSING[name], seed)
    torch.save({"pose_mean": torch.zeros(104), "pose_std": torch.ones(1, 104), "code_mean": torch.full((256,), 0.5),
                "code_std": torch.ones(256), "audio_mean": torch.zeros(3)}, subject / "data_stats.pth")
    return subject


@pytest.fixture
def subject(tmp_path):
    return write_subject(tmp_path, "PXB184")


def config(subject):
    return DataConfig(layout="a2p", root=str(subject.parent), subject=subject.name)


def test_scenes_are_listed_sorted_and_the_last_two_are_validation(subject):
    (subject / "notes.txt").write_text("not a scene")
    cfg = config(subject)
    assert list_scenes(subject) == list_segment_names(cfg) == sorted(SCENE_FRAMES)
    assert validation_scenes(list(SCENE_FRAMES), 2) == {"scene03", "scene04"}
    assert validation_scenes(["b", "c", "a"], 0) == set() and validation_scenes(["b", "a"], 5) == {"a", "b"}
    assert [read_segment_record(cfg, name).is_val for name in sorted(SCENE_FRAMES)] == [False, False, True, True]


def test_records_carry_every_stream_at_its_native_rate(subject):
    cfg = config(subject)
    for name, frames in SCENE_FRAMES.items():
        record = read_segment_record(cfg, name)
        audio, _ = soundfile.read(subject / f"{name}_audio.wav", dtype="float32")
        pose = np.load(subject / f"{name}_body_pose.npy")
        assert record.name == name and record.sample_rate == 48000
        assert record.visual_fps == cfg.visual_fps == 30.0 and record.token_fps == cfg.token_fps == 50.0
        np.testing.assert_array_equal(record.audio, audio.T)
        assert record.expression.shape == (frames, 256) and record.expression.dtype == np.float32
        np.testing.assert_array_equal(record.head_pose, pose[:, 12:16])
        np.testing.assert_array_equal(record.tokens, np.load(subject / TOKEN_DIR / f"{name}.npy"))
        assert record.tokens.shape == (2, round(frames * 50 / 30), 29)
        assert record.participant_features is None
        assert record.identity == "PXB184"  # the subject: one model may train on several


def test_the_identity_is_the_subject_folder_however_the_subject_is_named(tmp_path):
    subject = write_subject(tmp_path / "dataset", "TXB805")
    by_root = DataConfig(layout="a2p", root=str(subject.parent), subject="TXB805")
    assert read_segment_record(by_root, "scene01").identity == "TXB805"
    assert read_record(subject, "scene01", DataConfig(layout="a2p")).identity == "TXB805"


def test_missing_face_frames_are_masked_and_kept_as_stored(subject):
    record = read_segment_record(config(subject), "scene01")
    assert record.expression_valid.dtype == bool and record.expression_valid.shape == (30,)
    assert np.flatnonzero(~record.expression_valid).tolist() == [3, 4, 5, 29]
    np.testing.assert_array_equal(record.expression, np.load(subject / "scene01_face_expression.npy"))
    for name in ("scene02", "scene04"):
        assert read_segment_record(config(subject), name).expression_valid.all()


def test_pose_column_3_is_wrapped_for_pxb184_only_and_the_head_pose_is_unaffected(tmp_path):
    wrapped_subject = write_subject(tmp_path, "PXB184")
    plain_subject = write_subject(tmp_path, "TXB805")
    raw = np.load(wrapped_subject / "scene01_body_pose.npy")
    wrapped, plain = read_body_pose(wrapped_subject, "scene01"), read_body_pose(plain_subject, "scene01")
    np.testing.assert_allclose(wrapped[:, 3], np.mod(raw[:, 3].astype(np.float64) + np.pi, 2 * np.pi), atol=1e-6)
    assert (wrapped[:, 3] >= 0).all() and (wrapped[:, 3] < 2 * np.pi).all()
    np.testing.assert_array_equal(np.delete(wrapped, 3, axis=1), np.delete(raw, 3, axis=1))
    np.testing.assert_array_equal(plain, raw)
    cfg = DataConfig(layout="a2p", root=str(tmp_path))
    np.testing.assert_array_equal(read_record(wrapped_subject, "scene01", cfg).head_pose,
                                  read_record(plain_subject, "scene01", cfg).head_pose)


def test_audio_pose_invariant_names_both_files_and_counts(subject):
    audio, _ = soundfile.read(subject / "scene02_audio.wav", dtype="float32")
    soundfile.write(subject / "scene02_audio.wav", audio[:-10], 48000, subtype="FLOAT")
    with pytest.raises(ValueError) as error:
        read_segment_record(config(subject), "scene02")
    message = str(error.value)
    assert "scene02_body_pose.npy" in message and "scene02_audio.wav" in message
    assert "45 frames" in message and "72000" in message and "71990" in message


def test_non_finite_values_are_refused(subject):
    pose = np.load(subject / "scene01_body_pose.npy")
    pose[7, 50] = np.nan
    np.save(subject / "scene01_body_pose.npy", pose)
    with pytest.raises(ValueError, match="scene01_body_pose.npy: contains NaN or inf"):
        read_segment_record(config(subject), "scene01")
    expression = np.load(subject / "scene03_face_expression.npy")
    expression[0, 0] = np.inf  # even at a missing frame: interpolation would spread it into valid frames
    np.save(subject / "scene03_face_expression.npy", expression)
    with pytest.raises(ValueError, match="scene03_face_expression.npy: contains NaN or inf"):
        read_segment_record(config(subject), "scene03")


def test_missing_frames_file_needing_pickle_is_refused(subject):
    np.save(subject / "scene01_missing_face_frames.npy", np.array([[3, 4], [5]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="scene01_missing_face_frames.npy: needs pickle"):
        read_segment_record(config(subject), "scene01")


@pytest.mark.parametrize("indices, expected", [
    (np.array([2, 30]), r"frame indices \[30\] lie outside \[0, 30\)"),
    (np.array([-1]), r"frame indices \[-1\] lie outside"),
    (np.array([1.0, 2.0]), "expected integer frame indices"),
    (np.zeros((2, 2), dtype=np.int64), "expected a 1-D array"),
])
def test_bad_missing_frame_indices(subject, indices, expected):
    np.save(subject / "scene01_missing_face_frames.npy", indices)
    with pytest.raises(ValueError, match=expected):
        read_segment_record(config(subject), "scene01")


def test_shape_and_duration_errors_name_the_file(subject):
    cfg = config(subject)
    np.save(subject / "scene01_body_pose.npy", np.zeros((30, 103), dtype=np.float32))
    with pytest.raises(ValueError, match=r"scene01_body_pose.npy: expected body pose of shape \(T, 104\)"):
        read_segment_record(cfg, "scene01")
    np.save(subject / "scene02_face_expression.npy", np.zeros((44, 256), dtype=np.float32))
    with pytest.raises(ValueError, match="scene02_face_expression.npy has 44 frames; expected 45"):
        read_segment_record(cfg, "scene02")
    np.save(subject / TOKEN_DIR / "scene03.npy", np.zeros((2, 40, 29), dtype=np.float32))
    with pytest.raises(ValueError, match="scene03.npy covers 0.800 s"):
        read_segment_record(cfg, "scene03")
    np.save(subject / TOKEN_DIR / "scene04.npy", np.zeros((2, 100, 28), dtype=np.float32))
    with pytest.raises(ValueError, match=r"scene04.npy: expected token logits of shape \(channels, M, 29\)"):
        read_segment_record(cfg, "scene04")


def test_wrong_sample_rate_and_missing_files(subject):
    cfg = config(subject)
    soundfile.write(subject / "scene01_audio.wav", np.zeros((30 * 1600, 2)), 44100)
    with pytest.raises(ValueError, match="scene01_audio.wav: sample rate 44100 Hz; expected 48000"):
        read_segment_record(cfg, "scene01")
    (subject / "scene02_missing_face_frames.npy").unlink()
    with pytest.raises(FileNotFoundError, match="scene02_missing_face_frames.npy"):
        read_segment_record(cfg, "scene02")
    with pytest.raises(FileNotFoundError, match="subject folder not found"):
        list_segment_names(DataConfig(layout="a2p", root=str(subject.parent), subject="GQS883"))


def test_subject_packs_into_shards_with_4d_pose_and_face_masks(subject, tmp_path):
    from avflow.config import load_config
    from avflow.data.pack import pack
    from avflow.data.shard_index import iter_split_arrays

    cfg = load_config(None, ["data.layout=a2p", f"data.root={subject.parent}", f"data.subject={subject.name}",
                             "head_vae.pose_dim=4", "pack.name=PXB184"])
    manifest = pack(cfg, tmp_path / "shards", progress=False)
    assert manifest["dims"]["pose"] == 4
    assert manifest["splits"]["train"]["samples"] == 2 and manifest["splits"]["val"]["samples"] == 2
    train = {len(a["pose"]): a for a in iter_split_arrays(tmp_path / "shards", "train", ("pose", "expression_valid"))}
    frames_scene01 = int(30 / 30 * 22050) // 256
    scene01 = train[frames_scene01]
    times = np.arange(frames_scene01) / (22050 / 256)
    near_missing = (times > 2 / 30) & (times < 6 / 30) | (times > 28 / 30)  # face frames 3, 4, 5 and 29
    assert not scene01["expression_valid"][near_missing].any()
    assert scene01["expression_valid"][~near_missing].all()
