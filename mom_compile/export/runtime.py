"""Torch-free generation with the exported graphs: numpy + onnxruntime only.

    gen = OnnxGenerator("out/tiny")                    # reads model.json, opens both graphs
    ids = gen.generate(prompt_ids, attention_mask, max_new_tokens=32)

One prefill over the (left-padded) prompt batch, then one decode_step per new token, feeding every
`present.X` back as `past.X`. Token choice mirrors `MomForCausalLM.generate`: argmax, or sampling
from softmax(logits / temperature) restricted to the top_k ids and to the smallest set whose
probability reaches top_p; a sequence that produced an eos id is filled with the pad id, and
generation stops once all have. Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

MANIFEST_NAME = "model.json"


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


class OnnxGenerator:
    """Generation over an export folder (prefill.onnx, decode_step.onnx, model.json)."""

    def __init__(self, folder: str | os.PathLike, providers: Sequence[str] | None = None,
                 session_options: ort.SessionOptions | None = None) -> None:
        folder = os.fspath(folder)
        with open(os.path.join(folder, MANIFEST_NAME)) as f:
            self.manifest = json.load(f)
        if self.manifest.get("plugin"):
            raise ValueError(f"{folder}: plugin graphs need a mom::MemoryStep kernel that onnxruntime "
                             "lacks; export without --plugin to run them here")
        providers = list(providers or ["CPUExecutionProvider"])
        graphs = self.manifest["graphs"]
        self.prefill = ort.InferenceSession(os.path.join(folder, graphs["prefill"]["file"]),
                                            session_options, providers=providers)
        self.decode = ort.InferenceSession(os.path.join(folder, graphs["decode_step"]["file"]),
                                           session_options, providers=providers)
        self.pairs = [(s["present"], s["past"]) for s in self.manifest["state"]]
        self.vocab_size = self.manifest["vocab_size"]

    def _step(self, outputs: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
        feed = {past: outputs[present] for present, past in self.pairs}
        feed["input_ids"] = ids
        names = [o.name for o in self.decode.get_outputs()]
        return dict(zip(names, self.decode.run(names, feed)))

    def run_prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.prefill.get_outputs()]
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        return dict(zip(names, self.prefill.run(names, feed)))

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, seed: int | None = None) -> np.ndarray:
        """Token ids [B, T + n]: the prompt, then up to max_new_tokens generated ids."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.size == 0:
            raise ValueError(f"input_ids: expected a non-empty [batch, seq] array, "
                             f"got shape {input_ids.shape}")
        if input_ids.min() < 0 or input_ids.max() >= self.vocab_size:
            raise ValueError(f"input_ids: ids must lie in [0, {self.vocab_size})")
        if temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {input_ids.shape}, got {mask.shape}")
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int)
                                                else list(eos_token_id))
        if pad_token_id is None:
            configured = self.manifest.get("pad_token_id")
            pad_token_id = configured if configured is not None else (eos or [0])[0]
        if max_new_tokens <= 0:
            return input_ids
        rng = np.random.default_rng(seed)
        outputs = self.run_prefill(input_ids, mask)
        finished = np.zeros(input_ids.shape[0], dtype=bool)
        tokens = [input_ids]
        for step in range(max_new_tokens):
            next_ids = pick_next_token(outputs["logits"][:, -1], do_sample, temperature, top_k, top_p, rng)
            next_ids = np.where(finished, pad_token_id, next_ids).astype(np.int64)
            tokens.append(next_ids[:, None])
            if eos:
                finished |= np.isin(next_ids, eos)
                if finished.all():
                    break
            if step + 1 < max_new_tokens:
                outputs = self._step(outputs, next_ids[:, None])
        return np.concatenate(tokens, axis=1)
