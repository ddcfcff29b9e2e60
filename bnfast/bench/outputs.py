"""Where a run's results go: output paths checked before a run, files written atomically after.

A benchmark takes minutes, so a path it cannot write must be refused before it
starts, not found out at the end. Files are written through a temporary file
renamed on success (bnfast._files.atomic_output), so a failure never leaves a
half-written one.
"""
import contextlib
import os
import tempfile

from bnfast._files import atomic_output


def check_writable(paths):
    """Refuse, with a ValueError naming the label and the path, any of
    `paths` ({label: path or None}; None is skipped) that cannot be written:
    an empty name, a directory, a missing directory, a directory that refuses
    a new file, a read-only file, or the same file under two labels."""
    seen = {}
    for label, path in paths.items():
        if path is None:
            continue
        path = os.fspath(path)
        if not path:
            raise ValueError(f"{label} got an empty path; give a file name")
        if os.path.isdir(path):
            raise ValueError(f"{label} {path!r} is a directory; give a file name")
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"{seen[real]} and {label} name the same file {path!r}; "
                             "give each its own")
        seen[real] = label
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ValueError(f"{label} {path!r}: the directory {directory!r} does not exist; "
                             "create it or choose another path")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise ValueError(f"{label} {path!r} is read-only; choose another path")
        _probe(label, path, directory)


def _probe(label, path, directory):
    """Create and remove a file in `directory`, as the atomic write will."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".probe",
                                     dir=directory)
    except OSError as err:
        raise ValueError(f"{label} {path!r}: cannot write in {directory!r} "
                         f"({err.strerror}); choose another path") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(probe)


def write_text(text, path):
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_bytes(data, path):
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
