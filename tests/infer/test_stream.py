"""Streaming generation: the streamed mel and motion equal `generate`'s, BigVGAN chunks equal whole-mel vocoding,
Griffin-Lim chunks leave no seam, text line by line, an interrupted feed, the length cap, and `avflow stream`'s
files (stream.wav valid after every chunk)."""

import dataclasses
import json
import wave

import numpy as np
import pytest
import torch
from helpers import tiny_model_file

from avflow.cli import main
from avflow.config import MelConfig
from avflow.data.features import interpolate_frames, log_mel
from avflow.infer.generate import conditioning, generate_batch
from avflow.infer.model import load_inference_model
from avflow.infer.stream import Stream
from avflow.infer.stream_inputs import Piece
from avflow.infer.stream_writer import StreamWriter
from avflow.vocoder.bigvgan import BigVGAN, BigVGANConfig
from avflow.vocoder.chunked import BIGVGAN_CONTEXT_FRAMES, ChunkVocoder
from avflow.vocoder.griffin_lim import mel_to_audio
from avflow.vocoder.vocode import vocode

WINDOWS = ["sample.max_frames=80", "sample.window_overlap=12"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("stream") / "tiny.safetensors", ["sample.temperature=0.8"])


@pytest.fixture(scope="module")
def model(model_file):
    return load_inference_model(model_file, "cpu")


def _tokens(frames, seed=0):
    return np.random.default_rng(seed).normal(size=(frames, 29)).astype(np.float32)


def _window_config(model):
    return dataclasses.replace(model.cfg.sample, num_samples=1, max_frames=80, window_overlap=12)


@pytest.mark.parametrize("frames, first_window_s",
                         [(347, None), (347, 0.35), (80, None), (81, None), (148, None), (149, None), (23, None)])
def test_the_stream_speaks_and_moves_as_generate_does(model, frames, first_window_s):
    """Tokens known whole, one sample, the same seed and windows: the streamed mel equals generate's, and the
    30 fps expression codes and head poses equal generate's written ones (lengths below, at and around one
    window, at and just past two windows, and five windows, so every kind of window edge is crossed; a shorter
    first window changes the windows, so there it equals the windowed sampler on its own plan only)."""
    tokens = _tokens(frames)
    sample_cfg = _window_config(model)
    chunks = list(model.stream(tokens=tokens, sample_cfg=sample_cfg, first_window_s=first_window_s))
    assert [c.mel_start for c in chunks] == list(np.cumsum([0] + [c.mel.shape[0] for c in chunks]))[:-1]
    assert [c.motion_start for c in chunks] == list(np.cumsum([0] + [c.expression.shape[0] for c in chunks]))[:-1]
    mel = np.concatenate([c.mel for c in chunks])
    expression = np.concatenate([c.expression for c in chunks])
    head_pose = np.concatenate([c.head_pose for c in chunks])
    audio = np.concatenate([c.audio for c in chunks])
    frames_30 = max(1, round(frames / model.cfg.mel.frame_rate * 30))
    assert mel.shape[0] == frames and audio.size == frames * model.cfg.mel.hop_length
    assert expression.shape[0] == head_pose.shape[0] == frames_30
    if first_window_s is not None:
        assert len(chunks) > 1 and chunks[0].mel.shape[0] == round(0.35 * model.cfg.mel.frame_rate) - 12
        return
    expected = generate_batch(model, [conditioning(model, tokens)], sample_cfg)[0]
    np.testing.assert_allclose(mel, expected.mel[0], atol=1e-5 * np.abs(expected.mel).max(), rtol=0)
    for streamed, generated in ((expression, expected.expression[0]), (head_pose, expected.head_pose[0])):
        written = interpolate_frames(generated, model.cfg.mel.frame_rate, frames_30, 30.0)
        np.testing.assert_allclose(streamed, written, atol=1e-5 * np.abs(written).max(), rtol=0)


