#!/usr/bin/env python3
"""Release artifacts of TaoNode Guardian: SBOMs, signed provenance, and their verification.

Run through `bash scripts/release` (which builds what this signs) or `make verify`; both use
the pinned virtualenv `scripts/release` makes. Subcommands:

  keygen KEY                       a new Ed25519 release key (PKCS#8 PEM, mode 0600) and KEY.pub
  chart SRC OUT.tgz                the Helm chart as a reproducible package (sorted, fixed mtimes)
  sbom DIST                        CycloneDX 1.6 and SPDX 2.3 JSON for the workspace, each binary
                                   (from the dependency list `cargo auditable` put inside it) and
                                   each image (that binary plus the Debian packages of the shared
                                   libraries in the image), under DIST/sbom/
  validate-sbom FILES...           checks each SBOM against its format's schema (the official
                                   cyclonedx-python-lib and spdx-tools validators)
  attest DIST --key KEY --revision REV --source URI
                                   an in-toto v1 Statement with a SLSA v1 provenance predicate for
                                   every artifact in DIST, in a DSSE envelope signed with KEY
                                   (DIST/attestations/), plus DIST/release.json and DIST/release.pub
  verify DIST --key PUB --revision REV
                                   fails unless every artifact has an attestation signed by PUB
                                   whose subject digests match the file (and, for an image, the
                                   OCI manifest inside it), which names REV as its source, and
                                   unless each binary's embedded dependency list matches its SBOM;
                                   an artifact without an attestation also fails

Everything is deterministic for a given source revision: timestamps come from
SOURCE_DATE_EPOCH (the commit's time), identifiers are derived from content.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARIES = ("guardian-server", "guardianctl", "guardian-agent")
# Which binaries each image carries (scripts/build-images builds them).
IMAGES = {"guardian-server": ("guardian-server", "guardianctl"), "guardian-agent": ("guardian-agent",)}
ARTIFACT_DIRS = ("bin", "images", "chart", "sbom", "policy")
PAYLOAD_TYPE = "application/vnd.in-toto+json"
# The signed list of every artifact of a release (what `verify` expects to find, exactly).
MANIFEST_ENVELOPE = "release.intoto.json"
MANIFEST_PREDICATE = "https://github.com/taonode/guardian/blob/main/RELEASING.md#release-manifest"
BUILD_TYPE = "https://github.com/taonode/guardian/blob/main/RELEASING.md#make-release"
NAMESPACE = uuid.UUID("5b0c1b5e-4f3a-5d2e-9a61-7d1c0e6a2b10")


class Fail(Exception):
    """A check that failed: printed as one line, exit status 1."""


# ---------------------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_date() -> dt.datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        epoch = subprocess.run(
            ["git", "log", "-1", "--format=%ct"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
    return dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc)


def iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def workspace_version() -> str:
    return tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def artifacts(dist: Path) -> list[Path]:
    """Every file that is released, relative to DIST, sorted."""
    found = []
    for sub in ARTIFACT_DIRS:
        base = dist / sub
        if base.is_dir():
            found += [p.relative_to(dist) for p in base.rglob("*") if p.is_file()]
    return sorted(found)


def attestation_path(dist: Path, artifact: Path) -> Path:
    return dist / "attestations" / (str(artifact).replace("/", "__") + ".intoto.json")


# ---------------------------------------------------------------------------- keys, DSSE


def keygen(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if path.exists():
        raise Fail(f"{path} exists: refusing to overwrite a release key (move it away first)")
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    Path(str(path) + ".pub").write_bytes(public_pem(key.public_key()))
    print(f"release: new Ed25519 release key {path} (public key {path}.pub)")


def public_pem(public) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise Fail(f"cannot read the release key {path}: {e} (make one with: scripts/release keygen {path})")
    if not isinstance(key, Ed25519PrivateKey):
        raise Fail(f"{path} is not an Ed25519 private key: release keys are Ed25519 (PKCS#8 PEM)")
    return key


def load_public(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise Fail(f"cannot read the release public key {path}: {e}")
    if not isinstance(key, Ed25519PublicKey):
        raise Fail(f"{path} is not an Ed25519 public key")
    return key


def keyid(public) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is signed."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign_envelope(statement: dict, key) -> dict:
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    sig = key.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": keyid(key.public_key()), "sig": base64.b64encode(sig).decode()}],
    }


def open_envelope(path: Path, public) -> dict:
    """The statement inside a DSSE envelope, once a signature by `public` checks out."""
    from cryptography.exceptions import InvalidSignature

    try:
        env = json.loads(path.read_text())
        payload = base64.b64decode(env["payload"], validate=True)
        sigs = env["signatures"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Fail(f"{path}: not a DSSE envelope ({e})")
    if env.get("payloadType") != PAYLOAD_TYPE:
        raise Fail(f"{path}: payloadType {env.get('payloadType')!r}, expected {PAYLOAD_TYPE}")
    want = keyid(public)
    for s in sigs:
        if s.get("keyid") not in (None, "", want):
            continue
        try:
            public.verify(base64.b64decode(s["sig"], validate=True), pae(PAYLOAD_TYPE, payload))
        except (InvalidSignature, ValueError, KeyError):
            continue
        statement = json.loads(payload)
        if not isinstance(statement, dict):
            raise Fail(f"{path}: the signed payload is not a statement")
        return statement
    raise Fail(f"{path}: no valid signature by the release key {want[:16]}… (tampered, or signed by another key)")


# ---------------------------------------------------------------------------- chart


def package_chart(src: Path, out: Path) -> None:
    """`helm package` without helm: CHART-NAME/ as the tar's top folder, reproducible bytes."""
    chart = tomllib_yaml_name(src / "Chart.yaml")
    mtime = int(source_date().timestamp())
    buf = io.BytesIO()
    # The chart as committed: untracked or ignored files (a local values file) stay out.
    tracked = subprocess.run(["git", "ls-files", "-z", "--", str(src)], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode().split("\0")
    files = sorted(ROOT / t for t in tracked if t)
    if not files:
        raise Fail(f"{src}: no tracked files: is it inside this repository?")
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(f"{chart}/{path.relative_to(src.resolve())}")
            data = path.read_bytes()
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=mtime) as gz:
            gz.write(buf.getvalue())
    print(f"release: chart {out} ({out.stat().st_size} bytes)")


