"""The tuning cache: every decision a pass paid for (solver plans, fusion groups,
kernel configs, measured timings), keyed by what the decision depends on.

One SQLite file per cache directory (option `cache_dir`, else $GRAPHOPT_CACHE_DIR,
else the platformdirs user cache dir). SQLite in WAL mode with a busy timeout
lets several processes compile at once: readers never block, writers wait their
turn. The cache is an accelerator, never a dependency: a corrupt or incompatible
file is moved aside with a warning and rebuilt, and any database error at run
time counts as a miss.

Values are JSON, so a cache can be exported to a file and imported on another
machine (`graphopt cache export/import`). The file's `generation`, a token made anew when the
file is created, cleared or imported into, goes into the key of compiled graphs kept in torch's
AOTAutograd cache (graphopt/artifact_cache.py): after `cache clear` or `cache import` the next
compile plans again and uses what the file now holds. Every lookup is counted per graph in
the file (`graphopt cache stats`) and in this process (`lookups()`, which
`graphopt explain` prints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import platform
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import fx

from graphopt.options import Options

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0  # how long a write waits for other processes' writes before it counts as failed
FILE_NAME = "tuning.sqlite"
EXPORT_FORMAT = "graphopt-tuning-cache"

# Options that change what is written for a human, not what is compiled: not part of the key.
DEBUG_ONLY_OPTIONS = frozenset({"debug_dir", "cache_dir"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    graph_name TEXT,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, key)
);
CREATE TABLE IF NOT EXISTS graph_stats (
    graph_key TEXT NOT NULL,
    namespace TEXT NOT NULL,
    graph_name TEXT,
    hits INTEGER NOT NULL DEFAULT 0,
    misses INTEGER NOT NULL DEFAULT 0,
    last_seen REAL NOT NULL,
    PRIMARY KEY (graph_key, namespace)
);
"""
# name -> value; 'generation': see TuningCache.generation
_META_TABLE = "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"


class CacheWarning(UserWarning):
    """The tuning cache could not be used as is (moved aside, or an error counted as a miss)."""


def default_cache_dir(options: Options | None = None) -> str:
    """The `cache_dir` option, else $GRAPHOPT_CACHE_DIR, else the user cache dir."""
    if options is not None and options.cache_dir:
        return options.cache_dir
    from_env = os.environ.get("GRAPHOPT_CACHE_DIR")
    if from_env:
        return from_env
    import platformdirs

    return platformdirs.user_cache_dir("graphopt")


@dataclasses.dataclass(frozen=True)
class Lookup:
    """One get/get_or_compute in this process (what `graphopt explain` prints)."""

    graph_name: str | None
    graph_key: str | None
    namespace: str
    key: str
    hit: bool


_lookups_lock = threading.Lock()
_lookups: list[Lookup] = []


def lookups() -> list[Lookup]:
    """Every cache lookup made in this process, in order."""
    with _lookups_lock:
        return list(_lookups)


def reset_lookups() -> None:
    with _lookups_lock:
        _lookups.clear()


@dataclasses.dataclass(frozen=True)
class Entry:
    namespace: str
    key: str
    value: Any
    graph_name: str | None
    created: float
    last_used: float
    hits: int


@dataclasses.dataclass(frozen=True)
class GraphStats:
    graph_key: str
    namespace: str
    graph_name: str | None
    hits: int
    misses: int
    last_seen: float


_MISSING = object()


