"""The bootstrap server: SGLang's HTTP registry, plus each rank's kvpoll address.

Prefill ranks ``PUT /route`` their parallel layout as with every SGLang
backend, and the kvpoll backend adds ``kvpoll_address`` (where the rank's
:class:`~kvpoll.Sender` is reached) and ``kvpoll_state_addresses`` (one per
state component). A decode rank's ``GET /route`` for one prefill rank returns
them beside ``rank_ip`` and ``rank_port``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from sglang.srt.disaggregation.common.conn import CommonKVBootstrapServer

__all__ = ["MAX_ADDRESS", "MAX_STATE_ADDRESSES", "KvpollKVBootstrapServer"]

MAX_ADDRESS = 1024
"""The longest kvpoll address a rank may register (characters)."""
MAX_STATE_ADDRESSES = 16


def _address(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ADDRESS


def _key(data: Any) -> tuple[int, int, int, int]:
    """(dp group, cp rank, tp rank, pp rank) of a registration, as SGLang files it."""
    system_dp = int(data["system_dp_size"])
    dp_group = int(data["attn_dp_rank"]) if system_dp == 1 else int(data["system_dp_rank"])
    return dp_group, int(data["attn_cp_rank"]), int(data["attn_tp_rank"]), int(data["pp_rank"])


class KvpollKVBootstrapServer(CommonKVBootstrapServer):  # type: ignore[misc]
    """SGLang's bootstrap server, keeping each prefill rank's kvpoll address."""

    def __init__(self, host: str, port: int, **kwargs: Any) -> None:
        self.kvpoll_addresses: dict[tuple[int, int, int, int], dict[str, Any]] = {}
        super().__init__(host, port, **kwargs)

    async def _handle_route_put(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            key = _key(data)
            address = data.get("kvpoll_address")
            states = data.get("kvpoll_state_addresses", [])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return web.Response(text=f"malformed registration: {exc}", status=400)
        if (
            not isinstance(states, list)
            or len(states) > MAX_STATE_ADDRESSES
            or not all(_address(a) for a in states)
        ):
            return web.Response(
                text=f"kvpoll_state_addresses must be a list of at most {MAX_STATE_ADDRESSES} "
                "addresses",
                status=400,
            )
        if not _address(address):
            return web.Response(
                text="a kvpoll prefill rank registers its kvpoll_address (a string of "
                f"1 to {MAX_ADDRESS} characters); is the prefill server running another "
                "transfer backend?",
                status=400,
            )
        response: web.Response = await super()._handle_route_put(request)
        if response.status == 200:
            async with self.lock:
                self.kvpoll_addresses[key] = {
                    "kvpoll_address": address,
                    "kvpoll_state_addresses": list(states),
                }
        return response

    async def _handle_route_get(self, request: web.Request) -> web.Response:
        response: web.Response = await super()._handle_route_get(request)
        query = request.query
        try:
            key = tuple(
                int(query[name])
                for name in (
                    "prefill_dp_rank",
                    "prefill_cp_rank",
                    "target_tp_rank",
                    "target_pp_rank",
                )
            )
        except (KeyError, ValueError):
            return response
        if response.status != 200 or key == (-1, -1, -1, -1) or response.text is None:
            return response
        async with self.lock:
            kvpoll = self.kvpoll_addresses.get(key)  # type: ignore[arg-type]
        if kvpoll is None:
            return response
        body = json.loads(response.text)
        body.update(kvpoll)
        return web.json_response(body, status=200)
