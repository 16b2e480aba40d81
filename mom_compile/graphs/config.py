"""`MomConfig`: the model's hyper-parameters, read from and written to the reference `config.json`."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..interrupts import replace_files

CONFIG_NAME = "config.json"

# Keys this class writes itself; every other unknown key (fuse_*, attn_mode, transformers_version,
# ...) changes nothing here and is kept in `extra`, so that a config round-trips unchanged.
_WRITTEN_KEYS = {"model_type", "architectures"}


@dataclass
class MomConfig:
    """Hyper-parameters of a MoM causal language model (docs/math.md#shapes-and-names; the
    config.json keys: docs/math.md#checkpoint-layout).

    Defaults are the reference implementation's. Unknown keys of a config.json are kept in
    `extra` and written back unchanged.
    """

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_heads: int = 4
    head_dim: int = 256
    expand_v: float = 1.0
    conv_size: int = 4
    use_short_conv: bool = True
    conv_bias: bool = False
    use_output_gate: bool = True
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_memories: int = 4
    topk: int = 2
    capacity: float = 1.0  # read and written, unused: every token goes to exactly topk memories
    shared_mem: bool = True
    single_kv_proj: bool = False
    aux_loss_scale: float = 0.01
    mom_backend: str = "gated_deltanet"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2  # a list: any of them ends a sequence (Hugging Face's)
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048
    attn: dict | None = None
    attnres_block_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 256 * math.ceil(int(self.hidden_size * self.hidden_ratio * 2 / 3) / 256)

    @property
    def memory_slots(self) -> int:
        """Routed memories plus the shared one: the number of recurrent states per sequence."""
        return self.num_memories + int(self.shared_mem)

    @property
    def chosen_memories(self) -> int:
        """Memories each token goes to: its topk, and the shared one (k')."""
        return self.topk + int(self.shared_mem)

    def validate(self) -> None:
        """Raise a ValueError naming the first field that this implementation cannot honour."""
        def bad(key: str, why: str) -> None:
            raise ValueError(f"MomConfig.{key}: {why}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value))

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim",
                    "num_memories", "topk", "max_position_embeddings"):
            value = getattr(self, key)
            if not is_int(value) or value < 1:
                bad(key, f"expected a positive integer, got {value!r}")
        for key in ("use_short_conv", "conv_bias", "use_output_gate", "tie_word_embeddings", "shared_mem",
                    "single_kv_proj"):
            if not isinstance(getattr(self, key), bool):
                bad(key, f"expected true or false, got {getattr(self, key)!r}")
        for key, positive in (("expand_v", True), ("norm_eps", True), ("capacity", True),
                              ("initializer_range", False), ("aux_loss_scale", False)):
            value = getattr(self, key)
            if not is_number(value) or value < 0 or (positive and value == 0):
                bad(key, f"expected a {'positive' if positive else 'non-negative'} number, got {value!r}")
        if not is_int(self.conv_size):
            bad("conv_size", f"expected an integer, got {self.conv_size!r}")
        size = self.intermediate_size
        if size is not None and (not is_int(size) or size < 1):
            bad("intermediate_size", f"expected a positive integer or null, got {self.intermediate_size!r}")
        if self.hidden_ratio is not None and (not is_number(self.hidden_ratio) or self.hidden_ratio <= 0):
            bad("hidden_ratio", f"expected a positive number or null, got {self.hidden_ratio!r}")
        if self.intermediate_size is None and self.hidden_ratio is None:
            bad("intermediate_size", "either intermediate_size or hidden_ratio must be set")
        if self.intermediate_size is None and self.mlp_size < 1:
            bad("hidden_ratio", f"hidden_size * hidden_ratio = {self.hidden_size * self.hidden_ratio} "
                                "gives an MLP of width 0")
        def is_id(value) -> bool:
            return is_int(value) and 0 <= value < self.vocab_size

        for key in ("bos_token_id", "pad_token_id"):
            value = getattr(self, key)
            if value is not None and not is_id(value):
                bad(key, f"expected an id in [0, vocab_size={self.vocab_size}) or null, got {value!r}")
        eos = self.eos_token_id
        if not (eos is None or is_id(eos) or (isinstance(eos, list) and eos and all(map(is_id, eos)))):
            bad("eos_token_id", f"expected an id in [0, vocab_size={self.vocab_size}), a non-empty list "
                                f"of them, or null, got {eos!r}")
        if self.topk > self.num_memories:
            bad("topk", f"expected at most num_memories={self.num_memories}, got {self.topk}")
        if self.conv_size < 2:
            bad("conv_size", f"expected at least 2, got {self.conv_size}")
        if self.head_dim * self.expand_v != int(self.head_dim * self.expand_v):
            bad("expand_v", f"head_dim * expand_v must be a positive integer, got "
                            f"{self.head_dim} * {self.expand_v}")
        if not self.use_short_conv:
            bad("use_short_conv", "False is not supported (the reference implementation refuses "
                                  "it too)")
        if self.hidden_act not in ("swish", "silu"):
            bad("hidden_act", f"only 'swish'/'silu' is supported, got {self.hidden_act!r}")
        if self.mom_backend != "gated_deltanet":
            bad("mom_backend", f"only 'gated_deltanet' is supported, got {self.mom_backend!r}")
        if self.attn is not None:
            bad("attn", "hybrid softmax-attention layers are not supported; this package "
                        "implements pure MoM models (attn must be null)")
        if self.attnres_block_size is not None:
            bad("attnres_block_size", "attention residuals are not supported (must be null)")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MomConfig:
        """A named size: "tiny" (tests and quick exports), "340m" and "1.3b".

        "340m" and "1.3b" are the MoM paper's names of its two sizes (hidden size 1024 and 2048, 24
        layers), after the dense models of the same width and depth it compares with; they are
        names, not counts. Each memory (4 routed and 1 shared) has its own key, value, beta and
        alpha projections, and the 32K-token embeddings and output head are untied, so the models
        have 545.1M and 1618.4M parameters in the reference layout (545.2M and 1618.6M as held: the
        stacked input projections end in zero padding rows, graphs/stacked.py)."""
        if name not in PRESETS:
            raise ValueError(f"name: expected one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    # -- config.json ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        out["model_type"] = "mom"
        out["architectures"] = ["MomForCausalLM"]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MomConfig:
        if not isinstance(values, dict):
            raise ValueError(f"config.json: expected a JSON object of settings, got {type(values).__name__}")
        if values.get("model_type", "mom") != "mom":
            raise ValueError(f"config.json: model_type must be 'mom', got {values['model_type']!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names and k not in _WRITTEN_KEYS}
        return cls(**known, extra=extra)

    def to_json_file(self, file: str | os.PathLike) -> None:
        """The config as JSON into `file` (Hugging Face's name); a config that JSON cannot hold
        raises before the file is opened."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        with open(file, "w") as f:
            f.write(text)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """config.json into the folder `path`, written under a temporary name and moved into place."""
        os.makedirs(path, exist_ok=True)
        replace_files({os.path.join(path, CONFIG_NAME): self.to_json_file})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> MomConfig:
        """Read `config.json` from a folder (or the file itself)."""
        file = path if os.path.isfile(path) else os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"path: no {CONFIG_NAME} found at {os.fspath(path)!r}")
        try:
            with open(file) as f:
                values = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(values)


_PAPER = dict(num_hidden_layers=24, num_heads=4, head_dim=256, expand_v=1.0, num_memories=4, topk=2,
              shared_mem=True, conv_size=4, vocab_size=32000, norm_eps=1e-6, aux_loss_scale=0.01)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16,
                 num_memories=4, topk=2, shared_mem=True, hidden_ratio=2),
    "340m": dict(_PAPER, hidden_size=1024, hidden_ratio=3),
    "1.3b": dict(_PAPER, hidden_size=2048, hidden_ratio=4),
}
