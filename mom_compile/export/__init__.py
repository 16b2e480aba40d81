"""Deployment artefacts of MoM models: ONNX graphs (standard ops, or with each decode step's memory
updates as the nodes of two TensorRT plugins), TensorRT engines, torch-free generators over
onnxruntime and TensorRT, and torch.export packages.

Command line: `python -m mom_compile.export --help`. Modules: onnx_ops (the custom-op
translations), onnx_export (graphs -> .onnx), plugin (the plugin nodes' ONNX schemas),
tensorrt_plugin (the TensorRT plugins and their AOT kernels), tensorrt_engine (engines),
manifest (model.json), verify (onnxruntime vs PyTorch), runtime (generation without torch),
tensorrt_runtime (generation with the engines), pt2.
Nothing is imported here, so `import mom_compile` never needs onnx.
"""