def tomllib_yaml_name(chart_yaml: Path) -> str:
    m = re.search(r"^name:\s*([A-Za-z0-9._-]+)\s*$", chart_yaml.read_text(), re.M)
    if not m:
        raise Fail(f"{chart_yaml}: no `name:` line")
    return m.group(1)


# ---------------------------------------------------------------------------- SBOM


def cargo_metadata() -> dict:
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def lock_checksums() -> dict[tuple[str, str], str]:
    lock = tomllib.loads((ROOT / "Cargo.lock").read_text())
    return {(p["name"], p["version"]): p["checksum"] for p in lock["package"] if "checksum" in p}


def spdx_license(raw: str | None) -> str | None:
    """Cargo's licence field as an SPDX expression (old crates write `MIT/Apache-2.0`)."""
    if not raw:
        return None
    return re.sub(r"\s*/\s*", " OR ", raw.strip())


def embedded_deps(binary: Path) -> list[dict]:
    """The dependency list `cargo auditable` compressed into the binary's `.dep-v0` section."""
    import tempfile
    import zlib

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dep"
        r = subprocess.run(
            ["objcopy", "--dump-section", f".dep-v0={out}", str(binary), str(Path(tmp) / "copy")],
            capture_output=True, text=True,
        )
        if r.returncode != 0 or not out.exists():
            raise Fail(
                f"{binary}: no .dep-v0 section: not built with `cargo auditable` "
                f"({r.stderr.strip() or 'objcopy found none'}); build it with scripts/release"
            )
        try:
            return json.loads(zlib.decompress(out.read_bytes()))["packages"]
        except (ValueError, KeyError, zlib.error) as e:
            raise Fail(f"{binary}: unreadable .dep-v0 section ({e})")


