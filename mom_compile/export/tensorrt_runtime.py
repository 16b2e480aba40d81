"""Generation with the TensorRT engines of an export folder (`--tensorrt OUT`).

    gen = TensorRTGenerator("out/trt")           # model.json, prefill.engine, decode_step.engine
    ids = gen.generate(prompt_ids, attention_mask, max_new_tokens=32)

The loop is runtime.Generator, the one OnnxGenerator runs; TensorRTBackend only runs the engines.
The states stay on the GPU for the whole generation, in one set of buffers: prefill writes the
batch's states into them (in slices of at most `prefill_batch` rows, each slice's states at its
rows' offset), and every decode step binds them both as past.X and as present.X, since the decode
plugins update the tables in place and leave the slots a token does not touch as they were
(model.json: `tensorrt.state_in_place`). Only token ids go up and last-position logits come down.
GPU memory and copies use cuda-python's runtime API, as TensorRT's Python samples do; that thin
layer (CudaMemory, the engine loading) is the part that needs a GPU and TensorRT, everything else
runs against any memory/context pair.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .manifest import MANIFEST_NAME, TENSORRT_KEYS, check_keys, read_manifest
from .runtime import Generator, check_step_ids
from .tensorrt_engine import MIN_VERSION

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Host float32 from the raw bytes (uint8) of a float32/float16/bfloat16 array."""
    if dtype == "bfloat16":  # the upper half of a float32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.dtype(dtype)).astype(np.float32)


class CudaMemory:
    """GPU buffers, copies and one stream, through cuda-python's CUDA runtime bindings."""

    def __init__(self, device: int = 0) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:  # cuda-python before 12.6
            from cuda import cudart
        self.cudart = cudart
        self._call(cudart.cudaSetDevice(device))
        self.stream = self._call(cudart.cudaStreamCreate())

    def _call(self, result):
        err, *values = result
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error: {self.cudart.cudaGetErrorName(err)[1]}")
        return values[0] if values else None

    def alloc(self, nbytes: int) -> int:
        return int(self._call(self.cudart.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self._call(self.cudart.cudaFree(ptr))

    def upload(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream))

    def download(self, ptr: int, nbytes: int) -> np.ndarray:
        """nbytes from the device as uint8."""
        out = np.empty(nbytes, dtype=np.uint8)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.cudart.cudaMemcpyAsync(out.ctypes.data, ptr, nbytes, kind, self.stream))
        self._call(self.cudart.cudaStreamSynchronize(self.stream))
        return out

    def execute(self, context) -> None:
        if not context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT could not enqueue the engine")


def run_problem() -> str | None:
    """Why engines cannot run here (TensorRT, cuda-python), or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"running TensorRT engines needs TensorRT: pip install 'tensorrt>={MIN_VERSION}' cuda-python"
    try:
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        try:
            from cuda import cudart  # noqa: F401  (cuda-python before 12.6)
        except ImportError:
            return "running TensorRT engines needs cuda-python: pip install cuda-python"
    return None


def read_engine_manifest(folder: str) -> dict:
    """The folder's validated model.json, which must describe TensorRT engines."""
    manifest = read_manifest(folder)
    section = manifest.get("tensorrt")
    if not isinstance(section, dict):
        raise ValueError(f"{folder}: no TensorRT engines (python -m mom_compile.export --tensorrt OUT "
                         "writes them)")
    check_keys(manifest, TENSORRT_KEYS, os.path.join(folder, MANIFEST_NAME))
    if not section["state_in_place"]:
        raise ValueError(f"{folder}: model.json: 'tensorrt.state_in_place' is not true; this runtime binds "
                         "present.X to past.X's buffer, as the decode plugins require")
    return manifest


