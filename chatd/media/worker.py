"""Processing of uploaded files, in worker processes: what a file is, and what chatd serves of it.

``python -m chatd.media.worker --serve MAX_PIXELS AS_BYTES`` is a worker of the pool of
:mod:`chatd.media.processing` (one file at a time, requests and answers as JSON lines);
``python -m chatd.media.worker SRC OUTDIR MAX_PIXELS AS_BYTES CPU_S`` processes one file and exits
(for a person or a test). Either runs under an address-space limit (``RLIMIT_AS``) set before
anything is decoded, and the pool kills a worker at its per-file deadline: a crafted file can crash,
exhaust or hang only a worker, never the server. For each file it answers one JSON object and
writes the derived files into OUTDIR:

* ``{"kind": "image", "mime", "width", "height", "served": "main.<ext>", "thumbnails": [...],
  "placeholder": "data:image/jpeg;base64,..."}`` -- an image Pillow decodes fully, of at most
  MAX_PIXELS pixels, of an inline type: EXIF orientation applied, then **re-encoded** from the
  pixels alone, so no metadata (EXIF with GPS, XMP, IPTC, comments, ICC profiles) survives;
  thumbnails of 320 and 1280 px on the longer side (only those smaller than the image); an animated
  GIF or WebP keeps its frames, durations and loop count (each frame re-encoded from its pixels)
  up to ``MAX_FRAMES`` frames and ``MAX_ANIMATION_PIXELS`` frames x canvas pixels; beyond, its
  first frame is served as a still;
* ``{"kind": "audio", "mime", "duration_s", "waveform"}`` -- a sniffed Ogg/Opus, WebM, MP4/M4A, MP3
  or WAV file, served as uploaded (no transcoding); decoded by :mod:`chatd.media.avdecode` (PyAV)
  for its duration and 64-bucket waveform; where decoding fails, the duration mutagen reads from
  the header (``null`` if none: WebM from MediaRecorder) and ``waveform: null``;
* ``{"kind": "video", "mime", "duration_s", "width", "height", "thumbnails", "placeholder"}`` -- a
  WebM or MP4 video, served as uploaded; its poster frame (the first decodable key frame) made into
  the same metadata-free JPEG thumbnails as a photo (the 320 one always) -- or no poster
  (``thumbnails: []``, no size) where none decodes;
* ``{"kind": "file", "mime": "application/octet-stream" or the sniffed type, "reason"}`` --
  anything else, including images that fail to decode, exceed MAX_PIXELS or are not on the inline
  list (SVG is never an image here: it is a document that may run script).

Why these libraries: Pillow decodes and re-encodes every common image format and has a
decompression-bomb guard; ``filetype`` (no dependencies, magic numbers only) names the audio,
video and container types Pillow does not read; mutagen reads durations from the containers'
headers without decoding audio; PyAV (FFmpeg's decoders) decodes audio and video (setup.py).
"""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import sys

THUMB_SIZES = (320, 1280)
PLACEHOLDER_PX = 16
INLINE_IMAGES = {"JPEG": ("image/jpeg", "jpg"), "PNG": ("image/png", "png"), "WEBP": ("image/webp", "webp"),
                 "GIF": ("image/gif", "gif"), "AVIF": ("image/avif", "avif")}
INLINE_AV = {"audio/ogg": "audio", "audio/opus": "audio", "audio/mpeg": "audio", "audio/x-wav": "audio",
             "audio/mp4": "audio", "audio/m4a": "audio", "audio/aac": "audio",
             "video/webm": "video", "video/mp4": "video", "video/quicktime": None}
ANIMATED = {"GIF": ("image/gif", "gif"), "WEBP": ("image/webp", "webp")}  # kept animated, re-encoded
MAX_FRAMES = 1000
MAX_ANIMATION_PIXELS = 40_000_000  # frames x canvas pixels (e.g. 160 frames of 500x500)