class Component:
    def __init__(self, ecosystem, name, version, licence=None, sha256=None, scope="required", extra=None):
        self.ecosystem, self.name, self.version = ecosystem, name, version
        self.licence, self.sha256, self.scope, self.extra = licence, sha256, scope, extra or {}

    @property
    def purl(self) -> str:
        if self.ecosystem == "deb":
            return f"pkg:deb/debian/{self.name}@{self.version}?arch={self.extra.get('arch', 'amd64')}"
        return f"pkg:cargo/{self.name}@{self.version}"

    def spdx_id(self) -> str:
        return "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]", "-", f"{self.ecosystem}-{self.name}-{self.version}")


def cargo_components(packages: list[dict], licences, sums) -> tuple[list[Component], list[tuple[int, int]]]:
    comps = []
    for p in packages:
        local = p.get("source") == "local"
        comps.append(
            Component(
                "cargo", p["name"], p["version"],
                licence=spdx_license(licences.get((p["name"], p["version"]))),
                sha256=None if local else sums.get((p["name"], p["version"])),
                scope="excluded" if p.get("kind") == "build" else "required",
            )
        )
    edges = [(i, d) for i, p in enumerate(packages) for d in p.get("dependencies", [])]
    return comps, edges


def image_files(archive: Path) -> dict[str, bytes | None]:
    """Every regular file of the one image in an OCI archive: path -> content for binaries and
    shared libraries (None for the rest), read from the layers themselves."""
    files: dict[str, bytes | None] = {}
    with tarfile.open(archive) as tar:
        def blob(digest: str) -> bytes:
            return tar.extractfile(f"blobs/sha256/{digest.split(':', 1)[1]}").read()

        index = json.loads(tar.extractfile("index.json").read())
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"]))) as fs:
                for m in fs.getmembers():
                    if m.isfile():
                        path = "/" + m.name.lstrip("./")
                        wanted = path.startswith("/usr/local/bin/") or ".so" in path or "/ld-linux" in path
                        files[path] = fs.extractfile(m).read() if wanted else None
    return files


def debian_components(files: dict[str, bytes | None]) -> list[Component]:
    """The Debian package of each shared library in an image (as this host's dpkg knows it)."""
    comps, seen = [], set()
    # The CA bundle is generated by the ca-certificates package (dpkg does not list it).
    owned = {"/etc/ssl/certs/ca-certificates.crt": "ca-certificates"}
    for path in sorted(p for p in files if ".so" in p or "/ld-linux" in p or p in owned):
        owner = owned.get(path)
        for candidate in () if owner else (path, os.path.realpath(path), "/usr" + path):
            r = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
            if r.returncode == 0:
                owner = r.stdout.split(":")[0].strip()
                break
        if owner is None:
            raise Fail(f"{path} (in the image): no Debian package owns it; the image SBOM would miss it")
        if owner in seen:
            continue
        seen.add(owner)
        q = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}\t${Architecture}", owner],
            check=True, capture_output=True, text=True,
        ).stdout.split("\t")
        comps.append(Component("deb", owner, q[0], extra={"arch": q[1]}))
    return comps


