"""The HAProxy agent-check port: HAProxy connects, reads one line, and sets this box's state,
weight and connection limit from it (HAProxy 2.6 configuration manual, "agent-check").

The line, from the daemon's phase and load (read through the control socket's `Controlled`
interface, so HAProxy, `ctl status` and the dashboard see the same figures):

    loading, stopping     "maint"                     out of the farm, HAProxy pauses checks
    engine stalled, dead  "down #engine stalled"      as a failed health check, sooner
    draining              "up drain maxconn:M"        no new requests; those in flight finish
    ready                 "up ready W% maxconn:M"     W from the load, M from max_num_seqs

NOTE: HAProxy keeps what an agent said until the agent says otherwise ("only the agent may
revert its own actions"), so every reply states the phase word and "up" in full; a restarted
daemon undoes whatever the previous process announced.

The server answers every connection at once and never reads: HAProxy sends nothing unless
`agent-send` is configured, and a check must not wait on a slow peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from appliance.config import AppConfig
from appliance.server.control import Controlled

log = logging.getLogger(__name__)

# Below this load a box keeps its full weight. NOTE: with consistent hashing a weight change
# moves some prefixes to another box (and their cached KV blocks stay behind), so a box with
# room keeps its prefixes; only a box filling up sheds new ones.
FULL_WEIGHT_BELOW_LOAD = 0.5
MIN_WEIGHT_PERCENT = 10  # a full box still takes a trickle; 0% would read as a drain in HAProxy
WEIGHT_STEP_PERCENT = 10  # coarse steps: the hash ring is not rebuilt for every small change
_WRITE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class BoxState:
    """What the agent reports on, sampled once per check."""

    phase: str  # appliance.server.state.PHASES
    engine_ok: bool  # the engine exists, is alive and makes progress
    kv_cache_usage: float  # 0..1 of the KV blocks held by live sequences
    num_waiting: int  # requests the engine has not scheduled yet
    max_num_seqs: int


def box_load(state: BoxState) -> float:
    """0..1: the larger of KV-cache usage and the waiting queue measured in batches."""
    waiting = min(1.0, state.num_waiting / max(1, state.max_num_seqs))
    return max(0.0, min(1.0, max(state.kv_cache_usage, waiting)))


def weight_percent(load: float) -> int:
    """100 up to FULL_WEIGHT_BELOW_LOAD, then down linearly to MIN_WEIGHT_PERCENT at a full box,
    in steps of WEIGHT_STEP_PERCENT."""
    if load <= FULL_WEIGHT_BELOW_LOAD:
        return 100
    over = (load - FULL_WEIGHT_BELOW_LOAD) / (1.0 - FULL_WEIGHT_BELOW_LOAD)
    percent = 100 - over * (100 - MIN_WEIGHT_PERCENT)
    stepped = int(round(percent / WEIGHT_STEP_PERCENT)) * WEIGHT_STEP_PERCENT
    return max(MIN_WEIGHT_PERCENT, min(100, stepped))


def max_connections(max_num_seqs: int, load_balancers: int) -> int:
    """Connections one HAProxy may open to this box: one batch shared by all balancers."""
    return max(1, max_num_seqs // max(1, load_balancers))


def agent_reply(state: BoxState, load_balancers: int = 1) -> str:
    """The agent's one line (without the newline). See the module docstring."""
    if state.phase in ("loading", "stopping"):
        return "maint"
    if not state.engine_ok:
        return "down #engine stalled"  # NOTE: "#" must start a word of its own
    maxconn = f"maxconn:{max_connections(state.max_num_seqs, load_balancers)}"
    if state.phase == "draining":
        return f"up drain {maxconn}"
    return f"up ready {weight_percent(box_load(state))}% {maxconn}"


def read_box_state(daemon: Controlled, max_num_seqs: int) -> BoxState:
    """Sample the daemon through the same interface the control socket reads."""
    engine = daemon.engine
    if engine is None:
        return BoxState(daemon.state.phase, False, 0.0, 0, max_num_seqs)
    stats = engine.stats()
    return BoxState(daemon.state.phase, daemon.engine_progressing(), stats.kv_cache_usage, stats.num_waiting,
                    max_num_seqs)


class AgentCheckServer:
    """Serves `agent_reply` on [fleet] host:port. `start()` binds (OSError when the port is taken),
    `stop()` closes the listener and waits for open replies."""

    def __init__(self, daemon: Controlled, config: AppConfig) -> None:
        self.daemon = daemon
        self.host = config.fleet.host or config.server.host
        self.port = config.fleet.port
        self.load_balancers = config.fleet.load_balancers
        self.max_num_seqs = config.engine.scheduler.max_num_seqs
        self._server: asyncio.Server | None = None
        self._last_state: list[str] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._answer, self.host, self.port)
        log.info("HAProxy agent check on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), _WRITE_TIMEOUT_S)
            self._server = None

    def reply(self) -> str:
        line = agent_reply(read_box_state(self.daemon, self.max_num_seqs), self.load_balancers)
        # Log when the state words change (maint, down, up ready, up drain), not every weight.
        state = line.split(" ")[:2] if line.startswith("up ") else [line]
        if state != self._last_state:
            log.info("agent check now answers %r", line)
            self._last_state = state
        return line

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(f"{self.reply()}\n".encode("ascii"))
            await asyncio.wait_for(writer.drain(), _WRITE_TIMEOUT_S)
        except (ConnectionError, TimeoutError):
            pass  # the checker went away; it will ask again
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), _WRITE_TIMEOUT_S)


async def start_agent_check(daemon: Controlled, config: AppConfig) -> AgentCheckServer | None:
    """The daemon's hook: the running server when [fleet] is enabled, else None. A port that
    cannot be bound is logged as an error and the box serves without it (as without a control
    socket): HAProxy's health check still sees it, and a drained box's 503s are retried elsewhere."""
    if not config.fleet.enabled:
        return None
    server = AgentCheckServer(daemon, config)
    try:
        await server.start()
    except OSError as e:
        log.error("no HAProxy agent check on %s:%d: %s", server.host, server.port, e)
        return None
    return server
