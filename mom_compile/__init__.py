"""mom_compile: Mixture-of-Memories linear sequence models, compiled and exportable.

    from mom_compile import MomConfig, MomForCausalLM
    model = MomForCausalLM.from_pretrained("path/to/mom-checkpoint")
    ids = model.generate(input_ids, max_new_tokens=32)
"""
from . import ops
from .graphs import MomCache, MomCausalLMOutput, MomConfig, MomForCausalLM, MomLayer, MomModel

__all__ = ["MomCache", "MomCausalLMOutput", "MomConfig", "MomForCausalLM", "MomLayer", "MomModel",
           "ops"]
__version__ = "0.1.0"
