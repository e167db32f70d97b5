"""Study files: validation errors (before Ray starts), planning, search spaces, Pareto fronts and report pieces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from abd_ray.stats import format_mean_std, mean_std
from abd_ray.study.front import by_config, pareto_front, recommend, search_against_start
from abd_ray.study.report import render_markdown, search_lines
from abd_ray.study.spec import StudySpec, StudySpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "mode": "search",
    "dataset": "digits",
    "attacks": ["badnet_grid"],
    "synthesizers": ["zskt"],
    "defenses": ["none"],
    "seeds": [0],
    "budget": {"steps": 10, "eval_every": 5},
    "search": {"defense": "abd", "sampler": "tpe", "num_samples": 3,
               "space": {"coef": {"low": 0.1, "high": 5.0, "log": True}, "inner_round": {"low": 2, "high": 10}}},
}


def _with(path: str, value, base=None) -> dict:
    """A copy of BASE with ``path`` (dotted) set to ``value`` (``...`` deletes it)."""
    import copy

    d = copy.deepcopy(base or BASE)
    keys = path.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    if value is ...:
        cur.pop(keys[-1], None)
    else:
        cur[keys[-1]] = value
    return d


def test_base_is_valid():
    spec = StudySpec.from_dict(BASE)
    assert spec.planned_trials() == 1 + 3
    assert spec.search.space[1].is_int
    (cfg,) = spec.grid_configs()
    assert cfg["defense"] == "none" and cfg["study.kind"] == "grid" and cfg["steps"] == 10


@pytest.mark.parametrize(
    "path,value,needle",
    [
        ("budgt", {"steps": 3}, "budgt: unknown key (did you mean 'budget'?)"),
        ("budget.stepz", 3, "budget.stepz: unknown key"),
        ("dataset", "cifar11", "dataset: unknown name 'cifar11'"),
        ("attacks", ["badnet_grd"], "attacks: unknown name 'badnet_grd'"),
        ("synthesizers", ["zsk"], "synthesizers: unknown name 'zsk'"),
        ("defenses", ["abdd"], "defenses: unknown name 'abdd'"),
        ("attacks", [], "attacks: is empty"),
        ("synthesizers", [], "synthesizers: is empty"),
        ("seeds", [], "seeds: must be a non-empty list"),
        ("search.space.coef", {"low": 1.0, "high": 0.1}, "inverted range"),
        ("search.space.inner_round", {"low": 9, "high": 2}, "inverted range"),
        ("search.sampler", "cmaes", "search.sampler: unknown sampler 'cmaes'"),
        ("resources", {"gpu": -0.5}, "resources.gpu: must be >= 0"),
        ("resources", {"cpu": 0}, "resources.cpu: must be > 0"),
        ("search.space.bogus", {"low": 0, "high": 1}, "search.space.bogus: unknown key"),
        ("search.space.coef", {"low": 0.0, "high": 1.0, "log": True}, "log range needs low > 0"),
        ("search.space.pert_model", {"choices": []}, "must be a non-empty list"),
        ("search.defense", "none", "search.defense: 'none' cannot be searched"),
        ("mode", "bayes", "mode: unknown mode 'bayes'"),
        ("name", "../escape", "not a valid study name"),
        ("budget.eval_every", 50, "the run would never be evaluated"),
        ("max_concurrent", 0, "max_concurrent: must be >= 1"),
        ("teacher.arch", "wrn99", "teacher.arch: unknown model 'wrn99'"),
        ("attack.target", 10, "attack.target=10 is not a class; allowed: 0..9"),
        ("attack.poison_ratio", 1.5, "attack.poison_ratio=1.5 is outside (0, 1]"),
        ("attack.poison_ratio", True, "attack.poison_ratio=True is outside (0, 1]"),
        ("attack.pattern_file", "no/such.png", "attack.pattern_file='no/such.png' does not exist"),
        ("teacher.epochs", 0, "teacher epochs=0 must be a positive integer"),
        ("search.num_samples", 0, "search.num_samples: must be >= 1"),
        ("search.space.inner_round", {"low": 1, "high": 2}, "excludes the default 10"),
        ("search", ..., "search: is missing"),
        ("defense_params", {"abd": {"cof": 1}}, "defense_params.abd.cof: unknown key (did you mean 'coef'?)"),
    ],
)
def test_bad_study_files_name_the_key(path, value, needle):
    with pytest.raises(StudySpecError) as e:
        StudySpec.from_dict(_with(path, value))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_grid_mode_rejects_search_and_empty_defenses():
    with pytest.raises(StudySpecError, match="only allowed with mode: search"):
        StudySpec.from_dict(_with("mode", "grid"))
    grid = _with("search", ..., _with("mode", "grid"))
    with pytest.raises(StudySpecError, match="defenses: is empty"):
        StudySpec.from_dict(_with("defenses", [], grid))


def test_exclude_and_grid_product():
    d = _with("search", ..., _with("mode", "grid"))
    d.update(attacks=["badnet_grid", "blend"], synthesizers=["zskt", "clean"], defenses=["none", "abd"],
             seeds=[0, 1], exclude=[{"synthesizer": "clean", "defense": "abd"}])
    spec = StudySpec.from_dict(d)
    # 2 attacks x (zskt: none, abd; clean: none) x 2 seeds
    assert spec.planned_trials() == 2 * 3 * 2
    assert not any(c["synthesizer"] == "clean" and c["defense"] == "abd" for c in spec.grid_configs())
    with pytest.raises(StudySpecError, match="exclude\\[0\\].defence: unknown key"):
        StudySpec.from_dict({**d, "exclude": [{"defence": "abd"}]})


def test_smoke_shrinks_budgets():
    spec = StudySpec.from_dict({**BASE, "seeds": [0, 1, 2], "budget": {"steps": 1000, "eval_every": 100}})
    s = spec.with_smoke()
    assert s.budget["steps"] == 40 and s.budget["eval_every"] == 20 and s.seeds == (0,)
    assert s.search.num_samples == 2 and s.teacher["epochs"] == 3


def test_yaml_is_read_safely(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(StudySpecError, match="not valid YAML"):
        load_spec(f)
    with pytest.raises(StudySpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_files_validate(path):
    spec = load_spec(path)
    assert spec.planned_trials() > 0
    assert yaml.safe_load(path.read_text())["name"] == spec.name


def test_paper_study_plans_the_paper_table():
    spec = load_spec(ROOT / "studies" / "paper-zskt-cifar10.yaml")
    assert len(spec.attacks) == 10 and spec.seeds == (0, 1, 2)
    # ten triggers x (zskt: none, abd; clean KD: none) x three seeds
    assert spec.planned_trials() == 10 * 3 * 3
    assert spec.budget["steps"] == 80000 and spec.teacher.get("arch") in (None, "wrn16_2")


def test_search_space_and_samplers():
    optuna = pytest.importorskip("optuna")
    from abd_ray.study.search import SearchSpace, default_point, make_sampler

    spec = StudySpec.from_dict(_with("search.space.pert_model", {"choices": ["student", "teacher"]}))
    space = SearchSpace(spec.search.space, {"defense": "abd"})
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    const = space(trial)
    assert const == {"defense": "abd"}
    assert set(trial.params) == {"defense.coef", "defense.inner_round", "defense.pert_model"}
    assert 0.1 <= trial.params["defense.coef"] <= 5.0 and isinstance(trial.params["defense.inner_round"], int)
    assert default_point(spec.search)["defense.pert_model"] == "student"
    for name, cls in [("tpe", "TPESampler"), ("nsga2", "NSGAIISampler"), ("gp", "GPSampler"),
                      ("random", "RandomSampler")]:
        import dataclasses

        assert type(make_sampler(dataclasses.replace(spec.search, sampler=name))).__name__ == cls
    tpe = make_sampler(spec.search)
    assert tpe._multivariate


def test_tpe_and_gp_leave_random_start_up_within_a_small_budget():
    pytest.importorskip("optuna")
    import dataclasses

    from abd_ray.study.search import auto_startup_trials, make_sampler

    assert [auto_startup_trials(n) for n in (1, 8, 12, 30, 100)] == [2, 2, 4, 10, 10]
    spec = StudySpec.from_dict(_with("search.num_samples", 12))
    assert make_sampler(spec.search)._n_startup_trials == 4  # not Optuna's 10 of 12
    spec = StudySpec.from_dict(_with("search.startup_trials", 3))
    for name in ("tpe", "gp"):
        assert make_sampler(dataclasses.replace(spec.search, sampler=name))._n_startup_trials == 3
    with pytest.raises(StudySpecError, match="search.startup_trials"):
        StudySpec.from_dict(_with("search.startup_trials", 0))


def test_pareto_front_and_recommendation():
    pts = [
        {"id": "a", "clean_acc": 90.0, "asr": 95.0, "defense": "none"},
        {"id": "b", "clean_acc": 88.0, "asr": 10.0, "defense": "abd"},
        {"id": "c", "clean_acc": 80.0, "asr": 2.0, "defense": "abd"},
        {"id": "d", "clean_acc": 85.0, "asr": 12.0, "defense": "abd"},  # dominated by b
        {"id": "e", "clean_acc": float("nan"), "asr": 1.0, "defense": "abd"},  # never finished
    ]
    front = pareto_front(pts)
    assert [p["id"] for p in front] == ["c", "b", "a"]
    assert recommend(pts, 90.0, 5.0)["id"] == "b"
    assert recommend(pts, 90.0, 15.0)["id"] == "c"
    assert recommend(pts, 90.0, 1.0) is None
    m, s, n = mean_std([1.0, 3.0, float("nan")])
    assert m == 2.0 and math.isclose(s, math.sqrt(2)) and n == 2
    assert format_mean_std([1.0, 3.0]) == "2.0 +- 1.4 (2)" and format_mean_std([float("nan")]) == "n/a"
    assert format_mean_std([2.0]) == "2.0 (1)"  # one value has no spread


def test_the_search_is_judged_against_its_warm_start():
    def run(tid, kind, defense, coef, acc, asr):
        return {"trial_id": tid, "kind": kind, "defense": defense, "params": {} if coef is None else {"coef": coef},
                "clean_acc": acc, "asr": asr}

    start = [{"defense": "sv", "defaults": True, "params": {"coef": 4.0}},
             {"defense": "sv", "defaults": False, "params": {"coef": 1.0}},
             {"defense": "sv", "defaults": False, "params": {"coef": 10.0}}]
    rows = [run("u", "grid", "none", None, 98.0, 99.0), run("d", "search", "sv", 4, 96.0, 18.0),
            run("lo", "search", "sv", 1.0, 97.0, 60.0), run("hi", "search", "sv", 10.0, 95.0, 15.0),
            run("p1", "search", "sv", 2.2, 96.5, 30.0),  # on the front: nothing has both its acc and its asr
            run("p2", "search", "sv", 6.1, 95.5, 40.0)]  # dominated by the defaults only
    got = search_against_start(rows, start)
    by_id = {r["trial_id"]: r for r in got["trials"]}
    assert "u" not in by_id  # the undefended run is on the front but is no search trial
    assert [by_id[t]["origin"] for t in ("d", "lo", "hi", "p1", "p2")] == [
        "defaults", "warm start", "warm start", "proposal", "proposal"]
    assert by_id["p1"]["on_front"] and by_id["p1"]["dominated_by"] is None
    assert not by_id["p2"]["on_front"] and by_id["p2"]["dominated_by"] == "d"
    assert (got["proposals"], got["proposals_on_front"]) == (2, 1)
    assert got["verdict"] == "1 of the sampler's 2 proposals lie on the front (p1)"
    # Without p1, the one proposal left is dominated, and the verdict names what dominates it.
    got = search_against_start([r for r in rows if r["trial_id"] != "p1"], start)
    assert got["proposals_on_front"] == 0
    assert got["verdict"].startswith("every one of the sampler's 1 proposals is dominated, by d (defaults)")
    assert search_against_start(rows[:4], start)["verdict"].startswith("no proposal of the sampler has finished")
    md = "\n".join(search_lines({"c": search_against_start(rows, start)}))
    assert "## The search against its warm start: c" in md and "| p2 | proposal | sv | 95.5 | 40.0 | no | d |" in md


def test_recommendation_rests_on_the_mean_over_seeds_and_says_how_many():
    def run(tid, defense, coef, seed, acc, asr):
        return {"trial_id": tid, "kind": "grid", "cell": "c", "defense": defense, "seed": seed,
                "params": {} if coef is None else {"coef": coef}, "clean_acc": acc, "asr": asr, "robust_acc": 50.0}

    rows = [run("n0", "none", None, 0, 90.0, 99.0), run("n1", "none", None, 1, 92.0, 97.0),
            # coef 1: one lucky seed at asr 1, but 30 on average; coef 2: 5 on average over three seeds
            run("a0", "abd", 1, 0, 89.0, 1.0), run("a1", "abd", 1, 1, 89.0, 59.0),
            run("b0", "abd", 2, 0, 88.0, 4.0), run("b1", "abd", 2, 1, 88.0, 5.0), run("b2", "abd", 2, 2, 88.0, 6.0)]
    configs = by_config(rows)
    assert sorted((c["defense"], c["n"]) for c in configs) == [("abd", 2), ("abd", 3), ("none", 2)]
    rec = recommend(configs, 91.0, 5.0)
    assert rec["params"] == {"coef": 2} and rec["n"] == 3 and rec["seeds"] == [0, 1, 2] and rec["asr"] == 5.0
    assert rec["trial_ids"] == ["b0", "b1", "b2"] and rec["asr_std"] == 1.0
    assert recommend(rows, 91.0, 5.0)["trial_id"] == "a0"  # per run, the lucky seed would win
    rep = {"study": "s", "status": "FINISHED", "max_acc_drop": 5.0, "pareto": {}, "der": [], "trials": [],
           "counts": {"planned": 7, "tune_total": 7, "tune": {}, "optuna_total": {}, "search_trials": 0,
                      "mlflow": {}},
           "table": [{"attack": "badnet_grid", "synthesizer": "zskt", "defense": "abd", "teacher_clean_acc": 98.0,
                      "teacher_asr": 100.0, "clean_acc_text": format_mean_std([88.0] * 3),
                      "asr_text": format_mean_std([4.0, 5.0, 6.0])}],
           "recommended": {"c": {**rec, "undefended": {"clean_acc": "91.0 +- 1.4 (2)", "asr": "98.0 +- 1.4 (2)"}}}}
    md = render_markdown(rep)
    assert "| 88.0 +- 0.0 (3) | 5.0 +- 1.0 (3) |" in md and "| 3 (0, 1, 2) |" in md
    assert "91.0 +- 1.4 (2) / 98.0 +- 1.4 (2)" in md and "one draw" not in md
    rep["recommended"]["c"].update(n=1, seeds=[0])
    assert "one draw" in render_markdown(rep)


def test_sr_effect_pairs_abd_with_sv_by_seed_and_says_whether_sr_earns_its_place():
    from abd_ray.study.report import sr_effect, sr_effect_lines

    def row(cell, defense, seed, acc, asr, wall=100.0, kind="grid"):
        return {"cell": cell, "defense": defense, "seed": seed, "clean_acc": acc, "asr": asr, "wall_s": wall,
                "kind": kind}

    done = [row("a", "sv", 0, 97.0, 60.0), row("a", "sv", 1, 96.0, 40.0), row("a", "sv", 2, 95.0, 30.0),
            row("a", "abd", 0, 96.0, 40.0, 200.0), row("a", "abd", 1, 95.0, 24.0, 300.0),  # seed 2: sv only
            row("a", "abd", 0, 90.0, 0.0, kind="search"),  # a search trial is not the fixed configuration
            row("b", "sv", 0, 97.0, 90.0), row("b", "abd", 0, 92.0, 50.0),  # lower asr, but 5 points of clean
            row("c", "sv", 0, 97.0, 90.0), row("c", "none", 0, 98.0, 99.0)]  # no abd: no row
    a, b = sr_effect(done)
    assert a["cell"] == "a" and a["seeds"] == [0, 1] and a["n"] == 2
    assert a["asr_delta"] == pytest.approx(-18.0) and a["asr_delta_std"] == pytest.approx(2 ** 0.5 * 2)
    assert a["clean_delta"] == pytest.approx(-1.0) and a["time_ratio"] == pytest.approx(2.5) and a["earns"]
    assert b["cell"] == "b" and b["asr_delta"] == pytest.approx(-40.0) and not b["earns"]
    md = "\n".join(sr_effect_lines([a, b]))
    assert "| a | 2 (0, 1) | -18.0 +- 2.8 (2) | -1.0 +- 0.0 (2) | 2.50 | yes |" in md
    assert "| b | 1 (0) | -40.0 (1) | -5.0 (1) | 1.00 | no |" in md
    # Two sv runs on one seed (two fixed configurations): that seed does not pair.
    twice = [row("a", "sv", 0, 97.0, 60.0), row("a", "sv", 0, 97.0, 50.0), row("a", "abd", 0, 96.0, 40.0)]
    assert sr_effect(twice) == []


def test_study_searcher_order_failures_and_orphans(tmp_path):
    optuna = pytest.importorskip("optuna")
    from abd_ray.study.search import (
        StudySearcher,
        cell_searchers,
        close_orphans,
        optuna_counts,
        optuna_study_name,
    )

    spec = StudySpec.from_dict({**BASE, "attacks": ["badnet_grid", "blend"], "search": {**BASE["search"],
                                                                                         "num_samples": 2}})
    consts = {f"{a}/{s}": spec.base_config(a, s, "abd", 0, "search") for a, s in spec.search_cells()}
    searcher = StudySearcher(spec.grid_configs(), cell_searchers(spec, str(tmp_path), consts), 2, spec.name,
                             str(tmp_path))
    got = [searcher.suggest(f"t{i}") for i in range(7)]
    # The searches first (round-robin over cells), the undefended fixed trials (the cheapest) last.
    assert [g["study.cell"] for g in got[:4]] == ["badnet_grid/zskt", "blend/zskt"] * 2
    assert [(g["defense"], g["study.cell"]) for g in got[4:6]] == [("none", "badnet_grid/zskt"), ("none", "blend/zskt")]
    from abd_ray.defenses import build_defense

    defaults = build_defense("abd").params
    assert got[0]["defense.coef"] == defaults["coef"] and got[0]["defense.inner_round"] == defaults["inner_round"]
    assert got[6] == "FINISHED"
    searcher.on_trial_complete("t4", {"clean_acc": 95.0, "asr": 99.0, "final": 1})
    searcher.on_trial_complete("t4", {"clean_acc": 95.0, "asr": 99.0, "final": 1})  # a second time: once only
    searcher.on_trial_complete("t5", None, error=True)
    grid = optuna.load_study(study_name="t:badnet_grid/zskt:grid", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [(t.state.name, t.values, t.params["defense"]) for t in grid.trials] == [
        ("COMPLETE", [95.0, 99.0], "none")]
    grid = optuna.load_study(study_name="t:blend/zskt:grid", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [(t.state.name, t.values) for t in grid.trials] == [("FAIL", None)]
    searcher.on_trial_complete("t0", {"clean_acc": 90.0, "asr": 5.0, "final": 1})
    # A trial that errored after an evaluation is FAIL in Optuna, not COMPLETE with its partial values.
    searcher.on_trial_complete("t1", {"clean_acc": 50.0, "asr": 50.0}, error=True)
    searcher.on_trial_complete("t2", {"clean_acc": 91.0, "asr": 4.0, "final": 1})
    # t3 is left RUNNING, as if its driver had been killed: closed as FAIL once the study has ended.
    names = [optuna_study_name(spec.name, c) for c in consts]
    assert optuna_counts(str(tmp_path), names)[names[1]] == {"FAIL": 1, "RUNNING": 1}
    assert close_orphans(str(tmp_path), names) == 1
    counts = optuna_counts(str(tmp_path), names)
    assert counts[names[0]] == {"COMPLETE": 2}
    assert counts[names[1]] == {"FAIL": 2}
    # The searcher survives a save / restore (Tune pickles it into the experiment).
    searcher.save(str(tmp_path / "s.pkl"))
    fresh = StudySearcher([], {}, 0)
    fresh.restore(str(tmp_path / "s.pkl"))
    assert fresh.owner == searcher.owner and fresh.next_fixed == 2
    # Defended fixed trials (costly) go before the searches; the grid's order is kept within each group.
    grid = [{"defense": d, "seed": s} for d in ("none", "abd", "sv") for s in (0, 1)]
    (tmp_path / "o").mkdir()
    two = StudySearcher(grid, cell_searchers(spec, str(tmp_path / "o"), consts), 1)
    got = [two.suggest(f"u{i}") for i in range(9)]
    assert [(g["defense"], g.get("seed")) for g in got[:4]] == [("abd", 0), ("abd", 1), ("sv", 0), ("sv", 1)]
    assert [g["defense"] for g in got[4:6]] == ["abd", "abd"] and "study.cell" in got[4]
    assert [(g["defense"], g.get("seed")) for g in got[6:8]] == [("none", 0), ("none", 1)] and got[8] == "FINISHED"
    assert optuna.load_study(study_name=names[0], storage=f"sqlite:///{tmp_path}/optuna.db").best_trials


def test_the_digits_ablation_study_runs_what_the_ablation_benchmark_records():
    """studies/abd-digits.yaml plans three triggers x four defenses x three seeds, and each of its trials has the
    run config of the `abd-ray distill` command bench/spread.py records for that arm (so those records are its
    trials: a trial's result does not depend on its entry point)."""
    import sys

    from abd_ray.cli import build_parser
    from abd_ray.cli.runs import config_from_args

    sys.path.insert(0, str(ROOT / "bench"))
    import spread

    spec = load_spec(ROOT / "studies" / "abd-digits.yaml")
    assert spec.planned_trials() == 3 * 4 * 3 and tuple(spec.attacks) == spread.ATTACKS
    for attack in spec.attacks:
        for defense in spec.defenses:
            trial = spec.run_config(attack, "zskt", defense, 2, "grid").resolved()
            argv = spread.command(attack, defense, 2, str(ROOT / ".abd_ray" / "cache"), None)[3:]
            bench = config_from_args(build_parser().parse_args(argv)).resolved()
            assert trial.to_flat() == {**bench.to_flat(), "cache_dir": trial.cache_dir}, (attack, defense)


def test_the_ablation_table_says_whether_sr_earns_its_place():
    """bench/spread.py's ablation section pairs its abd and sv records by seed, as a study's report does."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import spread

    def rec(arm, seed, acc, asr):
        return {"attack": "blend", "arm": arm, "defense": arm.split("-")[0], "seed": seed, "commit": "abc",
                "metrics": {"clean_acc": acc, "asr": asr}, "process_s": 100.0, "teacher": {"weights_sha256": "f" * 64}}

    records = [rec("sv", 0, 95.0, 90.0), rec("abd", 0, 94.0, 70.0), rec("abd-srpaper", 0, 50.0, 0.0)]
    md = spread.table(records, [0], ("sv", "abd", "abd-srpaper"))
    assert "## Does SR earn its place?" in md
    assert "| blend/zskt | 1 (0) | -20.0 (1) | -1.0 (1) | 1.00 | yes |" in md  # abd-srpaper is not abd
    assert "Does SR" not in spread.table(records, [0], spread.DEFENSES)  # the spread has no sv arm


def test_the_spread_table_pools_seeds_per_teacher_weights():
    """One teacher spec trains to other weights on another CPU model: bench/spread.py gives such runs their own
    row, and names the machines the runs were made on."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import spread

    def rec(seed, asr, weights, **machine):
        return {"attack": "blend", "arm": "none", "defense": "none", "seed": seed, "commit": "abc", **machine,
                "metrics": {"clean_acc": 95.0, "asr": asr}, "process_s": 1.0, "teacher": {"weights_sha256": weights}}

    records = [rec(0, 90.0, "a" * 64), rec(1, 80.0, "a" * 64), rec(2, 10.0, "b" * 64, machine="Other CPU")]
    md = spread.table(records, [0, 1, 2], spread.DEFENSES)
    assert "| blend | none | 95.0 +- 0.0 (2) | 95.0..95.0 | 85.0 +- 7.1 (2) | 80.0..90.0 | 0,1 | aaaaaaaaaaaa |" in md
    assert "| blend | none | 95.0 (1) | 95.0..95.0 | 10.0 (1) | 10.0..10.0 | 2 | bbbbbbbbbbbb |" in md
    assert f"runs made on {spread.UNNAMED_MACHINE} (2 runs); Other CPU (1 run)." in md


# --- conditional spaces, the warm start, deterministic twins ---------------------------------------------------

SR_SPACE = {"coef": {"low": 0.5, "high": 8.0, "log": True}, "sr": {"choices": [True, False]},
            "inner_round": {"low": 3, "high": 10, "when": {"sr": True}},
            "pert_lr": {"low": 0.01, "high": 0.3, "log": True, "when": {"sr": "on"}}}


def test_a_switch_suggests_its_conditional_parameters_only_when_on():
    optuna = pytest.importorskip("optuna")
    from abd_ray.study.search import SearchSpace, default_point, make_sampler

    spec = StudySpec.from_dict(_with("search.space", SR_SPACE))
    by_name = {p.name: p for p in spec.search.space}
    assert by_name["inner_round"].when == (("study.sr", (True,)),) and by_name["sr"].key == "study.sr"
    assert spec.search.defenses() == ("abd", "sv") and make_sampler(spec.search)._group
    const = {"defense": "abd", "defense.K": 3, "defense.n_shuf_ens": 2}  # K is SR's: moot with SR off
    space = SearchSpace(spec.search.space, const, spec.search)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({"study.sr": False})
    off = study.ask()
    assert space(off) == {"defense": "sv", "defense.n_shuf_ens": 2}
    assert set(off.params) == {"defense.coef", "study.sr"}
    study.enqueue_trial({"study.sr": True})
    on = study.ask()
    assert space(on) == const and set(on.params) == {"defense.coef", "study.sr", "defense.inner_round",
                                                     "defense.pert_lr"}
    assert default_point(spec.search)["study.sr"] is True
    assert make_sampler(spec.search)._constant_liar  # parallel workers do not get the same proposal


@pytest.mark.parametrize("space,needle", [
    ({**SR_SPACE, "inner_round": {"low": 3, "high": 10}},
     "search.space.inner_round: means nothing with sr off (defense sv has no inner_round); add when: {sr: on}"),
    ({**SR_SPACE, "pert_lr": {"low": 0.01, "high": 0.3, "when": {"sr": "maybe"}}},
     "search.space.pert_lr.when.sr: 'maybe' is not among sr's choices; allowed: on, off"),
    ({**SR_SPACE, "pert_lr": {"low": 0.01, "high": 0.3, "when": {"srr": True}}},
     "search.space.pert_lr.when.srr: must name a {choices: [...]} parameter of search.space (did you mean 'sr'?)"),
    ({**SR_SPACE, "pert_lr": {"low": 0.01, "high": 0.3, "when": {"inner_round": 3}}},
     "search.space.pert_lr.when.inner_round: must name a {choices: [...]} parameter"),
    ({**SR_SPACE, "pert_lr": {"low": 0.01, "high": 0.3, "when": "sr"}},
     "search.space.pert_lr.when: must be a mapping {parameter: value}"),
    ({**SR_SPACE, "sr": {"low": 0, "high": 1}}, "search.space.sr: is a switch: write {choices: [on, off]}"),
])
def test_bad_conditions_are_refused_with_the_fix(space, needle):
    with pytest.raises(StudySpecError) as e:
        StudySpec.from_dict(_with("search.space", space))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_switch_belongs_to_its_defense_and_a_condition_may_name_any_choice():
    with pytest.raises(StudySpecError, match=r"search.space.sr: unknown key"):
        StudySpec.from_dict(_with("search.defense", "sv", _with("search.space", {"sr": {"choices": [True]},
                                                                                    "coef": {"low": 1, "high": 2}})))
    spec = StudySpec.from_dict(_with("search.space", {
        "pert_model": {"choices": ["student", "teacher"]},
        "hg_out_portion": {"low": 0.01, "high": 0.1, "when": {"pert_model": ["teacher"]}}}))
    assert spec.search.space[1].when == (("defense.pert_model", ("teacher",)),)


def test_the_warm_start_enqueues_defaults_and_the_ends_of_coef_or_the_study_s_points():
    from abd_ray.study.search import default_point

    spec = StudySpec.from_dict(_with("search.num_samples", 6, _with("search.space", SR_SPACE)))
    d = default_point(spec.search)
    assert d == {"defense.coef": 4.0, "study.sr": True, "defense.inner_round": 10, "defense.pert_lr": 0.1}
    pts = spec.search.warm_start(d)
    assert [p["defense.coef"] for p in pts] == [4.0, 0.5, 8.0] and all(p["study.sr"] for p in pts)
    spec = StudySpec.from_dict(_with("search.enqueue", [{"coef": 1, "sr": "off"}, {"inner_round": 5.0}, {"coef": 4.0}],
                                     _with("search.space", SR_SPACE)))
    pts = spec.search.warm_start(default_point(spec.search))
    # the defaults first; a point completed by the defaults, without what its own switch makes moot; no repeat
    assert pts == [d, {"defense.coef": 1, "study.sr": False}, {**d, "defense.inner_round": 5}]
    no_defaults = _with("search.include_defaults", False, _with("search.enqueue", [{"coef": 1.0}],
                                                                _with("search.space", SR_SPACE)))
    spec = StudySpec.from_dict(no_defaults)
    assert spec.search.warm_start(default_point(spec.search)) == [{**d, "defense.coef": 1.0}]
    assert StudySpec.from_dict(_with("search.include_defaults", False, BASE)).search.warm_start({}) == []


@pytest.mark.parametrize("enqueue,needle", [
    ({"coef": 1.0}, "search.enqueue: must be a list of points"),
    ([{"cof": 1.0}], "search.enqueue[0].cof: unknown key (did you mean 'coef'?)"),
    ([{"coef": 9.0}], "search.enqueue[0].coef: 9.0 is outside its range 0.5..8; give a value inside it"),
    ([{"inner_round": 3.5}], "search.enqueue[0].inner_round: 3.5 is outside its range 3..10 (integers)"),
    ([{}], "search.enqueue[0]: is empty"),
    ([{"sr": "off", "inner_round": 4}], "search.enqueue[0].inner_round: is moot at this point"),
    ([{"sr": "maybe"}], "search.enqueue[0].sr: 'maybe' is not among its choices; allowed: on, off"),
])
def test_bad_enqueued_points_are_refused(enqueue, needle):
    with pytest.raises(StudySpecError) as e:
        StudySpec.from_dict(_with("search.enqueue", enqueue, _with("search.space", SR_SPACE)))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_twins_share_a_key_and_a_finished_one_answers_the_other(tmp_path):
    pytest.importorskip("optuna")
    from abd_ray.study.search import REUSED_FROM, REUSED_RESULT, StudySearcher, trial_key

    spec = StudySpec.from_dict(BASE)
    (cfg,) = spec.grid_configs()
    abd = {**cfg, "defense": "abd", "defense.coef": 4}
    # the defaults filled in, 4 == 4.0, the study's bookkeeping ignored; another seed is another trial
    assert trial_key(abd) == trial_key({**cfg, "defense": "abd", "defense.coef": 4.0, "study.kind": "search"})
    assert trial_key(abd) == trial_key({**cfg, "defense": "abd"})
    assert trial_key(abd) != trial_key({**abd, "seed": 1}) and trial_key(abd) != trial_key({**abd, "defense.coef": 2})
    store = str(tmp_path / "store.jsonl")
    one = StudySearcher([abd, dict(abd), {**abd, "seed": 1}], {}, 0, "s1", None, reuse_store=store)
    a, b = one.suggest("a"), one.suggest("b")
    assert REUSED_FROM not in a and REUSED_FROM not in b  # twins running together both run: none had finished
    one.on_trial_complete("a", {"clean_acc": 90.0, "asr": 5.0, "final": 1, "step": 10, "training_iteration": 3})
    c = one.suggest("c")
    assert REUSED_FROM not in c  # another seed
    two = StudySearcher([dict(abd), {**abd, "seed": 1}], {}, 0, "s2", None, reuse_store=store)
    d, e = two.suggest("d"), two.suggest("e")
    assert d[REUSED_FROM] == "s1/a" and REUSED_FROM not in e
    assert yaml.safe_load(d[REUSED_RESULT]) == {"clean_acc": 90.0, "asr": 5.0, "final": 1, "step": 10}
    two.on_trial_complete("d", {"clean_acc": 90.0, "asr": 5.0, "final": 1, "step": 10})
    assert len((tmp_path / "store.jsonl").read_text().splitlines()) == 1  # a reused trial adds no record


def test_a_store_answers_only_with_trials_computed_on_this_machines_chip(tmp_path, monkeypatch):
    """Equal configs give equal results on one kind of chip only: a record made on another CPU model (or torch)
    answers no trial here, and a trial run here records this machine's chip."""
    pytest.importorskip("optuna")
    import abd_ray.engine.repro as repro
    from abd_ray.study.search import REUSED_FROM, ReuseStore, StudySearcher, trial_key

    (cfg,) = StudySpec.from_dict(BASE).grid_configs()
    path = tmp_path / "store.jsonl"
    result = {"clean_acc": 90.0, "asr": 5.0, "final": 1, "step": 10}
    monkeypatch.setattr(repro, "cpu_model", lambda: "Other CPU")
    ReuseStore(str(path)).add(trial_key(cfg), "elsewhere/a", result)
    monkeypatch.setattr(repro, "cpu_model", lambda: "This CPU")
    here = StudySearcher([dict(cfg)], {}, 0, "s", None, reuse_store=str(path))
    assert REUSED_FROM not in here.suggest("b")  # the other CPU's figure is not this machine's
    here.on_trial_complete("b", result)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["platform"].split(",")[0] for r in records] == ["Other CPU", "This CPU"]
    again = StudySearcher([dict(cfg)], {}, 0, "s2", None, reuse_store=str(path))
    assert again.suggest("c")[REUSED_FROM] == "s/b"
    # one model name, another instruction set (with and without AVX-512): other kernels, so not this machine
    monkeypatch.setattr(repro.torch.backends.cpu, "get_cpu_capability", lambda: "NOT_THIS_ISA")
    wider = StudySearcher([dict(cfg)], {}, 0, "s3", None, reuse_store=str(path))
    assert REUSED_FROM not in wider.suggest("d")


