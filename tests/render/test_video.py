"""Video writing: frames and audio round trip through the .mp4, samples side by side."""

import subprocess

import numpy as np
import pytest

from avflow.render import side_by_side, write_video


def test_side_by_side_places_videos_left_to_right():
    left, right = np.zeros((4, 6, 5, 3), np.uint8), np.full((4, 6, 7, 3), 255, np.uint8)
    joined = side_by_side([left, right])
    assert joined.shape == (4, 6, 12, 3) and joined[:, :, 5:].min() == 255
    with pytest.raises(ValueError, match=r"videos\[1\]"):
        side_by_side([left, right[:3]])


def test_write_video_reads_back_with_its_frames_and_audio(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="write_video needs imageio-ffmpeg")
    fps, frames, sample_rate = 10, 15, 16000
    video = np.zeros((frames, 24, 31, 3), np.uint8)  # odd width: padded to even for yuv420p
    video[:, :, :, 0] = np.linspace(0, 255, frames, dtype=np.uint8)[:, None, None]
    audio = 0.2 * np.sin(2 * np.pi * 440 * np.arange(int(1.5 * sample_rate)) / sample_rate)
    path = tmp_path / "out" / "clip.mp4"
    write_video(path, video, fps, audio, sample_rate)

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    decoded = [np.frombuffer(frame, np.uint8).reshape(meta["size"][1], meta["size"][0], 3) for frame in reader]
    assert meta["size"] == (32, 24) and meta["fps"] == pytest.approx(fps)
    assert len(decoded) == frames
    assert abs(int(decoded[-1][12, 10, 0]) - 255) < 10 and int(decoded[0][12, 10, 0]) < 10
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(path)], capture_output=True, text=True)
    assert "Audio: aac" in probe.stderr
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"]  # no temporary files left behind


def test_video_writer_encodes_pieces_as_they_come_and_leaves_nothing_when_discarded(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="VideoWriter needs imageio-ffmpeg")
    from avflow.render import VideoWriter

    video = np.zeros((12, 16, 20, 3), np.uint8)
    video[:, :, :, 1] = np.linspace(0, 255, 12, dtype=np.uint8)[:, None, None]
    writer = VideoWriter(tmp_path / "clip.mp4", 10)
    for first, last in ((0, 5), (5, 5), (5, 9), (9, 12)):  # pieces of 5, 0, 4 and 3 frames
        writer.append(video[first:last])
    with pytest.raises(ValueError, match="16 x 20"):
        writer.append(np.zeros((1, 16, 22, 3), np.uint8))
    assert not (tmp_path / "clip.mp4").exists()
    writer.close()
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "clip.mp4"))
    next(reader)
    decoded = [np.frombuffer(frame, np.uint8).reshape(16, 20, 3) for frame in reader]
    assert len(decoded) == 12 and int(decoded[0][8, 10, 1]) < 10 and abs(int(decoded[-1][8, 10, 1]) - 255) < 10

    discarded = VideoWriter(tmp_path / "other.mp4", 10)
    discarded.append(video)
    discarded.discard()
    assert [path.name for path in tmp_path.iterdir()] == ["clip.mp4"]
