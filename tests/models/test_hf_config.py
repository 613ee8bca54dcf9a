"""nextok/models/hf_config.py: sliding windows and rope settings read from config.json as transformers reads them."""

from __future__ import annotations

import pytest

from nextok.models.hf_config import layer_windows, rope_settings


@pytest.mark.parametrize("config,expected", [
    (dict(model_type="llama"), ()),
    (dict(model_type="mistral", sliding_window=4096, max_position_embeddings=32768), (4096,) * 4),
    (dict(model_type="mistral", sliding_window=4096, max_position_embeddings=4096), ()),  # covers every context
    (dict(model_type="mistral", sliding_window=None), ()),
    (dict(model_type="qwen2", sliding_window=64, use_sliding_window=False, max_window_layers=2), ()),
    (dict(model_type="qwen3", sliding_window=64, use_sliding_window=True, max_window_layers=2), (None, None, 64, 64)),
    (dict(model_type="phi3", sliding_window=2047, max_position_embeddings=4096), (2047,) * 4),
    (dict(model_type="gemma2", sliding_window=16), (16, None, 16, None)),
    (dict(model_type="gemma3_text", sliding_window=16, sliding_window_pattern=3), (16, 16, None, 16)),
    (dict(model_type="gemma3_text", sliding_window=16,
          layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"]),
     (None, 16, None, None)),
], ids=["llama", "mistral", "mistral-whole-context", "mistral-none", "qwen2-unused", "qwen3-upper-layers", "phi3",
        "gemma2", "gemma3-pattern", "layer-types"])
def test_layer_windows(config, expected):
    assert layer_windows(config, 4) == expected


def test_rope_settings_old_and_new_forms():
    assert rope_settings({"rope_theta": 5e5}) == (5e5, None)
    scaling = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}
    assert rope_settings({"rope_parameters": scaling}) == (5e5, scaling)
    per_type = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert rope_settings(per_type, "sliding_attention") == (1e4, None)
    assert rope_settings(per_type, "full_attention") == (1e6, per_type["rope_parameters"]["full_attention"])
