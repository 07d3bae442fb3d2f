"""Master <-> worker frames: length-prefixed msgpack over a socketpair."""

import asyncio
import socket

from dispa.config.snapshot import ClusterSpec, EndpointSpec, InterceptSpec, ProxySpec, make_snapshot
from dispa.server import messages as m
from dispa.server.channel import open_channel


def _snapshot():
    return make_snapshot(ProxySpec(), InterceptSpec(), (ClusterSpec(name="default", endpoints=(
        EndpointSpec(id="127.0.0.1:1", name="a", host="127.0.0.1", port=1),)),), "default")


def test_messages_cross_in_order_including_frames_split_across_reads():
    async def main():
        a, b = socket.socketpair()
        got = []
        done = asyncio.get_running_loop().create_future()

        def on_msg(msg):
            got.append(msg)
            if len(got) == 3:
                done.set_result(None)

        master = await open_channel(a, m.ToMaster, lambda msg: None, lambda exc: None)
        worker = await open_channel(b, m.ToWorker, on_msg, lambda exc: None)
        snap = _snapshot()
        master.send(m.ApplySnapshot(snapshot=snap))
        master.send(m.HealthUpdate(states={"default/127.0.0.1:1": False}))
        # a frame delivered one byte at a time still decodes
        import msgspec, struct
        payload = msgspec.msgpack.encode(m.StatsRequest(seq=7))
        frame = struct.pack(">I", len(payload)) + payload
        for i in range(len(frame)):
            worker.data_received(frame[i:i + 1])
        await asyncio.wait_for(done, 5)
        # the byte-by-byte frame was fed synchronously, before the socket delivered the rest
        assert got[0] == m.StatsRequest(seq=7)
        assert got[1] == m.ApplySnapshot(snapshot=snap)
        assert got[2].states == {"default/127.0.0.1:1": False}

    asyncio.run(main())


def test_the_peer_closing_is_reported():
    async def main():
        a, b = socket.socketpair()
        closed = asyncio.get_running_loop().create_future()
        await open_channel(b, m.ToWorker, lambda msg: None, lambda exc: closed.set_result(True))
        a.close()
        assert await asyncio.wait_for(closed, 5)

    asyncio.run(main())


def test_snapshot_version_is_a_content_hash():
    assert _snapshot().version == _snapshot().version
    other = make_snapshot(ProxySpec(via="x"), InterceptSpec(), _snapshot().clusters, "default")
    assert other.version != _snapshot().version