class TuningCache:
    """A handle on the cache file, optionally bound to the graph being compiled.

    `graph_key`/`graph_name` label the hit/miss statistics; the entries' own keys
    are chosen by the caller (usually `graph_key(...)` plus whatever else the
    decision depends on).
    """

    def __init__(self, path: str, *, graph_key: str | None = None, graph_name: str | None = None):
        self.path = path
        self.graph_key = graph_key
        self.graph_name = graph_name
        self._local = threading.local()
        self._warned = False
        _open_checked(path).close()

    # -- connection -------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections must not cross threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
        return conn

    def _degraded(self, error: Exception) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"graphopt: tuning cache {self.path}: {error}; failed lookups count as misses, failed writes are skipped",
                CacheWarning,
            )

    # -- the API passes use -----------------------------------------------------------

    def get(self, namespace: str, key: str, decode: Callable[[Any], Any] | None = None) -> Any | None:
        """The stored value, or None when absent (or when the database fails).

        `decode` turns the stored JSON back into what the pass uses, raising ValueError (or the
        KeyError/TypeError/IndexError of a value of the wrong shape) when it does not fit the graph:
        a corrupt or stale entry. That lookup counts as a miss, so the caller recomputes and
        stores a fresh value."""
        value = self._lookup(namespace, key, decode)
        return None if value is _MISSING else value

    def put(self, namespace: str, key: str, value: Any) -> None:
        """Store a JSON-able value (replacing any previous one)."""
        text = json.dumps(value, sort_keys=True)
        now = time.time()
        try:
            self._conn().execute(
                "INSERT INTO entries (namespace, key, value, graph_name, created, last_used) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, last_used = excluded.last_used",
                (namespace, key, text, self.graph_name, now, now),
            )
        except sqlite3.Error as e:
            self._degraded(e)

    def get_or_compute(self, namespace: str, key: str, compute: Callable[[], Any]) -> Any:
        """The stored value; on a miss, `compute()`'s value, stored for next time."""
        value = self._lookup(namespace, key)
        if value is _MISSING:
            value = compute()
            self.put(namespace, key, value)
        return value

    def _lookup(self, namespace: str, key: str, decode: Callable[[Any], Any] | None = None) -> Any:
        try:
            row = (
                self._conn()
                .execute("SELECT value FROM entries WHERE namespace = ? AND key = ?", (namespace, key))
                .fetchone()
            )
            value = _MISSING if row is None else json.loads(row[0])
        except (sqlite3.Error, ValueError) as e:
            self._degraded(e)
            value = _MISSING
        if value is not _MISSING and decode is not None:
            try:
                value = decode(value)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                warnings.warn(
                    f"graphopt: tuning cache entry {namespace}/{key} does not fit the graph ({e}); recomputing it",
                    CacheWarning,
                )
                value = _MISSING
        self._count(namespace, key, hit=value is not _MISSING)
        return value

    def _count(self, namespace: str, key: str, hit: bool) -> None:
        with _lookups_lock:
            _lookups.append(Lookup(self.graph_name, self.graph_key, namespace, key, hit))
        now = time.time()
        try:
            conn = self._conn()
            if hit:
                conn.execute(
                    "UPDATE entries SET hits = hits + 1, last_used = ? WHERE namespace = ? AND key = ?",
                    (now, namespace, key),
                )
            conn.execute(
                "INSERT INTO graph_stats (graph_key, namespace, graph_name, hits, misses, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (graph_key, namespace) DO UPDATE SET "
                "hits = hits + excluded.hits, misses = misses + excluded.misses, "
                "graph_name = excluded.graph_name, last_seen = excluded.last_seen",
                (self.graph_key or "-", namespace, self.graph_name, int(hit), int(not hit), now),
            )
        except sqlite3.Error as e:
            self._degraded(e)

    # -- the API the CLI uses ---------------------------------------------------------

    def entries(self, namespace: str | None = None) -> list[Entry]:
        query = "SELECT namespace, key, value, graph_name, created, last_used, hits FROM entries"
        params: tuple[Any, ...] = ()
        if namespace is not None:
            query += " WHERE namespace = ?"
            params = (namespace,)
        rows = self._conn().execute(query + " ORDER BY namespace, created", params).fetchall()
        return [Entry(ns, k, json.loads(v), g, c, u, h) for ns, k, v, g, c, u, h in rows]

    def find(self, key_prefix: str) -> list[Entry]:
        """Entries whose key starts with `key_prefix` (what `cache show` accepts)."""
        escaped = key_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = (
            self._conn()
            .execute(
                "SELECT namespace, key, value, graph_name, created, last_used, hits FROM entries "
                "WHERE key LIKE ? ESCAPE '\\' ORDER BY namespace",
                (escaped + "%",),
            )
            .fetchall()
        )
        return [Entry(ns, k, json.loads(v), g, c, u, h) for ns, k, v, g, c, u, h in rows]

    def graph_stats(self) -> list[GraphStats]:
        rows = (
            self._conn()
            .execute(
                "SELECT graph_key, namespace, graph_name, hits, misses, last_seen FROM graph_stats "
                "ORDER BY last_seen DESC, namespace"
            )
            .fetchall()
        )
        return [GraphStats(*row) for row in rows]

    def clear(self) -> int:
        """Delete every entry and statistic; returns how many entries there were."""
        conn = self._conn()
        with _transaction(conn):
            (count,) = conn.execute("SELECT COUNT(*) FROM entries").fetchone()
            conn.execute("DELETE FROM entries")
            conn.execute("DELETE FROM graph_stats")
            _new_generation(conn)
        return count

    def generation(self) -> str:
        """A token that changes whenever entries are removed or replaced from outside a compile
        (the file created anew, `clear`, `import_`): compiles of the same graph before and after
        such a change may differ. 'unreadable' when the database fails."""
        try:
            (value,) = self._conn().execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
        except sqlite3.Error as e:
            self._degraded(e)
            return "unreadable"
        return value

    def export(self, file: str, namespace: str | None = None) -> int:
        """Write the entries as one JSON document; returns how many."""
        entries = self.entries(namespace)
        document = {
            "format": EXPORT_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "entries": [
                {
                    "namespace": e.namespace,
                    "key": e.key,
                    "value": e.value,
                    "graph_name": e.graph_name,
                    "created": e.created,
                }
                for e in entries
            ],
        }
        with open(file, "w") as f:
            json.dump(document, f, indent=1, sort_keys=True)
        return len(entries)

    def import_(self, file: str) -> int:
        """Add (or replace) the entries of an exported file; returns how many."""
        with open(file) as f:
            document = json.load(f)
        if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{file} is not a graphopt cache export")
        if document.get("schema_version") != SCHEMA_VERSION:
            found = document.get("schema_version")
            raise ValueError(f"{file} has cache schema version {found}, this graphopt reads {SCHEMA_VERSION}")
        now = time.time()
        rows = [
            (
                e["namespace"],
                e["key"],
                json.dumps(e["value"], sort_keys=True),
                e.get("graph_name"),
                e.get("created", now),
                now,
            )
            for e in document["entries"]
        ]
        conn = self._conn()
        with _transaction(conn):
            conn.executemany(
                "INSERT INTO entries (namespace, key, value, graph_name, created, last_used) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, last_used = excluded.last_used",
                rows,
            )
            _new_generation(conn)
        return len(rows)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def open_cache(
    options: Options | None = None, *, graph_key: str | None = None, graph_name: str | None = None
) -> TuningCache | None:
    """The cache for these options, or None (with a warning) if its folder cannot be used."""
    folder = default_cache_dir(options)
    try:
        os.makedirs(folder, exist_ok=True)
        return TuningCache(os.path.join(folder, FILE_NAME), graph_key=graph_key, graph_name=graph_name)
    except (OSError, sqlite3.Error) as e:
        warnings.warn(f"graphopt: tuning cache disabled, cannot open {folder}: {e}", CacheWarning)
        return None


