"""The SQLite backend's options, read from its URL, and how it opens a connection."""

from __future__ import annotations

import dataclasses
import difflib
import os
import sqlite3
import stat
from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit
from urllib.request import pathname2url

from tidings.errors import CorruptStore, InvalidArgument, StatementError, StoreError

__all__ = [
    "SQLiteConfig",
    "check_location",
    "connect",
    "is_read_only_error",
    "read_only_message",
    "sqlite_path_exists",
]


_OPTIONS: Final = ("busy_timeout", "mode", "synchronous")


@dataclasses.dataclass(frozen=True, slots=True)
class SQLiteConfig:
    """Options of the SQLite backend, read from the URL's query string.

    ``synchronous``: ``full`` (default, durable on power loss) or ``normal`` (durable on process
    crash; the last commits may be lost on power loss). ``busy_timeout`` in milliseconds bounds how
    long a write waits for another process holding the file's write lock. ``mode``: ``rw``
    (default; the file is created if missing) or ``ro``: open an existing store read-only (a file
    without write permission, a copy under inspection): reads work, every write raises
    :class:`~tidings.StatementError`, and the database file is never written (SQLite may add the
    ``-wal``/``-shm`` files of a WAL database next to it if the folder allows).
    """

    path: str
    synchronous: str = "full"
    busy_timeout: int = 10_000
    read_only: bool = False

    @classmethod
    def from_url(cls, url: str) -> SQLiteConfig:
        """Parse ``url``; raise :class:`~tidings.InvalidArgument` for a malformed URL or option.

        ``sqlite:///rel/x.db`` is relative to the working directory, ``sqlite:////abs/x.db``
        absolute. ``sqlite://x.db`` (two slashes) is refused: it is read as a host name, not a path.
        """
        parts = urlsplit(url)
        if parts.scheme != "sqlite":
            raise InvalidArgument(f"not a sqlite URL: {url!r}")
        if parts.netloc:
            raise InvalidArgument(
                f"{url!r}: a sqlite URL has no host part; write sqlite:///{parts.netloc}{parts.path} "
                f"for a path relative to the working directory, or sqlite:////abs/path.db for an "
                "absolute one"
            )
        if parts.fragment:
            raise InvalidArgument(f"{url!r}: a sqlite URL takes no '#' fragment")
        # sqlite:///rel.db -> "rel.db"; sqlite:////abs/x.db -> "/abs/x.db"
        raw = unquote(parts.path)
        path = raw[1:] if raw.startswith("/") else raw
        if not path or path == ":memory:" or path.startswith("file:"):
            raise InvalidArgument(
                f"{url!r}: give the database file, e.g. sqlite:///tidings.db (use memory:// for a "
                "store that is not kept)"
            )
        if "\x00" in path:
            raise InvalidArgument(f"{url!r}: the path contains a NUL character")
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(f"{url!r}: the path is not valid Unicode text") from None
        if path.endswith(("/", os.sep)):
            raise InvalidArgument(f"{url!r}: {path!r} names a directory; give the database file")
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise InvalidArgument(
                f"{url!r}: malformed query string {parts.query!r}; write ?name=value&name=value "
                f"(options: {', '.join(_OPTIONS)})"
            ) from None
        options = dict(pairs)
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, _OPTIONS, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise InvalidArgument(
                f"{url!r}: unknown option {', '.join(hints)}; the options are {', '.join(_OPTIONS)}"
            )
        sync = options.get("synchronous", "full").lower()
        if sync not in ("full", "normal"):
            raise InvalidArgument(f"{url!r}: synchronous must be 'full' or 'normal', not {sync!r}")
        busy_text = options.get("busy_timeout", "10000")
        if not busy_text.isdigit() or len(busy_text) > 9:
            raise InvalidArgument(
                f"{url!r}: busy_timeout must be a whole number of milliseconds below 10**9, not {busy_text!r}"
            )
        mode = options.get("mode", "rw").lower()
        if mode not in ("rw", "ro"):
            raise InvalidArgument(f"{url!r}: mode must be 'rw' or 'ro', not {mode!r}")
        return cls(path=path, synchronous=sync, busy_timeout=int(busy_text), read_only=mode == "ro")


