"""The benchmark entry point's pure helpers (no timings asserted: benchmarks are not tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

run = pytest.importorskip("run")
bench_cost = pytest.importorskip("bench_cost")
bench_search = pytest.importorskip("bench_search")


def test_hypervolume_of_a_front():
    hv = bench_search.hypervolume
    assert hv([]) == 0.0
    assert hv([(90.0, 10.0)]) == pytest.approx(90 * 90)
    # a dominated point adds nothing; two front points add their strips
    assert hv([(90.0, 10.0), (80.0, 20.0)]) == pytest.approx(90 * 90)
    assert hv([(90.0, 10.0), (95.0, 50.0)]) == pytest.approx(95 * 50 + 90 * 40)
    assert bench_search.curve([{"clean_acc": 50.0, "asr": 50.0}, {"clean_acc": 100.0, "asr": 0.0}]) == [2500, 10000]
    assert bench_search.trials_to_95([10.0, 94.0, 95.0, 99.0], 100.0) == 3
    assert bench_search.trials_to_95([10.0, 94.0], 100.0) is None and bench_search.trials_to_95([99.0], None) is None


def test_grid_points_collapse_inner_round_without_sr():
    pts = bench_search.grid_points(0.9)
    assert len(pts) == 9  # 3 coef x (2 inner_round with SR + 1 without)
    assert len({tuple(sorted(p.items())) for p in pts}) == 9


@pytest.mark.parametrize("space, low, extra", [("sv", 0.1, {"defense.n_shuf_layer": "auto"}), ("coef", 1.0, {})])
def test_the_grid_holds_the_warm_start_corners(tmp_path, space, low, extra):
    """Each vaccine space's grid is 9 distinct points, and the default warm start's two corners are grid points
    (so a sampler's study answers them from the grid's trials); the generated study file is a valid search study
    of the vaccine, whose space is the quickstart's for ``coef``."""
    import yaml

    from abd_ray.study.search import default_point
    from abd_ray.study.spec import load_spec

    pts = bench_search.grid_points(0.9, space)
    assert len({tuple(sorted(p.items(), key=str)) for p in pts}) == 9
    f = tmp_path / "s.yaml"
    f.write_text(bench_search.study_yaml("s", "tpe", 6, 0, 2000, 0.9, 2, space=space, warm_start=True))
    search = load_spec(f).search
    assert search.defense == "sv"
    warm = search.warm_start(default_point(search))
    assert warm[0] == {"defense.coef": 4.0, **extra}  # the vaccine's defaults
    assert warm[1:] == [{"defense.coef": low, **extra}, {"defense.coef": 10.0, **extra}]
    assert all(w in pts for w in warm[1:])
    assert bench_search.warm_start_points(space, 0.9) == warm  # what the table counts as the warm start
    if space == "coef":
        quick = yaml.safe_load(open(Path(__file__).parent.parent / "studies" / "quickstart.yaml"))["search"]
        assert quick["defense"] == "sv" and quick["space"] == {"coef": {"low": 1.0, "high": 10.0, "log": True}}


def test_the_wrn_pair_study_distills_the_papers_pair(tmp_path):
    """``--pair wrn`` generates a study of the paper's WRN-16-2 -> WRN-16-1 over the same coef space and warm start."""
    from abd_ray.study.spec import load_spec

    f = tmp_path / "s.yaml"
    f.write_text(bench_search.study_yaml("s", "tpe", 6, 0, 2000, 0.9, 2, space="coef", warm_start=True, pair="wrn"))
    cnn = tmp_path / "c.yaml"
    cnn.write_text(bench_search.study_yaml("s", "tpe", 6, 0, 2000, 0.9, 2, space="coef", warm_start=True))
    for path, pair in ((f, ("wrn16_2", "wrn16_1")), (cnn, ("cnn_l", "cnn_s"))):
        config = load_spec(path).base_config("badnet_grid", "zskt", "sv", 0, "grid")
        assert (config["teacher_arch"], config["student_arch"]) == pair
    assert load_spec(f).search.space == load_spec(cnn).search.space


