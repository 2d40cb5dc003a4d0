"""The strategy list of a comparison: ``uniform,speed:k=5,lam=0.6,speed+p2`` parsed and checked.

Each entry is a registered strategy name (``speed_kernels.strategies.names()``, or with
``objective="flow"`` a ``speed_kernels.flow_strategies`` name), optionally followed by
``:key=value`` parameters separated by commas, or ``sampling+weighting`` for a combination; a
``key=value`` token belongs to the strategy before it. Every strategy is built once here, so an
unknown name or parameter fails before any training.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["parse_strategies"]


def parse_strategies(spec: str | Sequence[str], params: Sequence[str] | None = None,
                     objective: str = "diffusion") -> list[tuple[str, str, dict]]:
    """``"uniform,speed:k=5,lam=0.6,speed+p2"`` -> [(label, name, params), ...].

    The grammar of ``analyze --strategy`` (NAME:KEY=VALUE,...) in one comma-separated list: a
    KEY=VALUE token after a strategy belongs to it. ``params`` are ``--param [STRATEGY:]KEY=VALUE``
    items, routed by speed_kernels.analysis.parse_params (to the strategies that have KEY). Each
    strategy is checked against ``speed_kernels.strategies`` (unknown name or parameter ->
    ValueError naming the known ones). Labels are unique.

    ``objective="flow"``: names are flow strategies (``speed_kernels.flow_strategies``); ``params``
    are routed as ``train --objective flow`` does (an unprefixed item goes to every strategy, e.g.
    ``shift=3``) and each strategy is built once to check its name and parameters."""
    from speed_kernels import flow_strategies, strategies
    from speed_kernels.analysis import parse_params, parse_strategy_spec, route_params_unchecked, split_key_value

    builders = {"diffusion": strategies.get, "flow": flow_strategies.get}
    if objective not in builders:
        raise ValueError(f"objective must be diffusion or flow, got {objective!r}")

    tokens = spec.split(",") if isinstance(spec, str) else [t for s in spec for t in str(s).split(",")]
    entries: list[list] = []
    for raw in tokens:
        tok = raw.strip()
        if not tok:
            continue
        if ":" in tok or "=" not in tok:
            entries.append(list(parse_strategy_spec(tok)))
            continue
        if not entries:
            raise ValueError(f"strategy parameter {tok!r} comes before any strategy name")
        target, key, val = split_key_value(tok, option="strategy parameter")
        if target:
            raise ValueError(f"strategy parameter must be key=value, got {tok!r}")
        entries[-1][1][key] = val
    if not entries:
        raise ValueError("--strategies is empty")
    route = route_params_unchecked if objective == "flow" else parse_params
    routed = route(params or [], list(dict.fromkeys(name for name, _ in entries)))
    build = builders[objective]
    out, seen = [], set()
    for name, own in entries:
        p = {**routed[name], **own}
        build(name, **p)  # validates name and parameters now, before any training
        label = name + (":" + ",".join(f"{k}={v}" for k, v in p.items()) if p else "")
        if label in seen:
            raise ValueError(f"strategy {label!r} is listed twice")
        seen.add(label)
        out.append((label, name, p))
    return out
