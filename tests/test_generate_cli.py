"""`python -m cai_jax.tools.generate` end to end on the random tiny model."""
import json
import os
import re
import subprocess
import sys

import pytest

from cai_jax.tools.generate import read_prompts_file


def run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "cai_jax.tools.generate", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_jsonl_output_from_prompts_and_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is AI?"}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    out = run_cli("--model", "init:tiny", "--prompt", "Hello there", "--prompts_file", str(path),
                  "--chat", "--temperature", "0.8", "--top_k", "50", "--top_p", "0.95",
                  "--max_new_tokens", "6", "--seed", "3", "--batch_size", "2", "--ignore_eos",
                  "--format", "jsonl", "--no_progress")
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["prompt"] for r in records] == ["Hello there", "What is AI?", "Hi"]
    for r in records:
        assert r["finish_reason"] == "length" and r["num_tokens"] == 6
        assert isinstance(r["text"], str)


def test_text_output_format(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first line prompt\n\nsecond line prompt\n")
    args = ("--model", "init:tiny", "--prompts_file", str(path), "--temperature", "0",
            "--max_new_tokens", "5", "--no_progress")
    out = run_cli(*args)
    headers = re.findall(r"^=== \[(\d)\] (.*)$", out, flags=re.M)
    assert headers == [("0", "first line prompt"), ("1", "second line prompt")]
    footers = re.findall(r"^--- \((eos|stop_string|length), (\d+) tokens\)$", out, flags=re.M)
    assert len(footers) == 2 and all(int(n) <= 5 for _, n in footers)


def test_help_documents_every_flag():
    out = run_cli("--help")
    for flag in ("--model", "--prompt", "--prompts_file", "--chat", "--temperature", "--top_k",
                 "--top_p", "--max_new_tokens", "--seed", "--batch_size", "--stop", "--format"):
        assert flag in out


def test_prompts_file_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_prompts_file(str(path))


def test_a_bad_prompts_file_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + "{not json\n")
    proc = subprocess.run([sys.executable, "-m", "cai_jax.tools.generate", "--prompts_file", str(path)],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path} line 2: not JSON"), lines
