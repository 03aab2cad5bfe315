"""Sampler: shifted schedule, CFG interval, CFG/renorm formulas, Euler loop with progress and interrupt."""

import pytest
import torch

from bagel_vae_pp.bagel.sampler import (
    GuidanceOptions,
    StepCache,
    build_schedule,
    combine_cfg,
    euler_sample,
    is_guided,
)


class TestSchedule:
    def test_runs_from_noise_to_data_with_shift(self):
        t = build_schedule(5, 3.0)
        assert len(t) == 5 and t[0] == 1.0 and t[-1] == 0.0
        assert t[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))

    def test_interval_is_open_below_closed_above(self):
        assert is_guided(1.0, (0.4, 1.0)) and not is_guided(0.4, (0.4, 1.0))
        assert is_guided(torch.tensor(0.4000001).item(), (0.4, 1.0))


class TestCombine:
    v, v_text, v_img = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4)

    def test_text_scale_at_most_one_returns_the_conditional_velocity(self):
        assert combine_cfg(self.v, None, None, 1.0, 2.0, "global", 0.0) is self.v

    def test_without_renorm_clamp_it_is_nested_cfg(self):
        out = combine_cfg(self.v, self.v_text, self.v_img, 4.0, 1.5, "global", 1.0)
        v_txt = self.v_text + 4.0 * (self.v - self.v_text)
        torch.testing.assert_close(out, self.v_img + 1.5 * (v_txt - self.v_img))

    def test_global_renorm_caps_the_norm_at_the_conditional_norm(self):
        out = combine_cfg(self.v, self.v_text, None, 4.0, 1.0, "global", 0.0)
        assert torch.norm(out) <= torch.norm(self.v) * (1 + 1e-5)

    def test_channel_renorm_caps_each_token(self):
        out = combine_cfg(self.v, self.v_text, self.v_img, 4.0, 2.0, "channel", 0.0)
        assert (out.norm(dim=-1) <= self.v.norm(dim=-1) * (1 + 1e-5)).all()

    def test_text_channel_renorms_before_image_guidance(self):
        out = combine_cfg(self.v, self.v_text, self.v_img, 4.0, 2.0, "text_channel", 0.0)
        v_txt = self.v_text + 4.0 * (self.v - self.v_text)
        scale = (self.v.norm(dim=-1, keepdim=True) / (v_txt.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
        torch.testing.assert_close(out, self.v_img + 2.0 * (v_txt * scale - self.v_img))


class TestOptions:
    def test_unknown_renorm_type_names_input_and_allowed_values(self):
        with pytest.raises(
            ValueError, match=r"cfg_renorm_type is 'local'; allowed values are global, channel, text_channel"
        ):
            GuidanceOptions(50, 3.0, 4.0, 1.0, (0.4, 1.0), "local", 0.0)

    def test_renorm_min_outside_unit_range_is_rejected(self):
        with pytest.raises(ValueError, match="cfg_renorm_min"):
            GuidanceOptions(50, 3.0, 4.0, 1.0, (0.4, 1.0), "global", 1.5)


class TestEuler:
    def test_steps_are_schedule_minus_one_with_progress_each_step(self):
        calls, seen = [], []
        x = euler_sample(torch.ones(2, 3), build_schedule(5, 1.0), lambda x, t: seen.append(t) or torch.ones_like(x),
                         progress=lambda done, total: calls.append((done, total)))  # fmt: skip
        assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)] and len(seen) == 4
        torch.testing.assert_close(x, torch.zeros(2, 3))  # constant v=1 from t=1 to 0: x - 1

    def test_interrupt_stops_between_steps(self):
        evaluations = []

        def interrupt():
            if len(evaluations) == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            euler_sample(
                torch.ones(1, 1), build_schedule(10, 3.0), lambda x, t: evaluations.append(t) or x, interrupt=interrupt
            )
        assert len(evaluations) == 2


def drift(x, t):
    """A stand-in velocity that changes with x and t (and counts nothing itself)."""
    return torch.sin(3 * x) + t


class TestStepCache:
    """Against the rule written out here: evaluate unless the latent is within `threshold` (relative L1) of the one
    last evaluated at and the guidance phase is unchanged; then reuse that velocity."""

    def reference(self, x, schedule, threshold, phase):
        evaluated, last = [], None
        for i in range(len(schedule) - 1):
            t = schedule[i]
            near = last is not None and phase(t) == last[2]
            near = near and float((x - last[0]).abs().sum()) < threshold * float(last[0].abs().sum())
            if not near:
                last = (x, drift(x, t), phase(t))
                evaluated.append(i)
            x = x - last[1] * (schedule[i] - schedule[i + 1])
        return x, evaluated

    @pytest.mark.parametrize("threshold", [0.0, 0.05, 0.2, 0.6])
    def test_skips_the_steps_the_rule_skips(self, threshold):
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        schedule = build_schedule(30, 3.0)
        phase = lambda t: is_guided(t, (0.4, 1.0))  # noqa: E731
        steps = []
        cache = StepCache(lambda x, t: steps.append(t) or drift(x, t), threshold, phase)
        got = euler_sample(x, schedule, cache)
        want, evaluated = self.reference(x, schedule, threshold, phase)
        assert steps == [schedule[i] for i in evaluated] and cache.evaluations == len(evaluated)
        assert torch.equal(got, want)
        if threshold == 0.0:
            assert len(steps) == 29
        if threshold == 0.6:
            assert len(steps) < 15

    def test_a_guidance_switch_always_evaluates(self):
        """With a huge threshold only the first step and the step where CFG turns off run the model."""
        schedule = build_schedule(20, 3.0)
        steps = []
        cache = StepCache(lambda x, t: steps.append(t) or drift(x, t), 1.0, lambda t: is_guided(t, (0.4, 1.0)))
        euler_sample(torch.ones(4, 2), schedule, cache)
        first_unguided = next(t for t in schedule if not is_guided(t, (0.4, 1.0)))
        assert steps == [schedule[0], first_unguided]

    @pytest.mark.parametrize("value", [-0.1, 1.5])
    def test_threshold_outside_its_range_is_refused(self, value):
        with pytest.raises(ValueError, match=rf"step_cache is {value}; allowed range is 0.0 \(off\) to 1.0"):
            GuidanceOptions(50, 3.0, 4.0, 1.5, (0.4, 1.0), "global", 0.0, value)
