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
    install_requires=[
        "trio>=0.25",
        # chatd.shard.session writes pre-built frames through trio-websocket internals: pinned range.
        "trio-websocket>=0.11,<0.13",
        "hypercorn>=0.16",
        "h11>=0.14",  # push gateway client (chatd/push/http.py); hypercorn needs it too
        # Python 3.11 needs these pins (newer releases need 3.12 features).
        "quart>=0.19,<=0.22",
        "quart-trio>=0.11,<=0.12",
        "msgpack>=1.0",
        "click>=8.1",
        "kazoo>=2.9",
        "cassandra-driver>=3.29",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-trio>=0.8", "pytest-timeout>=2.3", "hypothesis>=6.100"],
    },
    entry_points={"console_scripts": ["chatd = chatd.cli:main"]},
)