def _limit(address_space_bytes: int, cpu_s: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes, address_space_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _image(src: str, outdir: str, max_pixels: int) -> dict | None:
    from PIL import Image, ImageOps
    Image.MAX_IMAGE_PIXELS = max_pixels  # above: DecompressionBombWarning; above twice: error
    import warnings
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    frames = None
    try:
        with Image.open(src) as im:
            fmt = im.format
            if fmt not in INLINE_IMAGES:
                return None if fmt is None else {"kind": "file", "reason": f"image format {fmt} is not shown inline"}
            if im.width * im.height > max_pixels:
                return {"kind": "file", "reason": "too many pixels"}
            if getattr(im, "is_animated", False) and fmt in ANIMATED:
                frames = _frames(im)  # None beyond the bound: served as a still of its first frame
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)  # the orientation tag's rotation, applied to the pixels
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return {"kind": "file", "reason": "decompression bomb"}
    except Image.UnidentifiedImageError:  # not an image Pillow knows: audio, video, anything else
        return None
    except Exception as e:  # noqa: BLE001 - any decoder failure: not an image we show
        return {"kind": "file", "reason": f"image does not decode: {type(e).__name__}"}
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    im = im.convert("RGBA" if has_alpha else "RGB")
    if fmt in ("JPEG",) or not has_alpha:
        mime, ext, save = "image/jpeg", "jpg", {"format": "JPEG", "quality": 85, "optimize": True}
        im = im.convert("RGB")
    else:
        mime, ext, save = "image/webp", "webp", {"format": "WEBP", "quality": 85}
    # A fresh image from the pixels only: nothing of the original's info dict (EXIF, XMP, ICC,
    # comments) is passed to the encoder.
    clean = Image.frombytes(im.mode, im.size, im.tobytes())
    out = {"kind": "image", "mime": mime, "width": clean.width, "height": clean.height, "served": f"main.{ext}"}
    if frames is not None:
        out.update(mime=ANIMATED[fmt][0], served=f"main.{ANIMATED[fmt][1]}", frames=len(frames[0]))
        _save_animation(frames, fmt, os.path.join(outdir, out["served"]))
    else:
        clean.save(os.path.join(outdir, f"main.{ext}"), **save)
    return {**out, **_stills(clean, outdir, ext, mime, save)}


def _stills(clean, outdir: str, ext: str, mime: str, save: dict, poster: bool = False) -> dict:
    """The thumbnails (``THUMB_SIZES`` px on the longer side, those smaller than ``clean``; for a
    video's ``poster``, the 320 one always, at the frame's own size if that is smaller) and the
    placeholder of a metadata-free picture."""
    thumbs = []
    for px in THUMB_SIZES:
        if max(clean.size) <= px and not (poster and not thumbs):
            break
        t = clean.copy()
        t.thumbnail((px, px))
        name = f"thumb{px}.{ext}"
        t.save(os.path.join(outdir, name), **save)
        thumbs.append({"name": name, "px": px, "width": t.width, "height": t.height, "mime": mime})
    tiny = clean.convert("RGB")
    tiny.thumbnail((PLACEHOLDER_PX, PLACEHOLDER_PX))
    buf = io.BytesIO()
    tiny.save(buf, format="JPEG", quality=60)
    return {"thumbnails": thumbs, "placeholder": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}


def _frames(im):
    """Every frame of an animated GIF/WebP as fresh RGBA images (no metadata) with its duration,
    and the loop count -- or None once ``MAX_FRAMES`` frames or ``MAX_ANIMATION_PIXELS`` pixels
    (frames x canvas) are passed: each frame is a full canvas in memory while it is re-encoded."""
    from PIL import Image, ImageSequence
    per_frame = im.width * im.height
    frames, durations = [], []
    for n, frame in enumerate(ImageSequence.Iterator(im), start=1):
        if n > MAX_FRAMES or n * per_frame > MAX_ANIMATION_PIXELS:
            return None
        rgba = frame.convert("RGBA")
        frames.append(Image.frombytes("RGBA", rgba.size, rgba.tobytes()))
        durations.append(int(frame.info.get("duration") or 100))
    return frames, durations, int(im.info.get("loop", 0))


def _save_animation(frames, fmt: str, path: str) -> None:
    images, durations, loop = frames
    extra = {"format": "GIF", "disposal": 2, "optimize": False} if fmt == "GIF" else \
            {"format": "WEBP", "quality": 85}
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=loop, **extra)


