"""Text specs are kept apart by their documents' text, not by the ranges they name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmerge.errors import BadInputError
from qmerge.io.textset import check_disjoint, load_documents, load_text_spec
from tests.conftest import write_text_spec


def _spec(folder: Path, name: str, source: Path, documents: str, fmt: str = "text") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(f'[source]\npath = "{source}"\nformat = "{fmt}"\n[split]\ndocuments = "{documents}"\n')
    return path


def _lee(tmp_path: Path) -> list[str]:
    return load_documents(load_text_spec(write_text_spec(tmp_path, "all", ":")))


def _refused(a: Path, b: Path) -> str:
    with pytest.raises(BadInputError) as e:
        check_disjoint(load_text_spec(a), load_text_spec(b), "quantize.calibration", "gate.eval")
    assert e.value.exit_code == 2
    return str(e.value)


def test_the_same_documents_in_a_copy_another_format_or_a_shifted_range_are_refused(tmp_path):
    docs = _lee(tmp_path)
    heldout = write_text_spec(tmp_path, "heldout", "265:300")
    crlf = tmp_path / "copy.cor"  # a header line in front, CRLF line ends: the same documents one index later
    crlf.write_bytes(("header line\r\n" + "\r\n".join(docs) + "\r\n").encode())
    assert "share 34 documents" in _refused(_spec(tmp_path, "cal", crlf, "266:301"), heldout)
    rows = tmp_path / "docs.jsonl"
    rows.write_text("".join(json.dumps({"text": d + "  "}) + "\n" for d in docs[270:280]))
    message = _refused(heldout, _spec(tmp_path, "j", rows, ":", "jsonl"))
    assert "share 10 documents: document 270 of lee_background.cor is document 0 of docs.jsonl" in message


def test_an_article_the_corpus_repeats_counts_as_shared(tmp_path):
    """The lee corpus holds article 263 again as 271: ranges 250:265 and 265:300 do not overlap, but would have
    put that article in both the selection and the gate's windows."""
    message = _refused(write_text_spec(tmp_path, "select", "250:265"), write_text_spec(tmp_path, "heldout", "265:300"))
    assert "share 1 document: document 263 of lee_background.cor is document 271" in message
    # the shipped split stops before it
    check_disjoint(load_text_spec(Path("calibration/news-select.toml")),
                   load_text_spec(Path("calibration/news-heldout.toml")), "merge.select", "gate.eval")


def test_overlapping_ranges_of_one_source_are_refused_even_where_its_documents_are_short(tmp_path):
    """Documents under 64 characters are not compared by text, but two ranges of one file still may not overlap."""
    (tmp_path / "lines.txt").write_text("".join(f"short instruction number {i:04d} of the set\n" for i in range(300)))
    message = _refused(_spec(tmp_path, "cal", tmp_path / "lines.txt", "150:250"),
                       _spec(tmp_path, "eval", tmp_path / "lines.txt", "200:300"))
    assert "share documents 200:250 of lines.txt" in message


def test_short_lines_in_common_are_not_counted(tmp_path):
    (tmp_path / "a.txt").write_text("Thank you.\n" + "a long first document " * 5 + "\n")
    (tmp_path / "b.txt").write_text("Thank you.\n" + "another long document " * 5 + "\n")
    check_disjoint(load_text_spec(_spec(tmp_path, "a", tmp_path / "a.txt", ":")),
                   load_text_spec(_spec(tmp_path, "b", tmp_path / "b.txt", ":")), "quantize.calibration", "gate.eval")


@pytest.mark.parametrize("split,needle", [
    ('documents = 265', '`split.documents`: Value error, must be a quoted slice of document indices like "240:300"'),
    ('documents = "::2"', "has a step: it must be a contiguous slice"),
    ("", "`source.path`: Field required"),
])
def test_a_bad_spec_names_the_key_and_the_fix(tmp_path, split, needle):
    from qmerge.errors import ConfigError

    path = tmp_path / "bad.toml"
    source = "" if not split else '[source]\npath = "package:gensim/test/test_data/lee_background.cor"\n'
    path.write_text(source + "[split]\n" + split + "\n")
    with pytest.raises(ConfigError) as e:
        load_text_spec(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_too_few_windows_names_the_size_of_the_corpus(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qmerge.io.textset import build_windows

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    with pytest.raises(BadInputError, match=r"0 documents \(of the 300 in lee_background.cor\) give 0 tokens"):
        build_windows(tokenizer, load_text_spec(write_text_spec(tmp_path, "past", "400:500")), 16, 1)


def test_sources_are_cached_only_while_resolve_compares_texts_and_a_directory_is_bad_input(tmp_path):
    """Resolve reads each source once while it compares texts; nothing stays cached after it (the stages' corpora
    stayed in memory through quantize and evaluate). A directory given as the source is exit 2, not a crash."""
    from qmerge.io import textset

    spec = load_text_spec(write_text_spec(tmp_path, "a", "0:10"))
    with textset.reading_sources_once():
        load_documents(spec), load_documents(spec)
        assert textset._cached_documents.cache_info().currsize == 1
    assert textset._cached_documents.cache_info().currsize == 0
    load_documents(spec)
    assert textset._cached_documents.cache_info().currsize == 0
    (tmp_path / "corpusdir").mkdir()
    with pytest.raises(BadInputError, match="cannot read text text from"):
        check_disjoint(load_text_spec(_spec(tmp_path, "d", tmp_path / "corpusdir", ":")), spec, "a", "b")
