"""nextok: exact, fast text generation with causal language models."""

from nextok.outputs import Completion, RequestOutput
from nextok.params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "Completion"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it on first use so `nextok --help` stays quick.
    if name == "LLM":
        from nextok.llm import LLM

        return LLM
    raise AttributeError(f"module 'nextok' has no attribute {name!r}")
