"""Torch-free generation with the exported graphs: numpy + onnxruntime only.

    gen = OnnxGenerator("out/tiny")                    # reads model.json, opens both graphs
    ids = gen.generate(prompt_ids, attention_mask, max_new_tokens=32)

Generation is one loop (`Generator`) over a `GraphBackend`: one prefill over the (left-padded)
prompt batch, then one decode step per new token. A backend runs the graphs and keeps the states
where they live (`OnnxBackend`: on the onnxruntime session's device, through I/O binding; the
TensorRT backend: in its engine's buffers); the loop sees only last-position logits on the host.

Token choice mirrors `MomForCausalLM.generate`, and so do the argument checks (one shared
`check_generate_args`): argmax, or sampling from softmax(logits / temperature) restricted to the
top_k ids and to the smallest set whose probability reaches top_p; a sequence that produced an eos
id is filled with the pad id, and generation stops once all have. Nothing here imports torch.
"""
from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnxruntime as ort

from ..generation_args import as_array, check_generate_args
from .manifest import read_manifest


class GraphBackend(Protocol):
    """Runs an export's two graphs and keeps their states itself (on its device)."""

    manifest: dict  # the folder's model.json, validated

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """int64 [B, T] ids and mask -> last-position logits [B, vocab] float32 on the host; the
        present states stay with the backend."""

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        """int64 [B, 1] -> logits [B, vocab] float32 on the host; the states advance."""