def check_location(config: SQLiteConfig) -> None:
    """Check, without creating anything, that ``config.path`` can be a database file: not a
    directory, in an existing directory that this process may look into.

    Raises :class:`~tidings.InvalidArgument` for a path that can never be a database file, and
    :class:`~tidings.StoreError` (:class:`~tidings.StatementError` for refused access) otherwise.
    """
    path = config.path
    parent = os.path.dirname(os.path.abspath(path))
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            raise InvalidArgument(f"cannot open {path!r}: it is a directory; give the database file")
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        pass  # the checks of its directory below say why
    except OSError as exc:
        raise StoreError(f"cannot open {path!r}: {exc.strerror or exc}") from exc
    try:
        info = os.stat(parent)
    except FileNotFoundError:
        raise StoreError(f"cannot open {path!r}: directory {parent} does not exist") from None
    except NotADirectoryError:
        raise InvalidArgument(
            f"cannot open {path!r}: a component of {parent} is a file, not a directory"
        ) from None
    except PermissionError:
        raise StatementError(
            f"cannot open {path!r}: permission denied to look into {parent} "
            "(check the folders' permissions for this user)"
        ) from None
    except OSError as exc:
        raise StoreError(f"cannot open {path!r}: cannot check {parent}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidArgument(f"cannot open {path!r}: {parent} is a file, not a directory")
    if not os.access(parent, os.X_OK):
        raise StatementError(
            f"cannot open {path!r}: permission denied to enter {parent} "
            "(check the folders' permissions for this user)"
        )
    exists = os.path.exists(path)
    if config.read_only and not exists:
        raise StoreError(f"cannot open {path!r} read-only (mode=ro): the file does not exist")
    if not exists and not os.access(parent, os.W_OK):
        raise StatementError(f"cannot create {path!r}: the folder {parent} is not writable for this user")


def is_read_only_error(exc: sqlite3.Error) -> bool:
    """True if ``exc`` says the database file (or its folder) cannot be written."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_READONLY


def connect(config: SQLiteConfig, *, wal: bool = True) -> sqlite3.Connection:
    """A connection to ``config.path`` in autocommit mode, with the configured durability and busy
    timeout; usable from any thread (the caller serialises its use).

    ``wal`` switches the database to WAL mode (a persistent change to the file); the writer passes
    False and switches only once it has checked that the file is a tidings store. A read-only
    config opens the file read-only (``mode=ro``) and never changes its mode.

    Raises :class:`~tidings.CorruptStore` if the file is not a usable SQLite database, and
    :class:`~tidings.StatementError` if it cannot be opened (permissions) or written.
    """
    target = config.path
    if config.read_only:
        target = f"file:{pathname2url(os.path.abspath(config.path))}?mode=ro"
    try:
        conn = sqlite3.connect(
            target, isolation_level=None, check_same_thread=False, timeout=0, uri=config.read_only
        )
    except sqlite3.Error as exc:
        raise StatementError(f"cannot open {config.path!r}: {exc} (check the file's permissions)") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {config.busy_timeout}")
        if wal and not config.read_only:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {config.synchronous.upper()}")
        conn.execute("PRAGMA cache_size = -65536")
    except sqlite3.DatabaseError as exc:
        conn.close()
        if is_read_only_error(exc):
            raise StatementError(read_only_message(config)) from exc
        raise CorruptStore(f"{config.path!r} is not a usable SQLite database: {exc}") from exc
    return conn


def read_only_message(config: SQLiteConfig) -> str:
    """The message of the error for a store file (or folder) this process cannot write."""
    if config.read_only:
        return (
            f"{config.path!r} cannot be read (mode=ro): a database in WAL mode needs its -shm and "
            "-wal files, which do not exist and cannot be created in its read-only folder; open it "
            "once where the folder is writable, or copy it"
        )
    return (
        f"{config.path!r} is read-only for this process (the file or its folder cannot be written); "
        f"open it with sqlite:///{config.path}?mode=ro to read it"
    )


def sqlite_path_exists(url: str) -> bool:
    """Whether the file behind a sqlite URL exists (used by the CLI to avoid creating one)."""
    return os.path.exists(SQLiteConfig.from_url(url).path)