def cyclonedx(name: str, version: str, kind: str, comps: list[Component], edges, when: dt.datetime,
              root_index: int | None, properties: dict | None = None) -> dict:
    body = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "version": 1,
        "metadata": {
            "timestamp": iso(when),
            "tools": {"components": [{"type": "application", "name": "taonode-guardian scripts/release.py",
                                      "version": workspace_version()}]},
            "component": {"type": kind, "bom-ref": f"root:{name}", "name": name, "version": version},
        },
        "components": [],
        "dependencies": [],
    }
    if properties:
        body["metadata"]["properties"] = [{"name": k, "value": v} for k, v in sorted(properties.items())]
    refs = []
    for i, c in enumerate(comps):
        ref = f"{c.purl}#{i}" if c.ecosystem == "cargo" else c.purl
        refs.append(ref)
        entry = {"type": "library", "bom-ref": ref, "name": c.name, "version": c.version, "purl": c.purl,
                 "scope": c.scope}
        if c.licence:
            entry["licenses"] = [{"expression": c.licence}]
        if c.sha256:
            entry["hashes"] = [{"alg": "SHA-256", "content": c.sha256}]
        body["components"].append(entry)
    deps: dict[str, list[str]] = {r: [] for r in refs}
    for a, b in edges:
        deps[refs[a]].append(refs[b])
    top = [refs[root_index]] if root_index is not None else refs
    body["dependencies"] = [{"ref": f"root:{name}", "dependsOn": sorted(set(top))}] + [
        {"ref": r, "dependsOn": sorted(set(d))} for r, d in deps.items()
    ]
    body["serialNumber"] = "urn:uuid:" + str(uuid.uuid5(NAMESPACE, json.dumps(body, sort_keys=True)))
    return body


def spdx(name: str, version: str, comps: list[Component], edges, when: dt.datetime, root_index: int | None) -> dict:
    ids, packages = [], []
    used = set()
    for c in comps:
        sid = c.spdx_id()
        while sid in used:
            sid += "-dup"
        used.add(sid)
        ids.append(sid)
        pkg = {
            "SPDXID": sid,
            "name": c.name,
            "versionInfo": c.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": c.licence or "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": c.purl}],
        }
        if c.sha256:
            pkg["checksums"] = [{"algorithm": "SHA256", "checksumValue": c.sha256}]
        packages.append(pkg)
    root_id = "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]", "-", f"root-{name}")
    packages.insert(0, {
        "SPDXID": root_id, "name": name, "versionInfo": version, "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False, "licenseConcluded": "NOASSERTION", "licenseDeclared": "Apache-2.0",
        "copyrightText": "NOASSERTION", "primaryPackagePurpose": "APPLICATION",
    })
    rel = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": root_id}]
    top = [ids[root_index]] if root_index is not None else ids
    rel += [{"spdxElementId": root_id, "relationshipType": "DEPENDS_ON", "relatedSpdxElement": t} for t in top]
    rel += [{"spdxElementId": ids[a], "relationshipType": "DEPENDS_ON", "relatedSpdxElement": ids[b]}
            for a, b in sorted(set(edges))]
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{name}-{version}",
        "creationInfo": {"created": iso(when), "creators": [f"Tool: taonode-guardian-release-{workspace_version()}"]},
        "packages": packages,
        "relationships": rel,
    }
    digest = uuid.uuid5(NAMESPACE, json.dumps(doc, sort_keys=True))
    doc["documentNamespace"] = f"https://github.com/taonode/guardian/spdx/{name}-{version}-{digest}"
    return doc


