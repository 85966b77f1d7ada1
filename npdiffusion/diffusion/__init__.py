"""Diffusion math: schedules, the forward process, posteriors, objectives, the variational bound, guidance."""
