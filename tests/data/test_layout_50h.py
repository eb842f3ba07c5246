"""The 50h layout reader: round trip from a written corpus, the validation rule, and each error."""

import shutil

import numpy as np
import pytest
import soundfile

from avflow.config import CorpusConfig
from avflow.data.corpus import write_corpus
from avflow.data.layouts.fifty_h import is_validation, list_segments, read_segment

VAL_PATTERNS = ["20240408", "20240509"]
TOKEN_DIR = "wav2vec2_fairseq_base_ls960_asr_ls960_vad100"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("written")
    names = write_corpus(root, CorpusConfig(train_segments=3, val_segments=1, words_per_segment=[3, 5]))
    return root, names


@pytest.fixture
def copy(written, tmp_path):
    """A private copy of the corpus that a test may damage, and one of its segment names."""
    root, names = written
    shutil.copytree(root, tmp_path / "data")
    return tmp_path / "data", names[0]


def test_list_segments_is_sorted_and_matches_the_writer(written):
    root, names = written
    assert list_segments(root) == sorted(names)


@pytest.mark.parametrize("name, expected", [
    ("20240408_s000", True), ("take_20240509_b", True), ("20240401_s000", False), ("20240418_s000", False)])
def test_validation_rule(name, expected):
    assert is_validation(name, VAL_PATTERNS) is expected


def test_custom_validation_patterns():
    assert is_validation("scene7", ["scene7"]) and not is_validation("scene7", [])


def test_round_trip(written):
    root, names = written
    for name in list_segments(root):
        segment = read_segment(root, name, VAL_PATTERNS)
        written_audio, sample_rate = soundfile.read(root / "audio" / f"{name}.wav", dtype="float32")
        assert segment.name == name and segment.sample_rate == sample_rate == 48000
        assert segment.audio.shape == (2, written_audio.shape[0]) and segment.audio.dtype == np.float32
        np.testing.assert_array_equal(segment.audio, written_audio.T)
        np.testing.assert_array_equal(segment.expression, np.load(root / "expression_codes" / f"{name}.npy"))
        np.testing.assert_array_equal(segment.headpose, np.load(root / "headpose" / f"{name}--headpose.npy"))
        np.testing.assert_array_equal(segment.tokens, np.load(root / TOKEN_DIR / f"{name}.npy"))
        assert segment.expression.shape[0] * 1600 == segment.audio.shape[1]
        assert segment.is_val is ("20240408" in name)
        assert segment.participant_expression is None and segment.participant_headpose is None
    assert sum(read_segment(root, name, VAL_PATTERNS).is_val for name in names) == 1


def test_participant_smirk_features_are_read_when_present(copy):
    root, name = copy
    frames = np.load(root / "expression_codes" / f"{name}.npy").shape[0]
    smirk = root / "participant" / "camera01" / "smirk_outputs"
    smirk.mkdir(parents=True)
    np.save(smirk / f"{name}--expression.npy", np.full((frames, 55), 0.25))
    np.save(smirk / f"{name}--headpose.npy", np.zeros((frames, 3)))
    segment = read_segment(root, name, VAL_PATTERNS)
    assert segment.participant_expression.shape == (frames, 55)
    assert segment.participant_expression.dtype == np.float32
    assert segment.participant_headpose.shape == (frames, 3)


def test_missing_root_and_audio_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_segments(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="audio"):
        list_segments(tmp_path)


@pytest.mark.parametrize("relative", ["expression_codes/{}.npy", "headpose/{}--headpose.npy", TOKEN_DIR + "/{}.npy",
                                      "audio/{}.wav"])
def test_missing_stream_file_names_it(copy, relative):
    root, name = copy
    (root / relative.format(name)).unlink()
    with pytest.raises(FileNotFoundError) as error:
        read_segment(root, name, VAL_PATTERNS)
    assert relative.format(name) in str(error.value)


@pytest.mark.parametrize("relative, index", [("expression_codes/{}.npy", (3, 7)),
                                             ("headpose/{}--headpose.npy", (0, 1, 2)),
                                             (TOKEN_DIR + "/{}.npy", (1, 4, 0))])
def test_non_finite_values_are_rejected(copy, relative, index):
    root, name = copy
    path = root / relative.format(name)
    array = np.load(path)
    array[index] = np.nan
    np.save(path, array)
    with pytest.raises(ValueError, match="NaN") as error:
        read_segment(root, name, VAL_PATTERNS)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("relative, reshape, expected", [
    ("expression_codes/{}.npy", lambda a: a[:, :255], r"\(N, 256\)"),
    ("headpose/{}--headpose.npy", lambda a: a.reshape(len(a), 16), r"\(N, 4, 4\)"),
    (TOKEN_DIR + "/{}.npy", lambda a: a[..., :28], r"\(channels, M, 29\)"),
    (TOKEN_DIR + "/{}.npy", lambda a: a[0], r"\(channels, M, 29\)"),
])
def test_wrong_rank_or_width_is_rejected(copy, relative, reshape, expected):
    root, name = copy
    path = root / relative.format(name)
    np.save(path, reshape(np.load(path)))
    with pytest.raises(ValueError, match=expected):
        read_segment(root, name, VAL_PATTERNS)


def truncate_expression(root, name, frames):
    path = root / "expression_codes" / f"{name}.npy"
    np.save(path, np.load(path)[:-frames])


def test_length_mismatch_is_rejected(copy):
    root, name = copy
    truncate_expression(root, name, 5)
    with pytest.raises(ValueError, match="durations disagree") as error:
        read_segment(root, name, VAL_PATTERNS)
    assert "expression_codes" in str(error.value)


def test_short_audio_is_a_mismatch_too(copy):
    root, name = copy
    path = root / "audio" / f"{name}.wav"
    audio, sample_rate = soundfile.read(path, dtype="float32")
    soundfile.write(path, audio[:-10 * 1600], sample_rate, subtype="PCM_16")
    with pytest.raises(ValueError, match="durations disagree"):
        read_segment(root, name, VAL_PATTERNS)


def test_a_one_frame_difference_is_tolerated(copy):
    root, name = copy
    truncate_expression(root, name, 1)
    assert read_segment(root, name, VAL_PATTERNS).expression.shape[1] == 256
