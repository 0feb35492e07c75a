"""Text loading from files of each supported format and from the named WikiText-2 source."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from conftest import needs_datasets, write_jsonl

from exlq.data import text_sources
from exlq.data.text_sources import NAMED_SOURCES, find_shared_dir, load_text
from exlq.errors import ExlqError

ROWS = [" = Title = \n", "", " First paragraph .\n", "Zürich 🙂\n"]
JOINED = " = Title = \n\n\n\n\n First paragraph .\n\n\nZürich 🙂\n"  # written out by hand
WIKITEXT_SHA256_PREFIX = "71fa921e"


def test_joined_constant_matches_rows():
    assert "\n\n".join(ROWS) == JOINED


def test_txt_is_read_verbatim(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(JOINED.encode("utf-8"))
    src = load_text(str(path))
    assert src.text == JOINED
    assert src.rows == 9 and "notes.txt" in src.description and "UTF-8" in src.description


def test_txt_crlf_line_endings_become_lf(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes(JOINED.replace("\n", "\r\n").encode("utf-8"))
    assert load_text(str(path)).text == JOINED


def test_txt_lines_split_only_on_newline(tmp_path):
    path = tmp_path / "odd.txt"
    path.write_text("a\x0cb\u2028c\nd", encoding="utf-8")  # form feed, line separator: not lines
    src = load_text(str(path), max_rows=1)
    assert (src.text, src.rows) == ("a\x0cb\u2028c\n", 1)
    assert load_text(str(path)).rows == 2


def test_unknown_extension_is_read_as_text_and_max_rows_keeps_first_lines(tmp_path):
    path = tmp_path / "corpus.md"
    path.write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert load_text(str(path)).text == "one\ntwo\nthree\n"
    src = load_text(str(path), max_rows=2)
    assert (src.text, src.rows) == ("one\ntwo\n", 2)
    assert "first 2 of 3 lines" in src.description


@needs_datasets
def test_jsonl_rows_joined_with_blank_line_and_empty_rows_kept(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": r, "id": i} for i, r in enumerate(ROWS)])
    src = load_text(str(path))
    assert src.text == JOINED
    assert src.rows == 4
    assert "data.jsonl" in src.description and "4 rows" in src.description and "empty rows kept" in src.description


@needs_datasets
def test_jsonl_gz_and_custom_field_and_max_rows(tmp_path):
    rows = [{"body": r, "text": "wrong"} for r in ROWS]
    path = write_jsonl(tmp_path / "data.jsonl.gz", rows, opener=gzip.open)
    assert load_text(str(path), text_field="body").text == JOINED
    src = load_text(str(path), text_field="body", max_rows=2)
    assert src.text == " = Title = \n\n\n" and src.rows == 2
    assert "first 2 of 4 rows" in src.description and "gzip" in src.description


@needs_datasets
def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": r} for r in ROWS]), encoding="utf-8")
    assert load_text(str(path)).text == JOINED


@needs_datasets
def test_parquet(tmp_path):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"text": ROWS, "n": list(range(len(ROWS)))}).to_parquet(str(path))
    src = load_text(str(path))
    assert src.text == JOINED and src.rows == 4 and "parquet" in src.description


@needs_datasets
def test_missing_field_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"content": "a", "meta": 1}])
    with pytest.raises(ExlqError, match=r"no field 'text'.*content, meta"):
        load_text(str(path))


@needs_datasets
def test_non_text_field_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "n": 3}])
    with pytest.raises(ExlqError, match="field 'n' is int"):
        load_text(str(path), text_field="n")


@needs_datasets
def test_malformed_json_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ExlqError, match="bad.jsonl"):
        load_text(str(path))


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl"])
def test_missing_file(tmp_path, name):
    with pytest.raises(ExlqError, match="does not exist"):
        load_text(str(tmp_path / name))


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ExlqError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(ExlqError, match="not a file"):
        load_text(str(tmp_path))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(ExlqError, match="not valid UTF-8"):
        load_text(str(path))


def test_bad_max_rows(tmp_path):
    with pytest.raises(ExlqError, match="max_rows"):
        load_text("wikitext2", max_rows=0)


def _real_wikitext() -> Path:
    shared = find_shared_dir()
    path = shared / NAMED_SOURCES["wikitext2"] if shared else None
    if path is None or not path.is_file():
        pytest.skip("shared WikiText-2 file not found (set EXLQ_SHARED_DIR or run from a checkout beside shared/)")
    return path


def test_wikitext2_named_source():
    path = _real_wikitext()
    expected = path.read_bytes()
    assert hashlib.sha256(expected).hexdigest().startswith(WIKITEXT_SHA256_PREFIX)
    src = load_text("wikitext2")
    # The shared file is CRLF on disk; the text is HF's "\n\n".join(rows) with "\n" endings.
    assert src.text.encode("utf-8") == expected.replace(b"\r\n", b"\n")
    assert src.text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    raw = path.parent / "wiki.test.raw"
    if raw.is_file():  # independent reference: rebuild HF's rows the way its wikitext script does
        rows = [line if line.strip() else "" for line in raw.open(encoding="utf-8")]
        assert len(rows) == 4358 and src.text == "\n\n".join(rows)
    assert src.description.startswith("wikitext2: ") and str(path) in src.description


def test_shared_dir_env_override(tmp_path, monkeypatch):
    target = tmp_path / NAMED_SOURCES["wikitext2"]
    target.parent.mkdir(parents=True)
    target.write_text("fake wiki\n", encoding="utf-8")
    monkeypatch.setenv("EXLQ_SHARED_DIR", str(tmp_path))
    assert find_shared_dir() == tmp_path
    assert load_text("wikitext2").text == "fake wiki\n"


def test_shared_dir_env_override_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EXLQ_SHARED_DIR", str(tmp_path))
    with pytest.raises(ExlqError, match="not in the shared directory"):
        load_text("wikitext2")


def test_shared_dir_not_found_says_where_it_looked(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    monkeypatch.setenv("EXLQ_SHARED_DIR", str(missing))
    assert find_shared_dir() is None
    with pytest.raises(ExlqError, match=rf"looked in: {missing}.*--data FILE.*EXLQ_SHARED_DIR"):
        load_text("wikitext2")


def test_shared_dir_fallbacks(tmp_path, monkeypatch):
    monkeypatch.delenv("EXLQ_SHARED_DIR", raising=False)
    import exlq

    repo_sibling = Path(exlq.__file__).resolve().parents[2] / "shared"
    (tmp_path / "shared").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # ../shared from here exists and comes first
    assert text_sources.shared_dir_candidates()[0] == tmp_path / "shared"
    assert find_shared_dir() == tmp_path / "shared"
    monkeypatch.chdir(tmp_path)  # ../shared from here does not exist: the repo's sibling is next
    assert text_sources.shared_dir_candidates()[-1] == repo_sibling
    assert find_shared_dir() == (repo_sibling if repo_sibling.is_dir() else None)


@needs_datasets
def test_reading_a_file_leaves_no_datasets_cache(tmp_path, monkeypatch):
    import datasets.config

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    load_text(str(write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])))
    assert list(cache.iterdir()) == []
