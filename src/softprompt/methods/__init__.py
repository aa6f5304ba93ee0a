"""Soft-prompt methods, one module each, registered by name in ``base.METHODS``."""

from .adaption_prompt import AdaptionPromptConfig
from .base import METHODS, Adapter, AdapterConfig
from .cartridge import CartridgeConfig
from .deep_prompt import DeepPromptConfig
from .multitask_prompt import MultitaskPromptConfig
from .p_tuning import PTuningConfig
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig

__all__ = [
    "METHODS",
    "Adapter",
    "AdapterConfig",
    "AdaptionPromptConfig",
    "CartridgeConfig",
    "DeepPromptConfig",
    "MultitaskPromptConfig",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
]
