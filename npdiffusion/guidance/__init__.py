"""Guidance by gradients: a noise-aware classifier and the guided sampling step of Dhariwal & Nichol,
and CLIP guidance through the VAE decoder. Derivations: docs/guidance.md.

* ``classifier.NoiseAwareClassifier``: logits of one shapes attribute from (x_t, t), with a
  hand-written backward; ``classifier.log_prob_grad`` gives log p(y | x_t, t) and its x_t-gradient.
* ``classifier_guidance``: eps_hat = eps - s sqrt(1 - abar_t) grad_x log p(y | x_t, t), alone or
  after classifier-free guidance, and a small guided sampling loop over any scheduler.
* ``clip_guidance``: grad of the CLIP similarity of the prompt and the decoded x0 prediction.
"""
