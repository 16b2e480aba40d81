"""Deployment artefacts of MoM models: ONNX graphs (standard ops, or a mom::MemoryStep plugin
node), a torch-free onnxruntime generator, and torch.export packages.

Command line: `python -m mom_compile.export --help`. Modules: onnx_ops (the custom-op
translations), onnx_export (graphs -> .onnx), plugin (the MemoryStep schema), manifest
(model.json), verify (onnxruntime vs PyTorch), runtime (generation without torch), pt2.
Nothing is imported here, so `import mom_compile` never needs onnx.
"""
