"""The procedural demo corpus: determinism, 50h layout, and streams that follow the letter timeline."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from avflow.config import CorpusConfig
from avflow.data.corpus import MOUTH_CONTROLS, PERSONAS, ground_truth_mouth_controls, synthesize_segment, write_corpus
from avflow.text.normalize import normalize_text
from avflow.text.token_labels import TOKEN_LABELS

TINY = CorpusConfig(train_segments=3, val_segments=1, seed=0, words_per_segment=[8, 9])
TOKEN_DIR = "wav2vec2_fairseq_base_ls960_asr_ls960_vad100"
FIRST_FORMANT_HZ = {"A": 730, "E": 530, "I": 390, "O": 570, "U": 440}
VOWELS = set("AEIOU")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root, TINY)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def load(root: Path, name: str):
    audio, sample_rate = soundfile.read(root / "audio" / f"{name}.wav", dtype="float64", always_2d=True)
    expression = np.load(root / "expression_codes" / f"{name}.npy")
    headpose = np.load(root / "headpose" / f"{name}--headpose.npy")
    tokens = np.load(root / TOKEN_DIR / f"{name}.npy")
    return audio, sample_rate, expression, headpose, tokens


def frame_symbols(root: Path, name: str, frames: int) -> np.ndarray:
    """The symbol under each 30 fps frame centre, from the alignment file (sample spans at 48 kHz)."""
    alignment = json.loads((root / "alignments.json").read_text())[name]
    centres = (np.arange(frames) + 0.5) * 1600
    ends = np.array([end for _, _, end in alignment])
    return np.array([symbol for symbol, _, _ in alignment])[np.searchsorted(ends, centres, side="right")]


def greedy_ctc_decode(log_probs: np.ndarray) -> str:
    best = log_probs.argmax(axis=1)
    kept = [TOKEN_LABELS[label] for i, label in enumerate(best) if label != 0 and (i == 0 or best[i - 1] != label)]
    return " ".join("".join(kept).replace("|", " ").split())


def test_same_seed_is_byte_identical_and_rewrite_is_idempotent(corpus, tmp_path):
    root, _ = corpus
    write_corpus(tmp_path / "again", TINY)
    assert file_bytes(tmp_path / "again") == file_bytes(root)
    write_corpus(tmp_path / "again", TINY)
    assert file_bytes(tmp_path / "again") == file_bytes(root)


def test_different_seed_differs(corpus, tmp_path):
    root, names = corpus
    other = CorpusConfig(train_segments=3, val_segments=1, seed=1, words_per_segment=[8, 9])
    assert write_corpus(tmp_path, other) == names
    for name in names:
        assert (tmp_path / "audio" / f"{name}.wav").read_bytes() != (root / "audio" / f"{name}.wav").read_bytes()


def test_shrinking_the_corpus_removes_its_own_stale_segments(tmp_path):
    write_corpus(tmp_path, TINY)
    names = write_corpus(tmp_path, CorpusConfig(train_segments=1, val_segments=1, words_per_segment=[4, 5]))
    assert sorted(path.stem for path in (tmp_path / "audio").glob("*.wav")) == sorted(names)
    assert sorted(path.stem for path in (tmp_path / "expression_codes").glob("*.npy")) == sorted(names)


def test_names_follow_the_50h_validation_rule(corpus):
    root, names = corpus
    assert len(names) == 4
    train, val = names[:3], names[3:]
    assert all("20240408" not in name and "20240509" not in name for name in train)
    assert all("20240408" in name for name in val)
    transcripts = json.loads((root / "transcripts.json").read_text())
    assert sorted(transcripts) == sorted(names)
    assert all(8 <= len(sentence.split()) <= 9 for sentence in transcripts.values())


def test_layout_shapes_and_rates(corpus):
    root, names = corpus
    for name in names:
        info = soundfile.info(root / "audio" / f"{name}.wav")
        assert (info.samplerate, info.channels, info.subtype) == (48000, 2, "PCM_16")
        audio, _, expression, headpose, tokens = load(root, name)
        frames = expression.shape[0]
        assert expression.shape == (frames, 256) and expression.dtype == np.float32
        assert headpose.shape == (frames, 4, 4) and headpose.dtype == np.float32
        assert frames * 1600 == audio.shape[0]
        assert tokens.dtype == np.float32 and tokens.shape[0] == 2 and tokens.shape[2] == 29
        assert abs(tokens.shape[1] - frames * 50 / 30) <= 1
        assert 0.45 < np.abs(audio[:, 0]).max() <= 0.51
        assert np.abs(audio[:, 1]).max() < 0.01


def test_tokens_spell_the_transcript_and_the_participant_is_silent(corpus):
    root, names = corpus
    transcripts = json.loads((root / "transcripts.json").read_text())
    for name in names:
        tokens = load(root, name)[4]
        assert greedy_ctc_decode(tokens[0]) == normalize_text(transcripts[name])
        assert (tokens[1].argmax(axis=1) == 0).all()


def pooled_controls(root: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    controls, symbols = [], []
    for name in names:
        expression = load(root, name)[2]
        controls.append(ground_truth_mouth_controls(expression))
        symbols.append(frame_symbols(root, name, expression.shape[0]))
    return np.concatenate(controls), np.concatenate(symbols)


def test_mouth_controls_follow_the_letters(corpus):
    root, names = corpus
    controls, symbols = pooled_controls(root, names)
    assert controls.shape[1] == len(MOUTH_CONTROLS) == 4
    jaw, round_, close = (controls[:, MOUTH_CONTROLS.index(c)] for c in ("jaw_open", "lip_round", "lip_close"))
    bilabial = np.isin(symbols, list("MBP"))
    vowel = np.isin(symbols, list(VOWELS))
    assert bilabial.sum() >= 3 and (symbols == "A").sum() >= 3 and (symbols == "M").sum() >= 1
    assert close[bilabial].mean() > 0.35 and close[bilabial].mean() > close[vowel].mean() + 0.25
    assert jaw[symbols == "A"].mean() > jaw[symbols == "M"].mean() + 0.3
    assert jaw[symbols == "|"].mean() < jaw[vowel].mean()
    rounded = np.isin(symbols, list("OUW"))
    assert round_[rounded].mean() > round_[np.isin(symbols, list("AEI"))].mean() + 0.3


def test_blinks_and_the_fixed_face_mix(corpus):
    root, names = corpus
    controls, _ = pooled_controls(root, names)
    blink = controls[:, MOUTH_CONTROLS.index("blink")]
    assert blink.min() >= 0 and blink.max() > 0.5 and (blink < 0.05).mean() > 0.5
    expression = np.concatenate([load(root, name)[2] for name in names])
    design = np.column_stack([expression[:, :4], np.ones(len(expression))])
    mix, *_ = np.linalg.lstsq(design, expression[:, 4:], rcond=None)
    residual = expression[:, 4:] - design @ mix
    assert residual.std() < 0.05 < expression[:, 4:].std()


def test_audio_is_louder_during_letters_than_in_word_gaps(corpus):
    root, names = corpus
    for name in names:
        audio = load(root, name)[0][:, 0]
        alignment = json.loads((root / "alignments.json").read_text())[name]
        margin = 960  # 20 ms kept clear of each boundary, where envelopes cross-fade
        letters = [audio[start + margin:end - margin] for symbol, start, end in alignment
                   if symbol in VOWELS and end - start > 3 * margin]
        gaps = [audio[start + margin:end - margin] for symbol, start, end in alignment
                if symbol == "|" and end - start > 3 * margin]
        letter_power = np.mean(np.concatenate(letters) ** 2)
        gap_power = np.mean(np.concatenate(gaps) ** 2)
        assert letter_power > 100 * gap_power


def test_vowel_spectrum_peaks_near_its_first_formant(corpus):
    root, names = corpus
    offsets = []
    for name in names:
        audio, sample_rate = load(root, name)[:2]
        for symbol, start, end in json.loads((root / "alignments.json").read_text())[name]:
            if symbol in FIRST_FORMANT_HZ and end - start >= 0.06 * sample_rate:
                centre = (start + end) // 2
                window = audio[centre - 960:centre + 960, 0] * np.hanning(1920)
                spectrum = np.abs(np.fft.rfft(window, sample_rate))  # 1 Hz bins
                band = np.arange(200, 4000)
                offsets.append(band[spectrum[band].argmax()] - FIRST_FORMANT_HZ[symbol])
    assert len(offsets) >= 5
    assert np.all(np.abs(offsets) < 150)


def test_head_pose_is_a_small_smooth_rigid_motion(corpus):
    root, names = corpus
    for name in names:
        pose = load(root, name)[3].astype(np.float64)
        rotation = pose[:, :3, :3]
        np.testing.assert_allclose(rotation @ rotation.transpose(0, 2, 1),
                                   np.broadcast_to(np.eye(3), rotation.shape), atol=1e-5)
        np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-5)
        np.testing.assert_array_equal(pose[:, 3], np.broadcast_to([0, 0, 0, 1], (len(pose), 4)))
        angle = np.degrees(np.arccos(np.clip((np.trace(rotation, axis1=1, axis2=2) - 1) / 2, -1, 1)))
        assert angle.max() < 12
        step = np.degrees(np.arccos(np.clip((np.einsum("nij,nij->n", rotation[1:], rotation[:-1]) - 1) / 2, -1, 1)))
        assert step.max() < 1.5
        assert np.abs(pose[:, :3, 3]).max() < 0.05


def _vowel_windows(streams, sample_rate: int = 48000):
    """(symbol, 40 ms Hann-windowed actor audio) at the centre of each long enough vowel."""
    for symbol, start, end in streams.alignment:
        if symbol in FIRST_FORMANT_HZ and end - start >= 0.06 * sample_rate:
            centre = (start + end) // 2
            yield symbol, streams.audio[0, centre - 960:centre + 960] * np.hanning(1920)


def _pitch_hz(window: np.ndarray, sample_rate: int = 48000) -> float:
    """The autocorrelation peak between 70 and 300 Hz."""
    correlation = np.correlate(window, window, mode="full")[len(window) - 1:]
    lags = np.arange(sample_rate // 300, sample_rate // 70)
    return sample_rate / lags[correlation[lags].argmax()]


@pytest.mark.parametrize("name", sorted(PERSONAS))
def test_each_persona_speaks_with_its_own_pitch_and_vocal_tract(name):
    who = PERSONAS[name]
    pitches, formant_ratios = [], []
    for index in range(3):
        streams = synthesize_segment(0, index, False, [6, 8], who)
        for symbol, window in _vowel_windows(streams):
            pitches.append(_pitch_hz(window))
            spectrum = np.abs(np.fft.rfft(window, 48000))
            band = np.arange(200, 1400)
            formant_ratios.append(band[spectrum[band].argmax()] / FIRST_FORMANT_HZ[symbol])
    low, high = who.f0_range
    # intonation (+-7%) and declination (+6% to -6%) move the pitch around the segment's base
    assert low * 0.85 < np.median(pitches) < high * 1.15
    # the strongest low peak is the first formant, or its harmonic nearest to it
    assert abs(np.median(formant_ratios) - who.formant_scale) < 0.08


def test_personas_differ_in_face_style_and_head_motion():
    fitted, head_speed = {}, {}
    for name, who in PERSONAS.items():
        streams = [synthesize_segment(0, index, False, [6, 8], who) for index in range(3)]
        expression = np.concatenate([s.expression for s in streams])
        controls, rest = expression[:, :len(MOUTH_CONTROLS)], expression[:, len(MOUTH_CONTROLS):]
        fitted[name] = np.linalg.lstsq(controls, rest, rcond=None)[0]
        rotation = np.concatenate([s.headpose[:, :3, :3].astype(np.float64) for s in streams])
        step = np.einsum("nij,nij->n", rotation[1:], rotation[:-1])
        head_speed[name] = float(np.degrees(np.arccos(np.clip((step - 1) / 2, -1, 1))).mean())
    for name, mix in fitted.items():
        np.testing.assert_allclose(mix, PERSONAS[name].face_mix(), atol=0.05)  # recovered from the data alone
        for other in fitted:
            if other != name:
                assert np.abs(mix - fitted[other]).mean() > 0.2
    by_motion = sorted(PERSONAS, key=lambda name: PERSONAS[name].head_motion_scale)
    assert sorted(head_speed, key=head_speed.get) == by_motion


def test_unknown_persona_is_one_error_listing_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="corpus.identity: expected one of demo, bright, deep, quick, got 'nobody'"):
        write_corpus(tmp_path, CorpusConfig(identity="nobody"))
    assert not any(tmp_path.iterdir())
