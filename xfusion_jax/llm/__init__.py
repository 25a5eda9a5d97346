"""Frozen pretrained LLMs from Hugging Face checkpoints, in Flax."""

from xfusion_jax.llm.api import FrozenLM
from xfusion_jax.llm.api import from_pretrained
from xfusion_jax.llm.api import save_pretrained
from xfusion_jax.llm.config import LMConfig
from xfusion_jax.llm.config import load_config
from xfusion_jax.llm.model import CausalLM
from xfusion_jax.llm.model import FROZEN

__all__ = [
    "CausalLM",
    "FROZEN",
    "FrozenLM",
    "LMConfig",
    "from_pretrained",
    "load_config",
    "save_pretrained",
]
