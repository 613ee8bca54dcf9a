"""What several model families read alike from a Hugging Face config.json: rope parameters, and which
layers attend through a sliding window.

transformers >= 5 writes rope settings under `rope_parameters` (for Gemma 3: one entry per layer type)
and every layer's type under `layer_types`; older files use `rope_theta`, `rope_scaling` and the
per-family window rules below. Both forms read the same here.
"""

from __future__ import annotations

from typing import Any

# model_type -> the layer types transformers derives when config.json has no `layer_types`
_SLIDING_BY_DEFAULT = {
    "qwen2": lambda cfg, i: i >= cfg.get("max_window_layers", 28),
    "qwen3": lambda cfg, i: i >= cfg.get("max_window_layers", 28),
    "gemma2": lambda cfg, i: (i + 1) % 2 != 0,
    "gemma3_text": lambda cfg, i: (i + 1) % cfg.get("sliding_window_pattern", 6) != 0,
}


def layer_windows(cfg: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: the layer attends to the whole context), or () when no layer
    has one. A window is the number of positions a token sees, itself included (transformers' mask:
    key position > query position - window). A window that covers max_position_embeddings is none."""
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:  # Qwen keep a window they do not use
        return ()
    if window >= cfg.get("max_position_embeddings", float("inf")):
        return ()
    windows = tuple(int(window) if s else None for s in sliding_layers(cfg, num_layers))
    return windows if any(w is not None for w in windows) else ()


def sliding_layers(cfg: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    """Which layers are of the sliding-window type (`layer_types`, else the family's rule), whatever
    the window's size: Gemma 3 gives those layers their own rope base."""
    types = cfg.get("layer_types")
    if types is None:
        rule = _SLIDING_BY_DEFAULT.get(cfg.get("model_type"), lambda cfg, i: True)  # Mistral, Phi-3: every layer
        return tuple(rule(cfg, i) for i in range(num_layers))
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for num_hidden_layers={num_layers}")
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"layer_types {sorted(unknown)} are not supported; "
                         f"supported: 'sliding_attention', 'full_attention'")
    return tuple(t == "sliding_attention" for t in types)


def rope_settings(cfg: dict[str, Any], layer_type: str | None = None) -> tuple[float | None, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) of a config, or of one layer type's entry where rope_parameters has one
    per layer type (Gemma 3); rope_scaling is None for plain rope."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
        theta, scaling = params.get("rope_theta"), None
    else:
        theta, scaling = cfg.get("rope_theta"), cfg.get("rope_scaling")
    if isinstance(params, dict):  # transformers >= 5 keeps theta and scaling here
        theta = theta or params.get("rope_theta")
        if scaling is None and params.get("rope_type", "default") != "default":
            scaling = params
    return (float(theta) if theta is not None else None), scaling


def partial_rotary_factor(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters")
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    return float(factor if factor is not None else cfg.get("partial_rotary_factor", 1.0))
