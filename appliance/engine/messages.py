"""The typed messages between the front end (`AsyncEngine`) and the engine core's process.

One module of wire types, nothing hand-copied: `msgspec` structs, encoded as MessagePack,
array-like (no field names on the wire). `SamplingParams` travels as the dataclass it is, so its
fields must stay plain data. The in-process client passes the same objects without encoding.

Front end → core: `AddRequest`, `AbortRequests`, `Shutdown`.
Core → front end: `Progress` (while loading), `Ready`, then one `StepOutputs` per engine step
(deltas, rejections, statistics), and `Failure` if the core dies with a Python exception (a
killed process just closes its end: the front end reads EOF).
"""

from __future__ import annotations

from typing import Any

import msgspec

from appliance import errors
from appliance.engine.outputs import EngineStats, RequestDelta
from appliance.engine.sequence import SamplingParams


class AddRequest(msgspec.Struct, tag=True, array_like=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float  # time.monotonic(): CLOCK_MONOTONIC is one clock for the whole machine


class AbortRequests(msgspec.Struct, tag=True, array_like=True, gc=False):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, array_like=True, gc=False):
    pass


class WireError(msgspec.Struct, array_like=True, gc=False):
    """A typed error (appliance.errors) by class name, so the front end raises the same class."""

    type_name: str
    message: str
    param: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, exc: BaseException) -> WireError:
        return cls(type(exc).__name__, getattr(exc, "message", None) or str(exc), getattr(exc, "param", None),
                   getattr(exc, "code", None))

    def to_exception(self) -> BaseException:
        error_cls: Any = getattr(errors, self.type_name, None)
        if isinstance(error_cls, type) and issubclass(error_cls, errors.ApplianceError):
            return error_cls(self.message, param=self.param, code=self.code)
        return errors.EngineDeadError(f"{self.type_name}: {self.message}")


class Progress(msgspec.Struct, tag=True, array_like=True, gc=False):
    status: str  # "warming up <model>": for systemd's STATUS= while loading


class Ready(msgspec.Struct, tag=True, array_like=True, gc=False):
    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer_path: str | None
    stats: EngineStats


class StepOutputs(msgspec.Struct, tag=True, array_like=True, gc=False):
    outputs: list[RequestDelta]
    rejected: list[tuple[str, WireError]]  # requests the core refused on add_request
    stats: EngineStats | None  # None: unchanged since the last message
    busy: bool  # the core has work left (it steps again without a new command)


class Failure(msgspec.Struct, tag=True, array_like=True, gc=False):
    error: WireError


ToCore = AddRequest | AbortRequests | Shutdown
FromCore = Progress | Ready | StepOutputs | Failure
