"""mom_compile: Mixture-of-Memories linear sequence models, compiled and exportable.

    from mom_compile import MomConfig, MomForCausalLM
    model = MomForCausalLM.from_pretrained("path/to/mom-checkpoint")
    ids = model.generate(input_ids, max_new_tokens=32)

Importing the package registers the `mom` custom ops (torch.export programs that contain them load
after `import mom_compile`). Without torch installed only the torch-free ONNX runtime,
`mom_compile.export.runtime`, is importable.
"""
__version__ = "0.1.0"

try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    from . import ops
    from .graphs import MomCache, MomCausalLMOutput, MomConfig, MomForCausalLM, MomLayer, MomModel

    __all__ = ["MomCache", "MomCausalLMOutput", "MomConfig", "MomForCausalLM", "MomLayer", "MomModel",
               "ops"]
