"""The artifact store's integrity check: every file's size and digest in the manifest, checked by
``verify`` against the bytes on disk (digests computed here by the hash libraries directly)."""

import hashlib
import json

import pytest
import torch
import xxhash

from nemo_acft.algorithms.exchange import ArtifactStore


def _write(d):
    (d / "head").mkdir()
    torch.save({"w": torch.arange(1000.0)}, d / "head" / "part.pt")
    (d / "notes.txt").write_bytes(b"x" * 5000)


def test_manifest_digests_are_xxh3_128_of_the_bytes_and_verify_finds_a_changed_byte(tmp_path):
    store = ArtifactStore(tmp_path)
    final = store.publish("nado", 3, _write, {"built_from": "test"})
    man = store.manifest("nado", 3)
    assert sorted(man["files"]) == ["head/part.pt", "notes.txt"]
    for name, meta in man["files"].items():
        data = (final / name).read_bytes()
        assert meta["bytes"] == len(data)
        assert meta["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
    assert store.verify("nado", 3) == final
    p = final / "notes.txt"
    data = bytearray(p.read_bytes())
    data[2500] ^= 1  # same size, one bit
    p.write_bytes(bytes(data))
    store.verify("nado", 3, verify_hash=False)  # the size still matches
    with pytest.raises(ValueError, match="notes.txt does not match its manifest"):
        store.verify("nado", 3)


def test_verify_reads_an_earlier_runs_sha256_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    final = store.publish("lm", 1, _write, {})
    mp = final / "manifest.json"
    man = json.loads(mp.read_text())
    for name, meta in man["files"].items():
        del meta["xxh3_128"]
        meta["sha256"] = hashlib.sha256((final / name).read_bytes()).hexdigest()
    mp.write_text(json.dumps(man))
    store.verify("lm", 1)
    (final / "head" / "part.pt").write_bytes((final / "head" / "part.pt").read_bytes()[::-1])
    with pytest.raises(ValueError, match="part.pt does not match its manifest .*sha256"):
        store.verify("lm", 1)
