"""What makes a zip entry unsafe, for every archive a user uploads (datasets and models).

An extractor that trusts entry names writes where the archive says (``../``, absolute
paths, Windows separators, drive letters, symbolic links), and one that trusts declared
sizes runs out of memory on a decompression bomb. Both checks read only the central
directory, never the data.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import PurePosixPath

#: Deflate reaches ~1000x on runs of zeros; real images, code and weights stay far below this.
MAX_COMPRESSION_RATIO = 200


def unsafe_entry_reason(info: zipfile.ZipInfo) -> str | None:
    """Why extracting this entry could write outside its folder, or None when it cannot."""
    name = info.filename
    path = PurePosixPath(name)
    if not name or "\x00" in name:
        return "has an empty name or a NUL character"
    if path.is_absolute():
        return "is an absolute path"
    if "\\" in name:
        return "contains a backslash"
    if ".." in path.parts:
        return "climbs out of its folder with '..'"
    if path.parts and ":" in path.parts[0]:
        return "names a drive"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    return None


def expands_too_much(info: zipfile.ZipInfo) -> bool:
    """A compressed entry whose declared size is out of proportion to its bytes (a bomb)."""
    return info.compress_size > 0 and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO
