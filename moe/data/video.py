"""Reading and writing clip videos (H.264 MP4 through PyAV).

Every failure a user can cause (a missing, truncated or non-video file, odd frame sizes) becomes a
`MoeError` naming the file; raw PyAV exceptions never reach the caller. Writes are atomic, so an
interrupted run never leaves a half-written clip that a later run would mistake for a good one.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from moe.errors import MoeError
from moe.files.atomic import atomic_file

# The errors PyAV raises for unreadable input; av's FileNotFoundError etc. derive from both.
_AV_ERRORS = (av.error.FFmpegError, OSError, EOFError)
# The container comment of every MP4 we write: `written_by_lora_moe` recognises our files.
VIDEO_MARKER = "written by wan-lora-moe"
MAX_FPS = 240


@contextmanager
def _open_for_reading(path: Path) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """Open `path` and its first video stream, translating every failure into a `MoeError`."""
    if not path.is_file():
        raise MoeError(f"video {path} does not exist")
    try:
        container = av.open(str(path), "r")
    except _AV_ERRORS as e:
        raise MoeError(f"video {path} is unreadable or corrupt ({e})") from None
    try:
        if not container.streams.video:
            raise MoeError(f"{path} has no video stream")
        yield container, container.streams.video[0]
    finally:
        container.close()


def _stream_fps(stream: av.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def iter_frames(path: str | Path, size: tuple[int, int] | None = None, only: Collection[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (frame index, uint8 RGB array [H, W, 3]) for the frames of `path`, in order.

    Streaming keeps memory flat for long source videos (a Cholec80 video is an hour long).
    `size` = (width, height) rescales while converting. With `only`, other frames are decoded
    but not converted, and decoding stops after the last wanted frame.
    """
    path = Path(path)
    width, height = size if size is not None else (None, None)
    last = max(only, default=-1) if only is not None else None
    with _open_for_reading(path) as (container, stream):
        try:
            for index, frame in enumerate(container.decode(stream)):
                if last is not None and index > last:
                    return
                if only is None or index in only:
                    yield index, frame.to_ndarray(format="rgb24", width=width, height=height)
        except _AV_ERRORS as e:
            raise MoeError(f"video {path} is corrupt: decoding failed ({e})") from None


def read_video(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Decode a video into a uint8 array [F, H, W, 3] (RGB), at most `max_frames` frames."""
    only = range(max_frames) if max_frames is not None else None
    frames = [frame for _, frame in iter_frames(path, only=only)]
    if not frames:
        raise MoeError(f"video {path} contains no decodable frames")
    return np.stack(frames)


def count_frames(path: str | Path) -> int:
    """Count the frames of `path` by decoding all of them.

    Slower than `probe_video`, but it is the only way to notice a file whose header is fine and
    whose data is truncated or damaged.
    """
    path = Path(path)
    with _open_for_reading(path) as (container, stream):
        try:
            return sum(1 for _ in container.decode(stream))
        except _AV_ERRORS as e:
            raise MoeError(f"video {path} is corrupt: decoding failed ({e})") from None


def probe_video(path: str | Path) -> tuple[int, float, int, int]:
    """Return (num_frames, fps, width, height) from the container, without decoding pixels.

    When the container does not record a frame count, the video packets are counted instead.
    """
    path = Path(path)
    with _open_for_reading(path) as (container, stream):
        try:
            num_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size > 0)
        except _AV_ERRORS as e:
            raise MoeError(f"video {path} is corrupt: demuxing failed ({e})") from None
        return num_frames, _stream_fps(stream), stream.codec_context.width, stream.codec_context.height


def _check_frames(path: Path, frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise MoeError(f"cannot write {path}: frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    num, height, width, _ = frames.shape
    if num == 0:
        raise MoeError(f"cannot write {path}: no frames")
    if width % 2 or height % 2:
        raise MoeError(f"cannot write {path}: H.264 (yuv420p) needs an even width and height, got {width}x{height}")


def _encode(target: str, frames: np.ndarray, fps: float, crf: int) -> None:
    """Encode with settings that make the output byte-identical for identical input.

    x264's output depends on its thread count, which by default follows the CPU count, so it
    runs on one thread. Its macroblock-tree rate control made repeated encodes of the same
    frames differ even then (measured with libx264 core 165), so it is off; at CRF 18 that
    costs a little file size, not visible quality.
    """
    with av.open(target, "w", format="mp4") as container:
        container.metadata["comment"] = VIDEO_MARKER
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "medium", "mbtree": "0"}
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


def check_frame_rate(fps: float) -> None:
    if not (math.isfinite(fps) and 0 < fps <= MAX_FPS):
        raise MoeError(f"--fps must be a finite number > 0 and <= {MAX_FPS}, got {fps}")


def written_by_lora_moe(path: str | Path) -> bool:
    """Whether `path` is an MP4 this project wrote (its container comment is our marker), so
    `--overwrite` may replace it; any other file is never replaced."""
    try:
        with av.open(str(path)) as container:
            return container.metadata.get("comment") == VIDEO_MARKER
    except _AV_ERRORS:
        return False


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Write uint8 RGB frames [F, H, W, 3] as an H.264 MP4, atomically.

    The file is written next to its target under a temporary name, fsynced and renamed, so
    `path` either holds a complete video or is left as it was.
    """
    path = Path(path)
    frames = np.asarray(frames)
    _check_frames(path, frames)
    check_frame_rate(fps)
    with atomic_file(path) as tmp:
        _encode(str(tmp), frames, fps, crf)
    return path
