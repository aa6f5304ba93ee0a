"""softprompt: soft-prompt fine-tuning for frozen Hugging Face transformers models.

model = softprompt.attach(base, softprompt.PrefixTuningConfig(num_virtual_tokens=10))
... train model.parameters_to_train() ...
model.save_adapter("my-adapter")
model = softprompt.load_adapter(base, "my-adapter")
"""

__version__ = "0.1.0"

from .errors import SoftPromptError  # noqa: E402
from .io import save_adapter  # noqa: E402
from .methods import (  # noqa: E402
    AdapterConfig,
    AdaptionPromptConfig,
    DeepPromptConfig,
    MultitaskPromptConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
)
from .model import SoftPromptModel, attach, load_adapter  # noqa: E402

__all__ = [
    "AdapterConfig",
    "AdaptionPromptConfig",
    "DeepPromptConfig",
    "MultitaskPromptConfig",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "SoftPromptError",
    "SoftPromptModel",
    "attach",
    "load_adapter",
    "save_adapter",
]