def generation(options: Options) -> str:
    """The generation of the tuning cache these options use ('unreadable' if it cannot be opened)."""
    cache = open_cache(options)
    if cache is None:
        return "unreadable"
    try:
        return cache.generation()
    finally:
        cache.close()


# -- opening, checking, moving aside ----------------------------------------------------


def _connect(path: str) -> sqlite3.Connection:
    # Autocommit (isolation_level=None): each statement is its own transaction unless
    # _transaction opens one. The busy timeout lets writers of other processes finish first.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    return conn


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Serializes creating/checking/moving the cache file among processes."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _open_checked(path: str) -> sqlite3.Connection:
    """A connection to a valid cache file: created if missing, rebuilt if corrupt or incompatible."""
    with _file_lock(path):
        try:
            return _initialize(path)
        except _Incompatible as e:
            problem = str(e)
        except sqlite3.OperationalError:
            raise  # busy, locked, unreadable folder: the file may be fine, so it stays where it is
        except sqlite3.DatabaseError as e:
            problem = f"not a readable SQLite database ({e})"
        aside = f"{path}.broken-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, aside + suffix)
        warnings.warn(
            f"graphopt: tuning cache {path} is {problem}; moved it to {aside} and started a new one", CacheWarning
        )
        return _initialize(path)


class _Incompatible(Exception):
    pass


def _has_generation(conn: sqlite3.Connection) -> bool:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return False
    return conn.execute("SELECT 1 FROM meta WHERE name = 'generation'").fetchone() is not None


