"""Audio, video and animation against a real ``chatd run`` (in process, ``fs`` backend): files the
test *encodes* with PyAV (FFmpeg's encoders in the ``av`` wheel) and Pillow, so what the server
extracts can be checked against what was put in -- a voice note's waveform and decoded duration
(Opus in Ogg and in WebM, AAC in MP4), a video's poster frame (VP8/VP9 in WebM, H.264 and MPEG-4
in MP4), an animated GIF/WebP kept animated -- and hostile inputs (truncated, corrupted, a header
claiming hours, a frame flood) that end as plain attachments or without waveform, in bounded time."""

from __future__ import annotations

import array
import io
import math
import struct
import time

import av
import pytest
import trio
from PIL import Image

from tests.helpers import dm, open_client
from tests.test_media import Client, media_server  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(180)
RATE = 48000


def tone_then_silence(path, fmt: str, codec: str, loud_s: float = 1.0, quiet_s: float = 1.0) -> bytes:
    """``loud_s`` of a 440 Hz sine at ~60 % of full scale, then ``quiet_s`` of silence, mono."""
    out = av.open(str(path), "w", format=fmt)
    stream = out.add_stream(codec, rate=RATE, layout="mono")
    step = 960
    total, loud = int((loud_s + quiet_s) * RATE), int(loud_s * RATE)
    for i in range(0, total, step):
        pcm = array.array("h", (int(20000 * math.sin(2 * math.pi * 440 * (i + k) / RATE)) if i + k < loud else 0
                                for k in range(step)))
        frame = av.AudioFrame(format="s16", layout="mono", samples=step)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate, frame.pts = RATE, i
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    return path.read_bytes()


