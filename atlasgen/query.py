"""`atlasgen query`: read-only SQL over the store, for real.

Two layers keep a query inside the store:
1. Before anything runs, every statement is classified and all but reads are refused with one line that
   names what is refused: COPY, ATTACH/DETACH, INSTALL/LOAD, EXPORT/IMPORT DATABASE, SET/RESET, setting
   PRAGMAs, and any statement that writes (INSERT, CREATE, CHECKPOINT, ...).
2. The connection itself is read-only and locked down (`Store.lock_down`): DuckDB's external access is off
   (no file, URL or extension is opened: `read_text('/etc/hostname')` inside a SELECT fails too), and the
   configuration is locked so no statement can turn that back on.
Errors get a hint that matches them: a syntax error says where it failed, a missing table lists the
tables, a missing column lists the table's columns; only a write attempt says the store is read-only.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from .errors import AtlasError

FORMATS = ("table", "csv", "json", "markdown")
EXAMPLE = 'atlasgen query "SELECT feature_id, label FROM features ORDER BY strength DESC LIMIT 10"'
WRITE_HINT = "query it with SELECT; to change the store, rerun a stage (e.g. `atlasgen encode`)"
READ_ONLY_HINT = ("atlasgen query runs SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN and read-only PRAGMAs; "
                  "`atlasgen export --to DIR` writes the tables as Parquet")

# Statement types that only read. PRAGMA and EXPLAIN are checked further below.
_READ_TYPES = {"SELECT", "RELATION", "CALL", "EXPLAIN", "PRAGMA"}
# Statement types that would write to the store (refused as such: "the store is read-only").
_WRITE_TYPES = {"INSERT", "UPDATE", "DELETE", "CREATE", "CREATE_FUNC", "DROP", "ALTER", "VACUUM", "ANALYZE",
                "MERGE_INTO", "LOGICAL_PLAN"}
# DuckDB parses a PIVOT without an IN list as MULTI (it first reads the distinct values, then pivots): a read
# when it starts like one. A MULTI that writes starts with CREATE and is refused as such.
_MULTI_READ_WORDS = {"PIVOT", "UNPIVOT", "SELECT", "FROM", "WITH"}
# A write inside a CTE (`WITH x AS (INSERT ... RETURNING *) SELECT ...`), which DuckDB types as SELECT.
_CTE_WRITE = re.compile(r"\bAS\s*(?:NOT\s+)?(?:MATERIALIZED\s*)?\(\s*(INSERT|UPDATE|DELETE|MERGE)\b", re.I)
# PRAGMAs that only show things; every other PRAGMA changes a setting (or imports a database).
_INFO_PRAGMAS = {"show_tables", "show_tables_expanded", "table_info", "show", "storage_info", "database_size",
                 "database_list", "version", "platform", "functions", "collations", "metadata_info",
                 "user_agent", "show_databases"}

# Leading keywords → (what is refused, why). Checked before statement types: IMPORT DATABASE and
# COPY FROM DATABASE parse as PRAGMA, CHECKPOINT as CALL, USE as SET.
_REFUSED_KEYWORDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("COPY",), "COPY", "atlasgen query neither writes nor reads files"),
    (("ATTACH",), "ATTACH", "atlasgen query reads only this store"),
    (("DETACH",), "DETACH", "atlasgen query reads only this store"),
    (("INSTALL",), "INSTALL", "atlasgen query loads no extensions"),
    (("FORCE", "INSTALL"), "FORCE INSTALL", "atlasgen query loads no extensions"),
    (("LOAD",), "LOAD", "atlasgen query loads no extensions"),
    (("UPDATE", "EXTENSIONS"), "UPDATE EXTENSIONS", "atlasgen query loads no extensions"),
    (("EXPORT", "DATABASE"), "EXPORT DATABASE", "atlasgen query writes no files"),
    (("IMPORT", "DATABASE"), "IMPORT DATABASE", "atlasgen query reads only this store"),
    (("SET",), "SET", "atlasgen query changes no settings (file and network access stay off)"),
    (("RESET",), "RESET", "atlasgen query changes no settings (file and network access stay off)"),
    (("USE",), "USE", "atlasgen query reads only this store"),
    (("CHECKPOINT",), "CHECKPOINT", "the store is read-only here"),
    (("FORCE", "CHECKPOINT"), "FORCE CHECKPOINT", "the store is read-only here"),
    (("PREPARE",), "PREPARE", "prepared statements are not supported; write the values into the query"),
    (("EXECUTE",), "EXECUTE", "prepared statements are not supported; write the values into the query"),
    (("DEALLOCATE",), "DEALLOCATE", "prepared statements are not supported"),
)


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple]
    truncated: bool  # more rows than the limit


# --- checking ------------------------------------------------------------------------------------
def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"--[^\n]*", " ", text)


def _strip_quoted(text: str) -> str:
    """`text` without comments, string literals and quoted names (so a keyword inside them is not seen)."""
    return re.sub(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", "''", _strip_comments(text))


def _words(text: str, n: int = 3) -> list[str]:
    return re.findall(r"[A-Za-z_]+", _strip_comments(text))[:n]


def _explained(text: str) -> str:
    """The statement under EXPLAIN [ANALYZE] [(options)]."""
    body = _strip_comments(text).strip()
    body = re.sub(r"^EXPLAIN\s+(ANALY[SZ]E\s+)?(\([^)]*\)\s*)?", "", body, flags=re.I)
    return body


def refusal(text: str, type_name: str) -> AtlasError | None:
    """Why one statement is refused, or None when it only reads."""
    words = [w.upper() for w in _words(text)]
    if words[:1] == ["EXPLAIN"]:
        inner = _explained(text)
        inner_words = [w.upper() for w in _words(inner)]
        if inner_words and inner_words[0] not in ("SELECT", "WITH", "FROM", "VALUES", "TABLE", "DESCRIBE", "SHOW",
                                                  "SUMMARIZE", "PIVOT", "UNPIVOT", "("):
            found = refusal(inner, "UNKNOWN")
            return found or AtlasError(f"refused: EXPLAIN {inner_words[0]}: only reads can be explained",
                                       READ_ONLY_HINT)
        return None
    for keywords, name, why in _REFUSED_KEYWORDS:
        if tuple(words[:len(keywords)]) == keywords:
            return AtlasError(f"refused: {name}: {why}", READ_ONLY_HINT)
    if type_name in _WRITE_TYPES or words[:1] in (["INSERT"], ["UPDATE"], ["DELETE"], ["CREATE"], ["DROP"],
                                                  ["ALTER"], ["TRUNCATE"], ["VACUUM"], ["ANALYZE"], ["COMMENT"],
                                                  ["MERGE"]):
        name = type_name.replace("_", " ") if type_name in _WRITE_TYPES and words[:1] == ["WITH"] else \
            (words[0] if words else type_name)
        return AtlasError(f"refused: {name}: the store is read-only here", WRITE_HINT)
    cte_write = _CTE_WRITE.search(_strip_quoted(text))
    if cte_write:
        return AtlasError(f"refused: {cte_write.group(1).upper()} inside WITH: the store is read-only here", WRITE_HINT)
    if type_name == "MULTI":
        if words[:1] and words[0] in _MULTI_READ_WORDS:
            return None
        return AtlasError(f"refused: {' '.join(words[:2]) or type_name}: not a read-only query", READ_ONLY_HINT)
    if re.search(r"\b(force_)?checkpoint\s*\(", _strip_comments(text), flags=re.I):
        return AtlasError("refused: checkpoint(): the store is read-only here", WRITE_HINT)
    if type_name == "PRAGMA":
        name = words[1].lower() if len(words) > 1 else ""
        if name not in _INFO_PRAGMAS or "=" in text:
            return AtlasError(f"refused: PRAGMA {name}: atlasgen query changes no settings",
                              "read-only PRAGMAs work, e.g. PRAGMA show_tables; PRAGMA table_info('features')")
        return None
    if type_name == "TRANSACTION":
        return AtlasError(f"refused: {words[0] if words else 'transaction'}: every atlasgen query is one read-only "
                          "transaction already", READ_ONLY_HINT)
    if type_name not in _READ_TYPES:
        return AtlasError(f"refused: {' '.join(words[:2]) or type_name}: not a read-only query", READ_ONLY_HINT)
    return None


def _type_name(statement) -> str:
    try:
        return statement.type.name
    except ValueError:  # a statement type newer than the Python binding's enum (e.g. UPDATE EXTENSIONS)
        return "UNKNOWN"


def check_sql(sql: str) -> list:
    """The statements of `sql`, each checked; raises AtlasError for empty SQL, a syntax error or a refusal.
    Nothing runs unless every statement passes."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.ParserException as e:
        raise syntax_error(e) from None
    except duckdb.Error as e:
        raise AtlasError(f"query failed: {_first_line(e)}", "check the SQL") from None
    if not statements:
        raise AtlasError("no SQL statement given: the query is empty or only comments",
                         f"e.g. {EXAMPLE}")
    for statement in statements:
        problem = refusal(statement.query, _type_name(statement))
        if problem is not None:
            raise problem
    return statements


