"""Database engines for the data directory's configured URL (SQLite or MySQL/PyMySQL)."""
from __future__ import annotations

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from ..common.datadir import DataDir
from ..common.errors import DatabaseError

SUPPORTED_DRIVERS = ("sqlite", "mysql+pymysql")


def parse_db_url(text: str) -> URL:
    """The URL in `text`. Errors show it with its password masked, or not at all when it
    cannot be parsed (then nothing tells the password apart from the rest)."""
    usage = "use mysql+pymysql://USER@HOST[:PORT]/DATABASE"
    try:
        url = make_url(text)
    except ArgumentError:
        raise DatabaseError(f"the database URL (not shown: it may hold a password) is not a URL: {usage}") from None
    except ValueError:  # SQLAlchemy's int() of the port
        raise DatabaseError(f"the database URL (not shown: it may hold a password) has a port that is not a number: "
                            f"{usage} with PORT 1-65535") from None
    if url.port is not None and not 1 <= url.port <= 65535:
        raise DatabaseError(f"database URL {url.render_as_string(hide_password=True)} has port {url.port}: "
                            f"a TCP port is 1-65535")
    if url.drivername not in SUPPORTED_DRIVERS:
        raise DatabaseError(f"database driver {url.drivername!r} is not supported: use one of {', '.join(SUPPORTED_DRIVERS)}")
    if url.drivername.startswith("mysql") and not url.database:
        raise DatabaseError(f"database URL {url.render_as_string(hide_password=True)} names no database: add /DATABASE")
    return url


def without_password(url: URL) -> URL:
    """The URL to store or show: URL.set(password=None) would keep the old password."""
    return URL.create(url.drivername, url.username, None, url.host, url.port, url.database, url.query)


def make_engine(url: URL) -> Engine:
    if url.drivername == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # WAL: readers do not block the heartbeat writer
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_size=20, max_overflow=10, pool_pre_ping=True, pool_recycle=3600,
                         connect_args={"charset": "utf8mb4", "connect_timeout": 10})


def datadir_url(data_dir: DataDir) -> URL:
    """The configured URL with the sealed password added (kept out of config.json)."""
    url = parse_db_url(data_dir.load_config().db_url)
    password = data_dir.database_password()
    return url.set(password=password) if password is not None else url


def datadir_engine(data_dir: DataDir) -> Engine:
    return make_engine(datadir_url(data_dir))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