def sbom(dist: Path) -> None:
    meta = cargo_metadata()
    licences = {(p["name"], p["version"]): p.get("license") for p in meta["packages"]}
    sums = lock_checksums()
    when = source_date()
    version = workspace_version()
    out = dist / "sbom"
    out.mkdir(parents=True, exist_ok=True)

    # The workspace: every package of the resolved graph (all targets and platforms).
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    order = sorted(nodes, key=lambda i: (next(p for p in meta["packages"] if p["id"] == i)["name"], i))
    index = {pid: k for k, pid in enumerate(order)}
    by_id = {p["id"]: p for p in meta["packages"]}
    packages = [
        {"name": by_id[i]["name"], "version": by_id[i]["version"],
         "source": "local" if by_id[i]["source"] is None else "crates.io",
         "dependencies": sorted({index[d["pkg"]] for d in nodes[i]["deps"]})}
        for i in order
    ]
    comps, edges = cargo_components(packages, licences, sums)
    write_json(out / "workspace.cdx.json", cyclonedx("taonode-guardian", version, "application", comps, edges, when, None))
    write_json(out / "workspace.spdx.json", spdx("taonode-guardian", version, comps, edges, when, None))
    print(f"release: sbom workspace ({len(comps)} packages)")

    per_binary = {}
    for b in BINARIES:
        binary = dist / "bin" / b
        pkgs = embedded_deps(binary)
        comps, edges = cargo_components(pkgs, licences, sums)
        root = next((i for i, p in enumerate(pkgs) if p.get("root")), None)
        per_binary[b] = (comps, edges, root)
        props = {"taonode:binary:sha256": sha256_file(binary)}
        write_json(out / f"{b}.cdx.json", cyclonedx(b, version, "application", comps, edges, when, root, props))
        write_json(out / f"{b}.spdx.json", spdx(b, version, comps, edges, when, root))
        print(f"release: sbom {b} ({len(comps)} crates, from its .dep-v0 section)")

    images = dist / "images"
    for image, bins in IMAGES.items():
        archive = images / f"{image}.oci.tar"
        if not archive.exists():
            continue
        files = image_files(archive)
        comps, edges = [], []
        for b in bins:
            inside = files.get(f"/usr/local/bin/{b}")
            if inside is None or hashlib.sha256(inside).hexdigest() != sha256_file(dist / "bin" / b):
                raise Fail(f"{archive}: /usr/local/bin/{b} is not bin/{b}: the image was built from other binaries")
            c, e, _ = per_binary[b]
            base = len(comps)
            comps += c
            edges += [(x + base, y + base) for x, y in e]
        deb = debian_components(files)
        comps += deb
        props = {"taonode:image:digest": oci_manifest_digest(archive)}
        cdx = cyclonedx(f"{image}-image", version, "container", comps, edges, when, None, props)
        write_json(out / f"{image}-image.cdx.json", cdx)
        write_json(out / f"{image}-image.spdx.json", spdx(f"{image}-image", version, comps, edges, when, None))
        print(f"release: sbom image {image} ({len(comps)} components: its binaries' crates and "
              f"{len(deb)} Debian packages: {', '.join(c.name for c in deb)})")


def validate_sbom(files: list[Path]) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    failures = 0
    for f in files:
        if f.name.endswith(".cdx.json"):
            err = JsonStrictValidator(SchemaVersion.V1_6).validate_str(f.read_text())
            problem = str(err) if err is not None else None
        elif f.name.endswith(".spdx.json"):
            from spdx_tools.spdx.parser.parse_anything import parse_file
            from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

            try:
                msgs = validate_full_spdx_document(parse_file(str(f)))
            except Exception as e:  # the parser raises on malformed documents
                msgs = [e]
            problem = "; ".join(str(getattr(m, "validation_message", m)) for m in msgs[:5]) or None
        else:
            problem = "not an SBOM (expected .cdx.json or .spdx.json)"
        if problem:
            failures += 1
            print(f"release: FAIL {f}: {problem}")
        else:
            print(f"release: ok   {f} is valid {'CycloneDX 1.6' if f.name.endswith('.cdx.json') else 'SPDX 2.3'}")
    if failures:
        raise Fail(f"{failures} SBOM(s) invalid")


# ---------------------------------------------------------------------------- provenance


def oci_manifest_digest(archive: Path) -> str:
    """The manifest digest of the one image in an OCI archive, after checking every blob's digest."""
    try:
        with tarfile.open(archive) as tar:
            names = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
            index = json.loads(tar.extractfile(names["index.json"]).read())
            for name, member in names.items():
                if name.startswith("blobs/sha256/"):
                    got = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
                    if got != name.rsplit("/", 1)[1]:
                        raise Fail(f"{archive}: blob {name} has digest sha256:{got}: the image was altered")
    except (OSError, KeyError, ValueError, tarfile.TarError) as e:
        raise Fail(f"{archive}: not a readable OCI archive ({e})")
    manifests = index.get("manifests", [])
    if len(manifests) != 1:
        raise Fail(f"{archive}: {len(manifests)} manifests in index.json, expected 1")
    return manifests[0]["digest"]


