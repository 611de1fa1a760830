"""entdyn: the command line above the three packages (``entdyn = entdyn.cli:main``; :mod:`entdyn.cli`).

``theory`` (formulas and rules) is imported by ``toy`` (the NumPy bandit lab) and by ``scale`` (the torch
trainer); neither of those imports the other. The CLI is the one place that reaches all three.
"""