# --- errors --------------------------------------------------------------------------------------
def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^[A-Za-z ]*Error: ", "", text)


def syntax_error(e: Exception) -> AtlasError:
    """A ParserException → the message and a hint saying where it failed (line, column, the line itself)."""
    text = str(e)
    first = _first_line(e)
    message = first if first.lower().startswith("syntax error") else f"syntax error: {first}"
    m = re.search(r"^(LINE (\d+): )(.*)\n(\s*)\^", text, flags=re.M)
    if m:
        column = len(m.group(4)) - len(m.group(1)) + 1
        hint = (f"check the SQL at line {m.group(2)}, column {max(column, 1)}: {m.group(3).strip()!r} "
                "(strings take 'single quotes', names \"double quotes\")")
    else:
        hint = "check the SQL syntax (strings take 'single quotes', names \"double quotes\")"
    return AtlasError(message, hint)


def explain_error(e: duckdb.Error, store, sql: str = "") -> AtlasError:
    """A DuckDB error from running a checked query (`sql`) → one line and the hint that matches it."""
    from .store import classify_store_error
    damaged = classify_store_error(e, store.paths.store_path)  # a corrupt block shows only when it is read
    if damaged is not None:
        return damaged
    text = str(e)
    first = _first_line(e)
    if isinstance(e, duckdb.ParserException):
        return syntax_error(e)
    if isinstance(e, duckdb.PermissionException) or "disabled by configuration" in text \
            or "disabled through configuration" in text:
        m = re.search(r'Cannot access (file|directory) "([^"]*)"', text)
        what = f'opening the {m.group(1)} "{m.group(2)}"' if m else first
        return AtlasError(f"refused: {what}: atlasgen query has no file, network or extension access",
                          "query the store's tables; `atlasgen export --to DIR` writes them as Parquet")
    if "configuration has been locked" in text:
        m = re.search(r'option "([^"]+)"', text)
        return AtlasError(f"refused: changing the setting {m.group(1) if m else ''}".rstrip() +
                          ": atlasgen query changes no settings", READ_ONLY_HINT)
    if "read-only mode" in text:  # a write the check above did not see; the connection refused it
        return AtlasError("refused: the query writes: the store is read-only here", WRITE_HINT)
    tables = store.table_names()
    m = re.search(r"Table with name (\S+) does not exist", text)
    if isinstance(e, duckdb.CatalogException) and m and re.search(r"[./\\:*]", m.group(1)):
        # FROM 'file.csv': DuckDB would read the file, but external access is off, so it looks for a table.
        return AtlasError(f'refused: reading the file "{m.group(1)}": atlasgen query has no file, network or '
                          "extension access", "query the store's tables; `atlasgen export --to DIR` writes them as Parquet")
    if isinstance(e, duckdb.CatalogException) and re.search(r"Table with name|Table .* does not exist", text):
        guess = re.search(r'Did you mean "([^"]+)"', text)
        if guess and guess.group(1).split(".")[-1] not in tables:
            guess = None  # one of DuckDB's own catalog tables (pg_sequences, ...), not the store's
        return AtlasError(f"query failed: {first}", (f"did you mean {guess.group(1)}? " if guess else "")
                          + f"the store's tables: {', '.join(tables)}")
    m = re.search(r'column "?([^"\s]+)"? not found|does not have a column named', text, flags=re.I)
    if isinstance(e, duckdb.BinderException) and m:
        hint = "DESCRIBE a table to see its columns, e.g. atlasgen query \"DESCRIBE features\""
        # The tables the error names, else those the query names (`FROM features f` ... `f.labl`: the error
        # names only the alias).
        named = [t for t in tables if re.search(rf"\b{re.escape(t)}\b", text)] or \
            [t for t in tables if re.search(rf"\b{re.escape(t)}\b", _strip_quoted(sql), flags=re.I)]
        return AtlasError(f"query failed: {first}", hint if not named else
                          "; ".join(f"{t}: {', '.join(c for c, _ in store.table_columns(t))}" for t in named[:2]))
    if isinstance(e, duckdb.CatalogException) and "Function with name" in text:
        return AtlasError(f"query failed: {first}",
                          "see DuckDB's functions: SELECT DISTINCT function_name FROM duckdb_functions()")
    return AtlasError(f"query failed: {first}",
                      "see docs/STORE.md for the tables and columns, DuckDB's SQL reference for the rest")


