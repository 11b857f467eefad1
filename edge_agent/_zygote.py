"""The edge's fork server for its ONNX Runtime worker processes.

Started once per edge process (``python -m edge_agent._zygote FD``) with one end of a socket
pair; it imports numpy and ONNX Runtime, then forks a worker for each request: the request
carries the worker's own connection (a socket, passed as a file descriptor) and its limits,
and the answer is the worker's pid. A worker is ``_worker_main.main`` in a fork of this
process: starting one costs a fork, not a Python start-up.

Why not ``multiprocessing``'s forkserver: its children re-import the parent's main module (an
unguarded ``python -m edge_agent`` would start a second edge in every worker), and its
shared-memory tracker is one more process to outlive us. This server imports nothing of its
parent and lives exactly as long as the socket to it: when the edge dies it reads EOF and
exits; its workers, reading EOF on their own connections, exit too.

Requests are pickled tuples on the socket, each with one descriptor:
``("fork", memory_bytes, threads, providers)`` -> ``("pid", pid)`` (``providers``: the
ONNX Runtime execution providers of the worker's sessions, a tuple of names).
"""

from __future__ import annotations

import array
import os
import pickle
import signal
import socket
import struct
import sys

_LEN = struct.Struct("<I")
MAX_REQUEST = 4096


def send_request(sock: socket.socket, msg: object, fd: int) -> None:
    data = pickle.dumps(msg)
    rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))
    sock.sendmsg([_LEN.pack(len(data)) + data], [rights])


def recv_reply(sock: socket.socket) -> object:
    head = _recv_exact(sock, _LEN.size)
    (n,) = _LEN.unpack(head)
    return pickle.loads(_recv_exact(sock, n))  # from our own child, over a socketpair


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the worker server closed")
        buf += chunk
    return bytes(buf)


def _serve(sock: socket.socket) -> None:
    from multiprocessing.connection import Connection

    from edge_agent import _worker_main

    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 1)
        except OSError:
            return
        if not msg:  # the edge is gone
            return
        try:
            (n,) = _LEN.unpack_from(msg)
            op, memory_bytes, threads, providers = pickle.loads(msg[_LEN.size : _LEN.size + n])
            providers = tuple(str(p) for p in providers)
        except (struct.error, pickle.UnpicklingError, ValueError, TypeError, EOFError):
            for fd in fds:
                os.close(fd)
            continue
        if op != "fork" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _worker_main.main(Connection(fds[0]), int(memory_bytes), int(threads), providers)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(fds[0])
        data = pickle.dumps(("pid", pid))
        try:
            sock.sendall(_LEN.pack(len(data)) + data)
        except OSError:
            return


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the edge's to handle
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    fd = int(sys.argv[1])
    sock = socket.socket(fileno=fd)
    import numpy  # noqa: F401 - imported once here, shared by every fork
    import onnx  # noqa: F401 - the batched variants of blocks are made with it
    import onnxruntime  # noqa: F401

    import edge_agent._worker_main  # noqa: F401

    _serve(sock)


if __name__ == "__main__":
    main()
