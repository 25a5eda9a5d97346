"""The ablation studies: which config fields each arm of a study sets.

Every arm of a study starts from the same base config; an arm differs from
the others only in the fields listed here. Arm names are folder names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

# Weight of the alignment loss in the "align_on" arm of the alignment study.
# NOTE: a starting value, not tuned on this project's data.
DEFAULT_ALIGN_WEIGHT = 0.5


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm of a study.

  Attributes:
    name: folder name of the arm, unique within its study.
    overrides: config fields and values this arm sets.
  """

  name: str
  overrides: Mapping[str, Any]


def _architecture() -> tuple[Arm, ...]:
  return (
      Arm("single_tower", {"architecture": "single_tower", "xfuse": False}),
      Arm("gated", {"architecture": "gated", "xfuse": False}),
      Arm("dual_projection", {"architecture": "dual_projection",
                              "xfuse": False}),
      Arm("dual_tower", {"architecture": "dual_tower", "xfuse": False}),
      Arm("dual_tower_xfuse", {"architecture": "dual_tower", "xfuse": True}),
  )


def _noise() -> tuple[Arm, ...]:
  # Understanding images get diffusion time t ~ U[0, cap]; 0 keeps them clean.
  return tuple(Arm(f"noise_cap_{percent}",
                   {"understanding_noise_cap": percent / 100})
               for percent in (0, 25, 50))


def _mixture() -> tuple[Arm, ...]:
  # generation:understanding shares of the training rows.
  shares = ((100, 0, 1.0), (66, 33, 2 / 3), (50, 50, 0.5), (33, 66, 1 / 3),
            (0, 100, 0.0))
  return tuple(Arm(f"generation_{g}_understanding_{u}",
                   {"generation_fraction": fraction})
               for g, u, fraction in shares)


def _alignment(align_weight: float) -> tuple[Arm, ...]:
  return (Arm("align_off", {"lambda_align": 0.0}),
          Arm("align_on", {"lambda_align": align_weight}))


STUDIES = ("architecture", "noise", "mixture", "alignment")


def study_arms(study: str, align_weight: float = DEFAULT_ALIGN_WEIGHT,
               selected: Sequence[str] | None = None) -> tuple[Arm, ...]:
  """Return the arms of `study`, or the `selected` ones in study order.

  Raises:
    ValueError: for an unknown study, an unknown arm name, or a
      non-positive `align_weight`.
  """
  if study == "architecture":
    arms = _architecture()
  elif study == "noise":
    arms = _noise()
  elif study == "mixture":
    arms = _mixture()
  elif study == "alignment":
    if align_weight <= 0:
      raise ValueError(f"align_weight={align_weight} turns alignment off in "
                       "the align_on arm. Pass a positive weight.")
    arms = _alignment(align_weight)
  else:
    raise ValueError(f"Unknown study {study!r}; choose one of "
                     f"{', '.join(STUDIES)}.")
  if not selected:
    return arms
  names = [arm.name for arm in arms]
  unknown = sorted(set(selected) - set(names))
  if unknown:
    raise ValueError(f"Study {study!r} has no arm {', '.join(unknown)}; its "
                     f"arms are {', '.join(names)}.")
  return tuple(arm for arm in arms if arm.name in selected)


def varied_fields(study: str) -> set[str]:
  """Return the config fields that the arms of `study` set."""
  return {key for arm in study_arms(study) for key in arm.overrides}