def test_the_report_shows_what_the_defense_saw():
    """A defended trial's probe metrics (SV's detection, SR's perturbation against the trigger) reach the report's
    diagnostics section; an undefended trial, which reports none, gets no row."""
    from abd_ray.study.report import trial_rows

    def trial(tid, defense, extra):
        return {"trial_id": tid, "status": "TERMINATED", "error": None,
                "config": {"attack.name": "blend", "synthesizer": "zskt", "defense": defense, "seed": 0},
                "last_result": {"final": True, "clean_acc": 90.0, "asr": 99.0, **extra}}

    rows = trial_rows([trial("n0", "none", {}),
                       trial("a0", "abd", {"sv_auc": 0.987, "sv_masked_frac": 0.0, "sr_trigger_cos": -0.25,
                                           "sr_trigger_target_rate": 12.5})])
    assert [r["trial_id"] for r in rows if r["diagnostics"]] == ["a0"]
    rep = {"study": "s", "status": "FINISHED", "max_acc_drop": 5.0, "pareto": {}, "der": [], "trials": rows,
           "counts": {"planned": 2, "tune_total": 2, "tune": {}, "optuna_total": {}, "search_trials": 0, "mlflow": {}},
           "table": [], "recommended": {}}
    md = render_markdown(rep)
    section = md.split("## What the defense saw")[1]
    assert "SV suspect AUC" in section and "cos(delta, trigger)" in section and "SR flip %" not in section
    assert "| a0 | blend/zskt | abd | 0 | 99.0 | 0.987 | 0.000 | 12.5 | -0.250 |" in section
    assert "| n0 |" not in section
