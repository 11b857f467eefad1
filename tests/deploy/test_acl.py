"""The ACL by role, checked rule by rule against the topic tree (hand-checkable)."""

from __future__ import annotations

import pytest

from iotoffload.deploy.acl import Role, Rule, mosquitto_acl, rules
from iotoffload.transport.topics import Topics

T = Topics()


def _may(role: Role, who: str, access: str, topic: str) -> bool:
    """Whether ``who`` may ``access`` ``topic`` (an MQTT topic filter match, as the broker)."""
    return any(access in r.access and _matches(r.topic, topic) for r in rules(role, who))


def _matches(pattern: str, topic: str) -> bool:
    p, t = pattern.split("/"), topic.split("/")
    if len(p) != len(t):
        return False
    return all(a in ("+", b) for a, b in zip(p, t, strict=True))


def test_every_writable_topic_carries_the_writers_own_identity() -> None:
    for role in Role:
        for r in rules(role, "me"):
            if "write" in r.access:
                levels = r.topic.split("/")
                assert "me" in levels, (role, r)
                assert r.topic.count("+") <= 1


@pytest.mark.parametrize(
    ("access", "topic", "allowed"),
    [
        ("write", T.edge_status("e1"), True),
        ("write", T.edge_status("e2"), False),
        ("write", T.device_inbox("d1", "e1"), True),
        ("write", T.device_inbox("d1", "e2"), False),
        ("read", T.edge_query("e1", "d1"), True),
        ("read", T.edge_query("e2", "d1"), False),
        ("write", T.edge_upload("e2", "e1"), True),  # a push to a peer, as itself
        ("write", T.edge_upload("e2", "e3"), False),
        ("write", T.edge_control("e2", "e1"), True),  # a peer fetch, as itself
        ("read", T.device_inbox("d1", "e1"), False),
        ("write", T.device_control("d1", "e1"), False),
        ("write", T.edge_query("e2", "e1"), False),
    ],
)
def test_an_edge(access: str, topic: str, allowed: bool) -> None:
    assert _may(Role.EDGE, "e1", access, topic) is allowed


@pytest.mark.parametrize(
    ("access", "topic", "allowed"),
    [
        ("write", T.edge_query("e1", "d1"), True),
        ("write", T.edge_query("e1", "d2"), False),
        ("write", T.edge_upload("e1", "d1"), True),
        ("write", T.edge_control("e1", "d1"), True),
        ("read", T.device_inbox("d1", "e1"), True),
        ("read", T.device_inbox("d2", "e1"), False),
        ("read", T.device_control("d1", "ops"), True),
        ("write", T.device_control("d1", "d1"), False),
        ("write", T.device_results("d1"), True),
        ("write", T.device_results("d2"), False),
        ("write", T.device_inbox("d1", "e1"), False),
        ("write", T.edge_status("d1"), False),
    ],
)
def test_a_device(access: str, topic: str, allowed: bool) -> None:
    assert _may(Role.DEVICE, "d1", access, topic) is allowed


@pytest.mark.parametrize(
    ("role", "access", "topic", "allowed"),
    [
        (Role.APP, "write", T.edge_query("e1", "app1"), True),
        (Role.APP, "write", T.edge_upload("e1", "app1"), False),  # apps do not upload
        (Role.APP, "read", T.device_results("d1"), True),
        (Role.APP, "read", T.device_inbox("d1", "e1"), False),
        (Role.APP, "write", T.device_control("d1", "app1"), False),
        (Role.OPERATOR, "write", T.device_control("d1", "app1"), True),
        (Role.OPERATOR, "write", T.edge_query("e1", "app1"), False),
        (Role.OPERATOR, "read", T.device_inbox("d1", "e1"), False),
    ],
)
def test_apps_and_operators(role: Role, access: str, topic: str, allowed: bool) -> None:
    assert _may(role, "app1", access, topic) is allowed


def test_the_mosquitto_acl_has_one_section_per_identity_with_its_roles_rules() -> None:
    text = mosquitto_acl({"e1": Role.EDGE, "d1": Role.DEVICE})
    sections = text.split("user ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["d1", "e1"]
    d1 = [line for line in sections[0].splitlines()[1:] if line.startswith("topic")]
    assert d1 == [f"topic {r.access} {r.topic}" for r in rules(Role.DEVICE, "d1")]
    assert "pattern" not in text  # nothing granted to every user at once


def test_ids_that_are_not_topic_levels_are_refused() -> None:
    with pytest.raises(ValueError):
        rules(Role.DEVICE, "a/b")
    with pytest.raises(ValueError):
        rules(Role.EDGE, "#")
    assert Rule("read", "x") == Rule("read", "x")
