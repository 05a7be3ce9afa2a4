"""Writes a small valid GGUF model `demo/tiny` into a store (llmlb layout) unless it is already there."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np


def main(store: Path) -> None:
    path = store / "demo" / "tiny" / "model.gguf"
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("modelfs demo")
    rng = np.random.default_rng(0)
    for i in range(4):
        writer.add_tensor(f"blk.{i}.weight", rng.standard_normal(4096).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote demo model {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
