#!/usr/bin/env python3
"""Proves `make verify` catches tampering: run by `bash scripts/check-release` on a release it
has just cut (debug profile, throwaway key) into DIST.

Each case copies DIST, changes one thing an attacker or an accident could change, and runs
the real `scripts/release.py verify`; the untouched copy must pass, every changed one must fail
with the reason named. Prints one line per case and `release: N passed, N failed`.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import release  # noqa: E402  (scripts/release.py)


def flip_byte(path: Path, offset: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def forge_payload(dist: Path, artifact: str) -> None:
    """Rewrite the statement's digest to the tampered file's, keeping the old signature."""
    path = dist / artifact
    flip_byte(path)
    att = release.attestation_path(dist, Path(artifact))
    env = json.loads(att.read_text())
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["subject"][0]["digest"]["sha256"] = release.sha256_file(path)
    env["payload"] = base64.b64encode(json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()).decode()
    att.write_text(json.dumps(env))


def resign_with_other_key(dist: Path, artifact: str) -> None:
    """An attacker's own key: a well-formed, validly signed envelope, but not by the release key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = dist / artifact
    flip_byte(path)
    att = release.attestation_path(dist, Path(artifact))
    statement = json.loads(base64.b64decode(json.loads(att.read_text())["payload"]))
    statement["subject"][0]["digest"]["sha256"] = release.sha256_file(path)
    att.write_text(json.dumps(release.sign_envelope(statement, Ed25519PrivateKey.generate())))


def drop_component(dist: Path, artifact: str) -> None:
    path = dist / artifact
    doc = json.loads(path.read_text())
    doc["components"] = doc["components"][1:]
    path.write_text(json.dumps(doc, indent=2))


def main() -> int:
    dist, pub, revision = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    image = next(p.name for p in (dist / "images").glob("*.oci.tar"))
    chart = next(p.name for p in (dist / "chart").glob("*.tgz"))
    cases = [
        # (name, change, expected in the output, must pass)
        ("the release as cut verifies", lambda d: None, "verified", True),
        ("a flipped byte in a binary", lambda d: flip_byte(d / "bin/guardian-agent"), "was altered", False),
        ("bytes appended to an image archive", lambda d: (d / "images" / image).open("ab").write(b"\0" * 512),
         "was altered", False),
        ("an SBOM with a component removed", lambda d: drop_component(d, "sbom/guardian-server.cdx.json"),
         "was altered", False),
        ("another chart in the chart's place", lambda d: flip_byte(d / "chart" / chart, 100), "was altered", False),
        ("a statement rewritten to the tampered digest, old signature kept",
         lambda d: forge_payload(d, "bin/guardianctl"), "no valid signature", False),
        ("a statement re-signed with another key",
         lambda d: resign_with_other_key(d, "bin/guardian-server"), "no valid signature", False),
        ("an attestation removed",
         lambda d: release.attestation_path(d, Path("bin/guardian-agent")).unlink(), "unsigned artifact", False),
        ("an extra, unsigned file", lambda d: (d / "bin" / "helper").write_bytes(b"#!/bin/sh\n"),
         "unsigned artifact", False),
        ("an artifact removed together with its attestation",
         lambda d: [(d / "images" / image).unlink(),
                    release.attestation_path(d, Path("images") / image).unlink()],
         "an artifact was removed", False),
        ("the signed release list removed", lambda d: (d / release.MANIFEST_ENVELOPE).unlink(),
         "no signed release list", False),
    ]
    passed = failed = 0
    for name, change, expect, ok in cases:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "dist"
            shutil.copytree(dist, copy)
            change(copy)
            r = run_verify(copy, pub, revision)
            good = (r.returncode == 0) == ok and expect in (r.stdout + r.stderr)
            passed, failed = passed + good, failed + (not good)
            print(f"release: {'ok  ' if good else 'FAIL'} {name}: verify exit {r.returncode}"
                  + ("" if good else f", expected {'success' if ok else 'failure'} saying {expect!r}:\n"
                     + r.stdout + r.stderr))
    # Another revision than the one the provenance names.
    r = run_verify(dist, pub, "0" * 40)
    good = r.returncode != 0 and "not from the revision asked for" in r.stderr + r.stdout
    passed, failed = passed + good, failed + (not good)
    print(f"release: {'ok  ' if good else 'FAIL'} a revision other than the built one: verify exit {r.returncode}")
    print(f"release: {passed} passed, {failed} failed")
    return 1 if failed else 0


def run_verify(dist: Path, pub: Path, revision: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HERE / "release.py"), "verify", str(dist), "--key", str(pub), "--revision", revision],
        capture_output=True, text=True,
    )


if __name__ == "__main__":
    sys.exit(main())
