"""The tuning cache: hits and misses, the key, corruption, concurrent processes, export/import."""

import multiprocessing
import os
import sqlite3
import warnings

import pytest
import torch

import graphopt.pipeline as pipeline
from graphopt import cache as cache_module
from graphopt.cache import CacheWarning, TuningCache, graph_key, open_cache
from graphopt.options import Options


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(folder))
    return folder


def test_miss_then_hit_and_get_or_compute_skips_the_work(cache_dir):
    cache = open_cache()
    assert cache.get("remat", "k1") is None
    cache.put("remat", "k1", {"saved": ["a", "b"], "peak": 123})
    assert cache.get("remat", "k1") == {"saved": ["a", "b"], "peak": 123}

    calls = []
    solve = lambda: calls.append(1) or [3, 1, 2]  # noqa: E731
    assert cache.get_or_compute("fusion", "k2", solve) == [3, 1, 2]
    assert TuningCache(cache.path).get_or_compute("fusion", "k2", solve) == [3, 1, 2]
    assert calls == [1]
    # None and falsy values are values, not misses.
    cache.put("fusion", "k3", None)
    assert cache.get_or_compute("fusion", "k3", lambda: pytest.fail("recomputed a stored None")) is None


def test_statistics_are_counted_per_graph_in_the_file_and_in_the_process(cache_dir):
    cache_module.reset_lookups()
    cache = open_cache(graph_key="abc", graph_name="g0_forward")
    cache.get_or_compute("remat", "k", lambda: 1)
    cache.get_or_compute("remat", "k", lambda: 1)
    cache.get("fusion", "other")
    stats = {(s.graph_key, s.namespace): (s.hits, s.misses, s.graph_name) for s in cache.graph_stats()}
    assert stats == {("abc", "remat"): (1, 1, "g0_forward"), ("abc", "fusion"): (0, 1, "g0_forward")}
    assert [(lk.namespace, lk.hit) for lk in cache_module.lookups()] == [
        ("remat", False),
        ("remat", True),
        ("fusion", False),
    ]
    assert cache.entries("remat")[0].hits == 1


def test_cache_dir_option_beats_the_environment_which_beats_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHOPT_CACHE_DIR", raising=False)
    import platformdirs

    assert cache_module.default_cache_dir(Options()) == platformdirs.user_cache_dir("graphopt")
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "env"))
    assert cache_module.default_cache_dir(Options()) == str(tmp_path / "env")
    assert cache_module.default_cache_dir(Options(cache_dir=str(tmp_path / "opt"))) == str(tmp_path / "opt")
    open_cache(Options(cache_dir=str(tmp_path / "opt"))).put("n", "k", 1)
    assert (tmp_path / "opt" / cache_module.FILE_NAME).exists() and not (tmp_path / "env").exists()


def _traced(shape, dynamic=False):
    """An ATen graph with meta['val'] (as AOTAutograd hands it over), traced at `shape`."""
    from torch.fx.experimental.proxy_tensor import make_fx

    f = lambda x, w: torch.relu(x @ w).sum(0)  # noqa: E731
    x, w = torch.randn(*shape), torch.randn(shape[-1], 3)
    gm = make_fx(f, tracing_mode="symbolic" if dynamic else "real")(x, w)
    return gm, [x, w]


def test_graph_key_depends_on_structure_shapes_and_compiling_options_only():
    device = torch.device("cpu")
    gm, inputs = _traced((4, 5))
    key = graph_key(gm, inputs, Options(), device)
    same_gm, same_inputs = _traced((4, 5))
    assert graph_key(same_gm, same_inputs, Options(), device) == key
    other_gm, other_inputs = _traced((6, 5))
    assert graph_key(other_gm, other_inputs, Options(), device) != key
    assert graph_key(gm, inputs, Options(fusion=False), device) != key
    assert graph_key(gm, inputs, Options(debug_dir="/x", cache_dir="/y"), device) == key
    # Symbolic shapes hash as expressions: the same dynamic graph at another size keeps its key.
    dyn_a, _ = _traced((4, 5), dynamic=True)
    dyn_b, _ = _traced((7, 5), dynamic=True)
    sym_inputs = [n.meta["val"] for n in dyn_a.graph.nodes if n.op == "placeholder"]
    assert graph_key(dyn_a, sym_inputs, Options(), device) == graph_key(dyn_b, sym_inputs, Options(), device)
    assert graph_key(dyn_a, sym_inputs, Options(), device) != key