def subjects_for(dist: Path, artifact: Path) -> list[dict]:
    path = dist / artifact
    subjects = [{"name": str(artifact), "digest": {"sha256": sha256_file(path)}}]
    if artifact.parts[0] == "images" and artifact.name.endswith(".oci.tar"):
        digest = oci_manifest_digest(path)
        subjects.append({"name": artifact.name.removesuffix(".oci.tar"), "digest": {"sha256": digest.split(":", 1)[1]}})
    return subjects


def attest(dist: Path, key_path: Path, revision: str, source: str) -> None:
    key = load_private(key_path)
    toolchain = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    started = dt.datetime.now(dt.timezone.utc)
    files = artifacts(dist)
    if not files:
        raise Fail(f"{dist}: nothing to attest (no files under {', '.join(ARTIFACT_DIRS)})")
    lock = sha256_file(ROOT / "Cargo.lock")
    manifest = []
    for artifact in files:
        statement = {
            "_type": "https://in-toto.io/Statement/v1",
            "subject": subjects_for(dist, artifact),
            "predicateType": "https://slsa.dev/provenance/v1",
            "predicate": {
                "buildDefinition": {
                    "buildType": BUILD_TYPE,
                    "externalParameters": {
                        "source": {"uri": source, "digest": {"gitCommit": revision}},
                        "target": "make release",
                        "profile": os.environ.get("PROFILE", "release"),
                    },
                    "internalParameters": {"SOURCE_DATE_EPOCH": str(int(source_date().timestamp()))},
                    "resolvedDependencies": [
                        {"uri": source, "digest": {"gitCommit": revision}},
                        {"uri": "Cargo.lock", "digest": {"sha256": lock}},
                        {"uri": f"toolchain:{toolchain}"},
                    ],
                },
                "runDetails": {
                    "builder": {"id": os.environ.get("RELEASE_BUILDER_ID", "local:make-release")},
                    "metadata": {"invocationId": str(uuid.uuid4()), "startedOn": iso(started),
                                 "finishedOn": iso(dt.datetime.now(dt.timezone.utc))},
                },
            },
        }
        write_json(attestation_path(dist, artifact), sign_envelope(statement, key))
        manifest.append({"path": str(artifact), "subjects": statement["subject"]})
    (dist / "release.pub").write_bytes(public_pem(key.public_key()))
    release = {"revision": revision, "source": source, "version": workspace_version(),
               "keyid": keyid(key.public_key()), "artifacts": manifest}
    write_json(dist / "release.json", release)
    # The list itself, signed: an artifact removed together with its attestation is missed.
    write_json(dist / MANIFEST_ENVELOPE, sign_envelope({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [s for a in manifest for s in a["subjects"][:1]],
        "predicateType": MANIFEST_PREDICATE,
        "predicate": release,
    }, key))
    print(f"release: {len(files)} artifacts attested and signed (key {keyid(key.public_key())[:16]}…)")


