"""Tree templates fitted to recorded acceptance (`proposers.tree_fit`)."""

import numpy as np
import pytest

from proposers.candidates import EMPTY
from proposers.reference.runner import GenerationConfig
from proposers.templates import RETRIEVAL, TemplateError, TreeTemplate, chain, load_template
from proposers.tree_fit import (
    AcceptanceRecord,
    expected_accepted,
    fit_template,
    load_hits,
    path_hits,
    save_hits,
    slot_hits,
)
from tests.conftest import dev_questions


def test_slot_hits_marks_emitted_tokens_and_never_empty_slots_or_unknown_depths():
    table = np.array([[5, 6, EMPTY], [7, 5, 8], [9, EMPTY, 9]])  # 3 deep, top-2 + R
    hits = slot_hits(table, [6, 8])  # depth 3 not known (the output ended)
    assert hits.tolist() == [[False, True, False], [False, False, True], [False, False, False]]
    assert not slot_hits(np.full((2, 3), EMPTY), []).any()


def _toy_hits(rng, steps=400):
    """Top-1 right 60% at each depth given the parent; retrieval right 50% on its own
    chain (independent); column 1 right where column 0 is not, 20%."""
    hits = np.zeros((steps, 4, 3), dtype=bool)  # depth 4, top-2 + R
    for d in range(4):
        top1 = rng.random(steps) < 0.6
        hits[:, d, 0] = top1
        hits[:, d, 1] = ~top1 & (rng.random(steps) < 0.2)
        hits[:, d, 2] = rng.random(steps) < 0.5
    return hits


def test_expected_accepted_counts_depths_with_a_right_path():
    hits = _toy_hits(np.random.default_rng(0))
    t = TreeTemplate("t", top_k=2, max_depth=2, paths=((0,), (1,), (RETRIEVAL,), (0, 0)))
    depth1 = hits[:, 0, 0] | hits[:, 0, 1] | hits[:, 0, 2]
    depth2 = hits[:, 0, 0] & hits[:, 1, 0]
    assert expected_accepted(hits, t) == pytest.approx(depth1.mean() + depth2.mean())
    assert path_hits(hits, (0, 0)).tolist() == depth2.tolist()
    with pytest.raises(TemplateError, match="at least as deep"):
        expected_accepted(hits, chain(5))


def test_fit_beats_or_matches_every_tree_of_its_size_it_is_compared_with():
    rng = np.random.default_rng(1)
    hits = _toy_hits(rng)
    fitted = fit_template(hits, 6, name="fit")
    assert fitted.num_nodes <= 6 and fitted.name == "fit"
    TreeTemplate.from_dict(fitted.to_dict())  # a valid, prefix-closed template
    rivals = [chain(4), chain(4, RETRIEVAL),
              TreeTemplate("mix", 2, 3, ((0,), (RETRIEVAL,), (0, 0), (RETRIEVAL, RETRIEVAL),
                                         (1,), (0, 0, 0)))]
    for rival in rivals:
        assert expected_accepted(hits, fitted) >= expected_accepted(hits, rival) - 1e-12
    # With one node only the best single slot at depth 1 is worth it: top-1 (60%).
    assert fit_template(hits, 1, name="one").paths == ((0,),)


def test_fit_mixes_columns_along_a_path():
    """Retrieval repeats top-1 at depth 1 (adds nothing there) and is right at depth 2,
    where top-1 never is: a node's token depends only on its depth and column, so the fit
    hangs the retrieval node under top-1 and spends no node on the repeat."""
    steps = 100
    hits = np.zeros((steps, 2, 2), dtype=bool)  # depth 2, top-1 + R
    hits[:, 0, 0] = hits[:, 0, 1] = True
    hits[:, 1, 1] = True
    fitted = fit_template(hits, 3, name="f")
    assert fitted.paths == ((0,), (0, RETRIEVAL))  # stops: a third node adds nothing
    assert expected_accepted(hits, fitted) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_template(np.zeros((5, 2, 2), dtype=bool), 3, name="none")


def test_record_predicts_the_runner_accepted_lengths(runner, tmp_path):
    """Recorded on the real model, the record's accepted length of the template that ran
    equals what each step accepted. `pld` drafts no noise (empty slots are pruned), so
    nothing the record cannot see can be accepted; the last step is cut at max tokens."""
    template = load_template("tree-16")
    cfg = GenerationConfig(method="pld", max_new_tokens=40, template="tree-16")
    rec = AcceptanceRecord()
    ids = runner.encode_chat(dev_questions(1)[1]["turns"][0])  # translation: retrieval hits
    steps = list(runner.stream(ids, cfg, observe=rec.observe))
    rec.close(list(ids) + [t for s in steps for t in s.token_ids])
    assert len(rec) == len(steps)
    hits = rec.hits
    assert hits.shape[1:] == (template.max_depth, template.top_k + 1)
    predicted = [expected_accepted(hits[i: i + 1], template) for i in range(len(steps))]
    actual = [s.accepted_depth for s in steps]
    assert predicted[:-1] == actual[:-1] and sum(actual) > 0
    save_hits(tmp_path / "h.npz", hits)
    assert (load_hits(tmp_path / "h.npz") == hits).all()


def test_fit_tree_cli_fits_scores_and_plots_a_saved_record(tmp_path):
    import json

    from benchmarks.reference import fit_tree

    hits = _toy_hits(np.random.default_rng(2), steps=200)
    record = tmp_path / "r.npz"
    np.savez_compressed(record, hits=hits)
    out, report = tmp_path / "t.json", tmp_path / "rep.json"
    argv = ["--hits", str(record), "--nodes", "5", "--sizes", "2,5", "--compare", "tree-8",
            "--out", str(out), "--report", str(report)]
    assert fit_tree.main(argv) == 0
    fitted = TreeTemplate.from_dict(json.loads(out.read_text()))
    assert fitted.num_nodes <= 5 and fitted.name == "fitted-5"
    result = json.loads(report.read_text())
    assert [r["name"] for r in result["templates"]] == ["fitted-5", "tree-8"]
    assert [r["nodes"] for r in result["sizes"]] == [2, 5]
    assert result["steps_fit"] + result["steps_held_out"] == 200
    assert report.with_suffix(".png").exists()
    # A template deeper than the saved record: one line, exit 2, no traceback.
    assert fit_tree.main(["--hits", str(record), "--compare", "paper-68-r16"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "must be >= 1"),
    (["--sizes", "4,x", "--report", "r.json"], "comma-separated"),
    (["--sizes", "4"], "needs --report"),
    (["--compare", "no-such"], "unknown template"),
    (["--collect-template", "tree-8", "--compare", "paper-68"], "does not fit a record"),
])
def test_fit_tree_cli_rejects_bad_arguments(argv, message, capsys):
    from benchmarks.reference import fit_tree

    with pytest.raises(SystemExit) as exc:
        fit_tree.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