def test_avflow_stream_writes_what_avflow_generate_writes(model_file, tmp_path):
    """The issue's command pair: `generate ... sample.max_frames=80 sample.window_overlap=12` and `stream` with the
    same overrides write the same 30 fps expression codes, head poses and head transforms."""
    np.save(tmp_path / "speech.npy", _tokens(300, seed=3))  # 50 Hz: 6 s, 516 mel frames, 8 windows
    common = ["--checkpoint", str(model_file), "--tokens", str(tmp_path / "speech.npy"), *WINDOWS]
    assert main(["generate", *common, "--num-samples", "1", "-o", str(tmp_path / "generate")]) == 0
    assert main(["stream", *common, "-o", str(tmp_path / "stream")]) == 0
    generated, streamed = np.load(tmp_path / "generate" / "speech_s0.npz"), np.load(tmp_path / "stream" / "stream.npz")
    for name in ("expression", "head_pose", "head_transform"):
        assert streamed[name].shape == generated[name].shape, name
        np.testing.assert_allclose(streamed[name], generated[name], atol=1e-5 * np.abs(generated[name]).max(),
                                   rtol=0, err_msg=name)
    with wave.open(str(tmp_path / "stream" / "stream.wav")) as wav:
        assert wav.getnframes() == 516 * 256
    latency = json.loads((tmp_path / "stream" / "latency.json").read_text())
    assert latency["window_frames"] == 80 and latency["first_audio_s"] > 0 and latency["real_time_factor"] > 0


def test_chunked_bigvgan_equals_vocoding_the_whole_mel():
    """Each chunk vocoded with BIGVGAN_CONTEXT_FRAMES of mel on both sides is the whole mel's audio, in chunks of
    any size (the generator's receptive field is +-13 mel frames)."""
    torch.manual_seed(0)
    vocoder = BigVGAN(BigVGANConfig(upsample_initial_channel=32)).eval()
    with torch.no_grad():
        for parameter in vocoder.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    cfg = MelConfig()
    mel = (-5.5 + 2.0 * torch.randn(150, 80, generator=torch.Generator().manual_seed(1))).numpy()
    whole = vocode(torch.from_numpy(mel), vocoder, cfg).numpy()
    errors = {}
    for context in (BIGVGAN_CONTEXT_FRAMES, 0):
        chunked = ChunkVocoder(vocoder, cfg)
        chunked.context = context
        finals = (9, 40, 41, 77, 120, 150)
        streamed = np.concatenate([chunked.audio(mel[:final], edge=final == 150) for final in finals])
        assert streamed.size == whole.size
        errors[context] = np.abs(streamed - whole).max()
    assert errors[BIGVGAN_CONTEXT_FRAMES] < 5e-5  # fp32 rounding through ~30 convolutions of other lengths
    assert errors[0] > 1e-2  # without context, every chunk edge would be audible


def _mel_error_by_frame(audio, mel, cfg):
    analysed = log_mel(torch.from_numpy(audio), cfg).T.numpy()[:mel.shape[0]]
    return np.abs(analysed - mel[:analysed.shape[0]]).mean(1)