def check_step_ids(input_ids: np.ndarray, batch: int | None) -> None:
    """A decode step's ids: [batch, 1] for the batch the backend was prefilled with (None: none)."""
    if not batch:
        raise RuntimeError("step: call prefill first")
    if tuple(input_ids.shape) != (batch, 1):
        raise ValueError(f"input_ids: expected [{batch}, 1], one id for each of the prefilled batch's "
                         f"{batch} rows, got shape {list(input_ids.shape)}")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def pick_next_token(logits: np.ndarray, do_sample: bool = False, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Next ids [B] from last-position logits [B, vocab]."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.astype(np.float64) / temperature
    if top_k is not None:
        kth = np.sort(logits, -1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None:
        order = np.argsort(-logits, -1, kind="stable")
        probs = _softmax(np.take_along_axis(logits, order, -1))
        drop_sorted = np.cumsum(probs, -1) - probs >= top_p  # keeps the id that crosses top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits = np.where(drop, -np.inf, logits)
    probs = _softmax(logits)
    rng = rng or np.random.default_rng()
    cum = probs.cumsum(-1)
    draws = rng.random((probs.shape[0], 1)) * cum[:, -1:]
    return np.minimum((cum <= draws).sum(-1), probs.shape[-1] - 1)


def _as_numpy(name: str, value) -> np.ndarray:
    return as_array(name, value, lambda v: isinstance(v, np.ndarray), np.asarray, "numpy array")


class Generator:
    """The generation loop over a backend: argument checks, token choice, eos and padding, stopping."""

    def __init__(self, backend: GraphBackend) -> None:
        self.backend = backend
        self.manifest = backend.manifest

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, seed: int | None = None) -> np.ndarray:
        """Token ids [B, T + n] int64: the prompt, then n <= max_new_tokens generated ids (fewer
        once every sequence has produced an eos id: by default the exported model's, `[]` for none).
        input_ids [B, T] and attention_mask (1 = token, 0 = left padding) are numpy arrays or nested
        lists; seed seeds the sampling."""
        input_ids = _as_numpy("input_ids", input_ids)
        attention_mask = None if attention_mask is None else _as_numpy("attention_mask", attention_mask)
        eos, pad_token_id, sampling = check_generate_args(
            input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
            pad_token_id, self.manifest["vocab_size"], self.manifest["pad_token_id"],
            self.manifest["eos_token_id"])
        if seed is not None and (not isinstance(seed, numbers.Integral) or seed < 0):
            raise ValueError(f"seed: expected an integer >= 0 or None, got {seed!r}")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if max_new_tokens == 0:
            return ids.astype(input_ids.dtype)  # a new array, as torch's generate returns
        mask = np.ones_like(ids) if attention_mask is None else \
            np.ascontiguousarray(attention_mask, dtype=np.int64)
        rng = np.random.default_rng(seed)
        logits = self.backend.prefill(ids, mask)
        finished = np.zeros(ids.shape[0], dtype=bool)
        tokens = [ids]
        for step in range(max_new_tokens):
            next_ids = pick_next_token(logits, *sampling, rng)
            next_ids = np.where(finished, pad_token_id, next_ids).astype(np.int64)
            tokens.append(next_ids[:, None])
            if eos:
                finished |= np.isin(next_ids, eos)
                if finished.all():
                    break
            if step + 1 < max_new_tokens:
                logits = self.backend.step(np.ascontiguousarray(next_ids[:, None]))
        return np.concatenate(tokens, axis=1).astype(input_ids.dtype)  # as torch's generate


def _state_device(session: ort.InferenceSession) -> tuple[str, int]:
    """Where the session's graph runs: ("cuda", device id) under the CUDA provider, else ("cpu", 0)."""
    if "CUDAExecutionProvider" in session.get_providers():
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0


def graph_session(path: str, graph: str, providers: Sequence[str | tuple[str, dict]],
                  session_options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An InferenceSession of the exported graph `graph` ("prefill" or "decode_step") at `path`.
    Prefill runs with onnxruntime's memory reuse off: with it on, the CUDA provider (1.31.1) returns
    wrong prefill outputs for opset-18 graphs while every intermediate value agrees with the CPU
    provider's (benchmarks/RESULTS.md). session_options, where given, is changed accordingly."""
    if graph == "prefill":
        session_options = session_options or ort.SessionOptions()
        session_options.enable_mem_reuse = False
    try:
        return ort.InferenceSession(path, session_options, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        if not os.path.isfile(path):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: onnxruntime cannot load this graph ({type(e).__name__}: {first_line})") \
            from None


def _cuda_graph_split(providers: list) -> tuple[list, bool]:
    """(the providers without CUDA-graph capture, whether the CUDA provider asked for it): only the
    decode step is captured, since prefill's shapes change with every prompt."""
    plain, asked = [], False
    for provider in providers:
        if isinstance(provider, (tuple, list)) and provider[0] == "CUDAExecutionProvider":
            options = dict(provider[1])
            asked = str(options.pop("enable_cuda_graph", "0")).lower() in ("1", "true")
            provider = (provider[0], options)
        plain.append(provider)
    return plain, asked


class OnnxBackend:
    """The two graphs of an export folder in onnxruntime, the states kept on the session's device.

    Two sets of state tensors live there for the current batch size: prefill writes one, and every
    decode step reads one set as past.X and writes the other as present.X (I/O binding, so the
    states never travel to the host and no step allocates them); only token ids and logits cross.

    With `("CUDAExecutionProvider", {"enable_cuda_graph": "1", ...})` among the providers, the
    decode step is captured as CUDA graphs and replayed, one per state set (told apart by
    onnxruntime's `gpu_graph_id` run option); its ids and logits then sit in fixed device buffers
    too, as replay needs. Prefill runs without capture. A new batch size allocates anew and captures
    two more graphs, and the session keeps every graph it captured: serve one batch size per
    backend."""

    def __init__(self, folder: str | os.PathLike, providers: Sequence[str | tuple[str, dict]] | None = None,
                 session_options: ort.SessionOptions | None = None) -> None:
        folder = os.fspath(folder)
        self.manifest = read_manifest(folder)
        if self.manifest["plugin"]:
            raise ValueError(f"{folder}: plugin graphs need the TensorRT plugins of mom::memory_decode, "
                             "which onnxruntime lacks; export without --plugin to run them here")
        providers = list(providers or ["CPUExecutionProvider"])
        plain, cuda_graph = _cuda_graph_split(providers)
        graphs = self.manifest["graphs"]
        self.decode_session, self.prefill_session = (
            graph_session(os.path.join(folder, graphs[name]["file"]), name, use, session_options)
            for name, use in (("decode_step", providers), ("prefill", plain)))
        self.device = _state_device(self.decode_session)
        self.cuda_graph = cuda_graph and self.device[0] == "cuda"
        self._batch = None  # the batch size the buffers below are for
        self._states: list[dict[str, ort.OrtValue]] = []  # the two sets, by present name
        self._bindings: list[tuple[ort.IOBinding, ort.RunOptions]] = []  # step reading set i, writing 1 - i
        self._ids = self._logits = None  # the replayed step's fixed buffers
        self._graphs = 0  # CUDA graph ids handed out so far (1, 2, ...; onnxruntime captures on a later run)
        self._turn = 0

    def _value(self, spec: dict, batch: int) -> ort.OrtValue:
        """A tensor of a manifest entry (its shape with "batch", its dtype) on the session's device."""
        shape = [batch if d == "batch" else d for d in spec["shape"]]
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(spec["dtype"]), *self.device)

    def _prepare(self, batch: int) -> None:
        """The states and step bindings for `batch`, kept while the batch size repeats."""
        if batch == self._batch:
            return
        self._batch = None  # until everything below is allocated
        self._states = [{s["present"]: self._value(s, batch) for s in self.manifest["state"]}
                        for _ in (0, 1)]
        if self.cuda_graph:
            graph = self.manifest["graphs"]["decode_step"]
            step = {t["name"]: t for t in (*graph["inputs"], *graph["outputs"])}
            self._ids = self._value(step["input_ids"], batch)
            self._logits = self._value(step["logits"], batch)
        self._bindings = []
        for i in (0, 1):
            binding, options = self.decode_session.io_binding(), ort.RunOptions()
            for s in self.manifest["state"]:
                binding.bind_ortvalue_input(s["past"], self._states[i][s["present"]])
            if self.cuda_graph:
                binding.bind_ortvalue_input("input_ids", self._ids)
                binding.bind_ortvalue_output("logits", self._logits)
                self._graphs += 1
                options.add_run_config_entry("gpu_graph_id", str(self._graphs))
            else:
                binding.bind_output("logits", "cpu")
            self._bind_states(binding, self._states[1 - i])
            self._bindings.append((binding, options))
        self._batch = batch

    def _bind_states(self, binding: ort.IOBinding, states: dict[str, ort.OrtValue]) -> None:
        for present, value in states.items():
            binding.bind_ortvalue_output(present, value)

    @staticmethod
    def _last(logits: ort.OrtValue) -> np.ndarray:
        return logits.numpy()[:, -1].astype(np.float32)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self._prepare(input_ids.shape[0])
        self._turn = 0
        binding = self.prefill_session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_output("logits", "cpu")  # bound first: [B, 1, vocab] to the host
        self._bind_states(binding, self._states[0])
        options = ort.RunOptions()
        if self.device[0] == "cuda":  # give back the prompt's transient memory, which decoding never needs
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{self.device[1]}")
        self.prefill_session.run_with_iobinding(binding, options)
        return self._last(binding.get_outputs()[0])

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        check_step_ids(input_ids, self._batch)
        binding, options = self._bindings[self._turn]
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if self.cuda_graph:
            self._ids.update_inplace(ids)  # host-synchronous copy into the captured address
        else:
            binding.bind_cpu_input("input_ids", ids)
        self.decode_session.run_with_iobinding(binding, options)
        self._turn = 1 - self._turn
        return self._last(self._logits if self.cuda_graph else binding.get_outputs()[0])


class OnnxGenerator(Generator):
    """Generation over an export folder (prefill.onnx, decode_step.onnx, model.json) in onnxruntime:
    `providers` as for an InferenceSession (default CPU), the states on that provider's device."""

    def __init__(self, folder: str | os.PathLike, providers: Sequence[str | tuple[str, dict]] | None = None,
                 session_options: ort.SessionOptions | None = None) -> None:
        super().__init__(OnnxBackend(folder, providers, session_options))
