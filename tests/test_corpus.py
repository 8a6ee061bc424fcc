"""The text corpus stream: file discovery, determinism, chunked reading, looping and errors."""

from __future__ import annotations

import logging
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from monitor.data import TextCorpus, default_corpus_paths


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def counting_file(tmp_path: Path) -> Path:
    """A file holding the 256 byte values in order, so each byte's value is its offset."""
    return write_file(tmp_path / "counting.bin", bytes(range(256)))


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "texts"
    for index in range(6):
        write_file(folder / f"doc{index}.txt", f"document {index}: ".encode() + bytes(range(32, 127)) * 20)
    return folder


def test_default_corpus_paths_is_stdlib() -> None:
    paths = default_corpus_paths()

    assert paths == [Path(sysconfig.get_paths()["stdlib"])]
    assert (paths[0] / "os.py").is_file()


def test_corpus_default_reads_stdlib() -> None:
    corpus = TextCorpus(None, context_size=8)

    contexts, targets = corpus.next_batch(4)

    assert Path(sysconfig.get_paths()["stdlib"], "os.py") in corpus.files
    assert not any("site-packages" in file.parts for file in corpus.files)
    assert contexts.shape == (4, 8)
    assert targets.shape == (4,)


def test_corpus_walk_keeps_text_suffixes(tmp_path: Path) -> None:
    write_file(tmp_path / "b.py", b"print(1)\n")
    write_file(tmp_path / "a.MD", b"# title\n")
    write_file(tmp_path / "image.png", b"\x89PNG")
    write_file(tmp_path / "sub" / "notes.txt", b"notes\n")
    write_file(tmp_path / "sub" / "empty.txt", b"")
    write_file(tmp_path / "__pycache__" / "b.py", b"cached\n")
    write_file(tmp_path / ".git" / "config.cfg", b"[core]\n")
    write_file(tmp_path / "lib" / "site-packages" / "pkg.py", b"x = 1\n")

    corpus = TextCorpus([tmp_path], context_size=2)

    assert corpus.files == [tmp_path / "a.MD", tmp_path / "b.py", tmp_path / "sub" / "notes.txt"]
    assert corpus.total_bytes == 8 + 9 + 6


def test_corpus_explicit_file_kept_whatever_suffix(counting_file: Path) -> None:
    corpus = TextCorpus([str(counting_file)], context_size=4)

    assert corpus.files == [counting_file]
    assert corpus.total_bytes == 256


def test_corpus_single_string_is_one_path(counting_file: Path) -> None:
    corpus = TextCorpus(str(counting_file), context_size=4)

    assert corpus.files == [counting_file]


def test_corpus_duplicate_paths_counted_once(text_folder: Path) -> None:
    corpus = TextCorpus([text_folder, text_folder / "doc1.txt"], context_size=4)

    assert len(corpus.files) == 6


def test_corpus_same_seed_same_batches(text_folder: Path) -> None:
    first = TextCorpus([text_folder], context_size=8, seed=3, chunk_bytes=512)
    second = TextCorpus([text_folder], context_size=8, seed=3, chunk_bytes=512)

    for batch_size in (1, 7, 64, 300, 5):
        contexts_first, targets_first = first.next_batch(batch_size)
        contexts_second, targets_second = second.next_batch(batch_size)
        assert np.array_equal(contexts_first, contexts_second)
        assert np.array_equal(targets_first, targets_second)


def test_corpus_other_seed_other_batches(text_folder: Path) -> None:
    first = TextCorpus([text_folder], context_size=8, seed=3, chunk_bytes=512)
    second = TextCorpus([text_folder], context_size=8, seed=4, chunk_bytes=512)

    contexts_first, _ = first.next_batch(64)
    contexts_second, _ = second.next_batch(64)

    assert not np.array_equal(contexts_first, contexts_second)


def test_corpus_examples_are_consecutive_bytes(counting_file: Path) -> None:
    """Each target is the byte after its context, also across a chunk boundary."""
    corpus = TextCorpus([counting_file], context_size=4, chunk_bytes=128)

    # The first chunk has 128 - 4 targets (offsets 4..127), the second 128 (offsets 128..255).
    contexts, targets = corpus.next_batch(252)

    assert sorted(targets.tolist()) == list(range(4, 256))
    expected_contexts = targets[:, None].astype(np.int64) + np.arange(-4, 0)
    assert np.array_equal(contexts, expected_contexts)


def test_corpus_loops_and_counts_epochs(counting_file: Path) -> None:
    corpus = TextCorpus([counting_file], context_size=4, chunk_bytes=100)

    contexts, targets = corpus.next_batch(600)

    # The first 100-byte chunk yields 96 targets and each later one 100, so 600 targets take 7 chunks:
    # two full passes over the 256-byte file and part of a third.
    assert corpus.epochs == 2
    assert corpus.bytes_read == 700
    assert np.array_equal((contexts[:, -1].astype(np.int64) + 1) % 256, targets)


def test_corpus_reads_lazily(tmp_path: Path) -> None:
    big_file = write_file(tmp_path / "big.txt", b"abcdefgh" * 128 * 1024)
    corpus = TextCorpus([big_file], context_size=8, chunk_bytes=4096)

    corpus.next_batch(16)

    assert corpus.total_bytes == 1024 * 1024
    assert corpus.bytes_read == 4096
    assert corpus.epochs == 0


def test_corpus_skips_file_deleted_after_start(text_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    corpus = TextCorpus([text_folder], context_size=4, chunk_bytes=64)
    (text_folder / "doc2.txt").unlink()

    with caplog.at_level(logging.WARNING, logger="monitor.data.corpus"):
        corpus.next_batch(20_000)

    assert corpus.epochs >= 1
    assert "skipping unreadable corpus file" in caplog.text
    assert "doc2.txt" in caplog.text


def test_corpus_all_files_deleted_raises(counting_file: Path) -> None:
    corpus = TextCorpus([counting_file], context_size=4)
    counting_file.unlink()

    with pytest.raises(ValueError, match=r"has no readable bytes left in its 1 files"):
        corpus.next_batch(1)


def test_corpus_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"

    message = rf"corpus path {re.escape(str(missing))} not found; pass existing text files or folders"

    with pytest.raises(ValueError, match=message):
        TextCorpus([missing], context_size=4)


def test_corpus_empty_raises(tmp_path: Path) -> None:
    write_file(tmp_path / "empty.txt", b"")
    write_file(tmp_path / "data.bin", b"\x00\x01")

    with pytest.raises(ValueError, match=r"has no bytes in 1 matching files; pass existing text files"):
        TextCorpus([tmp_path], context_size=4)


def test_corpus_empty_path_list_raises() -> None:
    with pytest.raises(ValueError, match=r"paths is empty; pass at least one text file or folder"):
        TextCorpus([], context_size=4)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"context_size": 0}, r"context_size must be an integer in \[1, 1073741823\], got 0"),
        (
            {"context_size": 16, "chunk_bytes": 16},
            r"chunk_bytes must be an integer in \[17, 1073741824\], got 16",
        ),
        ({"context_size": 4, "seed": -2}, r"seed must be a non-negative integer, got -2"),
    ],
)
def test_corpus_invalid_argument_raises(counting_file: Path, arguments: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TextCorpus([counting_file], **arguments)


def test_corpus_invalid_batch_size_raises(counting_file: Path) -> None:
    corpus = TextCorpus([counting_file], context_size=4)

    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, 1073741824\], got 0"):
        corpus.next_batch(0)
