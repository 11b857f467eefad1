"""A third-party client of an iotoffload edge: plain paho-mqtt 2.x, no iotoffload import.

It announces a model package's block chain to the edge (built from the package's manifest.json),
prints the edge's inventory, sends one whole-model query (blocks [0, N)) on a synthetic input and
prints the top-5 of the result, or the error frame. It does not upload blocks: run
``device-agent --wait-upload`` first if the inventory says some are missing.

    python examples/third_party_client.py --edge EDGE --package PACKAGE_DIR

On a secured broker (``iotoffload security init``): ``--broker mqtts://HOST:8883 --ca-file
ca.crt`` and either ``--cert-file/--key-file`` (the certificate's CN is the client's id) or
``--username`` with the password in ``$IOTOFFLOAD_MQTT_PASSWORD``. Protocol v2: the client's
id is the last level of every topic it publishes on, and must be its broker identity.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import queue
import random
import socket
import struct
import sys
import uuid
from math import prod
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

PREFIX = "iotoffload/v2"
FRAME_VERSION = 2
PRELUDE = struct.Struct(">4sBI")  # magic b"IOTO", frame version, header length (big-endian)
TYPECODES = {"float32": "f", "int8": "b", "uint8": "B", "int32": "i", "int64": "q"}
Frame = tuple[dict[str, Any], bytes]


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return PRELUDE.pack(b"IOTO", FRAME_VERSION, len(raw)) + raw + body


def decode(payload: bytes) -> Frame:
    magic, version, hlen = PRELUDE.unpack_from(payload)
    if magic != b"IOTO" or version != FRAME_VERSION:
        raise ValueError(f"not an iotoffload v2 frame: {magic!r} v{version}")
    end = PRELUDE.size + hlen
    return json.loads(payload[PRELUDE.size : end]), payload[end:]


def wait_for(inbox: queue.Queue[Frame], want: set[str], key: str, value: str, t: float) -> Frame:
    """The next inbox frame of a type in ``want`` whose ``key`` is ``value`` (others skipped)."""
    while True:
        header, body = inbox.get(timeout=t)
        if header.get("type") in want and header.get(key) == value:
            return header, body
        if header.get("type") == "error":  # e.g. invalid_model for the announce
            print(f"edge error: {header['code']}: {header['message']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--edge", required=True, help="edge id")
    ap.add_argument("--package", required=True, type=Path, help="model package directory")
    ap.add_argument("--protocol", type=int, choices=(5, 311), default=311)
    ap.add_argument("--device-id", default="thirdparty-app")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait per answer")
    ap.add_argument("--ca-file", help="CA that signed the broker's certificate (mqtts://)")
    ap.add_argument("--cert-file", help="client certificate (its CN must be --device-id)")
    ap.add_argument("--key-file", help="the client certificate's key")
    ap.add_argument("--username", help="password from $IOTOFFLOAD_MQTT_PASSWORD")
    args = ap.parse_args()

    manifest = json.loads((args.package / "manifest.json").read_text())
    model_id, blocks, spec = manifest["model_id"], manifest["blocks"], manifest["input"]
    n = len(blocks)
    if spec["dtype"] not in TYPECODES:
        sys.exit(f"input dtype {spec['dtype']} is not handled by this example")
    url = urlparse(args.broker)
    me = args.device_id
    control = f"{PREFIX}/edges/{args.edge}/control/{me}"
    inbox_topic = f"{PREFIX}/devices/{me}/inbox/+"  # the last level: the edge that answers

    inbox: queue.Queue[Frame] = queue.Queue()
    ready: queue.Queue[str] = queue.Queue()  # "" once subscribed, else why the broker refused
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{args.device_id}-{uuid.uuid4().hex[:6]}",
        protocol=MQTTProtocolVersion.MQTTv5 if args.protocol == 5 else MQTTProtocolVersion.MQTTv311,
    )

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            ready.put(str(rc))
            return
        # Nagle off: with it on (paho's default, and MQTT.js's) a small frame waits ~40 ms
        sock = c.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.subscribe(inbox_topic, qos=1)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if not mqtt.topic_matches_sub(inbox_topic, msg.topic):  # amqtt: other retained ones
            return
        if msg.topic.rsplit("/", 1)[-1] != args.edge:  # v2: the last level is the sender
            print(f"ignored a frame from {msg.topic.rsplit('/', 1)[-1]}: not the edge asked")
            return
        try:
            inbox.put(decode(bytes(msg.payload)))
        except (ValueError, struct.error) as e:  # never let a bad frame kill paho's thread
            print(f"ignored a bad frame: {e}")

    if url.scheme in ("mqtts", "ssl"):  # hostname verification stays on
        client.tls_set(ca_certs=args.ca_file, certfile=args.cert_file, keyfile=args.key_file)
    if args.username:
        client.username_pw_set(args.username, os.environ.get("IOTOFFLOAD_MQTT_PASSWORD"))
    client.on_connect, client.on_message = on_connect, on_message
    client.on_subscribe = lambda *_: ready.put("")
    default_port = 8883 if url.scheme in ("mqtts", "ssl") else 1883
    client.connect(url.hostname or "127.0.0.1", url.port or default_port)
    client.loop_start()
    try:
        if refused := ready.get(timeout=args.timeout):
            print(f"broker refused the connection: {refused} (amqtt speaks only --protocol 311)")
            return 1
        # 1. announce the chain (the edge only runs models a device announced and uploaded)
        keys = ("onnx_sha256", "onnx_bytes", "input", "output")
        announce = {
            "type": "announce",
            "device": args.device_id,
            "model_id": model_id,
            "name": manifest["name"],
            "blocks": [{k: b[k] for k in keys} for b in blocks],
        }
        client.publish(control, encode(announce), qos=1)
        inv, _ = wait_for(inbox, {"inventory"}, "model_id", model_id, args.timeout)
        print(f"inventory: known={inv['known']} stored={inv['stored']} partial={inv['partial']}")
        missing = sorted(set(range(n)) - set(inv["stored"]))
        if missing:
            print(
                f"blocks {missing} are NOT uploaded; this client does not upload them (run "
                f"device-agent --wait-upload first): expect blocks_missing"
            )
        # 2. the whole-model query: blocks [0, n) on a synthetic input
        size, code, rng = prod(spec["shape"]), TYPECODES[spec["dtype"]], random.Random(0)
        xs = [rng.uniform(-1, 1) if code == "f" else rng.randint(0, 127) for _ in range(size)]
        rid = f"{args.device_id}-{uuid.uuid4().hex[:8]}"
        query = {
            "type": "query",
            "request_id": rid,
            "device": args.device_id,
            "model_id": model_id,
            "start": 0,
            "end": n,
            "deadline_ms": args.timeout * 1e3,
            "tensor": {"dtype": spec["dtype"], "shape": spec["shape"]},
        }
        payload = encode(query, array.array(code, xs).tobytes())
        client.publish(f"{PREFIX}/edges/{args.edge}/query/{me}", payload, qos=1)
        header, body = wait_for(inbox, {"result", "error"}, "request_id", rid, args.timeout)
    except queue.Empty:
        print(f"no answer from edge {args.edge} within {args.timeout:g} s")
        return 1
    finally:
        client.disconnect()
        client.loop_stop()
    if header["type"] == "error":
        print(f"error frame: code={header['code']} message={header['message']}")
        return 1
    out = array.array(TYPECODES[header["tensor"]["dtype"]])
    out.frombytes(body)
    labels = manifest.get("labels") or []
    print(
        f"result {header['tensor']['dtype']}{header['tensor']['shape']}: "
        f"queue {header['queue_ms']:.2f} ms, exec {header['exec_ms']:.2f} ms"
    )
    for rank, i in enumerate(sorted(range(len(out)), key=lambda i: -out[i])[:5], 1):
        label = labels[i] if i < len(labels) else f"class {i}"
        print(f"  {rank}. {label:<28} {out[i]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