def left_blue_right_red(size=(640, 360)) -> Image.Image:
    im = Image.new("RGB", size, "red")
    im.paste(Image.new("RGB", (size[0] // 2, size[1]), "blue"), (0, 0))
    return im


class _Unseekable(io.RawIOBase):
    """A file the muxer cannot seek back in: its WebM header says no duration (as MediaRecorder's)."""
    def __init__(self, f):
        self.f = f

    def writable(self):
        return True

    def write(self, b):
        return self.f.write(b)


def video(path, fmt: str, codec: str, size=(640, 360), frames=12, live: bool = False) -> bytes:
    if live:
        sink = open(path, "wb")
        out = av.open(_Unseekable(sink), "w", format=fmt)
    else:
        out = av.open(str(path), "w", format=fmt)
    stream = out.add_stream(codec, rate=25)
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
    for _ in range(frames):
        for packet in stream.encode(av.VideoFrame.from_image(left_blue_right_red(size))):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    if live:
        sink.close()
    return path.read_bytes()


@pytest.mark.parametrize("fmt,codec,mime", [("ogg", "libopus", "audio/ogg"), ("webm", "libopus", "audio/webm"),
                                            ("mp4", "aac", "audio/mp4")])
async def test_voice_waveform_and_duration_follow_the_sound(media_server, nursery, tmp_path, fmt, codec, mime):
    assert av.codec.Codec(codec.removeprefix("lib"), "r")  # the decoder the server uses is in the wheel
    srv = await media_server()
    alice_l, bob_l = await srv.api.signup_login("alice"), await srv.api.signup_login("bob")
    alice = Client(srv, alice_l)
    data = tone_then_silence(tmp_path / f"voice.{fmt}", fmt, codec)
    r = await alice.upload(data, f"voice.{fmt}")
    assert r.status_code == 201, r.text
    media = r.json()["media"]
    assert (media["kind"], media["mime"]) == ("audio", mime), media
    assert abs(media["duration_s"] - 2.0) < 0.1, media
    wave = media["waveform"]
    assert len(wave) == 64 and all(isinstance(v, int) and 0 <= v <= 255 for v in wave)
    # 20000 / 32767 of full scale is ~155 of 255 in the first half; silence (0) in the second
    assert all(130 <= v <= 185 for v in wave[1:30]), wave
    assert all(v <= 5 for v in wave[34:]), wave
    got = await alice.get(media["url"])
    assert got.content == data and got.headers["content-type"] == mime  # served as uploaded
    # the same metadata on a message (live, HTTP history)
    ca = await open_client(nursery, alice_l["ws_url"], alice_l["token"])
    cb = await open_client(nursery, bob_l["ws_url"], bob_l["token"])
    ack = await ca.request({"type": "send", "channel_id": dm(alice_l, bob_l), "client_msg_id": "v", "body": "",
                            "attachments": [media["id"]]})
    assert ack["type"] == "ack", ack
    live = await cb.next_event("message")
    assert live["attachments"][0]["waveform"] == wave
    history = await srv.api.call("GET", f"/v1/channels/{dm(alice_l, bob_l)}/messages", token=bob_l["token"])
    assert history.body["messages"][0]["attachments"][0]["waveform"] == wave


@pytest.mark.parametrize("fmt,codec,live", [("webm", "libvpx", False), ("webm", "libvpx", True),
                                            ("webm", "libvpx-vp9", False), ("mp4", "libx264", False),
                                            ("mp4", "mpeg4", False)])
async def test_video_poster_frame_is_a_clean_thumbnail(media_server, tmp_path, fmt, codec, live):
    srv = await media_server()
    alice = Client(srv, await srv.api.signup_login("alice"))
    data = video(tmp_path / f"clip.{fmt}", fmt, codec, live=live)
    if live:  # written as a live stream: no duration in the header, found from the packets
        with av.open(io.BytesIO(data)) as c:
            assert not c.duration, c.duration
    media = (await alice.upload(data, f"clip.{fmt}")).json()["media"]
    assert (media["kind"], media["mime"]) == ("video", f"video/{fmt}"), media
    assert media["duration_s"] is not None and abs(media["duration_s"] - 12 / 25) < 0.1, media
    assert (media["width"], media["height"]) == (640, 360)
    assert media["placeholder"].startswith("data:image/jpeg;base64,")
    assert [(t["px"], t["width"], t["height"], t["mime"]) for t in media["thumbnails"]] == [(320, 320, 180, "image/jpeg")]
    got = await alice.get(media["thumbnails"][0]["url"])
    poster = Image.open(io.BytesIO(got.content))
    assert poster.size == (320, 180) and dict(poster.getexif()) == {}
    left, right = poster.convert("RGB").getpixel((60, 90)), poster.convert("RGB").getpixel((260, 90))
    assert left[2] > 180 > left[0] and right[0] > 180 > right[2], (left, right)  # the frame encoded
    assert (await alice.get(media["url"])).content == data


def animated(fmt: str, frames: int, size=(64, 48)) -> bytes:
    colors = ["red", "green", "blue", "yellow", "white", "black"]
    ims = [Image.new("RGB", size, colors[i % len(colors)]) for i in range(frames)]
    out = io.BytesIO()
    ims[0].save(out, fmt, save_all=True, append_images=ims[1:], duration=[70 + 10 * i for i in range(frames)], loop=3,
                comment=b"secret comment" if fmt == "GIF" else None)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
async def test_an_animated_image_stays_animated_without_metadata(media_server, fmt):
    srv = await media_server()
    alice = Client(srv, await srv.api.signup_login("alice"))
    data = animated(fmt, 5)
    media = (await alice.upload(data, f"anim.{fmt.lower()}")).json()["media"]
    assert (media["kind"], media["mime"]) == ("image", f"image/{fmt.lower()}"), media
    got = await alice.get(media["url"])
    served = Image.open(io.BytesIO(got.content))
    assert served.format == fmt and served.n_frames == 5 and served.info.get("loop") == 3
    durations = []
    for i in range(5):
        served.seek(i)
        served.load()  # (WebP sets a frame's duration when it is loaded)
        durations.append(served.info["duration"])
        px = served.convert("RGB").getpixel((10, 10))
        want = Image.new("RGB", (1, 1), ["red", "green", "blue", "yellow", "white"][i]).getpixel((0, 0))
        assert all(abs(a - b) < 12 for a, b in zip(px, want)), (i, px, want)  # (WebP: lossy)
    assert durations == [70, 80, 90, 100, 110]
    assert b"secret comment" not in got.content
    assert media["thumbnails"] == [] and media["placeholder"]  # the thumbnail (none at 64 px) may stay still


def gif_frame_flood(frames: int, side: int = 1000) -> bytes:
    """A GIF whose ``frames`` frames are 1x1 pixel each on a ``side`` x ``side`` canvas: ~20 bytes per
    frame in the file, a whole canvas per frame for a decoder that composes them."""
    head = b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    head += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = (b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms
             + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00")
    return head + frame * frames + b"\x3b"


async def test_a_gif_frame_flood_is_bounded_and_served_still(media_server):
    srv = await media_server()
    alice = Client(srv, await srv.api.signup_login("alice"))
    data = gif_frame_flood(50_000)  # 50,000 frames x 1 MP: 50 G pixels composed
    assert len(data) < 2_000_000
    t0 = time.monotonic()
    media = (await alice.upload(data, "flood.gif")).json()["media"]
    assert time.monotonic() - t0 < 20
    assert media["kind"] == "image", media  # beyond the bound: its first frame, as a still
    served = Image.open(io.BytesIO((await alice.get(media["url"])).content))
    assert getattr(served, "n_frames", 1) == 1 and served.size == (1000, 1000)
    assert srv.node.media.processor.stats["killed"] == 0  # bounded by the frame limit, not by the deadline


def ogg_claiming_hours(real: bytes) -> bytes:
    """An Ogg whose last page's granule position says ~24 hours (its CRC left wrong: mutagen believes
    it, FFmpeg decodes what is there)."""
    last = real.rfind(b"OggS")
    page = bytearray(real[last:])
    page[6:14] = struct.pack("<q", 24 * 3600 * 48000)
    return real[:last] + bytes(page)


async def test_hostile_audio_and_video_end_plain_or_without_waveform(media_server, tmp_path):
    srv = await media_server()
    alice = Client(srv, await srv.api.signup_login("alice"))
    voice = tone_then_silence(tmp_path / "v.webm", "webm", "libopus")
    ogg = tone_then_silence(tmp_path / "v.ogg", "ogg", "libopus")
    clip = video(tmp_path / "c.webm", "webm", "libvpx")
    corrupted = bytearray(clip)
    for i in range(200, len(corrupted), 5):
        corrupted[i] ^= 0xA5
    hostile = {"truncated.webm": voice[:700], "header-only.webm": voice[:64], "truncated-video.webm": clip[:400],
               "corrupted-video.webm": bytes(corrupted), "hours.ogg": ogg_claiming_hours(ogg),
               "truncated.ogg": ogg[:1000]}
    for name, data in hostile.items():
        with trio.fail_after(60):
            r = await alice.upload(data, name)
        assert r.status_code == 201, (name, r.text)
        media = r.json()["media"]
        assert media["kind"] in ("audio", "video", "file"), (name, media)
        if media["waveform"] is not None:  # what decoded is described as it is: nothing of 24 hours
            assert len(media["waveform"]) == 64 and media["duration_s"] < 3, (name, media)
        assert media["duration_s"] is None or media["duration_s"] < 24 * 3600, (name, media)
        assert (await alice.get(media["url"])).content == data
        if name == "hours.ogg":  # mutagen reads 86,400 s from its last page; 2 s decode
            assert media["waveform"] is not None and abs(media["duration_s"] - 2) < 0.1, media
    assert (await alice.get("/healthz")).status_code == 200
    assert srv.node.media.processor.stats["killed"] == 0
