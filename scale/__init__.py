"""scale: the torch + transformers GRPO trainer for real LLMs, running the same :mod:`theory.rules` rules.

Layout (one module or package a concern): :mod:`scale.config` (typed config sections, validation) and
:mod:`scale.flags` (flags, files); :mod:`scale.train` (the loop, one call per phase); :mod:`scale.rollout`
(KV-cache sampler, training forward), :mod:`scale.token_stats` (``log p``, ``H``, ``S*``, ``E_p[S]`` from
the lm_head, chunked), :mod:`scale.loss` (the one place a rule's output meets the loss);
:mod:`scale.tasks` and :mod:`scale.grading` (problems, checkers, graders, pass@k); :mod:`scale.models`,
:mod:`scale.checkpoint`, :mod:`scale.metrics_log`, :mod:`scale.plot`, :mod:`scale.distributed`;
:mod:`scale.adapters` (the rules inside TRL and verl). It imports :mod:`theory`, never :mod:`toy`.

Importing the package pulls in nothing: torch and transformers are imported by the modules that need
them (``scale.config`` and ``scale.flags`` never do).
"""

from theory._name_guard import check_scale_name

check_scale_name()
