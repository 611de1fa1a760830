"""Rules on independent batches stacked along leading axes, ``(..., B, T)``.

The toy runs many seeds in one array program; every rule must then compute its statistics per leading
index. Metamorphic test: applying a rule to a stack of R batches equals applying it to each batch.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import Backend
from tests.rule_strategies import batches, output_to_numpy, rules_for, run_rule, token_rule_names

NP = Backend("numpy")
NAMES = [*token_rule_names(), "compose"]


def _stack(ds):
    first = ds[0]

    def field(name):
        vals = [getattr(d, name) for d in ds]
        if any(v is None for v in vals):
            if name == "old_logp":  # None means "equal to logp"
                vals = [d.logp if v is None else v for d, v in zip(ds, vals, strict=True)]
            else:
                return None
        return np.stack(vals)

    names = ("logp", "adv", "valid", "old_logp", "entropy", "baseline", "group", "noise", "position")
    return type(first)(**{n: field(n) for n in names}, step=first.step, stage=first.stage)


def _split(d, i):
    names = ("logp", "adv", "valid", "old_logp", "entropy", "baseline", "group", "noise", "position")
    vals = {n: (None if getattr(d, n) is None else getattr(d, n)[i]) for n in names}
    return type(d)(**vals, step=d.step, stage=d.stage)


@given(data=st.data(), name=st.sampled_from(NAMES), runs=st.integers(1, 3))
def test_stacked_batches_equal_separate_batches(data, name, runs):
    b = data.draw(st.integers(1, 5))
    t = data.draw(st.integers(1, 8))
    ds = [data.draw(batches(min_b=b, max_b=b, min_t=t, max_t=t)) for _ in range(runs)]
    step, stage = ds[0].step, ds[0].stage
    ds = [type(d)(**{**d.__dict__, "step": step, "stage": stage}) for d in ds]
    rule = data.draw(rules_for(name))
    stacked = _stack(ds)
    together = output_to_numpy(run_rule(NP, rule, stacked))
    for i in range(runs):
        alone = output_to_numpy(run_rule(NP, rule, _split(stacked, i)))
        np.testing.assert_array_equal(together["keep"][i], alone["keep"])
        for f in ("adv", "weight", "kl_coef", "entropy_coef"):
            if alone[f] is None:
                assert together[f] is None, f
            else:
                np.testing.assert_allclose(together[f][i], alone[f], rtol=1e-12, atol=1e-15, err_msg=f)
        for k, v in alone["metrics"].items():
            got = together["metrics"][k]
            got = got[i] if np.ndim(got) > 0 else got
            np.testing.assert_allclose(got, v, rtol=1e-12, atol=1e-15, equal_nan=True, err_msg=k)
