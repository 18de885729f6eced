"""One route table for both ends: every send's channel is its receive's, every schedule."""

from __future__ import annotations

from typing import Any

import pytest

from stagewise.schedule import RecvActivation, RecvGrad, SendActivation, SendGrad
from stagewise.schedule.registry import schedule_factory, schedule_names
from stagewise.schedule.routes import Channel, channel_of, stage_routes


def _layouts() -> list[tuple[str, dict[str, Any]]]:
    names = [(name, {}) for name in schedule_names() if name != "interleaved"]
    return [*names, ("interleaved", {"virtual_stages": 2}), ("interleaved", {"virtual_stages": 3})]


@pytest.mark.parametrize(("name", "kwargs"), _layouts())
@pytest.mark.parametrize("stages", range(1, 9))
def test_every_send_meets_a_receive_on_the_same_channel(
    name: str, kwargs: dict[str, Any], stages: int
) -> None:
    factory = schedule_factory(name, kwargs.get("virtual_stages"))
    micro_batches = 2 * stages + 1
    sent: dict[tuple[int, int], list[tuple[Channel, Any]]] = {}
    received: dict[tuple[int, int], list[tuple[Channel, Any]]] = {}
    for stage in range(stages):
        schedule = factory(micro_batches, stages, stage)
        routes = stage_routes(schedule)
        for step in schedule.steps():
            for instr in step:
                channel = channel_of(routes, instr)
                if channel is None:
                    continue
                if isinstance(instr, (SendActivation, SendGrad)):
                    sent.setdefault((stage, channel.peer), []).append((channel, instr))
                else:
                    assert isinstance(instr, (RecvActivation, RecvGrad))
                    received.setdefault((channel.peer, stage), []).append((channel, instr))
    assert sent.keys() == received.keys()
    for link, sends in sent.items():
        recvs = received[link]
        assert len(sends) == len(recvs), link
        for (out, send), (into, recv) in zip(sends, recvs, strict=True):
            assert out.tag == into.tag and out.boundary == into.boundary, (link, send, recv)
            assert send.micro_batch_id == recv.micro_batch_id, (link, send, recv)
            assert isinstance(send, SendGrad) == isinstance(recv, RecvGrad), (link, send, recv)


def test_tags_name_the_boundary_and_the_direction() -> None:
    layout = schedule_factory("zbv")(4, 2, 1)
    routes = stage_routes(layout)
    # stage 1 holds virtual stages 1 and 2 (the turn of the V, a local boundary)
    assert [r.virtual for r in routes] == [1, 2]
    assert routes[0].recv_activation == Channel(peer=0, tag=0, boundary=0)
    assert routes[0].send_activation == Channel(peer=1, tag=2, boundary=1)
    assert routes[1].recv_grad == Channel(peer=0, tag=5, boundary=2)
    assert routes[1].send_grad == Channel(peer=1, tag=3, boundary=1)


def test_a_transfer_past_the_end_of_the_model_is_an_error() -> None:
    routes = stage_routes(schedule_factory("1f1b")(2, 2, 1))
    with pytest.raises(ValueError, match="SA0 on virtual stage 1 has no peer: it is the last"):
        channel_of(routes, SendActivation(0))