def _broken_files(folder):
    return sorted(p.name for p in folder.iterdir() if ".broken-" in p.name)


def test_a_file_that_is_not_sqlite_is_moved_aside_and_rebuilt(cache_dir):
    cache_dir.mkdir()
    (cache_dir / cache_module.FILE_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.warns(CacheWarning, match="moved it to"):
        cache = open_cache()
    assert cache.get("n", "k") is None
    cache.put("n", "k", [1])
    assert cache.get("n", "k") == [1]
    (aside,) = _broken_files(cache_dir)
    assert aside.startswith(cache_module.FILE_NAME) and b"not a database" in (cache_dir / aside).read_bytes()


def test_a_file_with_the_version_but_not_the_tables_is_moved_aside_and_rebuilt(cache_dir):
    cache_dir.mkdir()
    conn = sqlite3.connect(cache_dir / cache_module.FILE_NAME)
    conn.execute("CREATE TABLE entries (x)")
    conn.execute(f"PRAGMA user_version = {cache_module.SCHEMA_VERSION}")
    conn.commit()
    conn.close()
    with pytest.warns(CacheWarning, match="tables do not match"):
        cache = open_cache()
    cache.put("n", "k", 3)
    assert cache.get("n", "k") == 3


def test_a_file_with_another_schema_version_is_moved_aside_and_rebuilt(cache_dir):
    cache_dir.mkdir()
    conn = sqlite3.connect(cache_dir / cache_module.FILE_NAME)
    conn.execute("CREATE TABLE entries (x)")
    conn.execute(f"PRAGMA user_version = {cache_module.SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.warns(CacheWarning, match="schema version"):
        cache = open_cache()
    cache.put("n", "k", 2)
    assert cache.get("n", "k") == 2


def test_a_busy_database_is_a_miss_and_is_never_moved_aside(cache_dir, monkeypatch):
    cache = open_cache()
    cache.put("n", "k", 1)
    monkeypatch.setattr(cache_module, "BUSY_TIMEOUT_S", 0.1)
    writer = sqlite3.connect(cache.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process is writing and does not finish
    try:
        busy = TuningCache(cache.path)
        with pytest.warns(CacheWarning, match="database is locked; failed lookups count as misses"):
            assert busy.get("n", "k") == 1  # WAL: readers are not blocked by a writer
            busy.put("n", "k2", 2)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert _broken_files(cache_dir) == []
    assert TuningCache(cache.path).get("n", "k") == 1 and TuningCache(cache.path).get("n", "k2") is None


def test_an_unwritable_cache_dir_disables_the_cache_with_a_warning(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    with pytest.warns(CacheWarning, match="disabled"):
        assert open_cache(Options(cache_dir=str(blocker / "sub"))) is None


def test_a_database_error_at_run_time_is_a_miss_with_one_warning(cache_dir):
    cache = open_cache()
    cache.put("n", "k", 1)
    cache._conn().execute("DROP TABLE entries")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.get("n", "k") is None
        assert cache.get_or_compute("n", "k", lambda: 5) == 5
    assert sum(issubclass(w.category, CacheWarning) for w in caught) == 1


def _hammer(path, worker, rounds, errors):
    try:
        cache = TuningCache(path)
        for i in range(rounds):
            cache.put("plan", f"w{worker}-{i}", {"worker": worker, "i": i})
            assert cache.get("plan", f"w{worker}-{i}") == {"worker": worker, "i": i}
            shared = cache.get_or_compute("shared", f"s{i}", lambda i=i: {"i": i})
            assert shared == {"i": i}
    except BaseException as e:  # reported to the parent, which fails the test
        errors.put(f"worker {worker}: {type(e).__name__}: {e}")


def test_concurrent_processes_read_and_write_safely(tmp_path):
    path = str(tmp_path / cache_module.FILE_NAME)
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    workers, rounds = 4, 40
    processes = [context.Process(target=_hammer, args=(path, w, rounds, errors)) for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * workers
    assert errors.empty(), errors.get()
    cache = TuningCache(path)
    assert len(cache.entries("plan")) == workers * rounds
    assert len(cache.entries("shared")) == rounds
    (mode,) = cache._conn().execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"


def test_export_import_round_trip(tmp_path):
    source = TuningCache(str(tmp_path / "a.sqlite"))
    source.put("remat", "k1", {"saved": ["x"], "ms": 1.5})
    source.put("fusion", "k2", [[0, 1], [2]])
    file = str(tmp_path / "plans.json")
    assert source.export(file) == 2
    target = TuningCache(str(tmp_path / "b.sqlite"))
    target.put("fusion", "k2", "stale")
    assert target.import_(file) == 2
    assert {(e.namespace, e.key): e.value for e in target.entries()} == {
        ("remat", "k1"): {"saved": ["x"], "ms": 1.5},
        ("fusion", "k2"): [[0, 1], [2]],
    }
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a graphopt cache export"):
        target.import_(str(tmp_path / "bad.json"))


def test_the_generation_changes_when_entries_are_cleared_or_imported_only(tmp_path):
    """Compiled graphs kept in torch's AOTAutograd cache are keyed on it (graphopt/artifact_cache.py)."""
    path = str(tmp_path / "a.sqlite")
    cache = TuningCache(path)
    first = cache.generation()
    cache.put("n", "k", 1)
    cache.get("n", "k")
    assert TuningCache(path).generation() == first  # compiles' own writes and reopening keep it
    assert TuningCache(str(tmp_path / "b.sqlite")).generation() != first  # another file
    file = str(tmp_path / "plans.json")
    cache.export(file)
    assert cache.generation() == first
    cache.import_(file)
    imported = cache.generation()
    cache.clear()
    assert len({first, imported, cache.generation()}) == 3


def test_a_file_written_before_generations_existed_gets_one_and_keeps_its_entries(tmp_path):
    path = str(tmp_path / "a.sqlite")
    TuningCache(path).put("n", "k", 1)
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE meta")
    conn.commit()
    conn.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not moved aside
        cache = TuningCache(path)
    assert cache.get("n", "k") == 1 and cache.generation() == TuningCache(path).generation()


def test_the_backend_hands_every_pass_a_cache_bound_to_its_graph(cache_dir, monkeypatch):
    seen = []

    def remembering(gm, ctx):
        seen.append(ctx.cache)
        ctx.cache.get_or_compute("test-plan", ctx.cache.graph_key, lambda: "solved")
        return gm, pipeline.PassReport()

    monkeypatch.setattr(pipeline, "graph_passes", lambda options: [("remembering", remembering)])
    # the second compile must run the passes, not load the first one's result (graphopt/artifact_cache.py);
    # torch's own patch, since monkeypatch's undo deletes a config entry it did not find in the module's __dict__
    with torch._functorch.config.patch(enable_autograd_cache=False):
        f = torch.compile(lambda x: torch.sin(x) + 1, backend="graphopt")
        x = torch.randn(3)
        torch.testing.assert_close(f(x), torch.sin(x) + 1)
        torch._dynamo.reset()
        f = torch.compile(lambda x: torch.sin(x) + 1, backend="graphopt")
        f(x)
    assert len(seen) == 2 and all(isinstance(c, TuningCache) for c in seen)
    assert seen[0].graph_key == seen[1].graph_key
    assert seen[0].graph_name.endswith("inference")
    (stats,) = open_cache().graph_stats()
    assert (stats.graph_key, stats.hits, stats.misses) == (seen[0].graph_key, 1, 1)
    assert os.path.exists(cache_dir / cache_module.FILE_NAME)
