"""experiments/temperature_report.py: tables, summaries and the README blocks, on hand-made runs."""

import json
import struct

import pytest

from experiments import temperature_report as report

pytestmark = pytest.mark.backend_independent  # the scripts' logic, the same on every backend


def _run(arm, seed, acc, lr=0.1, factor=0.0, val=0.3, train_loss=1e-3, log_ggn=1.0):
    return {"arm": arm, "seed": seed, "lr": lr, "test_acc": acc, "val_acc": val, "test_loss": 2.0,
            "train_acc": 1.0, "train_loss": train_loss, "log_ggn_trace": log_ggn,
            "stddev": 5.57 if arm.startswith("gd+") and "penalty" not in arm else 0.0,
            "penalty_weight": factor * lr / 4, "history": {"step": [200, 400], "train_loss": [0.5, 0.25]}}


def _runs():
    """Seeds 0 and 1: small batch 0.40 / 0.44, GD 0.30 / 0.32, mixed 0.35 / 0.41, penalty at 1 and 4 x lr/4."""
    runs = {}
    accuracies = [(0.40, 0.30, 0.35, 0.32, 0.38), (0.44, 0.32, 0.41, 0.35, 0.44)]
    for seed, (small, gd, mixed, pen, pen4) in enumerate(accuracies):
        for arm, acc, factor in (("sgd32", small, 0), ("gd", gd, 0), ("gd+gaussian", mixed, 0),
                                 ("gd+penalty", pen, 1), ("gd+penalty x4", pen4, 4)):
            runs[(arm, seed)] = _run(arm, seed, acc, factor=factor)
    return runs


COST = {  # (vs GD, vs GD + GradientMix), each (median, q25, q75)
    "gd": ((1.0, 1.0, 1.0), (0.9, 0.8, 1.0)),
    "gd+gaussian": ((1.1, 1.0, 1.2), (1.0, 1.0, 1.0)),
    "gd+penalty": ((2.5, 2.5, 2.75), (2.5, 2.29, 2.61)),
}


def _cells(table, arm):
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    return [c.strip() for c in rows[arm].split("|")][1:-1]


def test_table_pairs_seeds_and_gives_the_share_recovered_per_seed_and_the_cost():
    cells = _cells(report.table(_runs(), cost=COST), "gd+gaussian")
    # Δ vs GD: +5, +9 -> 7.0 ± 2.8; vs small: -5, -3; recovered 50% and 75%.
    assert cells[4:8] == ["+7.0 ± 2.8", "-4.0 ± 1.4", "62 ± 18 %", "50, 75 %"]
    assert cells[-2:] == ["1.10 (1.00–1.20)", "1.00"]
    penalty = _cells(report.table(_runs(), cost=COST), "gd+penalty x4")
    # (0.38 - 0.30) / 0.10 = 80%, (0.44 - 0.32) / 0.12 = 100%; λ = 4 · 0.1/4; the timed penalty's cost.
    assert penalty[1] == "λ=0.1" and penalty[6:8] == ["90 ± 14 %", "80, 100 %"]
    assert penalty[-2:] == ["2.50 (2.50–2.75)", "2.50 (2.29–2.61)"]
    assert _cells(report.table(_runs(), cost=COST), "sgd32")[-2:] == ["–", "–"]
    # GD vs the small batch: -10 and -12 points.
    assert _cells(report.table(_runs()), "gd")[4:8] == ["–", "-11.0 ± 1.4", "–", "–"]


def test_step_time_ratios_are_medians_and_quartiles_of_per_round_ratios(tmp_path):
    path = tmp_path / "step_time.json"
    configs = {"plain": [100.0, 200.0, 100.0], "mix": [110.0, 200.0, 120.0], "penalty": [300.0, 500.0, 250.0]}
    path.write_text(json.dumps({"configs": {c: {"step_ms": t} for c, t in configs.items()}}))
    ratios = report.step_time_ratios(path)
    # Penalty / plain per round: 3, 2.5, 2.5 -> median 2.5, quartiles 2.5 and 2.75.
    assert ratios["gd+penalty"][0] == pytest.approx((2.5, 2.5, 2.75), rel=1e-12)
    # Penalty / mix: 2.727, 2.5, 2.083 -> median 2.5.
    assert ratios["gd+penalty"][1][0] == pytest.approx(2.5, rel=1e-12)
    assert ratios["gd"][0] == (1.0, 1.0, 1.0)


