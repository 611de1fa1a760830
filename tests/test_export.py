"""Checkpoints as Hugging Face model directories, and ``entdyn export`` (issue 19), on the tiny model, CPU.

One 3-step run (a checkpoint at every step) is trained once for the module; while it saves, a spy records
what the trainer's own model computes at that step (the logits of a fixed prompt and its greedy
continuation), so that every loaded checkpoint or export is compared with the trainer, not with itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_model  # noqa: E402
from safetensors.torch import load_model as load_weights  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from entdyn.cli import main as cli_main  # noqa: E402
from scale.checkpoint import (  # noqa: E402
    FILES,
    MANIFEST,
    TRAINING_FILES,
    checkpoint_dir,
    hf_state_dict,
    list_checkpoints,
    verify_checkpoint,
    write_model_files,
)
from scale.flags import resolve  # noqa: E402
from scale.metrics_log import read_metrics  # noqa: E402
from scale.models import build_tiny  # noqa: E402
from scale.train import setup as setup_mod  # noqa: E402
from scale.train import train  # noqa: E402
from tests.test_faults import copy_run, one_error_line, tree, truncate  # noqa: E402
from tests.test_scale_train import make_cfg, text_reward, untimed  # noqa: E402

PROMPT = "<|im_start|>user\n3+4?<|im_end|>\n<|im_start|>assistant\n"
NEW_TOKENS = 6
STEPS = (1, 2, 3)


@dataclass
class Trained:
    run: Path
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> the trainer's logits of PROMPT
    greedy: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> its greedy continuation


def probe(model, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of PROMPT, PROMPT plus NEW_TOKENS greedy tokens) of ``model`` in eval mode."""
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits.detach().clone()
        greedy = model.generate(**ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, greedy


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """A finished 3-step run with a checkpoint at every step (all kept), and what the trainer's model
    computed at each save."""
    every_step = {"steps": 3, "save_every": 1, "keep_checkpoints": 3}
    cfg = make_cfg(tmp_path_factory.mktemp("export"), run=every_step)
    found = Trained(Path(cfg.run.out))
    real_save = setup_mod.save_checkpoint

    def spy_save(run_dir, step, **kw):
        found.logits[step], found.greedy[step] = probe(kw["model"], kw["tokenizer"])
        return real_save(run_dir, step, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setup_mod, "save_checkpoint", spy_save)
        train(cfg, reward_fn=text_reward)
    assert sorted(found.logits) == list(STEPS)
    return found


def load_hf(folder: Path):
    """``from_pretrained`` of a model directory, as a user of the Hugging Face stack would load it."""
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tok


def assert_matches_trainer(folder: Path, trained: Trained, step: int) -> None:
    model, tok = load_hf(folder)
    logits, greedy = probe(model, tok)
    assert torch.equal(logits, trained.logits[step]), (logits - trained.logits[step]).abs().max()
    assert torch.equal(greedy, trained.greedy[step])
    assert greedy.shape[1] == tok(PROMPT, return_tensors="pt").input_ids.shape[1] + NEW_TOKENS
    assert isinstance(tok.decode(greedy[0]), str)


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli_main(["export", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def make_old_format(ckpt: Path) -> None:
    """Rewrite ``ckpt`` as checkpoints were written before issue 19: ``safetensors.torch.save_model``'s
    weights (the tied weight under ``lm_head.weight``, no ``format`` metadata), no config or tokenizer
    files, and a manifest of the three files of :data:`scale.checkpoint.FILES`."""
    model, _ = build_tiny()
    load_weights(model, str(ckpt / "model.safetensors"))
    for item in ckpt.iterdir():
        if item.name not in FILES:
            item.unlink()
    save_model(model, str(ckpt / "model.safetensors"))
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys() and "model.embed_tokens.weight" not in f.keys()
        assert "format" not in (f.metadata() or {})
    sha = {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest() for n in FILES}
    entries = {n: {"bytes": (ckpt / n).stat().st_size, "sha256": sha[n]} for n in FILES}
    (ckpt / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# every checkpoint is a Hugging Face model directory


def test_every_checkpoint_loads_with_from_pretrained_and_matches_the_trainer(trained):
    ckpts = list_checkpoints(trained.run)
    assert [int(p.name[5:]) for p in ckpts] == list(STEPS)
    for step, ckpt in zip(STEPS, ckpts, strict=True):
        assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
            p.name for p in ckpt.iterdir()
        }
        assert_matches_trainer(ckpt, trained, step)
    assert not torch.equal(trained.logits[1], trained.logits[3])  # the steps trained something


def test_checkpoint_weights_follow_the_hugging_face_conventions(trained):
    ckpt = list_checkpoints(trained.run)[-1]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # stored once, as HF does
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    model, tok = load_hf(ckpt)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # re-tied
    ref_model, ref_tok = build_tiny()
    assert set(keys) | {"lm_head.weight"} == set(ref_model.state_dict())
    chat = [{"role": "user", "content": "12+7?"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == ref_tok.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (tok.pad_token_id, tok.eos_token_id, tok.padding_side) == (2, 2, "right")


def test_the_manifest_covers_the_new_files(trained, tmp_path):
    run = copy_run(trained.run, tmp_path / "run")
    ckpt = list_checkpoints(run)[-1]
    listed = set(json.loads((ckpt / MANIFEST).read_text())["files"])
    assert listed == {p.name for p in ckpt.iterdir()} - {MANIFEST}
    assert verify_checkpoint(ckpt) is None
    config = (ckpt / "config.json").read_bytes()
    truncate(ckpt / "config.json")
    assert "config.json has" in verify_checkpoint(ckpt)
    (ckpt / "config.json").write_bytes(config)
    assert verify_checkpoint(ckpt) is None
    (ckpt / "tokenizer.json").unlink()
    assert verify_checkpoint(ckpt) == "missing tokenizer.json (the manifest lists it)"


def test_hf_names_for_a_gathered_fsdp_state_and_an_fsdp_class(tmp_path):
    model, tok = build_tiny()
    gathered = {k: v.clone() for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    sd = hf_state_dict(model, gathered)  # full_model_state keeps the tied weight as lm_head.weight
    assert "lm_head.weight" not in sd
    assert torch.equal(sd["model.embed_tokens.weight"], model.lm_head.weight)
    wrapped = type("FSDPLlamaForCausalLM", (type(model),), {})  # what fully_shard makes the class
    model.__class__ = wrapped
    assert hf_state_dict(model).keys() == sd.keys()
    write_model_files(tmp_path, model, model_state=gathered)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(sd)


def test_write_model_files_records_float64_weights(tmp_path):
    model, tok = build_tiny()
    names = write_model_files(tmp_path, model.to(torch.float64), tok)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float64"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.dtype == torch.float64
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


# --------------------------------------------------------------------------------------------------
# checkpoints written before this layout


def test_an_old_format_checkpoint_verifies_and_resumes_like_a_new_one(trained, tmp_path):
    new, old = copy_run(trained.run, tmp_path / "new"), copy_run(trained.run, tmp_path / "old")
    make_old_format(list_checkpoints(old)[-1])
    assert verify_checkpoint(list_checkpoints(old)[-1]) is None
    for run in (new, old):
        train(resolve({"run.resume": str(run), "run.steps": 4}), reward_fn=text_reward)
    a = load_file(str(checkpoint_dir(new, 4) / "model.safetensors"))
    b = load_file(str(checkpoint_dir(old, 4) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert untimed(read_metrics(new)) == untimed(read_metrics(old))
    assert [r["step"] for r in read_metrics(old)] == [1, 2, 3, 4]


def test_export_rebuilds_an_old_format_checkpoint_from_the_runs_config(trained, tmp_path, capsys):
    run = copy_run(trained.run, tmp_path / "run")
    make_old_format(list_checkpoints(run)[-1])
    out = tmp_path / "hf"
    rc, stdout, err = cli([str(run), str(out)], capsys)
    assert rc == 0, err
    assert "step_000003" in stdout
    assert not set(TRAINING_FILES) & {p.name for p in out.iterdir()}
    assert_matches_trainer(out, trained, 3)


def test_export_of_an_old_checkpoint_whose_base_model_is_gone_is_one_line(trained, tmp_path, capsys):
    run = copy_run(trained.run, tmp_path / "run")
    make_old_format(list_checkpoints(run)[-1])
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("name: tiny", f"name: {tmp_path / 'gone'}"))
    rc, _, err = cli([str(run), str(tmp_path / "hf")], capsys)
    assert rc == 2
    line = one_error_line(err)
    assert "predates config.json" in line and "gone" in line
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))


# --------------------------------------------------------------------------------------------------
# entdyn export


def test_export_writes_a_clean_directory_that_loads_and_generates(trained, tmp_path, capsys):
    before = tree(trained.run)
    out = tmp_path / "deep" / "hf"
    rc, stdout, err = cli([str(trained.run), str(out)], capsys)
    assert rc == 0 and err == ""
    assert "step_000003" in stdout and str(out) in stdout
    ckpt = list_checkpoints(trained.run)[-1]
    written = {p.name for p in out.iterdir()}
    assert written == {p.name for p in ckpt.iterdir()} - set(TRAINING_FILES)
    assert "state.pt" not in written and "model.safetensors" in written
    assert (out / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert_matches_trainer(out, trained, 3)
    assert tree(trained.run) == before  # the run directory is only read
    assert not list(out.parent.glob(".hf.*"))  # no temp directory left


def test_export_of_a_given_step(trained, tmp_path, capsys):
    rc, stdout, _ = cli([str(trained.run), str(tmp_path / "hf"), "--step", "2"], capsys)
    assert rc == 0 and "step_000002" in stdout
    assert_matches_trainer(tmp_path / "hf", trained, 2)


def test_export_skips_a_damaged_newest_checkpoint_and_leaves_it_in_place(trained, tmp_path, capsys):
    run = copy_run(trained.run, tmp_path / "run")
    truncate(list_checkpoints(run)[-1] / "model.safetensors")
    before = tree(run)
    rc, stdout, err = cli([str(run), str(tmp_path / "hf")], capsys)
    assert rc == 0
    assert "skipped checkpoint step_000003" in err and "model.safetensors" in err
    assert "step_000002" in stdout
    assert_matches_trainer(tmp_path / "hf", trained, 2)
    assert tree(run) == before and [p.name for p in list_checkpoints(run)][-1] == "step_000003"


def test_export_overwrite_replaces_a_non_empty_out(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    rc, _, err = cli([str(trained.run), str(out)], capsys)
    assert rc == 2
    line = one_error_line(err)
    assert str(out) in line and "not empty" in line and "--overwrite" in line
    assert (out / "old.txt").read_text() == "keep me"
    rc, _, _ = cli([str(trained.run), str(out), "--overwrite"], capsys)
    assert rc == 0 and not (out / "old.txt").exists()
    assert_matches_trainer(out, trained, 3)


def test_export_into_an_existing_empty_directory(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    rc, _, _ = cli([str(trained.run), str(out)], capsys)
    assert rc == 0 and (out / "config.json").is_file()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no-run-dir", ["does not exist", "entdyn train"]),
        ("no-checkpoint", ["holds no checkpoint", "--save-every"]),
        ("no-such-step", ["no checkpoint of step 7", "1, 2, 3", "--step"]),
        ("damaged-step", ["step_000002", "damaged", "--step"]),
        ("all-damaged", ["no checkpoint", "intact", "--resume"]),
        ("out-is-run", ["holds the run directory", "outside"]),
        ("out-is-a-file", ["is a file"]),
        ("a-checkpoint-dir", ["is a checkpoint, not a run directory", "--step 3"]),
    ],
)
def test_export_user_errors_exit_2_with_one_line(trained, tmp_path, capsys, case, expected):
    run = copy_run(trained.run, tmp_path / "run")
    out = tmp_path / "hf"
    argv = [str(run), str(out)]
    if case == "no-run-dir":
        argv[0] = str(tmp_path / "nowhere")
    elif case == "no-checkpoint":
        argv[0] = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
    elif case == "no-such-step":
        argv += ["--step", "7"]
    elif case == "damaged-step":
        truncate(checkpoint_dir(run, 2) / "state.pt")
        argv += ["--step", "2"]
    elif case == "all-damaged":
        for p in list_checkpoints(run):
            truncate(p / "model.safetensors")
    elif case == "out-is-run":
        argv = [str(run), str(run), "--overwrite"]
    elif case == "out-is-a-file":
        out.write_text("x")
    elif case == "a-checkpoint-dir":
        argv[0] = str(checkpoint_dir(run, 3))
    before = tree(run)
    rc, stdout, err = cli(argv, capsys)
    assert rc == 2 and stdout == ""
    lines = [line for line in err.splitlines() if line.strip()]
    line = one_error_line(lines[-1]) if case == "all-damaged" else one_error_line(err)
    assert line.startswith("entdyn export: ")
    for text in expected:
        assert text in line, line
    if case in ("no-run-dir", "no-checkpoint"):
        assert argv[0] in line
    assert tree(run) == before  # nothing of the run changed
    assert (out.read_text() == "x") if case == "out-is-a-file" else not out.exists()
    if case == "all-damaged":
        assert sum("skipped checkpoint" in line for line in lines) == 3


def test_export_help_lists_the_flags_without_importing_torch():
    import subprocess
    import sys

    code = (
        "import contextlib, io, sys\n"
        "from entdyn.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        "        main(['export', '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules\n"
        "print(buf.getvalue())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for text in ("RUN_DIR", "OUT", "--step", "--overwrite", "from_pretrained"):
        assert text in proc.stdout
