"""chatd: a trio-based, single-binary, sharded chat server."""

from setuptools import find_packages, setup

setup(
    name="chatd",
    version="0.1.0",
    description="Trio-based sharded chat server: WebSocket clients, ordered durable history",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["chatd", "chatd.*"]),
    # the web client (chatd/api/web.py serves it): static files, no build step
    package_data={"chatd": ["web/*.html", "web/*.css", "web/js/*.js"]},
    install_requires=[
        "trio>=0.25",
        # the bench's and the tests' WebSocket clients, and ConnectionClosed/CloseReason for the server's
        # own connection (chatd/shard/wsconn.py: wsproto's handshake and framing, trio glue).
        "trio-websocket>=0.11,<0.13",
        "wsproto>=1.2,<2",
        # the shard port's plain HTTP (SSE, long polling, POST /v1/frames: chatd/shard/httpconn.py);
        # already wsproto's own HTTP parser, so no new code in the tree
        "h11>=0.14",
        "hypercorn>=0.16",
        # Python 3.11 needs these pins (newer releases need 3.12 features).
        "quart>=0.19,<=0.22",
        "quart-trio>=0.11,<=0.12",
        # /openapi.json and request models; chatd/api/spec.py subclasses its OpenAPIProvider: pinned minor.
        "quart-schema[msgspec]>=0.25,<0.26",
        "msgspec>=0.18",  # also the client codec (chatd/protocol/client.py): decode + validate, encode
        "prometheus-client>=0.20",
        "httpx>=0.27",  # push gateways (chatd/push/http.py), the bench's setup calls
        "msgpack>=1.0",
        "click>=8.1",
        "kazoo>=2.9",
        "cassandra-driver>=3.29",
        # reactions are "one grapheme cluster" (chatd/lifecycle.py): regex's \X follows Unicode's
        # extended grapheme clusters (UAX #29, kept current with each Unicode release); the stdlib has none.
        "regex>=2023.0",
        # media (chatd/media/worker.py): Pillow decodes, re-encodes (stripping all metadata) and
        # thumbnails images, with a decompression-bomb guard; filetype (no dependencies, magic
        # numbers) names the audio/video/container types Pillow does not read; mutagen reads
        # audio/video durations from container headers without decoding.
        "pillow>=10",
        "filetype>=1.2",
        "mutagen>=1.47",
        # media (chatd/media/avdecode.py): PyAV decodes voice messages (their waveform, their true
        # duration: MediaRecorder's WebM has none in its header) and a video's poster frame. Chosen
        # because its manylinux wheels bundle FFmpeg's own decoders (Opus, AAC, VP8, VP9, H.264,
        # MPEG-4 among them: checked by tests/test_media_av.py, which also encodes its test
        # files with it), so chatd needs no system ffmpeg and no subprocess per file; FFmpeg is
        # the decoder every browser-side format is tested against, and PyAV is actively released.
        "av>=18",
        # S3 media backend (chatd/media/s3.py): SigV4 request signing by AWS's own implementation
        # (botocore.auth.SigV4Auth); the requests themselves go through httpx.
        "botocore>=1.34",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-trio>=0.8", "pytest-timeout>=2.3", "schemathesis>=4.0,<5",
                 "openapi-spec-validator>=0.7", "wsproto>=1.2", "trustme>=1.0", "hypothesis>=6.100",
                 # browser tests drive Debian's chromium (apt), never a downloaded browser
                 "playwright>=1.40"],
    },
    entry_points={"console_scripts": ["chatd = chatd.cli:main"]},
)
