"""nextok/models/registry.py: which architectures build, and the configs refused with a reason."""

from __future__ import annotations

import pytest

from nextok.models.registry import ARCHITECTURES, build_model

PHI3 = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=32, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)


def test_an_unsupported_architecture_is_one_line_naming_it_and_the_supported_ones():
    with pytest.raises(ValueError) as info:
        build_model({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}, {})
    message = str(info.value)
    assert "\n" not in message and "FalconForCausalLM" in message
    assert all(name in message for name in ARCHITECTURES)
    for name in ("Qwen3ForCausalLM", "Phi3ForCausalLM", "MistralForCausalLM"):
        assert name in ARCHITECTURES


@pytest.mark.parametrize("config,fragment", [
    (dict(PHI3, rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}), "longrope"),
    (dict(PHI3, rope_scaling={"type": "su", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}), "'su'"),
    (dict(PHI3, partial_rotary_factor=0.75), "partial_rotary_factor=0.75"),
    (dict(PHI3, sliding_window=8, layer_types=["chunked_attention"]), "chunked_attention"),
], ids=["phi3-longrope", "phi3-su", "partial-rotary", "unknown-layer-type"])
def test_configs_nextok_cannot_compute_are_refused(config, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_model(config, {})
