"""DeepSeekMoE: fine-grained expert segmentation and shared-expert isolation (Dai et al. 2024)."""

__version__ = "0.1.0"

from .config import DeepseekMoEConfig  # noqa: E402
from .model import CausalLMOutput, DeepseekForCausalLM  # noqa: E402
from .presets import get_config, preset_names  # noqa: E402

__all__ = ["CausalLMOutput", "DeepseekForCausalLM", "DeepseekMoEConfig", "get_config", "preset_names"]