# --- running -------------------------------------------------------------------------------------
def run_query(out_dir: Path, sql: str, limit: int) -> QueryResult | None:
    """Check `sql`, then run it on the locked-down read-only store; the last statement's rows (at most
    `limit`, 0 = all), or None when it returns no rows."""
    from .store import Store
    statements = check_sql(sql)
    with Store.open(out_dir, read_only=True) as store:
        store.lock_down()
        cursor = None
        try:
            for statement in statements:
                cursor = store.con.execute(statement.query)
            if cursor is None or cursor.description is None:
                return None
            columns = [d[0] for d in cursor.description]
            if limit > 0:
                rows = cursor.fetchmany(limit + 1)
                return QueryResult(columns, rows[:limit], len(rows) > limit)
            return QueryResult(columns, cursor.fetchall(), False)
        except duckdb.Error as e:
            raise explain_error(e, store, sql) from None


# --- printing ------------------------------------------------------------------------------------
def _json_value(v):
    """A value JSON can hold: a float that is not finite becomes null (JSON has no NaN or Infinity), in lists
    and structs too."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    return v


def _sql_text(v) -> str:
    """A value as SQL shows it: NULL, true/false."""
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def format_rows(result: QueryResult, fmt: str) -> str:
    columns, rows = result.columns, result.rows
    if fmt == "json":
        return json.dumps([{c: _json_value(v) for c, v in zip(columns, r)} for r in rows], default=str, indent=1,
                          allow_nan=False)
    if fmt == "csv":  # NULL is an empty field, as DuckDB's own CSV writes it
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if v is None else _sql_text(v) if isinstance(v, bool) else v for v in r]
                          for r in rows])
        return buffer.getvalue().rstrip("\n")
    if fmt == "markdown":
        def md(v) -> str:
            text = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else _sql_text(v))
            return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(md(c) for c in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(md(v) for v in r) + " |" for r in rows]
        return "\n".join(lines)
    assert fmt == "table", fmt

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        text = " ".join(_sql_text(v).splitlines())  # one line per row, as markdown has it
        return text if len(text) <= 60 else text[:57] + "..."
    cells = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise AtlasError(f"--format {fmt} is not one of {', '.join(FORMATS)}", "use --format table")
