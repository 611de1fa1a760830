"""Adapters that run the :mod:`theory.rules` rules inside other RL trainers.

* :mod:`scale.adapters.trl` -- :class:`~scale.adapters.trl.EntropyRuleGRPOTrainer`, a subclass of TRL's
  ``GRPOTrainer`` that computes the per-token statistics the rules need inside TRL's own loop, calls the
  rule once per generation batch over all processes, applies its output in TRL's loss and logs the
  entropy diagnostics through TRL's metrics (needs ``trl``).
* :mod:`scale.adapters.verl` -- the rules as verl policy losses registered in verl's
  ``POLICY_LOSS_REGISTRY`` with verl's signature, plus the batch-level (global-statistics) variant
  (``verl`` itself is optional: the functions take the registry to use).

Importing this package imports nothing heavy (no torch, trl or verl); import the submodules explicitly.
"""

from theory._name_guard import check_scale_name

check_scale_name()
