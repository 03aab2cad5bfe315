"""BAGEL's flow-matching sampler as plain functions (Bagel.generate_image / _forward_flow).

Time runs from t=1 (noise) to t=0 (data); the model predicts velocity = noise - data, so an Euler step is
x <- x - v * (t_i - t_{i+1}). `num_timesteps` schedule points give num_timesteps - 1 model evaluations.
Classifier-free guidance mixes up to three velocities: conditional (`v`), without the last text (`v_text`)
and without images (`v_img`), then optionally rescales the result towards the conditional norm ("renorm").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def norm_global(v: Tensor) -> Tensor:
    return torch.norm(v)  # one norm over all tokens and channels (the official code is batch-1 only)


def norm_per_token(v: Tensor) -> Tensor:
    return torch.norm(v, dim=-1, keepdim=True)  # [N, 1]


# cfg_renorm_type -> the norm the guided velocity is clamped against. text_channel renorms v_text per token.
RENORM_NORMS = {"global": norm_global, "channel": norm_per_token, "text_channel": norm_per_token}
RENORM_TYPES = tuple(RENORM_NORMS)


@dataclass(frozen=True)
class GuidanceOptions:
    num_timesteps: int  # schedule points; num_timesteps - 1 steps
    timestep_shift: float  # 3.0 at inference
    cfg_text_scale: float  # <= 1 disables all guidance (the image pass too)
    cfg_img_scale: float  # <= 1 disables image guidance
    cfg_interval: tuple[float, float]  # guidance only where start < t <= end (shifted t)
    cfg_renorm_type: str  # one of RENORM_TYPES
    cfg_renorm_min: float  # lower clamp of the renorm factor; 1.0 disables renorm
    step_cache: float = 0.0  # StepCache's threshold; 0 = every step runs the model (the official sampler)

    def __post_init__(self):
        check_renorm_type(self.cfg_renorm_type)
        if not 0.0 <= self.step_cache <= MAX_STEP_CACHE:
            raise ValueError(f"step_cache is {self.step_cache}; allowed range is 0.0 (off) to {MAX_STEP_CACHE}.")
        if self.num_timesteps < 2:
            raise ValueError(f"steps is {self.num_timesteps}; use at least 2 (steps - 1 model evaluations).")
        if not 0.0 <= self.cfg_renorm_min <= 1.0:
            raise ValueError(f"cfg_renorm_min is {self.cfg_renorm_min}; allowed range is 0.0 to 1.0.")


def check_renorm_type(name: str) -> None:
    if name not in RENORM_NORMS:
        raise ValueError(
            f"cfg_renorm_type is {name!r}; allowed values are {', '.join(RENORM_TYPES)}. (The 'local' option of "
            "some BAGEL UIs is not implemented upstream either.)"
        )


MAX_STEP_CACHE = 1.0


# The official app's settings per task: the defaults of the BAGEL nodes and of `python -m bagel_vae_pp bagel`.
DEFAULT_GUIDANCE = {
    "text_to_image": GuidanceOptions(50, 3.0, 4.0, 1.5, (0.4, 1.0), "global", 0.0),
    "edit": GuidanceOptions(50, 3.0, 4.0, 2.0, (0.0, 1.0), "text_channel", 0.0),
}


def build_schedule(num_timesteps: int, shift: float) -> list[float]:
    """Shifted timesteps from 1 to 0, [num_timesteps] (fp32 values, as the official sampler computes them)."""
    t = torch.linspace(1, 0, num_timesteps)
    t = shift * t / (1 + (shift - 1) * t)
    return t.tolist()


def is_guided(t: float, interval: tuple[float, float]) -> bool:
    """CFG is active where start < t <= end, compared in fp32 like the official tensor comparison."""
    start, end = (torch.tensor(v, dtype=torch.float32).item() for v in interval)
    return start < t <= end


def renorm(v_ref: Tensor, v_guided: Tensor, norm: Callable[[Tensor], Tensor], renorm_min: float) -> Tensor:
    scale = (norm(v_ref) / (norm(v_guided) + 1e-8)).clamp(min=renorm_min, max=1.0)
    return v_guided * scale


def combine_cfg(
    v: Tensor,
    v_text: Tensor | None,
    v_img: Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: str,
    renorm_min: float,
) -> Tensor:
    """Guided velocity [N, C] from the conditional `v`, the text-free `v_text` and the image-free `v_img`.

    Args:
        v_text: needed when text_scale > 1. v_img: needed when text_scale > 1 and img_scale > 1.
        renorm_type: "global"/"channel" rescale the final velocity; "text_channel" rescales the
            text-guided velocity per token and applies image guidance after it without renorm.
    """
    if text_scale <= 1.0:
        return v
    norm = RENORM_NORMS[renorm_type]
    v_txt = v_text + text_scale * (v - v_text)
    if renorm_type == "text_channel":
        v_txt = renorm(v, v_txt, norm, renorm_min)
        return v_img + img_scale * (v_txt - v_img) if img_scale > 1.0 else v_txt
    guided = v_img + img_scale * (v_txt - v_img) if img_scale > 1.0 else v_txt
    return renorm(v, guided, norm, renorm_min)


class StepCache:
    """Skips model evaluations whose input barely moved: an optional speed-up, off at threshold 0.

    A step reuses the guided velocity last computed while the latent it would evaluate at is within `threshold` of
    the latent that velocity was computed at (relative L1 distance: sum |x - x_last| < threshold * sum |x_last|) and
    `phase(t)` (whether CFG is on) has not changed; otherwise it runs `velocity`. A zeroth-order hold of v, as the
    TeaCache-style caches of other diffusion transformers hold their residuals. Decided from the host's latent
    alone, so in-process and every pool split skip the same steps. `evaluations` counts the model runs.
    """

    def __init__(self, velocity: Callable[[Tensor, float], Tensor], threshold: float, phase: Callable[[float], object]):
        self.velocity, self.threshold, self.phase = velocity, threshold, phase
        self.last: tuple[Tensor, Tensor, object] | None = None  # (x, v, phase) of the last evaluation
        self.evaluations = 0

    def __call__(self, x: Tensor, t: float) -> Tensor:
        phase = self.phase(t)
        if self.last is not None:
            x_last, v_last, phase_last = self.last
            if phase == phase_last and (x - x_last).abs().sum() < self.threshold * x_last.abs().sum():
                return v_last
        v = self.velocity(x, t)
        self.last, self.evaluations = (x, v, phase), self.evaluations + 1
        return v


def euler_sample(
    x: Tensor,
    timesteps: list[float],
    velocity: Callable[[Tensor, float], Tensor],
    progress: Callable[[int, int], None] | None = None,
    interrupt: Callable[[], None] | None = None,
) -> Tensor:
    """Integrate x [N, C] (fp32) from timesteps[0] to timesteps[-1] with Euler steps.

    Args:
        velocity: (x, t) -> v; evaluated len(timesteps) - 1 times.
        progress: called as progress(step, total) after each step.
        interrupt: called before each step; it raises to stop sampling.
    """
    total = len(timesteps) - 1
    for i in range(total):
        if interrupt is not None:
            interrupt()
        v = velocity(x, timesteps[i])
        x = x - v.to(x) * (timesteps[i] - timesteps[i + 1])  # fp32 dt, as t_i - t_{i+1} of fp32 values
        if progress is not None:
            progress(i + 1, total)
    return x
