"""The orchestrator flow of client/examples/orchestrator.rs, in Python, with a client generated
from proto/ by grpcio-tools (the generated modules must be on PYTHONPATH).

Usage: orchestrator.py SOCKET HANDOFF_SOCKET VM_ID NODE_MIB

For a guest with two NUMA nodes: read the host's nodes, create one region per guest node bound
to a host node, populate, verify placement from the kernel, then acquire each fd on the handoff
socket (SOCK_SEQPACKET, fds in SCM_RIGHTS) as a VMM would. Prints one JSON summary; any failed
check raises, so the exit status is non-zero.
"""
import json
import os
import socket
import sys

import grpc
from memplace.v1 import agent_pb2, agent_pb2_grpc, handoff_pb2, types_pb2

GUEST_NODES = 2


def main():
    sock, handoff_path, vm_id, node_mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    size = node_mib << 20
    # gRPC's Unix socket target: unix:///absolute/path. Python's gRPC would send the socket path
    # as the :authority, which the agent's HTTP/2 server refuses as malformed (RST_STREAM);
    # "localhost" is what grpcurl's -authority flag sets for the same reason.
    channel = grpc.insecure_channel(
        "unix://" + os.path.abspath(sock), options=[("grpc.default_authority", "localhost")]
    )
    stub = agent_pb2_grpc.NodeAgentServiceStub(channel)

    info = stub.GetNodeInfo(agent_pb2.GetNodeInfoRequest(), timeout=30)
    host = [n.id for n in info.nodes if n.allowed]
    assert host, "the agent reports no allowed node"
    plan = [(g, host[g % len(host)]) for g in range(GUEST_NODES)]

    token = None
    regions = []
    for guest, node in plan:
        name = "ram-node%d" % guest
        created = stub.CreateRegion(
            agent_pb2.CreateRegionRequest(
                vm_id=vm_id,
                name=name,
                size_bytes=size,
                backend=types_pb2.BACKEND_MEMFD,
                policies=[
                    types_pb2.RangePolicy(
                        policy=types_pb2.Policy(mode=types_pb2.POLICY_MODE_BIND, nodes=[node])
                    )
                ],
                request_id="py-%s-%s" % (vm_id, name),
            ),
            timeout=30,
        )
        token = created.handoff_token
        assert created.region.strategy == types_pb2.STRATEGY_SHARED_POLICY, created.region

        summary = None
        progress = 0
        for msg in stub.Populate(agent_pb2.PopulateRequest(vm_id=vm_id, name=name), timeout=60):
            if msg.HasField("progress"):
                progress += 1
            elif msg.HasField("summary"):
                summary = msg.summary
        assert summary is not None, "Populate ended without a summary"
        assert summary.bytes_done == size, summary
        assert not summary.cancelled, summary

        p = stub.GetPlacement(agent_pb2.GetPlacementRequest(vm_id=vm_id, name=name), timeout=30)
        pages = size // p.page_size_bytes
        on_node = sum(n.pages for n in p.nodes if n.node == node)
        assert on_node == pages, (on_node, pages, p)
        assert p.pages_misplaced == 0 and p.pages_not_present == 0, p
        regions.append((guest, node, name, pages))

    # The VMM side: one packet per request, fds in SCM_RIGHTS on the reply.
    vmm = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Each reply is awaited at most this long: a silent agent fails (TimeoutError at the recv of
    # the handoff reply) instead of hanging the test.
    vmm.settimeout(60)
    vmm.connect(handoff_path)
    out = []
    for guest, node, name, pages in regions:
        req = handoff_pb2.HandoffRequest(
            acquire=handoff_pb2.AcquireRequest(vm_id=vm_id, name=name, token=token)
        )
        vmm.send(req.SerializeToString())
        data, fds, _flags, _addr = socket.recv_fds(vmm, 1 << 16, 4)
        resp = handoff_pb2.HandoffResponse.FromString(data)
        assert resp.code == handoff_pb2.HANDOFF_CODE_OK, resp
        assert resp.fd_count == len(fds) >= 1, (resp.fd_count, fds)
        st = os.fstat(fds[0])
        assert st.st_size == size, (st.st_size, size)
        out.append(
            {
                "guest_node": guest,
                "host_node": node,
                "region": name,
                "size_bytes": st.st_size,
                "pages_on_node": pages,
                "holder_pid": resp.region.holder_pid,
            }
        )
        for fd in fds:
            os.close(fd)

    # A wrong token is refused, with the handoff code, and no fd.
    bad = handoff_pb2.HandoffRequest(
        acquire=handoff_pb2.AcquireRequest(vm_id=vm_id, name=regions[0][2], token="0" * 64)
    )
    vmm.send(bad.SerializeToString())
    data, fds, _flags, _addr = socket.recv_fds(vmm, 1 << 16, 4)
    assert not fds
    refused = handoff_pb2.HandoffResponse.FromString(data)
    assert refused.code == handoff_pb2.HANDOFF_CODE_PERMISSION_DENIED, refused

    # gRPC errors carry the agent's code and message.
    try:
        stub.GetRegion(agent_pb2.GetRegionRequest(vm_id=vm_id, name="nope"), timeout=30)
        raise AssertionError("GetRegion of a missing region succeeded")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        not_found = e.details()

    print(
        json.dumps(
            {"vm_id": vm_id, "regions": out, "pid": os.getpid(), "not_found": not_found}
        )
    )


if __name__ == "__main__":
    main()
