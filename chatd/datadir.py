"""The data directory and the files in it are private to the chatd user.

What lives there (``data_dir``): the SQLite database with its WAL and shared-memory files
(password hashes, messages, push tokens) and ``secret.key`` (the token-signing secret of
``chatd run`` when ``auth.secret`` is empty). Policy: a directory chatd creates is mode 0700;
a file chatd creates is mode 0600 *from its creation* (``os.open`` with the mode, never a
``chmod`` after the write, so there is no moment when another local user can open it); SQLite
gives its ``-wal`` and ``-shm`` files the database file's mode, so the database file is made
0600 before SQLite first opens it. An existing directory or file keeps the mode the operator
gave it (the systemd units also set ``UMask=0077``). Errors: ``OSError`` from the file system
reaches the caller (start-up fails with the path in the message).
"""

from __future__ import annotations

import os
from pathlib import Path

from .auth import new_secret

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> None:
    """Create ``path`` and each missing parent with mode 0700 (an existing one keeps its mode)."""
    missing = []
    while not path.is_dir() and path.parent != path:
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile by another process: its mode is its own
            continue
        os.chmod(d, DIR_MODE)  # mkdir's mode is masked by the umask; 0700 is what we promise


def private_file(path: Path) -> None:
    """Create an empty ``path`` with mode 0600 unless it exists (a database file, before SQLite)."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def write_private(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``, the file mode 0600 from its creation on."""
    private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_secret(secret: str, data_path: Path) -> str:
    """``secret`` (``auth.secret``) if set, else the one kept in ``data_path/secret.key``, made
    on first start."""
    if secret:
        return secret
    path = data_path / "secret.key"
    if path.exists():
        return path.read_text().strip()
    secret = new_secret()
    write_private(path, secret)
    return secret
