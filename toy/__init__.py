"""toy: NumPy experiments on tabular softmax policies that check the entropy-dynamics theory.

Modules:

* :mod:`toy.demo`: theory vs exact simulation of one GRPO logit step on random softmax states
  (``entdyn demo``).

Everything here is NumPy + matplotlib (never torch) and takes its formulas from :mod:`theory`.
"""
