"""The teacher stage: every distinct poisoned teacher of a study, trained once (a Ray task each, on a GPU where the
cluster has one) or found in the content-addressed teacher cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from abd_ray.study.preflight import check_teacher_file
from abd_ray.study.spec import StudySpec


def _teacher_task(spec_dict: dict[str, Any], cache_dir: str, data_root: str | None) -> dict[str, Any]:
    """A Ray task: the teacher of ``spec_dict`` from the cache, or trained once into it."""
    import ray

    from abd_ray.config import TeacherSpec
    from abd_ray.engine.teacher import get_teacher

    t = get_teacher(TeacherSpec.from_dict(spec_dict), cache_dir, data_root, "auto", progress=False)
    return {"path": str(t.path), "metrics": t.metrics, "cached": t.cached, "key": t.meta.get("key"),
            "node_id": ray.get_runtime_context().get_node_id()}


def train_teachers(spec: StudySpec, state: dict[str, Any], echo: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The teacher of each attack of the study: path, metrics, whether it came from the cache."""
    import ray

    if spec.teacher_file:
        meta = check_teacher_file(spec)
        echo(f"teacher stage: the study's teacher_file {spec.teacher_file} (not trained)")
        return {spec.attacks[0]: {"path": spec.teacher_file, "metrics": meta.get("metrics", {}), "cached": False,
                                  "key": meta.get("key"), "external": True}}
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(_teacher_task).options(num_cpus=spec.cpu if not gpus else 1, num_gpus=1 if gpus else 0,
                                             max_retries=2)
    # Plain dicts cross into the tasks: what a teacher's cache key and its artifact record are made of.
    specs = {a: spec.teacher_spec(a).to_dict() for a in spec.attacks}
    refs = {a: task.remote(s, state["cache_dir"], state.get("data_root")) for a, s in specs.items()}
    echo(f"teacher stage: {len(refs)} teacher(s) ({'GPU' if gpus else 'CPU'})")
    out = {}
    for a, ref in refs.items():
        info = ray.get(ref)
        m = info["metrics"]
        echo(f"  {a:<12} clean_acc {m['clean_acc']:6.2f}  asr {m.get('asr', float('nan')):6.2f}  "
             f"{'cached' if info['cached'] else 'trained'}  {info['path']}")
        out[a] = info
    return out
