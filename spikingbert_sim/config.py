"""Model configuration: a frozen dataclass with Hugging Face BERT field names, validated on creation."""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

WEIGHT_MODES = ("fp", "binary", "ternary")
"""Weight precision of every linear projection inside the encoder (SPEC §4):
``fp`` full precision, ``binary`` 1-bit {±1}·β, ``ternary`` 1.58-bit {-1, 0, 1}·γ."""
READOUTS = ("cls", "mean")
"""What the head reads (SPEC §3 names ``cls``): ``cls`` the final layer's ASR at the [CLS] position,
``mean`` its ASR averaged over the sequence's valid (non-padding) tokens."""


@dataclass(frozen=True)
class SpikingBertConfig:
    """Configuration of a spiking BERT (SpikingBERT architecture, SPEC §3).

    Field names follow ``transformers.BertConfig`` so that a BERT config converts field by field.
    """

    vocab_size: int = 30522  # word-piece vocabulary size
    hidden_size: int = 384  # D: width of every spiking layer except the intermediate one
    num_hidden_layers: int = 4  # N spiking encoder layers
    num_attention_heads: int = 12  # heads; hidden_size must divide evenly
    intermediate_size: int = 1536  # width of the spiking GELU layer
    max_position_embeddings: int = 512  # longest sequence the position table covers
    type_vocab_size: int = 2  # segment (token type) vocabulary
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon, as in BERT
    pad_token_id: int = 0  # id of [PAD]
    num_labels: int = 2  # classes of the head; 1 means regression (STS-B)
    weight_mode: str = "fp"  # precision of encoder projections: fp | binary | ternary
    threshold: float = 1.0  # V_th, firing threshold of every neuron
    leak: float = 1.0  # γ, membrane leak; 1.0 is integrate-and-fire (SpikingBERT's choice)
    # U[0] as a fraction of V_th; 0 (the paper's) makes a T-step rate floor(T·I/V_th)/T, 0.5 rounds
    # instead: half the worst-case error of a finite simulation and no bias (Bu et al. 2022)
    initial_membrane: float = 0.0
    readout: str = "cls"  # what the head reads: cls | mean (see READOUTS)
    feedback: bool = False  # optional feedback connection from the last layer to the input layer
    quant_eps: float = 1e-5  # ε in the 1.58-bit quantizer's RoundClip(W / (γ_w + ε))
    label_names: tuple[str, ...] = field(default_factory=tuple)  # optional class names of the head
    task: str | None = None  # optional GLUE task the head was trained for

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels"):
            positive_int(name)
        # Type checks first, so that a string or None (e.g. from a JSON config) gets an error that
        # names the field instead of a TypeError from the range comparisons below.
        for name in ("threshold", "leak", "initial_membrane", "layer_norm_eps", "quant_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise ConfigError(f"pad_token_id must be an integer, got {self.pad_token_id!r}")
        if isinstance(self.label_names, (str, bytes)) or not isinstance(self.label_names, (tuple, list)):
            raise ConfigError(f"label_names must be a list of class names, got {self.label_names!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})")
        if self.weight_mode not in WEIGHT_MODES:
            raise ConfigError(f"weight_mode must be one of {', '.join(WEIGHT_MODES)}, got {self.weight_mode!r}")
        if self.readout not in READOUTS:
            raise ConfigError(f"readout must be one of {', '.join(READOUTS)}, got {self.readout!r}")
        if not self.threshold > 0:
            raise ConfigError(f"threshold must be > 0, got {self.threshold!r}")
        if not 0 < self.leak <= 1:
            raise ConfigError(f"leak must be in (0, 1], got {self.leak!r}")
        if not 0 <= self.initial_membrane < 1:
            raise ConfigError(f"initial_membrane must be in [0, 1) (a fraction of the threshold), "
                              f"got {self.initial_membrane!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not self.quant_eps > 0:
            raise ConfigError(f"quant_eps must be > 0, got {self.quant_eps!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id must be in [0, vocab_size), got {self.pad_token_id!r}")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ConfigError(
                f"label_names has {len(self.label_names)} names but num_labels is {self.num_labels}")
        object.__setattr__(self, "label_names", tuple(self.label_names))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def replace(self, **changes: Any) -> "SpikingBertConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["label_names"] = list(self.label_names)
        if d["initial_membrane"] == 0.0:  # the default: files stay readable by versions without the field
            del d["initial_membrane"]
        if d["readout"] == "cls":  # likewise
            del d["readout"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpikingBertConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)  # __post_init__ validates label_names and stores it as a tuple

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SpikingBertConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(d)

    @classmethod
    def from_bert_config(cls, bert_config: Any, **overrides: Any) -> "SpikingBertConfig":
        """Take the shape fields of a ``transformers.BertConfig``; ``overrides`` set the rest."""
        fields = dict(
            vocab_size=bert_config.vocab_size,
            hidden_size=bert_config.hidden_size,
            num_hidden_layers=bert_config.num_hidden_layers,
            num_attention_heads=bert_config.num_attention_heads,
            intermediate_size=bert_config.intermediate_size,
            max_position_embeddings=bert_config.max_position_embeddings,
            type_vocab_size=bert_config.type_vocab_size,
            layer_norm_eps=bert_config.layer_norm_eps,
            pad_token_id=bert_config.pad_token_id if bert_config.pad_token_id is not None else 0,
        )
        fields.update(overrides)
        return cls(**fields)
