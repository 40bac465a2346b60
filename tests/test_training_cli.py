"""`msn train`, `msn data`, `msn artifact`: parsing and one-line errors (exit 2)."""

from __future__ import annotations

import json

from msn.cli import main


def test_help_lists_training_commands(capsys):
    for argv in (["train", "--help"], ["data", "build", "--help"], ["artifact", "extract", "--help"]):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0
    out = capsys.readouterr().out
    assert "--span-length" in out and "--num-magpie" in out and "--rank" in out


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    bench = tmp_path / "specbench-dev.jsonl"
    bench.write_text(json.dumps({"messages": []}) + "\n")
    cases = [
        ["train", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")],
        ["train", "--data", str(bench), "--output", str(tmp_path / "o")],
        ["data", "build", "--output", str(tmp_path / "x.txt")],
        ["data", "build", "--output", str(tmp_path / "x.jsonl"), "--shard", "2/2"],
        ["data", "merge", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "m.jsonl")],
        ["artifact", "extract", "--tuned", str(tmp_path), "--output", str(tmp_path / "a")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error:" in err, err


def test_data_merge_drops_repeated_prompts(tmp_path):
    rows = [("a?", "1"), ("b?", "2"), ("A? ", "3")]  # the third repeats the first, normalised
    shard0, shard1 = tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"
    for path, part in ((shard0, rows[:2]), (shard1, rows[2:])):
        path.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in part))
    out = tmp_path / "merged.jsonl"
    assert main(["data", "merge", str(shard0), str(shard1), "--output", str(out)]) == 0
    kept = [json.loads(line)["messages"][1]["content"] for line in out.read_text().splitlines()]
    assert kept == ["1", "2"]
