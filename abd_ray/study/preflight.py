"""Pre-flight: everything a study (or a single run) can be refused for, checked before Ray starts or any compute.

Each check raises a ValueError whose message is one line naming the problem and the fix; the CLI prints it.
Imports neither ray nor optuna.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from abd_ray.study.diskspace import StorageFull, check_free_space, min_free_mb
from abd_ray.study.folder import STATE, StudyFolder
from abd_ray.study.spec import StudySpec

Echo = Callable[[str], None]


def check_trigger(attack, dataset: str) -> None:
    """Build the attack's trigger once, so an unreadable pattern or mask file fails before any compute."""
    from abd_ray.attacks import make_trigger
    from abd_ray.data import dataset_info

    if attack.active:
        make_trigger(attack, dataset_info(dataset).shape)


def check_data_root(dataset: str, data_root: str | None) -> None:
    """Fail before compute when a dataset that needs files has none (the loader names what is missing)."""
    from abd_ray.data import dataset_info, load_dataset

    if dataset_info(dataset).needs_root:
        load_dataset(dataset, data_root)


def check_teacher_file(spec: StudySpec) -> dict[str, Any]:
    """Load a study's ``teacher_file`` (weights-only, tensors checked against the arch) and return its metadata."""
    from abd_ray.engine.teacher import load_external

    return load_external(spec.teacher_file, spec.teacher_spec(spec.attacks[0])).meta


def check_trials(spec: StudySpec) -> None:
    """Build the run config of every fixed trial, and of each search cell at every end of its space, as a trial
    would, so a setting that cannot run (e.g. more shuffled layers than the teacher has) fails before any compute."""
    from abd_ray.config import RunConfig
    from abd_ray.engine.distill import check_config
    from abd_ray.study.spec import split_config

    flats = spec.grid_configs()
    for base in spec.search_constants().values():
        flats.append(base)
        for p in spec.search.space:
            ends = p.choices if p.choices is not None else (p.low, p.high)
            flats += [{**spec.search.trial_config(base, {p.key: v}), p.key: int(v) if p.is_int else v} for v in ends]
    for flat in flats:
        try:
            check_config(RunConfig.from_flat(split_config(flat)[0]))
        except ValueError as e:
            where = "search" if flat.get("study.kind") == "search" else "defenses"
            raise ValueError(f"study {spec.name}: {where}: {flat['study.cell']}/{flat['defense']}: {e}") from None


def check_spec(spec: StudySpec, data_root: str | None) -> None:
    """Every check of a study's spec that needs its files: data, trigger files, teacher file, each trial's config."""
    if spec.dataset != "digits":
        # Fail before any compute when the data is not there (the loader names the missing files).
        from abd_ray.data import load_dataset

        load_dataset(spec.dataset, data_root)
    for attack in spec.attacks:  # an unreadable pattern / mask file fails here, not in the teacher stage
        check_trigger(spec.attack_spec(attack), spec.dataset)
    if spec.teacher_file:
        # A teacher from elsewhere is checked before anything is created: weights-only, fitting its arch.
        check_teacher_file(spec)
    check_trials(spec)


def check_room(paths: list[str]) -> None:
    """Refuse to start on a file system that is (nearly) full, before anything is written."""
    try:
        check_free_space(paths, min_free_mb(), "free space (or lower the limit), then run the command again")
    except StorageFull as e:
        raise ValueError(str(e)) from None


def spec_changes(old_text: str, new_text: str) -> list[str]:
    """``key: old -> new`` for each dotted key whose value differs between two study files."""
    import yaml

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix or "(file)": d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    try:
        old, new = flat(yaml.safe_load(old_text)), flat(yaml.safe_load(new_text))
    except yaml.YAMLError:
        return ["(the edited file is not valid YAML)"]
    absent = "(absent)"
    return [f"{k}: {old.get(k, absent)} -> {new.get(k, absent)}" for k in sorted(set(old) | set(new))
            if old.get(k, absent) != new.get(k, absent)]


def check_spec_unchanged(folder: StudyFolder, state: dict[str, Any], echo: Echo) -> None:
    """One study, one spec: a resume runs the study file as it was at launch.

    Raises:
        ValueError: the folder's copy (``study.yaml``) was edited since launch; resuming would mix two specs.
    """
    copy = folder.spec_copy
    launched = state.get("spec_source")
    if launched is None:  # a folder written before the launch-time source was recorded
        return
    saved = copy.read_text(errors="replace") if copy.exists() else ""
    if saved != launched:
        changes = "; ".join(spec_changes(launched, saved)[:6]) or "whitespace or comments only"
        raise ValueError(f"{copy} was edited since the study began ({changes}); a study runs one spec: restore it "
                         f"(the original is in {folder.path / STATE}, key spec_source), or run the edited file as a "
                         "new study with `abd-ray study FILE --name NEW`")
    original = Path(state.get("spec_file") or "")
    if original.is_file() and original.read_bytes() != launched.encode():
        changes = "; ".join(spec_changes(launched, original.read_text(errors="replace"))[:6]) or "comments only"
        echo(f"note: {original} changed since the study began ({changes}); resuming with the copy taken at launch, "
             f"{copy}; to run the edited file, start a new study: abd-ray study {original} --name NEW")
