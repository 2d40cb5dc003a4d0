"""The state a loss object owns around the functional ops: its random stream and its tables.

`DiffusionLoss` and `FlowMatchingLoss` are thin stateful wrappers over the backends (the
functional core: ``backend.noise(x0, t, args)`` / ``backend.loss(pred, x0, t, args, reduce_mean)``
with the named arguments of speed_kernels.op_schema). What they share lives here, once:

* the Philox key from (seed, rank) and the device counter of noise calls, so a restored
  `state_dict` continues the same stream on any backend;
* the float32 table, one copy per device, updated in place (CUDA-graph safe);
* the draw check: loss() regenerates the eps of the latest noise() call, so it refuses another
  batch or a t / sigma that is not that draw's (tensor identity: no device sync, no data read).
"""
from __future__ import annotations

import torch

from .rng import fold_key


def resolve_device(device) -> torch.device:
    if type(device) is not torch.device:  # per-call host time: skip the constructor when we can
        device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class LossStream:
    """Seed, rank, Philox key, call counter, step count, per-device tables and the latest draw.

    Subclasses set ``self._host_tables`` (float32 [rows, T] on the CPU) and call
    ``_init_stream(seed, rank)`` in their constructor."""

    _draw_name = "t"  # what noise() returns beside x_t, for the draw-check messages

    def _init_stream(self, seed: int | None, rank: int) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self.rank = int(rank)
        self.k0, self.k1 = fold_key(self.seed, self.rank)
        self.step = 0  # noise calls made: the training step that dynamic strategies follow
        self._call_start = 0
        self._call: torch.Tensor | None = None
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._draw: tuple | None = None  # (x0 shape, value returned, value given) of the latest noise()

    # ----------------------------------------------------------------- device state
    def tables(self, device) -> torch.Tensor:
        """The float32 kernel table on `device` (created once, updated in place)."""
        device = resolve_device(device)
        tab = self._tables.get(device)
        if tab is None:
            tab = self._host_tables.to(device)
            self._tables[device] = tab
        return tab

    def _counter(self, device) -> torch.Tensor:
        """The device tensor holding the index of the next noise call (moves with the data)."""
        device = resolve_device(device)
        if self._call is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # a counter allocated inside a capture would be re-filled on every replay
                raise RuntimeError(
                    f"{type(self).__name__}: run one noise()/loss() step before capturing a CUDA graph "
                    "(it allocates the device counter and tables; Triton compiles its kernels)"
                )
            self._call = torch.full((1,), self._call_start, dtype=torch.int64, device=device)
        elif self._call.device != device:
            self._call = self._call.to(device)
        return self._call

    # ----------------------------------------------------------------- the draw check
    def _remember_draw(self, x0: torch.Tensor, returned: torch.Tensor, given) -> None:
        self._draw = (tuple(x0.shape), returned, given)

    def _check_draw(self, x0: torch.Tensor, value: torch.Tensor) -> None:
        """Refuse to score another batch, or a t / sigma that is not the latest draw's."""
        if self._call is None:
            raise RuntimeError("loss() regenerates the eps of the latest noise() call: call noise() first")
        if self._draw is None:
            return  # restored state: the counter is right, the draw tensors are gone
        shape, out, given = self._draw
        name = self._draw_name
        if tuple(x0.shape) != shape:
            raise ValueError(
                f"loss() scores the latest noise() draw, which was for x0 of shape {shape}; got x0 of shape "
                f"{tuple(x0.shape)} (call noise() on this batch first)"
            )
        if value is out or value is given:
            return
        ptrs = (out.data_ptr(), -1 if given is None else given.data_ptr())
        if value.data_ptr() not in ptrs:  # a view of the same storage (e.g. t.view(-1)) is the same draw
            raise ValueError(
                f"loss() scores the latest noise() draw: {name} must be the tensor that noise() returned (or was "
                f"given); this {name} is another tensor (call noise() again, or pass the returned {name})"
            )

    # ----------------------------------------------------------------- state
    def _stream_state(self) -> dict:
        call = int(self._call.item()) if self._call is not None else self._call_start
        return {"seed": self.seed, "rank": self.rank, "call": call, "step": self.step}

    def _load_stream_state(self, state: dict, required=(), expect: dict | None = None) -> None:
        """Check `state` (keys present, recorded settings equal to this object's) and restore the
        stream from it; `expect` maps a key to this object's value."""
        for key in ("seed", "call", "step", *required):
            if key not in state:
                raise ValueError(f"state_dict is missing {key!r}")
        for key, mine in (expect or {}).items():
            if key in state and state[key] != mine:
                raise ValueError(f"state_dict is for {key} {state[key]!r}, this {type(self).__name__} has {mine!r}")
        self.seed = int(state["seed"])
        self.rank = int(state.get("rank", self.rank))
        self.k0, self.k1 = fold_key(self.seed, self.rank)
        self.step = int(state["step"])
        self._call_start = int(state["call"])
        if self._call is not None:
            self._call.fill_(self._call_start)
        self._draw = None


__all__ = ["LossStream", "resolve_device"]