def test_phrases_mark_single_seeds_and_a_missing_gap():
    runs = _runs()
    del runs[("gd+gaussian", 1)]
    assert report.recovered_phrase(runs, "gd+gaussian") == "50 % (seed 0 only)"
    assert report.recovered_phrase(runs, "gd+isotropic") == "not run yet"
    assert report.recovered_phrase(_runs(), "gd+gaussian") == "62 ± 18 % (seeds 0, 1: 50, 75 %)"
    assert report.recovered_phrase(_runs(), "gd+gaussian", per_seed=False) == "62 ± 18 % (2 seeds)"
    assert report.gap_phrase(_runs()) == "11.0 ± 1.4 points below batch 32 (2 seeds: 10.0, 12.0; in every seed)"
    runs[("gd", 1)] = _run("gd", 1, 0.45)
    assert report.gap_phrase(runs).endswith("(2 seeds: 10.0, -1.0; not in every seed)")


def test_a_diverged_run_is_counted_and_named_but_left_out_of_every_statistic():
    runs = _runs()
    runs[("gd+penalty x4", 2)] = dict(_run("gd+penalty x4", 2, 0.10, factor=4, train_loss=float("nan")), steps=600)
    runs[("gd+penalty x16", 0)] = dict(_run("gd+penalty x16", 0, 0.10, factor=16, train_loss=float("nan")), steps=1200)
    penalty = _cells(report.table(runs), "gd+penalty x4")
    # Seeds 0 and 1 only: 80% and 100%, as without the diverged run.
    assert penalty[2] == "2 (+1 diverged)" and penalty[6:8] == ["90 ± 14 %", "80, 100 %"]
    assert _cells(report.table(runs), "gd+penalty x16")[2:5] == ["0 (+1 diverged)", "–", "–"]
    assert "| gd+penalty x4 | 38.0 | 44.0 | diverged |" in report.per_seed(runs)
    assert report.recovered_phrase(runs, "gd+penalty x4") == "90 ± 14 % (seeds 0, 1: 80, 100 %; seed 2 diverged)"
    assert report.recovered_phrase(runs, "gd+penalty x16") == "diverged (seed 0)"
    assert "| 16 | 0.4 | 30.0 (diverged at step 1200) |" in report.penalty_selection(runs)


def test_penalty_selection_chooses_the_larger_factor_on_validation():
    runs = _runs()
    runs[("gd+penalty x16", 0)] = _run("gd+penalty x16", 0, 0.39, factor=16, val=0.33)
    runs[("gd+penalty x4", 0)]["val_acc"] = 0.33  # a tie goes to the smaller factor
    rows = report.penalty_selection(runs).splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "4", "16"]
    assert [r.split("|")[-2].strip() for r in rows] == ["always run", "yes", ""]


def test_curvature_per_loss_pairs_seeds():
    runs = {("sgd32", 0): _run("sgd32", 0, 0.4, train_loss=2e-4, log_ggn=0.7),
            ("gd", 0): _run("gd", 0, 0.3, train_loss=2e-5, log_ggn=0.3)}
    # (e^0.3 / 2e-5) / (e^0.7 / 2e-4) = 10 e^-0.4 = 6.703.
    assert report.curvature_per_loss(runs, "gd", "sgd32")[0] == pytest.approx(6.7032, rel=1e-4)


