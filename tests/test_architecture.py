"""The layout's promises: ``toy -> theory <- scale`` (the CLI above them), one spec grammar, one set of
batch statistics with one empty-set answer, and modules and functions short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from theory.diagnostics import batch_statistics, masked_mean, tabular_entropy_change

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("theory", "toy", "scale", "entdyn")
#: package -> packages it must never import, anywhere in it
FORBIDDEN = {"theory": {"toy", "scale", "entdyn"}, "toy": {"scale", "entdyn"}, "scale": {"toy", "entdyn"},
             "entdyn": set()}  # fmt: skip
#: package -> libraries it must not import at module level (inside a function that only torch arrays
#: reach is fine: theory.rules takes torch's top-k for torch input)
NO_MODULE_LEVEL = {"theory": {"torch", "transformers"}, "toy": {"torch", "transformers"}, "scale": set(),
                   "entdyn": {"torch", "transformers"}}  # fmt: skip
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 120


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported(path: Path, module_level: bool = False) -> set[str]:
    """Top-level package names a module imports (anywhere in it, or only in its module-level statements);
    relative imports resolve inside the module's own package, so they are left out."""
    names = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body if module_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package):
    bad = {
        str(p.relative_to(ROOT)): sorted(_imported(p) & FORBIDDEN[package])
        for p in _sources(package)
        if _imported(p) & FORBIDDEN[package]
    }
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}: {bad}"
    heavy = {
        str(p.relative_to(ROOT)): sorted(_imported(p, module_level=True) & NO_MODULE_LEVEL[package])
        for p in _sources(package)
        if _imported(p, module_level=True) & NO_MODULE_LEVEL[package]
    }
    assert not heavy, f"{package} imports at module level: {heavy}"


@pytest.mark.parametrize("package", PACKAGES)
def test_files_and_functions_stay_readable(package):
    too_long = []
    for p in _sources(package):
        text = p.read_text(encoding="utf-8")
        rel = p.relative_to(ROOT)
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}() {n} lines")
    assert not too_long, too_long


def test_the_train_loop_phases_are_short():
    """``scale.train.loop.train_step`` reads top to bottom: every function of the loop <= 80 lines."""
    tree = ast.parse((ROOT / "scale" / "train" / "loop.py").read_text(encoding="utf-8"))
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80]  # fmt: skip
    assert not long, long


# ------------------------------------------------------------------ one spec grammar (theory.spec)


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("YES", True), ("0", False),
                                         ("false", False), ("No", False)])  # fmt: skip
def test_rules_tasks_and_the_detector_read_booleans_alike(text, value):
    from scale.tasks import make_task
    from theory.rules import make_rule

    assert make_rule(f"clip_v:center={text}").center is value
    assert make_rule(f"high_entropy_mask:in_normaliser={text}").in_normaliser is value
    assert make_task(f"countdown:use_all={text},n_train=2,n_eval=1").params["use_all"] is value


def test_rules_tasks_and_the_detector_read_numbers_alike():
    from scale.config import ConfigError, make_stage_detector
    from scale.tasks import make_task
    from theory.rules import make_rule

    assert make_rule("position_bonus:start_step=1e1").start_step == 10
    assert make_stage_detector("stage_detector:window=1e1").window == 10
    assert make_task("arithmetic:digits=1e0,n_train=2,n_eval=1").params["digits"] == 1
    with pytest.raises(ValueError, match=r"position_bonus\.start_step expects an integer, got '2\.5'"):
        make_rule("position_bonus:start_step=2.5")
    with pytest.raises(ConfigError, match=r"stage_detector\.window expects an integer, got '2\.5'"):
        make_stage_detector("stage_detector:window=2.5")
    with pytest.raises(ValueError, match=r"arithmetic\.digits expects an integer, got '2\.5'"):
        make_task("arithmetic:digits=2.5")
    for bad in ("clip_b:mu=abc", "stage_detector:ema=abc"):
        with pytest.raises(ValueError, match="expects a number, got 'abc'"):
            (make_stage_detector if bad.startswith("stage") else make_rule)(bad)


# ------------------------------------------------- one set of batch statistics (theory.diagnostics)


def _batch(xp_array, valid, adv):
    shape = valid.shape
    return {
        "entropy": xp_array(np.full(shape, 1.5)),
        "logp": xp_array(np.full(shape, -0.7)),
        "s_star": xp_array(np.full(shape, 0.3)),
        "baseline": xp_array(np.full(shape, 0.1)),
        "adv": xp_array(adv),
        "valid": xp_array(valid),
    }


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_empty_sets_give_zero_everywhere(backend):
    """The documented answer: a mean over no token is 0 (not NaN), on NumPy and torch alike."""
    convert = np.asarray if backend == "numpy" else pytest.importorskip("torch").as_tensor
    none = np.zeros((3, 4), dtype=bool)
    st = batch_statistics(**_batch(convert, none, np.ones((3, 4))))
    values = {k: float(v) for k, v in st.items()}
    assert values == dict.fromkeys(values, 0.0), values
    total, parts = tabular_entropy_change(convert(np.ones((3, 4))), convert(np.ones((3, 4))),
                                          convert(np.ones((3, 4))), convert(none))  # fmt: skip
    assert float(total) == 0.0 and all(float(v) == 0.0 for v in parts.values())
    # tokens, but none with A < 0: entropy/neg is 0, entropy/pos the mean
    some = np.ones((3, 4), dtype=bool)
    st = batch_statistics(**_batch(convert, some, np.ones((3, 4))))
    assert float(st["entropy/neg"]) == 0.0 and float(st["entropy/pos"]) == pytest.approx(1.5)
    assert float(st["theory/cor35_ratio"]) == pytest.approx(1.5)  # |0.3| / |0.3 - 0.1|
    assert float(st["quad/pos_high_frac"]) == 1.0


def test_backends_agree_on_the_statistics():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shape = (2, 6, 5)  # leading axis: independent batches
    arrays = {k: rng.normal(size=shape) for k in ("entropy", "logp", "s_star", "baseline", "adv")}
    arrays["valid"] = rng.random(shape) < 0.7
    st_np = batch_statistics(**arrays)
    st_t = batch_statistics(**{k: torch.as_tensor(v) for k, v in arrays.items()})
    assert set(st_np) == set(st_t)
    for k in st_np:
        assert st_np[k].shape == (2,), k
        np.testing.assert_allclose(st_t[k].numpy(), st_np[k], rtol=1e-12, err_msg=k)
    mean = masked_mean(arrays["entropy"], arrays["valid"])
    np.testing.assert_allclose(mean, [arrays["entropy"][i][arrays["valid"][i]].mean() for i in range(2)])