def load_contexts(folder: str, manifest: dict) -> dict:
    """An execution context per engine of the folder."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    contexts = {}
    for graph, entry in manifest["tensorrt"]["engines"].items():
        with open(os.path.join(folder, entry["file"]), "rb") as f:
            engine = runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise RuntimeError(f"{entry['file']}: TensorRT cannot load it (built with TensorRT "
                               f"{manifest['tensorrt']['version']}, on another GPU?)")
        contexts[graph] = engine.create_execution_context()
    return contexts


class TensorRTBackend:
    """runtime.GraphBackend over the folder's engines, states in GPU buffers."""

    def __init__(self, folder: str | os.PathLike, device: int = 0) -> None:
        folder = os.fspath(folder)
        manifest = read_engine_manifest(folder)
        problem = run_problem()
        if problem:
            raise ImportError(problem)
        self._start(manifest, load_contexts(folder, manifest), CudaMemory(device))

    def _start(self, manifest: dict, contexts: dict, memory) -> None:
        """Everything but loading: `contexts` take set_input_shape/set_tensor_address, `memory`
        is a CudaMemory or a stand-in with the same methods."""
        self.manifest, self.contexts, self.memory = manifest, contexts, memory
        section = manifest["tensorrt"]
        self.max_batch, self.max_seq, self.prefill_rows = section["max_batch"], section["max_seq"], \
            section["prefill_batch"]
        self.states = manifest["state"]
        self.vocab, self.dtype = manifest["vocab_size"], manifest["dtype"]
        self.batch = 0
        self.buffers: list[int] = []  # one state buffer per state tensor
        self.scratch: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)

    def _row_bytes(self, state: dict) -> int:
        return math.prod(state["shape"][1:]) * _ITEMSIZE[state["dtype"]]

    def _allocate_states(self, batch: int) -> None:
        if batch == self.batch:
            return
        for ptr in self.buffers:
            self.memory.free(ptr)
        self.buffers = [self.memory.alloc(batch * self._row_bytes(s)) for s in self.states]
        self.batch = batch

    def _scratch(self, name: str, nbytes: int) -> int:
        """A reusable buffer of at least nbytes (input ids, mask, logits)."""
        ptr, size = self.scratch.get(name, (0, -1))
        if size < nbytes:
            if size >= 0:
                self.memory.free(ptr)
            ptr, size = self.memory.alloc(nbytes), nbytes
            self.scratch[name] = (ptr, size)
        return ptr

    def _upload(self, context, name: str, array: np.ndarray) -> None:
        ptr = self._scratch(name, array.nbytes)
        self.memory.upload(ptr, array)
        context.set_input_shape(name, array.shape)
        context.set_tensor_address(name, ptr)

    def _last_logits(self, context, rows: int) -> np.ndarray:
        """Runs `context` with logits [rows, 1, vocab] bound (both graphs emit the last position
        only); them as float32."""
        row = self.vocab * _ITEMSIZE[self.dtype]
        ptr = self._scratch("logits", rows * row)
        context.set_tensor_address("logits", ptr)
        self.memory.execute(context)
        raw = self.memory.download(ptr, rows * row)
        return to_float32(raw, self.dtype).reshape(rows, self.vocab)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        batch, seq = input_ids.shape
        if batch > self.max_batch or seq > self.max_seq:
            raise ValueError(f"input_ids: the engines take batch <= {self.max_batch} and seq <= "
                             f"{self.max_seq} (--max-batch, --max-seq at export), got {batch} x {seq}")
        self._allocate_states(batch)
        context, logits = self.contexts["prefill"], []
        for start in range(0, batch, self.prefill_rows):
            rows = slice(start, min(batch, start + self.prefill_rows))
            for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask)):
                self._upload(context, name, np.ascontiguousarray(array[rows], dtype=np.int64))
            for state, ptr in zip(self.states, self.buffers):
                context.set_tensor_address(state["present"], ptr + start * self._row_bytes(state))
            logits.append(self._last_logits(context, rows.stop - start))
        return np.concatenate(logits)

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        check_step_ids(input_ids, self.batch)
        batch = self.batch
        context = self.contexts["decode_step"]
        self._upload(context, "input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        for state, ptr in zip(self.states, self.buffers):  # updated in place: past and present alike
            context.set_input_shape(state["past"], (batch, *state["shape"][1:]))
            context.set_tensor_address(state["past"], ptr)
            context.set_tensor_address(state["present"], ptr)
        return self._last_logits(context, batch)


class TensorRTGenerator(Generator):
    """Generation over a `--tensorrt` export folder: Generator's loop on TensorRTBackend."""

    def __init__(self, folder: str | os.PathLike, device: int = 0) -> None:
        super().__init__(TensorRTBackend(folder, device))
