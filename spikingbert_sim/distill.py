r"""Knowledge distillation from a non-spiking BERT teacher (SPEC §6, Eqn 7).

Three losses, one per training stage:

* ``kd`` — intermediate layers: :math:`\sum_l \mathrm{MSE}(W_l\, a^*_l + b_l,\; h_{g(l)})` between the
  student's layer-output ASRs :math:`a^*_l` (the ``embeddings`` site and each ``layer.i.output``)
  and the teacher's hidden states :math:`h_{g(l)}`; optionally plus
  :math:`\sum_i \mathrm{MSE}(S_i, S^{teacher}_{g'(i)})` over pre-softmax attention scores
  :math:`QK^\top/\sqrt{d_{head}}` ([SB], TinyBERT's form).
* ``predict`` — prediction layer: soft cross-entropy between temperature-softened teacher and
  student distributions (MSE between predictions for the STS-B regression).
* ``finetune`` — the task loss on the true labels: cross-entropy, or MSE for STS-B.

Choices (documented because the papers leave them open):

* **Layer map** ``g``: the student's embeddings match the teacher's embeddings (hidden state 0);
  student layer i (0-based) of N matches teacher hidden state ``round((i + 1) · M / N)`` of M
  layers — evenly spaced, the last student layer on the last teacher layer (:func:`default_layer_map`).
  Attention scores of student layer i match those of the teacher layer that produces that hidden
  state (teacher layer ``g(i) − 1``, 0-based).
* **Projections** ``W_l``: one learnable ``nn.Linear(student hidden → teacher hidden)`` per
  matched hidden state, always present (the student's ASRs live in [0, 1], the teacher's hidden
  states are LayerNorm outputs around 0, so even equal widths need an affine map). With equal
  widths it starts as the identity with zero bias (training starts from plain MSE); otherwise
  from ``nn.Linear``'s default initialisation. Projections belong to the distiller, not to the
  student checkpoint.
* **Padding**: hidden-state MSE averages over valid tokens only (and all features); attention
  MSE over (query, key) pairs of two valid tokens, every head.
* **Temperature**: soft cross-entropy :math:`-\sum_c \mathrm{softmax}(t/\tau)_c \log\mathrm{softmax}(s/\tau)_c`,
  averaged over the batch, without Hinton's :math:`\tau^2` factor (TinyBERT's and [SB]'s form;
  with the default τ = 1 the two agree).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .model import INPUT_SITE

STAGES = ("kd", "predict", "finetune")
"""Training stages, in the order ``--stage all`` runs them."""


def default_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Teacher hidden-state index for each student layer: ``round((i + 1) · M / N)``, i = 0..N−1.

    Hidden state 0 is the embeddings, hidden state j the output of teacher layer j (1-based), as in
    ``transformers``' ``output_hidden_states``. E.g. 4 student layers from 6: ``[2, 3, 4, 6]``
    (Python's round-half-to-even).
    """
    if num_student < 1 or num_teacher < 1:
        raise ConfigError(f"layer counts must be positive, got {num_student} and {num_teacher}")
    return [round((i + 1) * num_teacher / num_student) for i in range(num_student)]


def parse_layer_map(text: str, num_student: int, num_teacher: int) -> list[int]:
    """``"2,4,6"`` -> ``[2, 4, 6]``, checked: one entry per student layer, each in 0..M."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"layer map must be comma-separated integers, got {text!r}") from None
    check_layer_map(values, num_student, num_teacher)
    return values


def check_layer_map(values: Sequence[int], num_student: int, num_teacher: int) -> None:
    if len(values) != num_student:
        raise ConfigError(f"layer map has {len(values)} entries but the student has {num_student} layers")
    bad = [v for v in values if not 0 <= v <= num_teacher]
    if bad:
        raise ConfigError(f"layer map entries must be teacher hidden states 0..{num_teacher} "
                          f"(0: embeddings), got {bad[0]}")


# --- losses ----------------------------------------------------------------------------------------

def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MSE over valid tokens: ``Σ_valid (p − t)² / (valid tokens · features)``.

    prediction, target: (B, L, D); mask: (B, L) with 1 for tokens, 0 for padding.
    """
    m = mask.to(prediction.dtype)[..., None]  # (B, L, 1)
    count = m.sum() * prediction.shape[-1]
    return ((prediction - target) ** 2 * m).sum() / count.clamp_min(1)


