"""nn.Modules built from the `mom` ops and stock torch: the layer, model, cache and generation."""
from .cache import LayerState, MomCache
from .config import MomConfig
from .layer import MomLayer
from .model import MomBlock, MomCausalLMOutput, MomForCausalLM, MomModel

__all__ = ["LayerState", "MomBlock", "MomCache", "MomCausalLMOutput", "MomConfig", "MomForCausalLM",
           "MomLayer", "MomModel"]
