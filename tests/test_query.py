"""`atlasgen query` is read-only for real: every statement kind that writes, reads files, loads extensions or
changes settings is refused with one line and exit 2, and nothing is written or read outside the store (the
file system is compared before and after); the hint matches the error; the output formats."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlasgen.cli import app
from atlasgen.progress import set_quiet
from atlasgen.store import Store

runner = CliRunner()
SECRET = "s3cret-marker-4711"


@pytest.fixture(scope="module")
def small_out(tmp_path_factory) -> Path:
    """A store with a few rows in images and features (no build needed)."""
    set_quiet(True)
    out = tmp_path_factory.mktemp("query") / "build"
    with Store.open(out) as store:
        store.con.execute("INSERT INTO images (image_id, source, label, corpus_path) VALUES "
                          "(1, 'a.jpg', 'cat', 'corpus/1.jpg'), (2, 'b.jpg', 'dog', 'corpus/2.jpg'), "
                          "(3, 'c.jpg', 'cat', 'corpus/3.jpg')")
        store.con.execute("INSERT INTO feature_stats (feature_id, n_active, frequency, label) VALUES "
                          "(0, 2, 0.66, 'cat (2/3)'), (1, 1, 0.33, 'dog (1/1)'), (2, 0, 0.0, NULL)")
        store.con.execute("CHECKPOINT")
    return out


@pytest.fixture
def sandbox(small_out, tmp_path, monkeypatch):
    """cwd and HOME in an empty folder with one secret file outside the store; returns (out, cwd, home)."""
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    (cwd / "secret.txt").write_text(SECRET)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    return small_out, cwd, home


def snapshot(*folders: Path) -> dict[str, tuple]:
    """Every file and folder under `folders`: size and modification time."""
    out = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = Path(root) / name
                st = path.stat()
                out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


def query(out: Path, sql: str, *args: str):
    # `--` so that SQL starting with "--" (a comment) is not taken for an option.
    return runner.invoke(app, ["query", "--out", str(out), *args, "--", sql])


# Each refused statement, and the word that names what is refused in the one-line error.
REFUSED = [
    ("COPY features TO 'leak.csv'", "COPY"),
    ("COPY (SELECT * FROM images) TO 'leak.parquet' (FORMAT parquet)", "COPY"),
    ("COPY features FROM 'secret.txt'", "COPY"),
    ("COPY FROM DATABASE atlas TO other", "COPY"),
    ("ATTACH 'other.duckdb' AS other", "ATTACH"),
    ("ATTACH ':memory:' AS scratch", "ATTACH"),
    ("DETACH atlas", "DETACH"),
    ("INSTALL httpfs", "INSTALL"),
    ("FORCE INSTALL httpfs", "INSTALL"),
    ("LOAD httpfs", "LOAD"),
    ("UPDATE EXTENSIONS", "UPDATE EXTENSIONS"),
    ("EXPORT DATABASE 'dump'", "EXPORT DATABASE"),
    ("IMPORT DATABASE 'dump'", "IMPORT DATABASE"),
    ("SET enable_external_access = true", "SET"),
    ("SET lock_configuration = false", "SET"),
    ("RESET enable_external_access", "RESET"),
    ("SET GLOBAL threads = 1", "SET"),
    ("PRAGMA threads = 1", "PRAGMA threads"),
    ("PRAGMA enable_profiling", "PRAGMA enable_profiling"),
    ("USE memory", "USE"),
    ("INSERT INTO features (feature_id) VALUES (99)", "INSERT"),
    ("UPDATE features SET label = 'x'", "UPDATE"),
    ("DELETE FROM images", "DELETE"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("CREATE TEMP TABLE t AS SELECT 1", "CREATE"),
    ("CREATE VIEW v AS SELECT 1", "CREATE"),
    ("CREATE MACRO m(x) AS x + 1", "CREATE"),
    ("DROP TABLE images", "DROP"),
    ("ALTER TABLE images ADD COLUMN x INTEGER", "ALTER"),
    ("TRUNCATE images", "TRUNCATE"),
    ("CHECKPOINT", "CHECKPOINT"),
    ("CALL checkpoint()", "checkpoint"),
    ("VACUUM", "VACUUM"),
    ("BEGIN TRANSACTION", "BEGIN"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("EXPLAIN COPY features TO 'leak.csv'", "COPY"),
    ("WITH x AS (SELECT 1) INSERT INTO features (feature_id) SELECT * FROM x", "INSERT"),
    # DuckDB types these as SELECT: the write is in a CTE.
    ("WITH x AS (INSERT INTO images (image_id, source) VALUES (9, 'x') RETURNING *) SELECT * FROM x", "INSERT"),
    ("SELECT 42; WITH x AS MATERIALIZED ( DELETE FROM images RETURNING * ) SELECT * FROM x", "DELETE"),
    ("CREATE TABLE p AS PIVOT images ON label USING count(*)", "CREATE"),
    ("SELECT 1; COPY features TO 'leak.csv'", "COPY"),
    # Reads of files, URLs and globs inside a SELECT: refused by DuckDB itself (external access is off).
    ("SELECT * FROM read_text('secret.txt')", "secret.txt"),
    ("SELECT * FROM read_csv('secret.txt')", "secret.txt"),
    ("SELECT * FROM 'secret.txt'", "secret.txt"),
    ("SELECT * FROM read_blob('/etc/hostname')", "/etc/hostname"),
    ("SELECT * FROM glob('*')", "*"),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "https://example.com/x.parquet"),
]


@pytest.mark.parametrize("sql,named", REFUSED, ids=[s for s, _ in REFUSED])
def test_refused_with_one_line_and_nothing_touched(sandbox, sql, named):
    out, cwd, home = sandbox
    before = snapshot(out, cwd, home)
    result = query(out, sql)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("error: refused: "), result.output
    assert named.lower() in lines[0].lower(), f"{named!r} not named in {lines[0]!r}"
    assert len(lines) == 2 and lines[1].startswith("hint: "), result.output
    assert "Traceback" not in result.output and SECRET not in result.output
    assert snapshot(out, cwd, home) == before, "the file system changed"
    assert sorted(p.name for p in cwd.iterdir()) == ["secret.txt"] and not any(home.iterdir())


def test_only_writes_say_read_only(sandbox):
    out, *_ = sandbox
    result = query(out, "INSERT INTO features (feature_id) VALUES (99)")
    assert "read-only" in result.output
    for sql in ("SELEC 1", "SELECT * FROM nope", "SELECT nope FROM features", "SELECT 'a'::INTEGER"):
        result = query(out, sql)
        assert result.exit_code == 2 and "read-only" not in result.output, (sql, result.output)


def test_syntax_error_says_where(sandbox):
    out, *_ = sandbox
    result = query(out, "SELECT feature_id\nFROM features\nWHERE label = = 'x'")
    assert result.exit_code == 2
    error, hint = result.output.strip().splitlines()
    assert error.startswith("error: syntax error") and '"="' in error
    assert hint.startswith("hint: check the SQL at line 3, column 15") and "WHERE label = = 'x'" in hint


def test_missing_table_lists_tables_and_missing_column_lists_columns(sandbox):
    out, *_ = sandbox
    result = query(out, "SELECT * FROM featurez")
    assert result.exit_code == 2 and "featurez" in result.output
    hint = result.output.strip().splitlines()[-1]
    assert hint.startswith("hint: did you mean features? the store's tables:"), hint
    assert "features" in hint and "activations" in hint
    result = query(out, "SELECT * FROM sequencez")  # DuckDB would suggest its own pg_sequence
    hint = result.output.strip().splitlines()[-1]
    assert hint.startswith("hint: the store's tables:") and "pg_" not in hint, hint
    for sql in ("SELECT lable FROM features", "SELECT f.lable FROM features f"):
        result = query(out, sql)
        assert result.exit_code == 2
        hint = result.output.strip().splitlines()[-1]
        assert "features:" in hint and "label_purity" in hint, (sql, hint)


@pytest.mark.parametrize("sql", ["", "   ", "-- just a comment", "/* nothing */ -- here\n"])
def test_empty_or_comment_only_is_a_clear_error(sandbox, sql):
    out, *_ = sandbox
    result = query(out, sql)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: no SQL statement given")


def test_reads_work_in_every_format(sandbox):
    out, *_ = sandbox
    sql = "SELECT feature_id, label, frequency FROM features ORDER BY feature_id"
    result = query(out, sql, "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["feature_id", "label", "frequency"] and rows[1] == ["0", "cat (2/3)", "0.66"] and len(rows) == 4
    result = query(out, sql, "--format", "json")
    data = json.loads(result.stdout)
    assert data[1] == {"feature_id": 1, "label": "dog (1/1)", "frequency": 0.33} and data[2]["label"] is None
    result = query(out, sql, "--format", "markdown")
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "| feature_id | label | frequency |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| 0 | cat (2/3) | 0.66 |" and len(lines) == 5
    result = query(out, sql, "--limit", "2")
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["feature_id", "label", "frequency"] and len(lines) == 4
    assert "--limit 0" in result.stderr
    result = query(out, sql, "--format", "yaml")
    assert result.exit_code == 2 and "markdown" in result.output


def test_values_print_as_sql_and_json_stays_json(sandbox):
    """NULL and booleans as SQL writes them, one line per row in a table, and JSON without NaN or Infinity
    (which JSON does not have: they are null), in arrays too."""
    out, *_ = sandbox
    sql = ("SELECT NULL AS n, true AS t, 'line1' || chr(10) || 'line2' AS s, 1/0 AS inf, 'nan'::DOUBLE AS nan, "
           "[1.5, 'inf'::DOUBLE] AS xs")
    table = query(out, sql).stdout.strip().splitlines()
    assert len(table) == 3 and table[2].split()[:4] == ["NULL", "true", "line1", "line2"], table
    data = json.loads(query(out, sql, "--format", "json").stdout, parse_constant=lambda c: pytest.fail(c))
    assert data == [{"n": None, "t": True, "s": "line1\nline2", "inf": None, "nan": None, "xs": [1.5, None]}]
    rows = list(csv.reader(io.StringIO(query(out, sql, "--format", "csv").stdout)))
    assert rows[1][:2] == ["", "true"]
    markdown = query(out, sql, "--format", "markdown").stdout.strip().splitlines()
    assert markdown[2].startswith("|  | true | line1 line2 |"), markdown


def test_negative_limit_is_a_clear_error(sandbox):
    out, *_ = sandbox
    result = query(out, "SELECT * FROM range(5)", "--limit", "-1")
    assert result.exit_code == 2 and result.output.startswith("error: --limit -1 is negative"), result.output


def test_read_only_statements_run(sandbox):
    out, *_ = sandbox
    for sql, expected in (("DESCRIBE features", "label_purity"), ("SHOW TABLES", "coactivation"),
                          ("SUMMARIZE images", "label"), ("PRAGMA table_info('images')", "corpus_path"),
                          ("EXPLAIN SELECT * FROM images", "physical_plan"),
                          ("FROM images SELECT count(*) AS n", "3"),
                          ("SELECT 1 AS a; SELECT label FROM images WHERE image_id = 2", "dog"),
                          # A PIVOT without IN is one MULTI statement (distinct values, then the pivot).
                          ("PIVOT images ON label USING count(*)", "cat"),
                          ("SELECT * FROM (PIVOT images ON label USING count(*))", "dog"),
                          # A string or a name that only looks like a write in a CTE.
                          ("WITH x AS (SELECT 'AS (INSERT' AS \"AS (DELETE\") SELECT * FROM x", "INSERT")):
        result = query(out, sql)
        assert result.exit_code == 0 and expected in result.stdout, (sql, result.output)





def test_ctrl_c_during_a_long_query_exits_130(small_out, monkeypatch):
    """Ctrl-C while DuckDB runs a statement reaches us as DuckDB's own error (RuntimeError "Query
    interrupted"): still exit 130 and one line, as Ctrl-C anywhere else."""
    import _thread
    import threading
    connections = []
    lock_down = Store.lock_down

    def keep_connection(store):
        connections.append(store.con)
        lock_down(store)

    def end_the_task():
        # DuckDB looks for a signal between its tasks, and one task of this query can take minutes: end it, so
        # DuckDB sees the pending Ctrl-C now (it still reports "Query interrupted", the Ctrl-C).
        for con in connections:
            try:
                con.interrupt()
            except Exception:  # the query already stopped and its connection is closed
                pass
    monkeypatch.setattr(Store, "lock_down", keep_connection)
    ctrl_c = threading.Timer(1.0, _thread.interrupt_main)  # SIGINT as the terminal sends it, to the main thread
    end_task = threading.Timer(1.5, end_the_task)
    ctrl_c.start()
    end_task.start()
    try:
        result = runner.invoke(app, ["query", "SELECT sum(hash(range)) FROM range(30000000000)",
                                     "--out", str(small_out)])
    finally:
        ctrl_c.cancel()
        end_task.join()
    assert connections, "the query did not run"
    assert result.exit_code == 130, (result.output, result.exception)
    assert result.output.splitlines()[0] == "error: interrupted" and "Traceback" not in result.output
