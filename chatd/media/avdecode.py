"""Decoding audio and video with PyAV (FFmpeg's decoders, bundled in the ``av`` wheel), inside a
media worker (:mod:`chatd.media.worker`): a voice message's waveform and true duration, a video's
poster frame. Nothing here is transcoded or served: the upload is served as it came.

* :func:`audio_summary` decodes the first audio stream, resampled to 8 kHz mono 16-bit, and
  returns ``(duration_s, waveform)``: ``waveform`` is ``WAVEFORM_BUCKETS`` (64) integers 0-255,
  each the peak absolute amplitude of one 64th of the audio, linear, 255 = full scale (a client
  scales it to its tallest bar). Audio longer than ``MAX_DECODE_S`` (10 minutes: a voice message
  is shorter) gets no waveform (``None``) and decoding stops there; so does a file whose decoding
  fails midway (a truncated or corrupted upload): ``(None, None)``, never an exception
  (``MemoryError`` excepted: it goes up to the worker, which answers "ran out of memory" and exits).
  The same for a poster that does not decode.
* :func:`media_duration` is the container's duration, or, where the header has none (a WebM
  written live, as MediaRecorder does), the end of its last packet, found by demuxing without
  decoding (at most ``MAX_DURATION_PACKETS``); ``None`` when neither is known.
* :func:`poster_frame` decodes the first video stream's first decodable key frame (at most
  ``MAX_POSTER_PACKETS`` packets read) into a Pillow image, or ``None``; a stream declaring more
  than ``max_pixels`` pixels is not decoded.

Resource policy: one decoding thread (``thread_count = 1``: FFmpeg's frame threads would each
reserve stacks and malloc arenas in the worker's ``RLIMIT_AS``); the samples are folded into one
peak per 10 ms as they are decoded (at most 60,000 integers for 10 minutes), never kept. The
worker's address-space limit and the pool's per-file deadline bound what a crafted file can make
FFmpeg do beyond that.
"""

from __future__ import annotations

import functools

WAVEFORM_BUCKETS = 64
MAX_DECODE_S = 600
MAX_POSTER_PACKETS = 2000
MAX_DURATION_PACKETS = 200_000  # a 25 MiB upload holds far fewer; demuxing reads, never decodes
_RATE = 8000
_WINDOW = _RATE // 100  # one peak per 10 ms


def _or(failed):
    """The module's error policy: any failure of the decorated decoder is ``failed`` (a truncated,
    corrupted or odd file is still served, without what it could not give); ``MemoryError`` goes
    up to the worker, which answers "ran out of memory" and exits."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args):
            try:
                return fn(*args)
            except MemoryError:
                raise
            except Exception:  # noqa: BLE001 - see above
                return failed
        return run
    return wrap


def _open(src: str):
    import av
    return av.open(src, "r", metadata_errors="ignore")


@_or((None, None))
def audio_summary(src: str) -> tuple[float | None, list[int] | None]:
    """``(duration_s, waveform)`` of the first audio stream of ``src`` (module docstring)."""
    import av
    with _open(src) as container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            return None, None
        stream.codec_context.thread_count = 1
        resampler = av.AudioResampler(format="s16", layout="mono", rate=_RATE)
        peaks: list[int] = []
        pending = 0  # samples of the current 10-ms window seen so far
        peak = 0
        samples = 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                n = out.samples
                data = memoryview(bytes(out.planes[0])[: n * 2]).cast("h")
                i = 0
                while i < n:
                    take = min(_WINDOW - pending, n - i)
                    chunk = data[i:i + take]
                    peak = max(peak, max(chunk), -min(chunk))
                    pending += take
                    i += take
                    if pending == _WINDOW:
                        peaks.append(peak)
                        pending, peak = 0, 0
                samples += n
            if samples > MAX_DECODE_S * _RATE:
                return None, None  # too long for a voice message: the container's duration stands
        if pending:
            peaks.append(peak)
    if not samples:
        return None, None
    return round(samples / _RATE, 3), _buckets(peaks)


def _buckets(peaks: list[int]) -> list[int]:
    n = len(peaks)
    out = []
    for b in range(WAVEFORM_BUCKETS):
        lo, hi = b * n // WAVEFORM_BUCKETS, max((b + 1) * n // WAVEFORM_BUCKETS, b * n // WAVEFORM_BUCKETS + 1)
        part = peaks[lo:min(hi, n)]
        out.append(min(255, max(part) * 255 // 32767) if part else 0)
    return out


@_or(None)
def media_duration(src: str) -> float | None:
    """Seconds from the container's header, else from its packets' timestamps (module docstring)."""
    import av
    with _open(src) as container:
        if container.duration and container.duration > 0:
            return round(container.duration / av.time_base, 3)
        first = end = None
        for n, packet in enumerate(container.demux()):
            if n >= MAX_DURATION_PACKETS:
                return None
            if packet.pts is None or packet.time_base is None:
                continue
            start = float(packet.pts * packet.time_base)
            stop = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            first = start if first is None else min(first, start)
            end = stop if end is None else max(end, stop)
    return round(end - first, 3) if end is not None and end > first else None


@_or(None)
def poster_frame(src: str, max_pixels: int):
    """The first decodable key frame of the first video stream, as a Pillow RGB image, or None."""
    with _open(src) as container:
        stream = next((s for s in container.streams if s.type == "video"), None)
        if stream is None:
            return None
        ctx = stream.codec_context
        if not ctx.width or not ctx.height or ctx.width * ctx.height > max_pixels:
            return None
        ctx.thread_count = 1
        ctx.skip_frame = "NONKEY"
        for n, packet in enumerate(container.demux(stream)):
            if n >= MAX_POSTER_PACKETS:
                return None
            for frame in packet.decode():
                if frame.width * frame.height > max_pixels:
                    return None
                return frame.to_image().convert("RGB")
    return None
