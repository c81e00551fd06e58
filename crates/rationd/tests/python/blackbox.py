#!/usr/bin/env python3
"""Black-box check of a running rationd, using nothing but grpcio packages.

    python blackbox.py HOST:PORT

No project code and no generated stubs: gRPC health checking
(grpcio-health-checking) and server reflection (grpcio-reflection) only, as any
client or operator tool would see the node. Exits 0 when every check passes;
otherwise prints what failed and exits 1.

Checks:
  * grpc.health.v1: "" (the whole server), "ration.v1.Ledger" and "ration.v1.Cluster"
    are SERVING; an unknown service is NOT_FOUND.
  * reflection v1alpha (grpc_reflection's ProtoReflectionDescriptorDatabase): the
    services listed include every expected one; the descriptor of ration.v1.Ledger
    resolves and has the Acquire method with its request and reply types.
  * reflection v1 (raw stream; the messages are wire-identical to v1alpha's): the
    services listed include every expected one, and the file defining
    ration.v1.Ledger declares Acquire.
"""

import sys
import time

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

TIMEOUT = 10  # seconds, per call

EXPECTED_SERVICES = {
    "ration.v1.Ledger",
    "ration.v1.Cluster",
    "ration.v1.Raft",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}

REFLECTION = {
    "v1": "grpc.reflection.v1.ServerReflection",
    "v1alpha": "grpc.reflection.v1alpha.ServerReflection",
}

failures = []
listed = {}  # reflection version -> services it lists


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def check_listed(version, services):
    """Each reflection service lists every expected service, both reflection
    versions included."""
    missing = EXPECTED_SERVICES - services
    check(not missing, f"reflection {version} lists the expected services "
                       f"(missing {sorted(missing)}, listed {sorted(services)})")


def health(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ["", "ration.v1.Ledger", "ration.v1.Cluster"]:
        try:
            # "" and Ledger report SERVING once the node knows a leader (a single
            # node elects itself within its election timeout): poll briefly.
            deadline = time.monotonic() + 15
            while True:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
                if reply.status == serving or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            check(reply.status == serving, f"health {service!r} is SERVING (got {status})")
        except grpc.RpcError as e:
            check(False, f"health {service!r} is SERVING (got error {e.code()}: {e.details()})")
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
        check(False, f"health of an unknown service is NOT_FOUND (got {reply.status})")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND,
              f"health of an unknown service is NOT_FOUND (got {e.code()})")


def reflection_v1alpha(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    listed["v1alpha"] = services
    check_listed("v1alpha", services)
    pool = descriptor_pool.DescriptorPool(db)
    ledger = pool.FindServiceByName("ration.v1.Ledger")
    methods = {m.name: m for m in ledger.methods}
    acquire = methods.get("Acquire")
    check(acquire is not None, f"reflection v1alpha: ration.v1.Ledger has Acquire (methods {sorted(methods)})")
    if acquire is not None:
        check(acquire.input_type.full_name == "ration.v1.AcquireRequest"
              and acquire.output_type.full_name == "ration.v1.Lease",
              f"reflection v1alpha: Acquire(AcquireRequest) returns (Lease) "
              f"(got {acquire.input_type.full_name} -> {acquire.output_type.full_name})")
        fields = {f.name for f in acquire.input_type.fields}
        check({"budget", "wanted"} <= fields,
              f"reflection v1alpha: AcquireRequest has budget and wanted (fields {sorted(fields)})")


def reflection_v1(channel):
    # grpcio-reflection ships only v1alpha stubs; v1's messages are wire-identical.
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="ration.v1.Ledger"),
    ]
    try:
        replies = list(call(iter(requests), timeout=TIMEOUT))
    except grpc.RpcError as e:
        check(False, f"reflection v1 answers (got error {e.code()}: {e.details()})")
        return
    if len(replies) != 2:
        check(False, f"reflection v1 answers both requests (got {len(replies)} replies)")
        return
    for reply in replies:
        if reply.HasField("error_response"):
            check(False, f"reflection v1: {reply.error_response.error_message}")
            return
    services = {s.name for s in replies[0].list_services_response.service}
    listed["v1"] = services
    check_listed("v1", services)
    methods = set()
    for raw in replies[1].file_descriptor_response.file_descriptor_proto:
        fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        if fd.package != "ration.v1":
            continue
        for service in fd.service:
            if service.name == "Ledger":
                methods |= {m.name for m in service.method}
    check("Acquire" in methods, f"reflection v1: the file of ration.v1.Ledger declares Acquire "
                                f"(methods {sorted(methods)})")


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    target = sys.argv[1]
    print(f"rationd at {target}, grpcio {grpc.__version__}", flush=True)
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        except grpc.FutureTimeoutError:
            print(f"FAIL cannot connect to {target} within {TIMEOUT} s", file=sys.stderr)
            return 1
        for part in (health, reflection_v1alpha, reflection_v1):
            try:
                part(channel)
            except Exception as e:  # an unexpected reply shape is a failure too
                check(False, f"{part.__name__} raised {type(e).__name__}: {e}")
    if len(listed) == 2:
        union = listed["v1"] | listed["v1alpha"]
        missing = EXPECTED_SERVICES - union
        check(not missing, f"reflection v1 and v1alpha together list every expected service "
                           f"(missing {sorted(missing)})")
    if failures:
        print(f"{len(failures)} check(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