def test_schedule_ratio_weights_the_stages():
    cells = {("zskt", "none"): {"cpu_s_per_step": 1.0}, ("zskt", "sv"): {"cpu_s_per_step": 1.2},
             ("zskt", "sr"): {"cpu_s_per_step": 5.0}, ("zskt", "abd"): {"cpu_s_per_step": 6.0}}
    r = bench_cost.schedule_ratios(cells, "zskt", {"half": 0.5})
    assert r["abd_trial_ratio@half"] == pytest.approx(0.5 * 1.2 + 0.5 * 6.0)
    assert r["sr_trial_ratio@half"] == pytest.approx(3.0)


def test_update_section_replaces_only_its_block(tmp_path, monkeypatch):
    md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(run, "RESULTS_MD", md)
    run.update_section("zskt", "zskt one")
    run.update_section("cost", "cost one")
    run.update_section("zskt", "zskt two")
    text = md.read_text()
    assert "zskt two" in text and "zskt one" not in text and "cost one" in text
    assert text.index("BEGIN cost") < text.index("BEGIN zskt")  # fixed section order


def test_barrier_waits_for_every_process(tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "peer").touch()  # another process that already checked in
    bench_cost.wait_barrier(f"{folder}:2", timeout=5)
    assert len(list(folder.iterdir())) == 2
    with pytest.raises(SystemExit, match="only 2 of 3 checked in"):
        bench_cost.wait_barrier(f"{folder}:3", timeout=0.2)


def test_defense_rows_with_other_settings_are_stale():
    defenses = pytest.importorskip("defenses")
    params = defenses.defense_params("abd")
    assert params["coef"] == 4.0 and params["fixed_mode"] == "capped"
    assert not defenses.stale({"defense": "abd", "defense_params": params})
    assert defenses.stale({"defense": "abd", "defense_params": {**params, "fixed_mode": "drop"}})
    assert not defenses.stale({"defense": "abd"})  # a row from before the settings were recorded is kept


def test_commit_is_marked_dirty_by_code_changes_not_by_benchmark_outputs(tmp_path, monkeypatch):
    import subprocess

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    for f in ("code.py", "bench/RESULTS.md", "bench/results/search.json"):
        (tmp_path / f).write_text("0\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(run, "ROOT", tmp_path)
    clean = run.git_commit()
    assert clean and not clean.endswith("+")
    (tmp_path / "bench/results/search.json").write_text("1\n")  # a benchmark wrote its results
    (tmp_path / "bench/RESULTS.md").write_text("1\n")
    assert run.git_commit() == clean
    (tmp_path / "code.py").write_text("1\n")
    assert run.git_commit() == clean + "+"


def test_benchmarks_cover_every_registered_component():
    from abd_ray.registry import DEFENSES, SYNTHESIZERS

    defenses = pytest.importorskip("defenses")
    assert set(bench_cost.SYNTHS) == set(SYNTHESIZERS.names())
    assert bench_cost.DEFENSES[0] == "none" and set(bench_cost.DEFENSES) == set(DEFENSES.names())
    cells = defenses.cells(None)
    assert {c[0] for c in cells} == set(SYNTHESIZERS.names())
    assert {c[2] for c in cells if c[0] == "zskt"} == set(DEFENSES.names())


@pytest.mark.slow
def test_cost_cell_runs_the_loop_with_set_overrides(digits_teacher):
    _, cache = digits_teacher
    r = bench_cost.run_cell("zskt", "none", dataset="digits", steps=2, eval_every=1, threads=1, cache=str(cache),
                            sets=["synth.n_s=1", "batch_size=16"])
    assert "error" not in r, r
    assert r["synth"] == "zskt" and r["measured_steps"] == 1 and r["cpu_s_per_step"] > 0


def test_rank_correlation_of_the_check_benchmark_matches_hand_computed_values():
    sv_check = pytest.importorskip("sv_check")
    assert sv_check.rank_corr([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert sv_check.rank_corr([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)
    assert sv_check.rank_corr([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / 3**0.5)  # tied ranks share 0.5
    assert sv_check.rank_corr([1, 1], [1, 2]) == 0.0
