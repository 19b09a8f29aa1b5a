#!/usr/bin/env python3
"""A TaoNode Guardian Fleet API client in Python, for integrations.

The stubs are generated from the project's proto/ with grpcio-tools at first use (into
GUARDIAN_PY_STUBS, default ./_generated beside this file), so they always match the server's
contract. The connection is mutual TLS with an operator certificate, like guardianctl's.

  python guardian_client.py --server HOST:7443 [--pki DIR | --ca CA --cert CERT --key KEY] nodes [--json]
  python guardian_client.py ... node NODE_ID
  python guardian_client.py ... health [SERVICE]

`--pki DIR` (or GUARDIAN_PKI_DIR) takes ca.pem, operator.pem and operator-key.pem from DIR,
as `guardianctl pki init` writes them. `--server-name` is the name in the server certificate
(default localhost).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto" / "proto"


def stubs():
    """guardian_pb2 and guardian_pb2_grpc, generated from proto/ when missing or stale."""
    out = Path(os.environ.get("GUARDIAN_PY_STUBS", HERE / "_generated"))
    proto = PROTO_ROOT / "guardian" / "v1" / "guardian.proto"
    made = out / "guardian" / "v1" / "guardian_pb2.py"
    if not made.exists() or made.stat().st_mtime < proto.stat().st_mtime:
        from grpc_tools import protoc

        out.mkdir(parents=True, exist_ok=True)
        code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto)])
        if code != 0:
            sys.exit(f"guardian_client: protoc failed on {proto} (exit {code})")
    sys.path.insert(0, str(out))
    return importlib.import_module("guardian.v1.guardian_pb2"), importlib.import_module("guardian.v1.guardian_pb2_grpc")


def channel(args):
    import grpc

    pki = args.pki or os.environ.get("GUARDIAN_PKI_DIR")
    ca = args.ca or (pki and os.path.join(pki, "ca.pem"))
    cert = args.cert or (pki and os.path.join(pki, "operator.pem"))
    key = args.key or (pki and os.path.join(pki, "operator-key.pem"))
    if not (ca and cert and key):
        sys.exit("guardian_client: give --pki DIR (or GUARDIAN_PKI_DIR), or --ca, --cert and --key")
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(),
            private_key=Path(key).read_bytes(),
            certificate_chain=Path(cert).read_bytes(),
        )
    except OSError as e:
        sys.exit(f"guardian_client: cannot read the TLS files: {e}")
    options = [("grpc.ssl_target_name_override", args.server_name)]
    return grpc.secure_channel(args.server, creds, options=options)


def node_row(node) -> dict:
    return {
        "node_id": node.node_id,
        "network": node.network,
        "connected": node.connected,
        "phase": node.phase,
        "risk": node.risk,
        "last_stored_seq": node.last_stored_seq,
        "last_seen_unix_ms": node.last_seen_unix_ms,
        "best_block": node.last_chain.best_block if node.HasField("last_chain") else None,
    }


def main(argv: list[str]) -> int:
    import grpc

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default="127.0.0.1:7443")
    ap.add_argument("--server-name", default="localhost")
    ap.add_argument("--pki")
    ap.add_argument("--ca")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--timeout", type=float, default=10.0)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("nodes", help="every node")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("node", help="one node")
    p.add_argument("node_id")
    p = sub.add_parser("health", help="grpc.health.v1 status")
    p.add_argument("service", nargs="?", default="")
    args = ap.parse_args(argv)

    with channel(args) as ch:
        try:
            if args.cmd == "health":
                from grpc_health.v1 import health_pb2, health_pb2_grpc

                answer = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
                )
                print(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
                return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1
            pb, rpc = stubs()
            fleet = rpc.FleetStub(ch)
            if args.cmd == "nodes":
                answer = fleet.ListNodes(pb.ListNodesRequest(), timeout=args.timeout)
                rows = [node_row(n) for n in answer.nodes]
                if args.json:
                    print(json.dumps({"fleet_risk": answer.fleet_risk, "nodes": rows}, indent=2))
                else:
                    print(f"{'NODE':<24} {'NETWORK':<10} {'CONNECTED':<9} {'PHASE':<11} {'RISK':>5} {'SEQ':>8}")
                    for r in rows:
                        print(f"{r['node_id']:<24} {r['network']:<10} {str(r['connected']).lower():<9} "
                              f"{r['phase'] or '-':<11} {r['risk']:>5.2f} {r['last_stored_seq']:>8}")
            elif args.cmd == "node":
                print(json.dumps(node_row(fleet.GetNode(pb.GetNodeRequest(node_id=args.node_id), timeout=args.timeout)), indent=2))
        except grpc.RpcError as e:
            print(f"guardian_client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
