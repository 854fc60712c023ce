"""core/data/video.py on tiny videos made here with ffmpeg; tools/synth/video.py's boxes and motion."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.data.video import VideoError, load_video

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tools.synth.video import Box, VideoSpec, VideoSynthError, filtergraph, render  # noqa: E402

SR = 16000

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is needed (bash run.sh setup)")


def _ffmpeg(*args):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    av = d / "av.mp4"   # testsrc + 440 Hz sine, 64x64, 8 fps, 2 s
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=8:duration=2",
            "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={SR}:duration=2",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "1", "-shortest", str(av))
    mute = d / "mute.mp4"  # a red picture without an audio track
    _ffmpeg("-f", "lavfi", "-i", "color=c=red:size=64x64:rate=8:duration=2",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", str(mute))
    stereo = d / "stereo44k.mp4"  # audio at 44.1 kHz stereo: resampled and downmixed
    _ffmpeg("-f", "lavfi", "-i", "color=c=blue:size=64x48:rate=10:duration=3",
            "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=44100:duration=3",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "2", "-shortest", str(stereo))
    corrupt = d / "corrupt.mp4"
    corrupt.write_bytes(av.read_bytes()[: 300])
    empty = d / "empty.mp4"
    empty.write_bytes(b"")
    return {"av": av, "mute": mute, "stereo": stereo, "corrupt": corrupt, "empty": empty, "dir": d}


def test_frames_and_audio(media):
    clip = load_video(media["av"], num_frames=8)
    assert clip.frames.shape == (8, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.duration == pytest.approx(2.0, abs=0.01)
    assert clip.fps == pytest.approx(8 / clip.duration)
    # frame i is the one at the centre of the i-th eighth of the clip
    assert np.allclose(clip.frame_times, np.arange(8) * 0.25 + 0.125, atol=0.01)
    assert clip.audio.dtype == np.float32 and clip.audio.ndim == 1
    assert clip.sample_rate == SR and len(clip.audio) == round(clip.duration * SR)
    assert clip.has_audio and 0.1 < np.abs(clip.audio).max() <= 1.0
    # the sine is there: the spectrum's peak is at 440 Hz
    spec = np.abs(np.fft.rfft(clip.audio[4000:20000]))
    assert abs(np.argmax(spec) * SR / 16000 - 440) < 5
    # testsrc moves: not all sampled frames are equal
    assert len({f.tobytes() for f in clip.frames}) > 1


def test_more_frames_than_the_video_has_and_other_rates(media):
    clip = load_video(media["av"], num_frames=40, sample_rate=8000)
    assert clip.frames.shape[0] == 40 and clip.fps == pytest.approx(20.0, rel=0.01)
    assert len(clip.audio) == round(clip.duration * 8000)
    st = load_video(media["stereo"], num_frames=4)
    assert st.frames.shape == (4, 48, 64, 3) and st.duration == pytest.approx(3.0, abs=0.01)
    assert st.audio.ndim == 1 and len(st.audio) == 3 * SR
    assert st.frames[..., 2].mean() > 150 and st.frames[..., 0].mean() < 60  # blue


def test_segment(media):
    clip = load_video(media["av"], num_frames=4, begin_time=0.5, end_time=1.5)
    assert clip.duration == pytest.approx(1.0) and clip.fps == pytest.approx(4.0)
    assert clip.begin_time == 0.5 and len(clip.audio) == SR
    assert clip.frame_times.min() >= 0.5 - 0.125 and clip.frame_times.max() < 1.5
    whole = load_video(media["av"], num_frames=8)
    start = int(0.5 * SR)
    assert np.allclose(clip.audio, whole.audio[start: start + SR], atol=1e-6)
    # -1 / None are the ends of the file; an end a hair past the end is clipped
    assert load_video(media["av"], 2, begin_time=-1, end_time=2.03).duration == pytest.approx(2.0, abs=0.01)
    with pytest.raises(VideoError, match=r"av\.mp4: end_time 3.0 is past the end"):
        load_video(media["av"], end_time=3.0)
    with pytest.raises(VideoError, match="begin_time 2.5 is not before the end"):
        load_video(media["av"], begin_time=2.5)
    with pytest.raises(VideoError, match="must be greater than begin_time"):
        load_video(media["av"], begin_time=1.0, end_time=0.5)


def test_no_audio_track(media):
    with pytest.raises(VideoError) as err:
        load_video(media["mute"])
    msg = str(err.value)
    assert msg.startswith(str(media["mute"])) and "no audio track" in msg
    assert "data.missing_audio: silence" in msg
    clip = load_video(media["mute"], num_frames=8, missing_audio="silence")
    assert not clip.has_audio and clip.audio.dtype == np.float32
    assert len(clip.audio) == round(clip.duration * SR) and not clip.audio.any()
    assert clip.frames.shape == (8, 64, 64, 3) and clip.frames[..., 0].mean() > 200  # red


def test_bad_files(media):
    with pytest.raises(VideoError, match=r"corrupt\.mp4: unreadable or corrupt video"):
        load_video(media["corrupt"])
    with pytest.raises(VideoError, match=r"empty\.mp4: empty file \(0 bytes\)"):
        load_video(media["empty"])
    with pytest.raises(VideoError, match=r"nope\.mp4: no such video file"):
        load_video(media["dir"] / "nope.mp4")
    with pytest.raises(VideoError, match="not a regular file"):
        load_video(media["dir"])
    with pytest.raises(ValueError, match="missing_audio"):
        load_video(media["av"], missing_audio="zeros")
    with pytest.raises(ValueError, match="num_frames"):
        load_video(media["av"], num_frames=0)


def test_manifest_and_loader_agree_on_no_audio(media, tmp_path):
    """read_manifest's check and load_video use the same words for a video without sound."""
    from core.data.manifest import ManifestError, read_manifest
    m = tmp_path / "m.jsonl"
    m.write_text('{"key": "a", "video": "%s", "task": "av_qa"}\n' % media["mute"], encoding="utf-8")
    with pytest.raises(ManifestError, match="the video has no audio track"):
        read_manifest(m)