def verify(dist: Path, pub: Path, revision: str) -> None:
    public = load_public(pub)
    files = artifacts(dist)
    if not files:
        raise Fail(f"{dist}: no artifacts to verify (looked under {', '.join(ARTIFACT_DIRS)})")
    problems: list[str] = []
    # The signed list first: every artifact it names must be here, and nothing else.
    try:
        if not (dist / MANIFEST_ENVELOPE).exists():
            raise Fail(f"{MANIFEST_ENVELOPE} is missing: no signed release list, so removed artifacts cannot be told")
        listed = open_envelope(dist / MANIFEST_ENVELOPE, public)
        if listed.get("predicateType") != MANIFEST_PREDICATE:
            raise Fail(f"{MANIFEST_ENVELOPE}: not a release manifest")
        release = listed["predicate"]
        if release.get("revision") != revision:
            raise Fail(f"{MANIFEST_ENVELOPE}: the release is of {release.get('revision')}, not of the revision asked for ({revision})")
        names = {a["path"] for a in release["artifacts"]}
        on_disk = {str(f) for f in files}
        for missing in sorted(names - on_disk):
            problems.append(f"{missing}: listed in the signed release but missing: an artifact was removed")
            print(f"release: FAIL {problems[-1]}")
        print(f"release: ok   {MANIFEST_ENVELOPE}: the signed list of {len(names)} artifacts")
    except (OSError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"{MANIFEST_ENVELOPE}: unreadable signed release list ({e})")
        print(f"release: FAIL {problems[-1]}")
    except Fail as e:
        problems.append(str(e))
        print(f"release: FAIL {e}")
    attested = set()
    for artifact in files:
        att = attestation_path(dist, artifact)
        attested.add(att.name)
        try:
            if not att.exists():
                raise Fail(f"{artifact}: no attestation ({att.relative_to(dist)} is missing): unsigned artifact")
            statement = open_envelope(att, public)
            if statement.get("predicateType") != "https://slsa.dev/provenance/v1":
                raise Fail(f"{artifact}: predicate {statement.get('predicateType')!r} is not SLSA provenance v1")
            want = {s["name"]: s["digest"]["sha256"] for s in statement.get("subject", [])}
            for s in subjects_for(dist, artifact):
                if want.get(s["name"]) != s["digest"]["sha256"]:
                    raise Fail(f"{artifact}: {s['name']} has sha256:{s['digest']['sha256'][:16]}…, the signed "
                               f"provenance says sha256:{str(want.get(s['name']))[:16]}…: the artifact was altered")
            src = statement["predicate"]["buildDefinition"]["externalParameters"]["source"]["digest"]["gitCommit"]
            if src != revision:
                raise Fail(f"{artifact}: built from {src}, not from the revision asked for ({revision})")
            print(f"release: ok   {artifact}")
        except Fail as e:
            problems.append(str(e))
            print(f"release: FAIL {e}")
    for extra in sorted((dist / "attestations").glob("*.intoto.json")) if (dist / "attestations").is_dir() else []:
        if extra.name not in attested:
            problems.append(f"{extra.name}: an attestation for an artifact that is not there")
            print(f"release: FAIL {problems[-1]}")
    # Each binary's embedded dependency list is the one its SBOM lists.
    for b in BINARIES:
        binary, cdx = dist / "bin" / b, dist / "sbom" / f"{b}.cdx.json"
        if not binary.exists():
            continue
        try:
            if not cdx.exists():
                raise Fail(f"bin/{b}: no SBOM sbom/{b}.cdx.json")
            embedded = sorted((p["name"], p["version"]) for p in embedded_deps(binary))
            listed = sorted((c["name"], c["version"]) for c in json.loads(cdx.read_text())["components"])
            if embedded != listed:
                raise Fail(f"bin/{b}: its embedded dependency list differs from sbom/{b}.cdx.json "
                           f"({len(set(embedded) ^ set(listed))} packages differ)")
            print(f"release: ok   bin/{b} carries the {len(embedded)} crates its SBOM lists")
        except Fail as e:
            problems.append(str(e))
            print(f"release: FAIL {e}")
    if problems:
        raise Fail(f"verify: {len(problems)} problem(s) in {dist}; do not install these artifacts")
    print(f"release: verified {len(files)} artifacts of revision {revision} against key {keyid(public)[:16]}…")


# ---------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="release.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("keygen").add_argument("key", type=Path)
    p = sub.add_parser("chart")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    sub.add_parser("sbom").add_argument("dist", type=Path)
    sub.add_parser("validate-sbom").add_argument("files", type=Path, nargs="+")
    p = sub.add_parser("attest")
    p.add_argument("dist", type=Path)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--revision", required=True)
    p.add_argument("--source", required=True)
    p = sub.add_parser("verify")
    p.add_argument("dist", type=Path)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--revision", required=True)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "keygen":
            keygen(a.key)
        elif a.cmd == "chart":
            package_chart(a.src, a.out)
        elif a.cmd == "sbom":
            sbom(a.dist)
        elif a.cmd == "validate-sbom":
            validate_sbom(a.files)
        elif a.cmd == "attest":
            attest(a.dist, a.key, a.revision, a.source)
        elif a.cmd == "verify":
            verify(a.dist, a.key, a.revision)
    except Fail as e:
        print(f"release: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