def attention_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """MSE between pre-softmax attention scores over pairs of valid tokens.

    student, teacher: (B, H, L, L); mask: (B, L). A (query, key) pair counts when both are tokens.
    """
    m = mask.to(student.dtype)
    pairs = (m[:, None, :, None] * m[:, None, None, :]).expand_as(student)  # (B, H, L, L)
    return ((student - teacher) ** 2 * pairs).sum() / pairs.sum().clamp_min(1)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Mean over the batch of :math:`-\sum_c \mathrm{softmax}(t/\tau)_c \log\mathrm{softmax}(s/\tau)_c`."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}")
    targets = torch.softmax(teacher_logits / temperature, dim=-1)
    return -(targets * torch.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()


def prediction_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                    regression: bool = False) -> Tensor:
    """Prediction-layer KD: soft cross-entropy, or MSE between the two predictions for regression."""
    if regression:
        return F.mse_loss(student_logits.reshape(-1), teacher_logits.reshape(-1).to(student_logits.dtype))
    return soft_cross_entropy(student_logits, teacher_logits.to(student_logits.dtype), temperature)


def label_loss(logits: Tensor, labels: Tensor, regression: bool = False) -> Tensor:
    """The task loss on true labels: cross-entropy, or MSE for regression (STS-B)."""
    if regression:
        return F.mse_loss(logits.reshape(-1), labels.to(logits.dtype).reshape(-1))
    return F.cross_entropy(logits, labels)


# --- the distiller ---------------------------------------------------------------------------------

def _key(site: str) -> str:
    return site.replace(".", "_")  # ModuleDict keys cannot hold dots


@dataclass
class KDLoss:
    """The intermediate-layer loss and its parts (floats, for logging)."""

    total: Tensor
    hidden: dict[str, float]
    attention: dict[str, float]


class Distiller(nn.Module):
    """The learnable projections and the layer map of intermediate-layer distillation.

    Args:
        student_hidden, teacher_hidden: widths of the student's and teacher's hidden states.
        num_student, num_teacher: encoder layers of each.
        layer_map: teacher hidden-state index (0..M, 0 the embeddings) for each student layer; default
            :func:`default_layer_map`. The embeddings always match hidden state 0.
        attention: also match pre-softmax attention scores.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int, num_student: int, num_teacher: int,
                 layer_map: Sequence[int] | None = None, attention: bool = False) -> None:
        super().__init__()
        self.layer_map = list(layer_map) if layer_map is not None else default_layer_map(num_student, num_teacher)
        check_layer_map(self.layer_map, num_student, num_teacher)
        self.attention = attention
        # student site -> teacher hidden-state index
        self.hidden_targets = {INPUT_SITE: 0, **{f"layer.{i}.output": j for i, j in enumerate(self.layer_map)}}
        # student attention-score name -> teacher layer index (0-based); a student layer matched to
        # the embeddings (hidden state 0) has no teacher attention to match
        self.attention_targets = {f"layer.{i}.attention_scores": j - 1 for i, j in enumerate(self.layer_map) if j > 0}
        self.projections = nn.ModuleDict()
        for site in self.hidden_targets:
            proj = nn.Linear(student_hidden, teacher_hidden)
            if student_hidden == teacher_hidden:
                with torch.no_grad():
                    proj.weight.copy_(torch.eye(student_hidden))
                    proj.bias.zero_()
            self.projections[_key(site)] = proj

    @property
    def student_sites(self) -> list[str]:
        """Student sites whose ASRs the loss needs."""
        return list(self.hidden_targets)

    @property
    def teacher_attention_layers(self) -> list[int]:
        """Teacher layers (0-based) whose attention scores the loss needs (empty without attention)."""
        return sorted(set(self.attention_targets.values())) if self.attention else []

    def project(self, site: str, asr: Tensor) -> Tensor:
        return self.projections[_key(site)](asr)

    def intermediate_loss(self, student_asr: dict[str, Tensor], teacher_hidden: Sequence[Tensor],
                          attention_mask: Tensor, student_scores: dict[str, Tensor] | None = None,
                          teacher_scores: dict[int, Tensor] | None = None) -> KDLoss:
        """Σ hidden-state MSEs (+ Σ attention-score MSEs when enabled); see the module doc."""
        hidden: dict[str, Tensor] = {}
        for site, j in self.hidden_targets.items():
            a = student_asr[site]
            target = teacher_hidden[j].to(a.dtype)
            hidden[site] = masked_mse(self.project(site, a), target, attention_mask)
        attention: dict[str, Tensor] = {}
        if self.attention:
            if student_scores is None or teacher_scores is None:
                raise ConfigError("attention-score distillation needs student and teacher attention scores")
            for name, j in self.attention_targets.items():
                s = student_scores[name]
                t = teacher_scores[j].to(s.dtype)
                if s.shape != t.shape:
                    raise ConfigError(f"attention scores of {name} {tuple(s.shape)} do not match teacher layer "
                                      f"{j} {tuple(t.shape)}: student and teacher need the same number of heads")
                attention[name] = attention_mse(s, t, attention_mask)
        total = sum(hidden.values()) + sum(attention.values(), torch.zeros((), dtype=next(iter(hidden.values())).dtype,
                                                                             device=attention_mask.device))
        return KDLoss(total=total, hidden={k: float(v.detach()) for k, v in hidden.items()},
                      attention={k: float(v.detach()) for k, v in attention.items()})
