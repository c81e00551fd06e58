#!/usr/bin/env python3
"""Black-box check of a rationd serving mutual TLS, using nothing but grpcio.

    python tls_blackbox.py HOST:PORT CA GW_CERT GW_KEY NODE_CERT NODE_KEY

No project code and no generated stubs (gRPC health checking only), as any
outside client would see the node. Exits 0 when every check passes; otherwise
prints what failed and exits 1.

Checks, on the node's client port:
  * with a client certificate naming a principal (GW_CERT): "" and
    "ration.v1.Ledger" are SERVING;
  * with no client certificate: UNAUTHENTICATED, saying no certificate was
    presented;
  * with a node certificate (NODE_CERT) used as a client: PERMISSION_DENIED,
    saying it is for the peer port;
  * in plaintext: the call fails.
"""

import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT = 10  # seconds, per call

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def health(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)


def refused(channel, code, says, what):
    try:
        health(channel, "")
    except grpc.RpcError as e:
        check(
            e.code() == code and says in (e.details() or ""),
            f"{what}: {e.code().name}: {e.details()}",
        )
        return
    check(False, f"{what}: the call succeeded")


def main():
    addr, ca, gw_cert, gw_key, node_cert, node_key = sys.argv[1:7]
    root = read(ca)
    gw = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=read(gw_key), certificate_chain=read(gw_cert)
    )
    with grpc.secure_channel(addr, gw) as ch:
        for service in ["", "ration.v1.Ledger"]:
            try:
                # "" and Ledger report SERVING once the node knows a leader (a single
                # node elects itself within a second or so of starting).
                deadline = time.monotonic() + 15
                while True:
                    status = health(ch, service).status
                    serving = status == health_pb2.HealthCheckResponse.SERVING
                    if serving or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                check(
                    status == health_pb2.HealthCheckResponse.SERVING,
                    f"with a client certificate, {service or '(server)'!r} is "
                    f"{health_pb2.HealthCheckResponse.ServingStatus.Name(status)}",
                )
            except grpc.RpcError as e:
                check(False, f"with a client certificate, {service!r}: {e.code().name}: {e.details()}")

    anonymous = grpc.ssl_channel_credentials(root_certificates=root)
    with grpc.secure_channel(addr, anonymous) as ch:
        refused(
            ch,
            grpc.StatusCode.UNAUTHENTICATED,
            "no client certificate was presented",
            "without a client certificate",
        )

    node = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=read(node_key), certificate_chain=read(node_cert)
    )
    with grpc.secure_channel(addr, node) as ch:
        refused(
            ch,
            grpc.StatusCode.PERMISSION_DENIED,
            "is for the peer port",
            "with a node certificate as a client",
        )

    with grpc.insecure_channel(addr) as ch:
        try:
            health(ch, "")
            check(False, "in plaintext: the call succeeded")
        except grpc.RpcError as e:
            check(True, f"in plaintext: {e.code().name}: {e.details()}")

    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)


if __name__ == "__main__":
    main()
