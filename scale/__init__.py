"""scale: the torch + transformers GRPO trainer for real LLMs, sharing the entropy-dynamics rules (to come).

This package also hosts the ``entdyn`` command-line interface (:mod:`scale.cli`). Importing it pulls in
nothing: torch and transformers are imported lazily, only by the subcommands that need them.
"""