def _audio_video(src: str, mime: str, outdir: str, max_pixels: int) -> dict:
    kind = INLINE_AV.get(mime)
    duration = None
    try:
        import mutagen
        f = mutagen.File(src)
        if f is not None and f.info is not None and getattr(f.info, "length", None):
            duration = round(float(f.info.length), 3)
        duration = duration if duration and duration > 0 else None  # (a truncated Ogg reads as negative)
    except Exception:  # noqa: BLE001 - a header mutagen cannot read: no duration, still playable
        duration = None
    if mime == "video/webm" and _webm_audio_only(src):
        kind, mime = "audio", "audio/webm"
    if mime == "video/mp4" and _mp4_audio_only(src):
        kind, mime = "audio", "audio/mp4"
    if kind is None:
        return {"kind": "file", "mime": mime, "reason": f"{mime} is not played inline"}
    out = {"kind": kind, "mime": mime, "duration_s": duration}
    from . import avdecode
    if kind == "audio":
        decoded, waveform = avdecode.audio_summary(src)
        # what was decoded is the truth (a header may claim anything, MediaRecorder's WebM says nothing)
        out.update(duration_s=decoded if decoded is not None else duration, waveform=waveform)
    else:
        if duration is None:  # mutagen reads no WebM, and MediaRecorder's WebM header has none
            out["duration_s"] = avdecode.media_duration(src)
        poster = avdecode.poster_frame(src, max_pixels)
        if poster is not None:
            from PIL import Image
            clean = Image.frombytes("RGB", poster.size, poster.tobytes())
            save = {"format": "JPEG", "quality": 85, "optimize": True}
            out.update(width=clean.width, height=clean.height,
                       **_stills(clean, outdir, "jpg", "image/jpeg", save, poster=True))
    return out


def _webm_audio_only(src: str) -> bool:
    """A WebM with no video track (MediaRecorder's voice notes): the codec ids in its first 64 KiB."""
    with open(src, "rb") as f:
        head = f.read(65536)
    return b"V_VP" not in head and b"V_AV1" not in head and b"V_MPEG" not in head


def _mp4_audio_only(src: str) -> bool:
    with open(src, "rb") as f:
        head = f.read(1 << 20)
    return b"vide" not in head and b"soun" in head


def process(src: str, outdir: str, max_pixels: int) -> dict:
    import filetype
    with open(src, "rb") as f:
        head = f.read(8192)
    image = _image(src, outdir, max_pixels)
    if image is not None and image["kind"] == "image":
        return image
    guess = filetype.guess(head)
    mime = guess.mime if guess is not None else "application/octet-stream"
    if head[:4] == b"\x1a\x45\xdf\xa3" and b"webm" in head[:64]:  # EBML with DocType webm (MediaRecorder's)
        mime = "video/webm"
    if image is None and mime in INLINE_AV:
        return _audio_video(src, mime, outdir, max_pixels)
    out = {"kind": "file", "mime": mime}
    if image is not None:
        out["reason"] = image["reason"]
    return out


RECYCLE_AFTER_FILES = 200
RECYCLE_ABOVE_RSS_KIB = 300 * 1024


def serve(max_pixels: int, as_bytes: int) -> int:
    """The pool's worker: one request per line on stdin (``{"src", "out"}``), one JSON answer per
    line on stdout, until stdin closes. It exits after an out-of-memory (its state is suspect), after
    ``RECYCLE_AFTER_FILES`` files or once its peak RSS passed ``RECYCLE_ABOVE_RSS_KIB``: the pool starts
    a fresh one."""
    resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    import filetype  # noqa: F401  (imported once, before the first file)
    from PIL import Image  # noqa: F401
    for n, line in enumerate(sys.stdin, start=1):
        req = json.loads(line)
        last = n >= RECYCLE_AFTER_FILES
        try:
            out = process(req["src"], req["out"], max_pixels)
        except MemoryError:
            out = {"kind": "file", "mime": "application/octet-stream", "reason": "processing ran out of memory"}
            last = True
        last = last or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > RECYCLE_ABOVE_RSS_KIB
        out["last"] = last
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        if last:
            break
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--serve":
        return serve(int(argv[1]), int(argv[2]))
    src, outdir, max_pixels, as_bytes, cpu_s = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    _limit(as_bytes, cpu_s)
    try:
        out = process(src, outdir, max_pixels)
    except MemoryError:
        out = {"kind": "file", "mime": "application/octet-stream", "reason": "processing ran out of memory"}
    sys.stdout.write(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