# ----------------------------------------------------------------------------- tools/synth/video.py

def test_synth_boxes_motion_and_windows(tmp_path):
    beep = tmp_path / "beep.wav"
    subprocess.run(["sox", "-n", "-r", str(SR), "-c", "1", "-b", "16", str(beep), "synth", "0.3", "sine", "1000",
                    "pad", "0.5", "0"], check=True)
    spec = VideoSpec((Box("red", 2, 2, 12, x_end=50), Box("blue", 50, 34, 12, y_end=2),
                      Box("green", 34, 50, 12, start=1.0, end=1.5)), duration=2.0, audio=str(beep))
    assert "[v]" in filtergraph(spec)
    out = tmp_path / "x.mp4"
    assert render(spec, out) == 2.0
    clip = load_video(out, num_frames=8)
    assert clip.frames.shape == (8, 64, 64, 3)
    red_x = [np.nonzero((f[..., 0] > 128).any(0))[0].min() for f in clip.frames]
    blue_y = [np.nonzero((f[..., 2] > 128).any(1))[0].min() for f in clip.frames]
    green = [(f[..., 1] > 128).sum() for f in clip.frames]
    assert red_x == sorted(red_x) and red_x[0] < 10 and red_x[-1] > 40      # left -> right
    assert blue_y == sorted(blue_y, reverse=True) and blue_y[-1] < 10        # bottom -> top
    assert [g > 100 for g in green] == [False] * 4 + [True, True] + [False] * 2  # shown in [1, 1.5)
    loud = np.nonzero(np.abs(clip.audio) > 0.2)[0] / SR
    assert 0.45 < loud.min() and loud.max() < 0.85                            # the beep at 0.5-0.8 s
    mute = render(VideoSpec((Box("red", 2, 2),), duration=2.0), tmp_path / "mute.mp4")
    assert mute == 2.0
    with pytest.raises(VideoError, match="no audio track"):
        load_video(tmp_path / "mute.mp4")
    with pytest.raises(VideoSynthError, match="bad box 0"):
        render(VideoSpec((Box("red", 2, 2, start=1.0, end=0.5),)), tmp_path / "bad.mp4")
    with pytest.raises(VideoSynthError, match="no such audio file"):
        render(VideoSpec((), audio=str(tmp_path / "none.wav")), tmp_path / "bad.mp4")
    assert not (tmp_path / "bad.mp4").exists()
