"""Fingerprints of what a layer state depends on, compared at every transfer's handshake.

Two workers may exchange state only if they run the same weights with the same model config
and keep state in the same dtypes (DESIGN.md, Seams: Peers must match). A restarted or
upgraded worker with other weights must be refused, never fed wrong state.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from baton.workers.transfer.base import PROTOCOL_VERSION

# Files up to this size are hashed in full; larger safetensors shards contribute their header
# (every tensor's name, dtype, shape and offsets), their size and sampled stretches of data,
# which keeps start-up fast for 100 GB checkpoints and still tells any two trainings apart.
FULL_HASH_BYTES = 256 << 20
SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 1 << 20


def _hash_file(digest, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(8 << 20), b""):
                digest.update(block)
            return
        if path.suffix == ".safetensors":
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, 64 << 20)))
        for i in range(SAMPLES_PER_FILE):
            f.seek((size - SAMPLE_BYTES) * i // max(SAMPLES_PER_FILE - 1, 1))
            digest.update(f.read(SAMPLE_BYTES))


def model_fingerprint(model_path: str | os.PathLike, settings: Mapping[str, object]) -> str:
    """Hex digest over the checkpoint (config and weights), settings and protocol version.

    settings: whatever else shapes the state on the wire (state dtypes, speculative tokens);
    JSON-serializable values.
    """
    root = Path(model_path)
    if not root.is_dir():
        raise ValueError(f"model_path={str(root)!r} is not a directory")
    digest = hashlib.sha256()
    digest.update(f"baton-transfer-protocol:{PROTOCOL_VERSION}".encode())
    digest.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and (p.suffix in (".safetensors", ".json")))
    if not any(p.name == "config.json" for p in files):
        raise ValueError(f"model_path={str(root)!r} has no config.json")
    for path in files:
        _hash_file(digest, path)
    return digest.hexdigest()