def test_write_block_replaces_only_its_block_and_keeps_the_indentation(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(
        "intro\n<!-- BEGIN temperature_report:a -->\nold a\n<!-- END temperature_report:a -->\nmiddle\n"
        "- item\n  <!-- BEGIN temperature_report:b -->\n  old b\n  <!-- END temperature_report:b -->\nend\n"
    )
    report.write_block(path, "a", "new a\n\nline 2\n")
    report.write_block(path, "b", "new b")
    assert path.read_text() == (
        "intro\n<!-- BEGIN temperature_report:a -->\nnew a\n\nline 2\n<!-- END temperature_report:a -->\nmiddle\n"
        "- item\n  <!-- BEGIN temperature_report:b -->\n  new b\n  <!-- END temperature_report:b -->\nend\n"
    )
    report.write_block(path, "a", "new a\n\nline 2")  # idempotent
    assert path.read_text().count("new a") == 1
    with pytest.raises(ValueError, match="block 'c' exactly once"):
        report.write_block(path, "c", "x")
    path.write_text(path.read_text() * 2)
    with pytest.raises(ValueError, match="block 'a' exactly once"):
        report.write_block(path, "a", "x")


def test_the_committed_blocks_are_what_the_results_files_give():
    """Every block of both READMEs equals what --write makes of the committed results files."""
    records = {name: report.stats.load(report.RESULTS / name, key=None)
               for name in (report.DEFAULT_RESULTS.name, report.ADAM_RESULTS.name)}
    layerwise = {name: (rows, report.chosen_rate(rows)) for name, rows in
                 (("lars", report.load_if_present(report.LARS_RESULTS)),
                  ("lamb", report.load_if_present(report.LAMB_RESULTS)))}
    blocks = report.blocks(records[report.DEFAULT_RESULTS.name], records[report.ADAM_RESULTS.name],
                           report.step_time_ratios(), report.SGD_LR, report.ADAM_LR, layerwise)
    readmes = {"experiments": report.HERE / "README.md", "root": report.ROOT / "README.md"}
    for (readme, name), text in blocks.items():
        content = readmes[readme].read_text()
        begin = content.index(f"<!-- BEGIN temperature_report:{name} -->\n")
        end = content.index(f"<!-- END temperature_report:{name} -->")
        body = content[content.index("\n", begin) + 1:end].rstrip(" ")
        indent = content[content.rindex("\n", 0, begin) + 1:begin]
        expected = "\n".join(indent + line if line else line for line in text.rstrip().splitlines()) + "\n"
        assert body == expected, f"{readmes[readme].name}: block {name} is stale: run the --write command"
    # The recorded Regime A numbers (computed before this report existed).
    assert "| gd+gaussian | 5.57 | 3 | 34.0 ± 1.2 | +1.7 ± 0.4 | +0.1 ± 0.2 | 105 ± 14 % | 121, 95, 98 % |" in (
        blocks[("experiments", "sgd")])


def test_write_into_a_folder_leaves_the_repository_alone_and_copes_with_a_tiny_sweep(tmp_path, capsys):
    """--into: copies of both READMEs and the figure; a sweep of one seed, batch 16, no mixing arm but isotropic."""
    sgd, adam = tmp_path / "sgd.jsonl", tmp_path / "adam.jsonl"
    sgd_rows = [_run("sgd16", 0, 0.40), _run("gd", 0, 0.30), _run("gd+gaussian", 0, 0.36),
                _run("gd+penalty", 0, 0.31, factor=1), _run("gd+penalty x4", 0, 0.33, factor=4)]
    adam_rows = [dict(_run("sgd16", 0, 0.40, lr=1e-3), phase="rate"), dict(_run("gd", 0, 0.30, lr=1e-3), phase="rate"),
                 _run("gd+isotropic", 0, 0.29, lr=1e-3)]
    sgd.write_text("".join(json.dumps(r) + "\n" for r in sgd_rows))
    adam.write_text("".join(json.dumps(r) + "\n" for r in adam_rows))
    step_time = tmp_path / "step_time.json"
    step_time.write_text(json.dumps({"configs": {c: {"step_ms": [t]} for c, t in
                                                 (("plain", 100.0), ("mix", 104.0), ("penalty", 290.0))}}))
    before = {p: p.read_text() for p in (report.HERE / "README.md", report.ROOT / "README.md")}
    report.main(["--write", "--results", str(sgd), "--adam-results", str(adam), "--adam-lr", "1e-3",
                 "--step-time", str(step_time), "--into", str(tmp_path / "out")])
    assert {p: p.read_text() for p in before} == before
    readme = " ".join((tmp_path / "out" / "README.md").read_text().split())  # the wrapped lines as one
    # Isotropic: (0.29 - 0.30) / (0.40 - 0.30) = -10%; the penalty at 4 lr/4: 30%, at 2.9x plain GD.
    assert "the isotropic control -10% (seed 0 only)" in readme
    assert "at λ = 4·lr/4 30% (seed 0 only); it costs 2.9× the step time" in readme
    experiments = (tmp_path / "out" / "experiments_README.md").read_text()
    assert "| 0.001 (chosen) | 100.0 | 30.0 | 40.0 | 100.0 | 30.0 |" in experiments
    assert (tmp_path / "out" / report.FIGURE.name).stat().st_size > 0


def test_lars_and_lamb_blocks_follow_their_rate_phase_and_say_what_is_not_run(tmp_path):
    """The rate is the rate phase's choice; a file not there yet, or a phase that has not chosen, is said so."""
    rate = [dict(_run("sgd32", 0, 0.40, lr=lr, val=val), phase="rate") for lr, val in ((0.3, 0.31), (1.0, 0.33))]
    rate += [dict(_run("gd", 0, 0.30, lr=1.0), phase="rate")]
    assert report.chosen_rate(rate) == 1.0
    assert report.chosen_rate(rate[:2]) is None  # GD not run yet
    assert report.chosen_rate([dict(r, train_acc=0.5) for r in rate]) is None  # nothing fits
    rows = rate + [_run("gd+gaussian", 0, 0.38, lr=1.0), _run("gd+gaussian s=2.79", 0, 0.35, lr=1.0)]
    lars = tmp_path / "lars.jsonl"
    lars.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.main(["--write", "--lars-results", str(lars), "--lamb-results", str(tmp_path / "none.jsonl"),
                 "--into", str(tmp_path / "out")])
    text = (tmp_path / "out" / "experiments_README.md").read_text()
    assert "| 1 (chosen) | 100.0 | 33.0 | 40.0 | 100.0 | 30.0 |" in text
    assert "| gd+gaussian | 5.57 | 1 | 38.0 |" in text
    prose = " ".join(text.split())  # the wrapped lines as one
    assert "With LARS at equal rate (1) and steps, full-batch descent tested 10.0 points below batch 32" in prose
    assert "Gaussian 80% (seed 0 only); Bernoulli not run yet" in prose
    assert "noise-to-signal ratio after the trust ratio recovered: at 2.79 50% (seed 0 only)." in prose
    lamb = text[text.index("<!-- BEGIN temperature_report:lamb-rate -->"):]
    assert lamb.split("\n")[1] == "Not run yet."
    assert (tmp_path / "out" / report.LAYERWISE_FIGURE.name).stat().st_size > 0


def _no_accuracy_gap_runs():
    """LAMB-like: GD's test accuracy above the small batch's on seed 0, its test cross-entropy far above on both."""
    runs = {}
    # (arm, seed 0 acc, seed 1 acc, seed 0 CE, seed 1 CE)
    for arm, acc0, acc1, ce0, ce1 in (("sgd32", 0.318, 0.305, 7.0, 8.0), ("gd", 0.322, 0.299, 57.0, 68.0),
                                      ("gd+gaussian", 0.311, 0.306, 5.0, 6.0),
                                      ("gd+isotropic", 0.299, 0.288, 15.0, 16.0),
                                      ("gd+gaussian s=5.57", 0.316, 0.301, 7.0, 6.0)):
        for seed, acc, ce in ((0, acc0, ce0), (1, acc1, ce1)):
            runs[(arm, seed)] = dict(_run(arm, seed, acc, lr=3e-3), test_loss=ce)
    return runs


def test_without_an_accuracy_gap_the_summary_says_so_and_gives_the_cross_entropy_gap_recovered():
    runs = _no_accuracy_gap_runs()
    assert not report.gap_in_every_seed(runs) and report.gap_in_every_seed(runs, "test_loss")
    text = " ".join(report.prose(report.layerwise_summary(runs, "LAMB", 3e-3)).split())
    # Small batch - GD: -0.4 and +0.6 points; against batch 32: Gaussian -0.7, +0.1; isotropic -1.9, -1.7;
    # matched -0.2, -0.4. Bernoulli, not run, is left out.
    assert ("With LAMB at equal rate (0.003) and steps there is no test-accuracy gap at this scale: full-batch "
            "descent tested 0.1 ± 0.7 points below batch 32 (2 seeds: -0.4, 0.6; not in every seed)") in text
    assert ("(points, mean ± std over seeds): Gaussian -0.3 ± 0.6; the isotropic control -1.8 ± 0.1; Gaussian at "
            "5.57 (matched) -0.3 ± 0.1.") in text
    # CE gap 50 and 60; Gaussian (5 - 57) / (7 - 57) = 104.0%, (6 - 68) / (8 - 68) = 103.3%.
    assert "In test cross-entropy GD had 62.5 ± 7.8 against batch 32's 7.5 ± 0.7 (2 seeds: 50.0, 60.0; higher" in text
    assert "Gaussian 103.7 ± 0.5% (seeds 0, 1: 104.0, 103.3%); Bernoulli not run yet; the isotropic control" in text
    # Matched: (7 - 57) / -50 = 100.0%, (6 - 68) / -60 = 103.3%.
    assert "noise-to-signal ratio after the trust ratio: at 5.57 101.7 ± 2.4% (seeds 0, 1: 100.0, 103.3%)." in text
    cells = _cells(report.table(runs, ce_gap=True), "gd+isotropic")
    # (15 - 57) / -50 = 84.0%, (16 - 68) / -60 = 86.7%.
    assert cells[8:11] == ["15.500 ± 0.707", "85.3 ± 1.9 %", "84.0, 86.7 %"]
    assert "| gd+isotropic | 15.00 | 16.00 |" in report.report(runs, ce_gap=True).split("cross-entropy per seed")[1]


def test_the_top_level_table_gives_each_optimizer_its_gap_and_shares():
    no_gap = [dict(r, phase="rate") for r in _no_accuracy_gap_runs().values()]
    gap = [_run("sgd32", 0, 0.40, lr=1.0), _run("gd", 0, 0.30, lr=1.0), _run("gd+gaussian", 0, 0.35, lr=1.0),
           _run("gd+isotropic", 0, 0.10, lr=1.0, train_loss=5e12)]  # blew up: a finite loss far above chance
    gap = [dict(r, test_loss=ce) for r, ce in zip(gap, (2.0, 4.0, 3.0, 5e12))]
    rows = report.layerwise_table({"lars": (gap, 1.0), "lamb": (no_gap, 3e-3)}).splitlines()[2:]
    # Cells: the share of the CE gap recovered, then the test accuracy minus the small batch's (points).
    assert rows[0] == "| LARS (1), 1 | -10.0 | 2.0, 4.0 | 50.0%, -5.0 | not run | seed 0 diverged | not run |"
    assert rows[1] == ("| LAMB (0.003), 2 | -0.1 ± 0.7 (not in every seed) | 7.5 ± 0.7, 62.5 ± 7.8 | "
                       "103.7 ± 0.5%, -0.3 ± 0.6 | not run | 85.3 ± 1.9%, -1.8 ± 0.1 | "
                       "101.7 ± 2.4%, -0.3 ± 0.1 at 5.57 |")
    assert report.layerwise_table({"lars": ([], None)}).splitlines()[2] == "| LARS | rate not chosen yet | | | | | |"


def test_the_layerwise_figure_has_a_cross_entropy_row(tmp_path):
    path = tmp_path / "figure.png"
    report.figure([("LAMB", _no_accuracy_gap_runs())], path, ["small", "gd", "gd+bernoulli", "matched"],
                  metrics=("test_acc", "test_loss"))
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the PNG header
    assert (width, height) == (650, 880)  # 100 dpi: one panel 6.5 in wide, two rows of 4.4 in
