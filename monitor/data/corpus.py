"""An endless, seeded stream of (context, next byte) training examples read from text files.

The corpus is the concatenation of its files in a shuffled order. It is read lazily, one chunk of
`chunk_bytes` at a time, and loops forever: each pass over all files is one epoch, and every epoch
reshuffles the file order. `next_batch` draws examples from the current chunk in a random order without
replacement. Once every byte of a chunk has served as a target, the stream moves on to the next chunk.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset(
    {
        ".py",
        ".pyi",
        ".pyw",
        ".txt",
        ".md",
        ".rst",
        ".json",
        ".toml",
        ".cfg",
        ".ini",
        ".conf",
        ".html",
        ".htm",
        ".xml",
        ".css",
        ".js",
        ".ts",
        ".csv",
        ".tsv",
        ".yaml",
        ".yml",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".rs",
        ".go",
        ".java",
        ".sh",
        ".tex",
        ".sql",
    }
)
"""File suffixes (compared in lower case) that folder walks keep. Explicit file paths are always kept."""

SKIPPED_FOLDERS = frozenset({"__pycache__", "site-packages", "dist-packages"})
"""Folder names a walk does not enter, in addition to hidden folders such as .git. Third-party packages
are skipped because they differ between environments, which would make the default corpus differ too."""

MAX_CHUNK_BYTES = 1 << 30


def default_corpus_paths() -> list[Path]:
    """Return the standard library source folder of the running interpreter, real text on every machine."""
    return [Path(sysconfig.get_paths()["stdlib"])]


class TextCorpus:
    """A deterministic, endless stream of byte-level training examples from text files.

    Args:
        paths: files and folders to read, or None for `default_corpus_paths()`. A single str or Path
            counts as one path, not as a sequence of characters. Folders are walked
            recursively in sorted order and keep files whose suffix is in `TEXT_SUFFIXES`. Hidden folders
            and those in `SKIPPED_FOLDERS` are not entered. Explicit files are kept whatever their suffix.
        context_size: number of bytes before each target byte, the model's context size.
        seed: seed of the file order and of the example order. The same seed, files and sequence of
            batch sizes give the same batches.
        chunk_bytes: number of bytes read from the stream at a time. Examples are drawn within a chunk
            plus the `context_size` bytes before it, so a chunk bounds the memory used.

    Raises:
        ValueError: an argument is out of range, a path is missing or not a file or folder, or the
            files contain no bytes.
    """

    def __init__(
        self,
        paths: Sequence[str | Path] | str | Path | None,
        *,
        context_size: int,
        seed: int = 0,
        chunk_bytes: int = 65536,
    ) -> None:
        _check_int("context_size", context_size, 1, MAX_CHUNK_BYTES - 1)
        _check_int("chunk_bytes", chunk_bytes, context_size + 1, MAX_CHUNK_BYTES)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

        if paths is None:
            self.paths = default_corpus_paths()
        elif isinstance(paths, str | Path):
            self.paths = [Path(paths)]
        else:
            self.paths = [Path(path) for path in paths]
        if not self.paths:
            raise ValueError("paths is empty; pass at least one text file or folder, or None for the default corpus")
        self.context_size = context_size
        self.chunk_bytes = chunk_bytes
        self.seed = seed
        self.files, self.total_bytes = _collect_files(self.paths)

        self.epochs = 0
        """Number of complete passes over the corpus. It counts when the reader wraps around, which is
        up to one chunk before the last examples of that pass are drawn."""
        self.bytes_read = 0
        """Number of bytes read from files so far, over all epochs."""

        # Separate generators keep the file order independent of how many examples were drawn.
        file_order_seed, example_seed = np.random.SeedSequence(seed).spawn(2)
        self._file_order_rng = np.random.default_rng(file_order_seed)
        self._example_rng = np.random.default_rng(example_seed)

        self._unreadable: set[int] = set()
        self._file_order: list[int] = []
        self._order_index = 0
        self._file_offset = 0
        self._epoch_bytes = 0
        self._start_epoch()

        self._window = np.empty(0, dtype=np.uint8)
        self._example_order = np.empty(0, dtype=np.int64)
        self._example_cursor = 0

        logger.info(
            "text corpus: %d files, %d bytes, from %s, seed %d",
            len(self.files),
            self.total_bytes,
            ", ".join(str(path) for path in self.paths),
            seed,
        )

    def next_batch(self, batch_size: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """Return `batch_size` contexts of shape (B, context_size) and their next bytes of shape (B,).

        Raises ValueError when every file has become unreadable or empty since construction.
        """
        _check_int("batch_size", batch_size, 1, MAX_CHUNK_BYTES)

        contexts = np.empty((batch_size, self.context_size), dtype=np.uint8)
        targets = np.empty(batch_size, dtype=np.uint8)
        filled = 0
        while filled < batch_size:
            if self._example_cursor == len(self._example_order):
                self._load_next_chunk()

            count = min(batch_size - filled, len(self._example_order) - self._example_cursor)
            starts = self._example_order[self._example_cursor : self._example_cursor + count]
            examples = _sliding_rows(self._window, self.context_size + 1)[starts]
            contexts[filled : filled + count] = examples[:, : self.context_size]
            targets[filled : filled + count] = examples[:, self.context_size]

            self._example_cursor += count
            filled += count

        return contexts, targets

    def _load_next_chunk(self) -> None:
        # The window starts with the last context_size bytes of the previous one, so contexts may cross
        # the chunk boundary. Each byte of the stream after its first context_size bytes is then the
        # target of exactly one example.
        tail = self._window[len(self._window) - self.context_size :] if len(self._window) else self._window
        chunk = np.frombuffer(self._read_stream(self.chunk_bytes), dtype=np.uint8)
        self._window = np.concatenate([tail, chunk])

        example_count = len(self._window) - self.context_size
        self._example_order = self._example_rng.permutation(example_count)
        self._example_cursor = 0

    def _read_stream(self, size: int) -> bytes:
        """Read `size` bytes from the endless stream, crossing file ends and epochs."""
        parts: list[bytes] = []
        remaining = size
        while remaining > 0:
            if self._order_index == len(self._file_order):
                self._finish_epoch()
                continue

            file_index = self._file_order[self._order_index]
            data = self._read_file(file_index, remaining)
            if not data:
                self._order_index += 1
                self._file_offset = 0
                continue

            parts.append(data)
            remaining -= len(data)
            self._file_offset += len(data)
            self._epoch_bytes += len(data)
            self.bytes_read += len(data)

        return b"".join(parts)

    def _read_file(self, file_index: int, size: int) -> bytes:
        if file_index in self._unreadable:
            return b""

        path = self.files[file_index]
        try:
            with path.open("rb") as file:
                file.seek(self._file_offset)
                return file.read(size)
        except OSError as exc:
            # The file was deleted or made unreadable after construction. Dropping it for the rest of the
            # run keeps training going, and an epoch with no bytes at all raises in _finish_epoch.
            logger.warning("skipping unreadable corpus file %s: %s", path, exc)
            self._unreadable.add(file_index)
            return b""

    def _finish_epoch(self) -> None:
        if self._epoch_bytes == 0:
            raise ValueError(
                f"text corpus from {', '.join(str(path) for path in self.paths)} has no readable bytes left "
                f"in its {len(self.files)} files; pass text files or folders that the process can read"
            )
        self.epochs += 1
        logger.info("text corpus finished epoch %d: %d bytes", self.epochs, self._epoch_bytes)
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._file_order = [int(index) for index in self._file_order_rng.permutation(len(self.files))]
        self._order_index = 0
        self._file_offset = 0
        self._epoch_bytes = 0


def _sliding_rows(window: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.uint8]:
    # Row i is window[i : i + width] as a read-only view: a context followed by its target byte.
    return np.lib.stride_tricks.sliding_window_view(window, width)


def _collect_files(paths: Sequence[Path]) -> tuple[list[Path], int]:
    """Return the corpus files in walk order without duplicates, and their total size in bytes."""
    suffixes = " ".join(sorted(TEXT_SUFFIXES))
    accepted = f"pass existing text files or folders containing files with suffixes {suffixes}"
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(_walk_text_files(path))
        elif path.exists():
            raise ValueError(f"corpus path {path} is neither a file nor a folder; {accepted}")
        else:
            raise ValueError(f"corpus path {path} not found; {accepted}")

    unique_files: list[Path] = []
    seen: set[Path] = set()
    total_bytes = 0
    for file in files:
        resolved = file.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)

        try:
            size = file.stat().st_size
        except OSError as exc:
            logger.warning("skipping corpus file %s: %s", file, exc)
            continue
        if size > 0:
            unique_files.append(file)
            total_bytes += size

    if total_bytes == 0:
        listed = ", ".join(str(path) for path in paths)
        raise ValueError(f"text corpus from {listed} has no bytes in {len(files)} matching files; {accepted}")
    return unique_files, total_bytes


def _walk_text_files(folder: Path) -> list[Path]:
    # Sorting folder and file names makes the order independent of the file system's listing order.
    found: list[Path] = []
    for root, folder_names, file_names in os.walk(folder):
        folder_names[:] = sorted(
            name for name in folder_names if not name.startswith(".") and name not in SKIPPED_FOLDERS
        )
        for name in sorted(file_names):
            if Path(name).suffix.lower() in TEXT_SUFFIXES:
                found.append(Path(root, name))
    return found


def _check_int(name: str, value: object, minimum: int, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")
