"""Learning from the policy's own samples: sampling (``rollout``), the shared generation loop
(``generations``), rewards (``rewards``), GRPO's advantages and policy loss (``advantages``,
``policy_losses``), and the three on-policy batch sources: ``grpo``, ``online_dpo`` and the
rounds of ``iterative`` DPO."""
