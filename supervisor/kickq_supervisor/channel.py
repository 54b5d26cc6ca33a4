"""A worker's own Redis connection for its script calls, where a call need not wait for its reply.

A run's outcome is sent the moment its handler returns (so a dead node re-runs nothing that had
finished), but the worker goes on with its next job instead of waiting for Redis to answer: the
replies are read later, in order, by `settle`.
Redis runs the calls of one connection in the order they were sent.

With wait_replicas > 0 (`acks`), `settle` sends one WAIT after the calls in flight: Redis then
counts the replicas that hold everything this connection wrote (kickq.acks).
"""
from __future__ import annotations

from typing import Any

import redis

from kickq import acks, scripts
from kickq.connection import checkout, hiredis_packs, packed
from kickq.errors import KickqError


class Channel:
    def __init__(self, client: redis.Redis, wanted: acks.Acks | None = None) -> None:
        self.client = client
        self.acks = wanted
        self.scripts = scripts.Scripts(client)  # FCALL or EVALSHA, and loading them again
        self.conn: Any = None
        self.by_hiredis = hiredis_packs(client)  # see kickq.connection.packed
        # per call sent and not settled: (script name, (keys, args)), or ("", command args)
        self.sent: list[tuple[str, Any]] = []

    def _connection(self) -> Any:
        if self.conn is None:
            self.conn = checkout(self.client.connection_pool)
        elif not self.sent:
            # Nothing in flight: a connection that follows a master (Sentinel, a Cluster slot)
            # moves now if its route names another node; else nothing to do.
            self.conn.connect()
        return self.conn

    def _send(self, name: str, keys_and_args: tuple[list[str], list[Any]]) -> None:
        keys, args = keys_and_args
        conn = self._connection()
        command = scripts.command(name, keys, args, self.scripts.functions)
        conn.send_packed_command(packed(conn, [command], self.by_hiredis))

    def send(self, name: str, keys_and_args: tuple[list[str], list[Any]]) -> None:
        """Send a script call; its reply comes with the next `settle`."""
        try:
            self._send(name, keys_and_args)
        except BaseException:
            self.reset()
            raise
        self.sent.append((name, keys_and_args))

    def send_commands(self, *commands: tuple[Any, ...]) -> None:
        """Send plain commands in one write; their replies come with the next `settle`."""
        try:
            conn = self._connection()
            conn.send_packed_command(packed(conn, commands, self.by_hiredis))
        except BaseException:
            self.reset()
            raise
        self.sent += [("", args) for args in commands]

    def settle(self) -> list[Any]:
        """The replies of every call sent and not yet settled, in order. A reply that is an error
        is returned as the exception (a NOSCRIPT is mended by sending that call again). On a
        connection error the connection is dropped and the error raised: the calls in flight
        may or may not have run (the scripts' tokens make a repeat harmless).

        With `acks`, when fewer replicas than wanted confirm, every reply is read and then
        ReplicationTimeout raised: the calls ran on the master, unconfirmed. The connection is
        kept, so that the next WAIT on it still counts what they wrote."""
        replies = []
        shortfall: KickqError | None = None
        waiting = self.acks is not None and bool(self.sent)
        try:
            if waiting:
                assert self.acks is not None
                self.conn.send_packed_command(packed(self.conn, acks.after(self.acks), self.by_hiredis))
            while self.sent:
                name, keys_and_args = self.sent[0]
                try:
                    replies.append(self.conn.read_response())
                except redis.exceptions.ResponseError as exc:
                    if not (name and scripts.is_unloaded(exc)):
                        replies.append(exc)
                    elif self.acks is None:  # Redis lost its scripts (a restart, a flush): load, run again
                        replies.append(self.scripts.load_and_run(name, keys_and_args, exc))
                    else:  # ... on another connection, whose own WAIT confirms it
                        (reply,), waited = acks.run(self.client, self.scripts, [(name, keys_and_args)],
                                                    self.acks, failed=exc)
                        replies.append(reply)
                        shortfall = shortfall or self._shortfall(waited)
                self.sent.pop(0)
            if waiting:
                after = []
                for _ in range(2):  # the WAIT's reply, ROLE's
                    try:
                        after.append(self.conn.read_response())
                    except redis.exceptions.ResponseError as exc:
                        after.append(exc)
                shortfall = self._shortfall(acks.Waited(*after)) or shortfall
        except BaseException:
            self.reset()
            raise
        if shortfall is not None:
            raise shortfall
        return replies

    def _shortfall(self, waited: Any) -> KickqError | None:
        """What acks.confirm raises for the WAIT's reply `waited` (a KickqError), or None when it
        confirms."""
        assert self.acks is not None
        try:
            acks.confirm(self.acks, waited, "a worker's saves", [], acks.where(self.client.connection_pool,
                                                                              self.conn))
        except KickqError as exc:
            return exc
        except redis.exceptions.ResponseError as exc:
            return KickqError(f"a worker's saves: Redis refused the WAIT after them ({exc})")
        return None

    def reset(self) -> None:
        """Drop the connection (after an error, or at exit): unsettled calls are forgotten."""
        self.sent.clear()
        if self.conn is not None:
            try:
                self.conn.disconnect()
            finally:
                try:
                    self.client.connection_pool.release(self.conn)
                except Exception:  # a pool reset in between; the connection is closed anyway
                    pass
                self.conn = None