def _new_generation(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('generation', ?)", (uuid.uuid4().hex,))


def _initialize(path: str) -> sqlite3.Connection:
    conn = _connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        (found,) = conn.execute("PRAGMA user_version").fetchone()
        if found == 0:
            with _transaction(conn):
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif found != SCHEMA_VERSION:
            raise _Incompatible(f"cache schema version {found}, this graphopt uses {SCHEMA_VERSION}")
        try:
            conn.execute("SELECT namespace, key, value, graph_name, created, last_used, hits FROM entries LIMIT 1")
            conn.execute("SELECT graph_key, namespace, graph_name, hits, misses, last_seen FROM graph_stats LIMIT 1")
        except sqlite3.OperationalError as e:  # a table or column is missing: not the schema it claims
            raise _Incompatible(f"a cache whose tables do not match schema version {SCHEMA_VERSION} ({e})") from None
        if not _has_generation(conn):  # a new file, or one written before the meta table existed
            with _transaction(conn):
                conn.execute(_META_TABLE)
                _new_generation(conn)
    except BaseException:
        conn.close()
        raise
    return conn


# -- nodes in stored values ------------------------------------------------------------


class NodeIndex:
    """Nodes of one graph in stored values: each as its position in the graph and its op,
    which reading back checks, so a value that does not fit the graph is caught."""

    def __init__(self, nodes: Sequence[fx.Node]):
        self.nodes = list(nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}

    @staticmethod
    def _op(node: fx.Node) -> str:
        from graphopt.pipeline import node_op_name

        return node_op_name(node) if node.op == "call_function" else node.op

    def refs(self, nodes: Sequence[fx.Node]) -> list[list[Any]]:
        return [[self.position[n], self._op(n)] for n in nodes]

    def resolve(self, refs: Any) -> list[fx.Node]:
        """The nodes `refs` stored; ValueError if a position is out of range or holds another op."""
        nodes = []
        for position, op in refs:
            in_range = isinstance(position, int) and 0 <= position < len(self.nodes)
            if not in_range or self._op(self.nodes[position]) != op:
                raise ValueError(f"no {op} at position {position}")
            nodes.append(self.nodes[position])
        return nodes


# -- the key ----------------------------------------------------------------------------


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A hash of graphopt's own source: an edited pass or codegen (same version number, as in a
    development checkout) may decide differently, so its cached decisions must not be found."""
    import graphopt
    from graphopt import codegen, cost_model, passes

    digest = hashlib.sha256()
    for package in (graphopt, codegen, cost_model, passes):
        for folder in package.__path__:
            for name in sorted(os.listdir(folder)):
                if name.endswith(".py"):
                    with open(os.path.join(folder, name), "rb") as f:
                        digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def device_name(device: torch.device) -> str:
    """What the hardware is, not which slot it sits in: cached plans move between GPUs of a kind."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{platform.machine()}:{platform.processor() or 'unknown'}"


def _describe_value(value: Any) -> Any:
    """Shape/dtype/stride/device of a tensor (symbolic sizes as their expression), else a stable repr."""
    if isinstance(value, torch.Tensor):
        return (
            "T",
            str(value.dtype),
            value.device.type,
            tuple(str(s) for s in value.shape),
            tuple(str(s) for s in value.stride()) if value.layout == torch.strided else (),
            str(value.layout),
        )
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("S", type(value).__name__, str(value))
    if isinstance(value, (list, tuple)):
        return tuple(_describe_value(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _describe_value(v)) for k, v in value.items()))
    if isinstance(value, (int, float, bool, str, type(None))):
        return value
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    return type(value).__qualname__


def _describe_graph(gm: fx.GraphModule) -> list[Any]:
    from graphopt.pipeline import node_op_name

    index = {node: i for i, node in enumerate(gm.graph.nodes)}

    def arg(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: ("N", index[n]))

    described = []
    for node in gm.graph.nodes:
        target = node.target if node.op in ("placeholder", "get_attr", "output") else node_op_name(node)
        if node.op == "placeholder":
            target = "input"  # input names vary between otherwise identical graphs
        args = _describe_value(arg(node.args)) if node.op != "placeholder" else ()
        kwargs = _describe_value(arg(node.kwargs))
        described.append((node.op, str(target), args, kwargs, _describe_value(node.meta.get("val"))))
    return described


def graph_key(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options, device: torch.device) -> str:
    """The cache key of one graph: what a decision about it may depend on.

    The graph's structure (ops, argument structure, shapes/dtypes/strides of every
    value, symbolic where dynamic), the inputs' layout, the device kind, the
    torch/triton/graphopt versions (and graphopt's source), and every option that changes
    compiled code.
    """
    import graphopt

    options_part = {k: v for k, v in options.as_dict().items() if k not in DEBUG_ONLY_OPTIONS}
    material = (
        _describe_graph(gm),
        _describe_value(list(example_inputs)),
        device_name(device),
        (torch.__version__, _package_version("triton"), graphopt.__version__, source_digest()),
        sorted((k, repr(v)) for k, v in options_part.items()),
    )
    return hashlib.sha256(repr(material).encode()).hexdigest()[:32]


def open_graph_cache(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options, device: torch.device, graph_name: str
) -> TuningCache | None:
    """The cache bound to one graph being compiled (what the backend puts in PassContext.cache);
    None, with a warning, if the graph cannot be keyed: caching is never worth a failed compile."""
    try:
        key = graph_key(gm, example_inputs, options, device)
    except Exception as e:
        warnings.warn(f"graphopt: tuning cache off for graph {graph_name}: cannot key it: {e}", CacheWarning)
        return None
    return open_cache(options, graph_key=key, graph_name=graph_name)
