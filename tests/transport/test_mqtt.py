"""MqttLink's own work per message: packets written from a view, routes remembered (bounded)."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt

from iotoffload.transport import mqtt as link_mod
from iotoffload.transport.link import Message
from iotoffload.transport.mqtt import MAX_ROUTE_TOPIC, MqttLink


def test_the_installed_paho_queues_packets_as_the_override_expects() -> None:
    assert link_mod._queues_packets_as_expected()
    link = MqttLink("mqtt://127.0.0.1:9", "never-connected")
    assert isinstance(link.client, link_mod._Client)
    c = link.client
    c._packet_queue(0x30, bytearray(b"x" * 1000), 0, 0)  # a PUBLISH paho built
    packet = c._out_packet.pop()
    assert isinstance(packet["packet"], memoryview)  # slicing it to send copies nothing
    assert packet["to_process"] == 1000


def _message(topic: str) -> Any:
    m = mqtt.MQTTMessage(topic=topic.encode())
    m.payload = b"p"
    return m


def test_routes_are_remembered_and_renewed_by_subscribe_but_long_topics_are_not() -> None:
    link = MqttLink("mqtt://127.0.0.1:9", "never-connected")
    got: list[tuple[str, str]] = []
    link.subscribe("a/+/in", lambda m: got.append(("one", m.topic)))
    link._on_message(link.client, None, _message("a/x/in"))
    assert got == [("one", "a/x/in")] and "a/x/in" in link._routes
    link.subscribe("a/#", lambda m: got.append(("two", m.topic)))  # a new filter: routes anew
    link._on_message(link.client, None, _message("a/x/in"))
    assert got[1:] == [("one", "a/x/in"), ("two", "a/x/in")]
    long = "a/" + "y" * MAX_ROUTE_TOPIC + "/in"
    link._on_message(link.client, None, _message(long))
    assert got[-2:] == [("one", long), ("two", long)]
    assert long not in link._routes  # matched, not remembered: invented topics pin nothing


def test_a_handler_that_fails_does_not_stop_the_others() -> None:
    link = MqttLink("mqtt://127.0.0.1:9", "never-connected")
    got: list[Message] = []

    def bad(_m: Message) -> None:
        raise RuntimeError("bug")

    link.subscribe("t", bad)
    link.subscribe("t", got.append)
    link._on_message(link.client, None, _message("t"))
    assert [m.topic for m in got] == ["t"]
