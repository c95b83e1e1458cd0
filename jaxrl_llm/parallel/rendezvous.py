"""The bounded start-up handshake of a multi-process job: before JAX's own (which aborts the process with an
opaque message when a peer is missing), the processes meet on a small TCP rendezvous, and each fails with a
one-line `DistributedError` naming the coordinator and the missing or misconfigured process ids."""

from __future__ import annotations

import socket
import time

ENV_RENDEZVOUS_PORT = "JAXRL_RENDEZVOUS_PORT"
_REPLY_GRACE_S = 10.0  # a non-zero process waits this much longer than process 0 for its verdict


class DistributedError(RuntimeError):
    """Multi-process start-up failed or is misconfigured; the message is one line naming the setting/peer."""


def rendezvous(host: str, port: int, num_processes: int, process_id: int, timeout_s: float,
               coordinator: str) -> None:
    """All `num_processes` processes meet (TCP on host:port) or each fails with a one-line DistributedError
    within `timeout_s` (process 0) or `timeout_s` + a short grace (the others)."""
    deadline = time.monotonic() + timeout_s
    if process_id == 0:
        _serve(port, num_processes, deadline, timeout_s, coordinator)
    else:
        _join(host, port, num_processes, process_id, deadline, timeout_s, coordinator)


def _serve(port: int, n: int, deadline: float, timeout_s: float, coordinator: str) -> None:
    try:
        srv = _listen(port)
    except OSError as e:
        raise DistributedError(f"process 0 cannot listen on the rendezvous port {port} (coordinator {coordinator} "
                               f"port + 1; set {ENV_RENDEZVOUS_PORT}): {e}") from e
    peers: dict[int, socket.socket] = {}
    problems: list[str] = []
    try:
        srv.settimeout(0.2)
        while len(peers) < n - 1 and time.monotonic() < deadline:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.settimeout(max(0.5, deadline - time.monotonic()))
            try:
                words = _readline(conn).split()
            except OSError:
                conn.close()
                continue
            if len(words) != 3 or words[0] != "jaxrl" or not (words[1].isdigit() and words[2].isdigit()):
                conn.close()  # not one of ours (a port scanner, a stale job): ignore
                continue
            pid, their_n = int(words[1]), int(words[2])
            if their_n != n or not 0 < pid < n or pid in peers:
                why = (f"process {pid} says num_processes={their_n}, process 0 has {n}" if their_n != n else
                       f"process id {pid} is out of range [1, {n})" if not 0 < pid < n else
                       f"process id {pid} connected twice")
                problems.append(why)
                _send(conn, f"fail coordinator {coordinator}: {why}")
                conn.close()
                continue
            peers[pid] = conn
        missing = sorted(set(range(1, n)) - set(peers))
        if problems or missing:
            head = (f"coordinator {coordinator}: {n - len(missing)} of {n} processes started within "
                    f"{timeout_s:g}s; {len(missing)} missing (process ids {_ids(missing)})") if missing else \
                f"coordinator {coordinator}: bad peers"
            msg = "; ".join([head, *problems])
            for conn in peers.values():
                _send(conn, f"fail {msg}")
            raise DistributedError(msg)
        for conn in peers.values():
            _send(conn, "ok")
    finally:
        for conn in peers.values():
            conn.close()
        srv.close()


def _listen(port: int) -> socket.socket:
    """A server socket on every address of this host, IPv6 and IPv4 where the host has both (as JAX's coordinator
    binds [::]:port): a coordinator given as [v6]:port or a host name that resolves to IPv6 only reaches it too."""
    if socket.has_dualstack_ipv6():
        try:
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        except OSError:  # IPv6 turned off on this host: IPv4 only
            pass
    return socket.create_server(("", port))


def _join(host: str, port: int, n: int, pid: int, deadline: float, timeout_s: float, coordinator: str) -> None:
    conn = None
    while conn is None:
        try:
            conn = socket.create_connection((host, port), timeout=max(0.2, min(2.0, deadline - time.monotonic())))
        except OSError:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"process {pid} of {n}: could not reach the coordinator {coordinator} (process 0, rendezvous "
                    f"port {port}) within {timeout_s:g}s; 1 of {n} processes (id 0) missing or unreachable"
                ) from None
            time.sleep(0.2)
    try:
        conn.settimeout(max(0.5, deadline - time.monotonic()) + _REPLY_GRACE_S)
        _send(conn, f"jaxrl {pid} {n}")
        reply = _readline(conn)
    except OSError as e:
        raise DistributedError(f"process {pid} of {n}: no answer from the coordinator {coordinator} within "
                               f"{timeout_s:g}s: {e}") from None
    finally:
        conn.close()
    if reply == "ok":
        return
    if reply.startswith("fail "):
        raise DistributedError(f"process {pid}: {reply[5:]}")
    raise DistributedError(f"process {pid} of {n}: the coordinator {coordinator} closed the rendezvous "
                           "without an answer (process 0 exited?)")


def _send(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall((line + "\n").encode())
    except OSError:
        pass


def _readline(conn: socket.socket, limit: int = 4096) -> str:
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        chunk = conn.recv(limit)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def _ids(ids: list[int], show: int = 16) -> str:
    return ", ".join(map(str, ids[:show])) + (f", ... ({len(ids) - show} more)" if len(ids) > show else "")
