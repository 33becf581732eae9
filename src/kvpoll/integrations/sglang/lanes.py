"""One request's rooms: one per lane (KV and each state component), all with one id.

Each room follows kvpoll's table on its own. The request's status, as SGLang
polls it, is the KV room's, with two rules over the state rooms (the same
rules SGLang's scheduler applies across tensor-parallel ranks):

* any room Failed: the request is Failed (the other rooms are aborted, so the
  peer hears of it);
* the KV room Success while a state room in use is not: Transferring (the
  request is not complete until its state has landed).

Neither rule can move a status back: the KV room only moves forward, and a
state room only ends the request (Failed) or holds it at Transferring before
Success.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from kvpoll.errors import KvpollError, UnknownRoom
from kvpoll.statemachine import TransferStatus

if TYPE_CHECKING:
    from kvpoll.integrations.sglang.manager import Lane

__all__ = ["LaneRooms"]

S = TransferStatus


class LaneRooms:
    """The rooms one request has on its lanes (lane 0 is KV)."""

    def __init__(self, lanes: list[Lane], room: int) -> None:
        self.lanes = lanes
        self.room = room
        self.open = [False] * len(lanes)

    def endpoint(self, lane: int) -> Any:
        return self.lanes[lane].endpoint

    def status(self, lane: int) -> TransferStatus:
        """Lane ``lane``'s room status (Failed once the room is gone)."""
        try:
            status: TransferStatus = self.endpoint(lane).poll(self.room)
        except UnknownRoom:
            return S.Failed
        return status

    def combined(self, kv: TransferStatus) -> TransferStatus:
        """The request's status, given the KV room's (see the module docstring)."""
        states = [self.status(i) for i in range(1, len(self.lanes)) if self.open[i]]
        if kv is S.Failed or S.Failed in states:
            return S.Failed
        if kv is S.Success and any(s is not S.Success for s in states):
            return S.Transferring
        return kv

    def failure(self) -> str | None:
        """The reason of the first failed room, naming its lane."""
        for i, lane in enumerate(self.lanes):
            if not self.open[i]:
                continue
            try:
                info = self.endpoint(i).info(self.room)
            except UnknownRoom:
                continue
            if info.status is S.Failed and info.reason:
                return info.reason if i == 0 else f"{lane.name}: {info.reason}"
        return None

    def abort(self, reason: str) -> None:
        """Fail every unfinished room (each tells its peer)."""
        for i in range(len(self.lanes)):
            if self.open[i]:
                with contextlib.suppress(KvpollError):
                    if not self.endpoint(i).poll(self.room).is_final:
                        self.endpoint(i).abort(self.room, reason)

    def remove(self, lane: int | None = None) -> None:
        """Forget the room on ``lane`` (every lane when None)."""
        for i in range(len(self.lanes)) if lane is None else (lane,):
            if self.open[i]:
                self.open[i] = False
                with contextlib.suppress(KvpollError):
                    self.endpoint(i).remove(self.room)

    def totals(self) -> tuple[int, float | None, float | None]:
        """Bytes moved over every lane, the KV room's bootstrap and transfer time."""
        moved, bootstrap, transfer = 0, None, None
        for i in range(len(self.lanes)):
            if not self.open[i]:
                continue
            try:
                metrics = self.endpoint(i).info(self.room).metrics
            except UnknownRoom:
                continue
            moved += metrics.bytes_moved
            if i == 0:
                bootstrap, transfer = metrics.bootstrap_s, metrics.transfer_s
        return moved, bootstrap, transfer
