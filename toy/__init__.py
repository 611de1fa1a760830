"""toy: NumPy experiments on tabular softmax policies that check the entropy-dynamics theory.

Modules:

* :mod:`toy.demo`: theory vs exact simulation of one GRPO logit step on random softmax states
  (``entdyn demo``).
* :mod:`toy.bandit`: K-armed, contextual and sequence softmax bandits (:class:`toy.bandit.Bandit`) and
  vectorised inverse-CDF sampling.
* :mod:`toy.grpo`: GRPO over many runs at once (:func:`toy.grpo.step`), any rule from
  :mod:`theory.rules`, with predicted vs realised entropy change per update (batch statistics from
  :mod:`theory.diagnostics`).
* :mod:`toy.kernels`: the step's dense passes per cache-sized block of runs, and the runs' random streams
  drawn ahead (:class:`toy.kernels.RunStreams`).
* :mod:`toy.run`: training over many seeds (:func:`toy.run.train`); :mod:`toy.experiments`: the named
  experiments (``entdyn toy``); :mod:`toy.report` and :mod:`toy.plotting`: their tables, JSON and figures.

Everything here is NumPy + matplotlib (never torch) and takes its formulas from :mod:`theory`.
"""
