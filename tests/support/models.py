"""Model files in the llmlb layout (`DIR/org/name/model.gguf`), as the store, a shared directory and the test
router hold them: writing them for a test, finding them as the router lists them.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

_NAME_RE = re.compile(r"^[a-z0-9_.\-/]+$")


def write_model(root: Path, name: str, data: bytes, flat: bool = False) -> Path:
    """Put a model file in a models directory, in the llmlb layout (or flat: `root/name.gguf`)."""
    path = root / f"{name}.gguf" if flat else model_file(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def gguf_bytes(size: int, seed: int = 0) -> bytes:
    """Bytes that start with the GGUF magic (enough for tests that only compare bytes): random, or with a seed a
    fixed pattern."""
    return b"GGUF" + os.urandom(size - 4) if seed == 0 else b"GGUF" + bytes((seed + i) % 251 for i in range(size - 4))


def valid_name(name: str) -> bool:
    """llmlb model names: a-z 0-9 - _ . / with no empty, '.' or '..' segment."""
    if not _NAME_RE.match(name):
        return False
    return all(seg not in ("", ".", "..") for seg in name.split("/"))


def model_file(models_dir: Path, name: str) -> Path:
    """llmlb layout: model `org/m` lives at DIR/org/m/model.gguf."""
    return models_dir.joinpath(*name.split("/"), "model.gguf")


def list_models(models_dir: Path) -> list[tuple[str, int]]:
    """(name, size) of every non-empty model.gguf under the dir, sorted by name."""
    found: list[tuple[str, int]] = []
    for root, _dirs, files in os.walk(models_dir):
        if "model.gguf" not in files:
            continue
        name = Path(root).relative_to(models_dir).as_posix()
        try:
            st = os.stat(os.path.join(root, "model.gguf"))  # follows symlinks on purpose
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size > 0 and valid_name(name):
            found.append((name, st.st_size))
    return sorted(found)