def test_chunked_griffin_lim_keeps_the_seam_at_chunk_edges_small():
    """Griffin-Lim reconstructs phases; chunks that each started their own would leave a seam at every edge. Each
    chunk keeps the audio already out and continues it: the re-analysed mel's error in the frames at chunk
    edges, relative to the error elsewhere, is measured against whole-mel Griffin-Lim's (whose frames at those
    positions are not edges) and against chunks vocoded on their own."""
    cfg = MelConfig()
    rng = np.random.default_rng(0)
    frames = 400  # a smooth, speech-like mel: slowly varying band energies
    mel = (-6 + 2.5 * np.sin(np.arange(frames)[:, None] / 9.0 + np.arange(80)[None] / 7.0)
           + 0.3 * rng.normal(size=(frames, 80))).astype(np.float32)
    chunked, edges, pieces = ChunkVocoder(None, cfg), [], []
    for final in range(60, frames + 1, 60):
        pieces.append(chunked.audio(mel[:final], edge=False))
        edges.append(chunked.done)
    pieces.append(chunked.audio(mel, edge=True))
    near = np.zeros(frames, bool)
    for edge in edges[:-1]:
        near[max(0, edge - 2):edge + 2] = True
    alone = np.concatenate([mel_to_audio(torch.from_numpy(mel[start:end]).T, cfg).numpy()
                            for start, end in zip([0, *edges], [*edges, frames]) if end > start])
    ratios = {}
    for name, audio in (("stream", np.concatenate(pieces)), ("whole", mel_to_audio(torch.from_numpy(mel).T, cfg)
                                                              .numpy()), ("alone", alone)):
        assert audio.size == frames * cfg.hop_length
        error = _mel_error_by_frame(audio, mel, cfg)
        ratios[name] = error[near[:error.size]].mean() / error[~near[:error.size]].mean()
    print("Griffin-Lim mel error at chunk edges / elsewhere: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    assert ratios["alone"] > 2.0  # the seam there is to remove
    assert ratios["stream"] < 1.5  # measured 1.25 (whole-mel Griffin-Lim: 0.94)


def test_text_line_by_line_speaks_each_line_before_the_next_arrives_and_skips_what_cannot_be_spoken(model):
    """Each line is one utterance: all of its audio and motion come out before the next line is read. A line
    with nothing to speak is reported and skipped, an empty one passed over."""
    read = []

    def lines():
        for line in ["hello there", "...", "", "how are you today"]:
            read.append(line)
            yield line + "\n"

    stream = model.stream(lines=lines(), sample_cfg=_window_config(model))
    audio_before_read = {}
    for chunk in stream:
        audio_before_read[len(read)] = audio_before_read.get(len(read), 0) + chunk.audio.size
    first_line_frames = conditioning(model, _first_line_tokens(model)).shape[0]
    assert audio_before_read[1] == first_line_frames * model.cfg.mel.hop_length  # all of line 1 before line 2
    assert [entry["line"] for entry in stream.skipped] == [2] and "no letters" in stream.skipped[0]["reason"]
    assert stream.summary()["skipped_lines"] == stream.skipped


def _first_line_tokens(model):
    from avflow.infer.inputs import tokens_for_text

    return tokens_for_text(model, "hello there", 1.0, 1.0, model.cfg.sample.seed + 1)


def _interrupted(model, pieces, stop_after):
    cond = conditioning(model, _tokens(pieces * 40))
    for index in range(pieces):
        if index == stop_after:
            raise OSError("connection reset by peer")
        yield Piece(cond[index * 40:(index + 1) * 40], False, 0.0)


def test_an_interrupted_feed_ends_the_stream_with_everything_that_arrived(model, tmp_path):
    """The source fails after 3 of 6 pieces (120 frames): the stream ends cleanly, every arrived frame is spoken
    and written, and the files are valid."""
    stream = Stream(model, _interrupted(model, 6, 3), _window_config(model))
    writer = StreamWriter(tmp_path, model.cfg, video=False)
    for chunk in stream:
        writer.add(chunk)
        with wave.open(str(tmp_path / "stream.wav")) as wav:  # a valid wav after every chunk
            assert wav.getnframes() == sum(c["audio_samples"] for c in stream.chunks)
    writer.close(stream.summary())
    assert "connection reset" in stream.interrupted
    with wave.open(str(tmp_path / "stream.wav")) as wav:
        assert wav.getnframes() == 120 * model.cfg.mel.hop_length
    assert np.load(tmp_path / "stream.npz")["expression"].shape[0] == round(120 / model.cfg.mel.frame_rate * 30)
    assert json.loads((tmp_path / "latency.json").read_text())["interrupted"].startswith("OSError")


def test_the_video_is_encoded_as_chunks_come_and_appears_whole_when_the_stream_ends(model, tmp_path, monkeypatch):
    """With a face decoder, each chunk's frames go to ffmpeg as the chunk comes (counted at the encoder's input),
    while nothing is under stream.mp4; an interrupted feed still ends with a complete stream.mp4 holding every
    frame that came, with the speech muxed in, and no scratch file left behind."""
    import subprocess

    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="the video needs imageio-ffmpeg")
    from avflow.render import ProceduralFaceDecoder

    encoded = []
    write_frames = imageio_ffmpeg.write_frames

    def counting_write_frames(*args, **kwargs):
        encoder = write_frames(*args, **kwargs)

        class Counting:
            def send(self, frame):
                encoded.extend([] if frame is None else [frame.shape])
                return encoder.send(frame)

            def close(self):
                encoder.close()

        return Counting()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", counting_write_frames)
    stream = Stream(model, _interrupted(model, 6, 3), _window_config(model),
                    face_decoder=ProceduralFaceDecoder(latitudes=6, longitudes=8))
    writer = StreamWriter(tmp_path, model.cfg, video=True)
    rendered = 0
    for chunk in stream:
        writer.add(chunk)
        rendered += 0 if chunk.frames is None else chunk.frames.shape[0]
        assert len(encoded) == rendered  # encoded now, not held until the end
        assert not (tmp_path / "stream.mp4").exists()
    written = writer.close(stream.summary())
    frames_30 = round(120 / model.cfg.mel.frame_rate * 30)
    assert rendered == frames_30 and tmp_path / "stream.mp4" in written
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "stream.mp4"))
    next(reader)
    assert sum(1 for _ in reader) == frames_30
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(tmp_path / "stream.mp4")], capture_output=True,
                           text=True)
    assert "Audio: aac" in probe.stderr
    assert not list(tmp_path.glob(".*"))


def test_the_input_length_cap_applies_per_stream(model_file, tmp_path, capsys, monkeypatch):
    """Lines whose total passes sample.max_input_seconds: the stream stops there with one error line (exit 2),
    and what came before is written."""
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there friend\n" * 6))
    assert main(["stream", "--checkpoint", str(model_file), "--text", "-", "--max-input-seconds", "2.5",
                 "-o", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "sample.max_input_seconds=2.5" in error and len(error.splitlines()) == 1
    with wave.open(str(tmp_path / "stream.wav")) as wav:
        assert 0 < wav.getnframes() <= 2.5 * 22050
    assert (tmp_path / "stream.npz").is_file() and (tmp_path / "latency.json").is_file()


@pytest.mark.parametrize("arguments, message", [
    (["--num-samples", "3"], "avflow stream speaks one sample"),
    (["--realtime"], "--realtime feeds --tokens and --audio files"),
    (["--first-window", "0.05"], "first window: expected more than the overlap"),
    (["model.d_model=64"], "only sample.* keys apply here"),
    (["--max-input-seconds", "0.2"], "sample.max_input_seconds=0.2"),
])
def test_bad_stream_options_fail_with_one_line_before_anything_is_written(model_file, tmp_path, capsys, arguments,
                                                                          message):
    assert main(["stream", "--checkpoint", str(model_file), "--text", "hello", "-o", str(tmp_path / "out"),
                 *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out" / "stream.wav").exists()


def test_tokens_fed_in_real_time_come_out_before_the_input_ends_and_as_the_whole_input_would(model):
    """Fed at its real pace (3.5 s in 34 pieces), the input's first audio comes out while it is still arriving,
    the latency is measured from its first piece, and the result is the stream of the whole input (the same
    windows)."""
    tokens = _tokens(300)
    sample_cfg = _window_config(model)
    live = model.stream(tokens=tokens, sample_cfg=sample_cfg, realtime=True)
    chunks, pieces_at_first_audio = [], None
    for chunk in live:
        chunks.append(chunk)
        if chunk.audio.size and pieces_at_first_audio is None:
            pieces_at_first_audio = len(live._arrivals)
    assert pieces_at_first_audio < len(live._arrivals) == 34
    assert live.summary()["measured_from"] == "first input"
    whole = np.concatenate([c.mel for c in model.stream(tokens=tokens, sample_cfg=sample_cfg)])
    np.testing.assert_allclose(np.concatenate([c.mel for c in chunks]), whole, atol=1e-5 * np.abs(whole).max())


def test_speech_is_turned_into_tokens_chunk_by_chunk(model, tiny_wav2vec2, tmp_path):
    from avflow.data.features import save_wav

    seconds = 2.5
    save_wav(tmp_path / "speech.wav", 0.1 * np.random.default_rng(0).normal(size=int(16000 * seconds)), 16000)
    chunks = list(model.stream(audio=tmp_path / "speech.wav", asr_model=tiny_wav2vec2,
                               sample_cfg=_window_config(model)))
    frames = sum(c.mel.shape[0] for c in chunks)
    assert frames == int(seconds * model.cfg.mel.frame_rate)
    assert sum(c.audio.size for c in chunks) == frames * model.cfg.mel.hop_length
