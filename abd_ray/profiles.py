"""Named sets of synthesizer and defense values that a run applies under its own explicit ones.

``default`` sets nothing: every key keeps the package default. ``paper`` sets what the published code of ABD
(Hong et al., ICML 2023; the public repository ``illidanlab/ABD``) and its sweeps set, per synthesizer and, where
the sweeps differ, per dataset; ``docs/fidelity.md`` section 2 gives the source line of each value. Where a sweep
lists several values the first is taken (e.g. ZSKT's SR resumes at pseudo batch 79,399 of 80,000: ``sr_start``
0.9925; ``inner_round`` 10 of 10 / 20).

A run's explicit ``synth.<key>`` / ``defense.<key>`` always wins over its profile (:meth:`RunConfig.resolved`).
The defense values are grouped by the component that owns them (SV, SR, ABD's own), so each defense receives its
own keys only, and every value goes through the defense's normal validation.
"""

from __future__ import annotations

from typing import Any

PROFILES = ("default", "paper")

# Which value groups each defense takes.
_DEFENSE_GROUPS = {"none": (), "sv": ("sv",), "sr": ("sr",), "abd": ("sv", "sr", "abd")}

# SR as the original runs it on every synthesizer: delta in the normalised input space from zero, found on the
# teacher, the hypergradient's forwards in train mode, added raw (no ratio cap, no clip) with a fresh optimiser.
_SR_COMMON: dict[str, Any] = {
    "pert_space": "normalized", "pert_init": "zero", "pert_model": "teacher", "inner_round": 10, "pert_lr": 0.1,
    "pert_l2": 1e-3, "sr_bn": "train", "inner_detach_clean": True, "hg_ref": "student", "hg_out_rounding": "floor",
    "sr_max_ratio": None, "sr_clip": None, "sr_fresh_opt": True, "sup_resume_lr": 5e-4,
}
_SV_COMMON: dict[str, Any] = {
    "coef": 0.1, "n_shuf_ens": 3, "n_shuf_layer": 5, "layer_count": "named_conv", "fixed_mode": "ascent",
    "check_skip": 11, "pseudo_test_batches": 0,
}
# CMI's repository (cmi/datafree/unlearn.py): the teacher's search without L2, KLDiv x T^2, the outer loss's
# reference keeps its gradient, and SR resumes a run without SV. Its DeepInversion shares this KD and SR.
_SR_CMI: dict[str, Any] = {
    **_SR_COMMON, "search_l2": 0.0, "sr_loss": "batchmean_t2", "sr_T": 20.0, "hg_ref_grad": True, "sr_start": 0.99,
}
_BANK = {"sv": {**_SV_COMMON, "bank_mode": "term"}, "sr": _SR_CMI, "abd": {"sv_in_stage2": False}}

PAPER: dict[str, dict[str, dict[str, Any]]] = {
    "zskt": {
        "synth": {
            "kd_reduction": "mean", "at_layer": "pre_bn", "n_g": 1, "n_s": 10, "z_dim": 100, "lr_g": 1e-3,
            "lr_s": 2e-3, "clip": 5.0, "clip_g": 5.0, "beta": 250.0, "T": 1.0,
        },
        "sv": dict(_SV_COMMON),
        "sr": {**_SR_COMMON, "search_l2": 1e-3, "sr_loss": "mean", "sr_T": 1.0, "hg_ref_grad": False,
               "sr_start": 0.9925},
        "abd": {},
    },
    "cmi": {
        "synth": {
            "g_steps": 200, "lr_g": 1e-3, "bn": 1.0, "oh": 1.0, "adv": 0.5, "cr": 0.8, "cr_T": 0.1,
            "round_every": 400, "opt_s": "sgd", "lr_s": 0.1, "wd_s": 1e-4, "T": 20.0,
        },
        **_BANK,
    },
    "deepinversion": {"synth": {}, **_BANK},
    "ood": {
        "synth": {"T": 8.0, "opt_s": "adam", "lr_s": 1e-3, "cutmix_beta": 0.25, "cutmix_prob": 1.0},
        "sv": {**_SV_COMMON, "bank_mode": "reweight"},
        # SR resumes from the sweep's 297.pth, the last two of 300 epochs (its 298.pth would leave one).
        "sr": {**_SR_COMMON, "search_l2": 0.0, "sr_loss": "batchmean_t2", "sr_T": 8.0, "hg_ref_grad": True,
               "sr_start": 1.0 - 2.0 / 300.0},
        "abd": {"sv_in_stage2": False},
    },
    # The clean-data KD reference of the paper's tables: no published values beyond the package's.
    "clean": {"synth": {}, "sv": {}, "sr": {}, "abd": {}},
}

# Where a dataset's sweep differs (zskt/sweeps/gtsrb_wrn_poi_defense.yml): T 0.5 for KD, the generator and SR
# (not the vaccine), no attention transfer, the vaccine check on 50 batches (ours 39 after 11 skipped), SR over
# the last 201 of 10,000 batches.
PAPER_DATASET: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("zskt", "gtsrb"): {
        "synth": {"T": 0.5, "beta": 0.0},
        "sv": {"pseudo_test_batches": 39},
        "sr": {"sr_T": 0.5, "sr_start": 0.98},
    },
}


def check_profile(name: Any) -> str:
    """``name`` if it is a known profile, else a ValueError listing the known ones."""
    if name not in PROFILES:
        raise ValueError(f"profile={name!r} is unknown; known profiles: {', '.join(PROFILES)}")
    return name


def profile_values(name: str, synthesizer: str, dataset: str, defense: str) -> tuple[dict, dict]:
    """The synthesizer and defense values profile ``name`` sets for one run.

    Returns:
        (``synth`` values, ``defense_params`` values); both empty for ``default``.

    Raises:
        ValueError: an unknown profile, or a synthesizer the profile has no values for (the message lists both
            sets of known names).
    """
    if check_profile(name) == "default":
        return {}, {}
    if synthesizer not in PAPER:
        raise ValueError(
            f"profile 'paper' has no published values for synthesizer {synthesizer!r}; it covers "
            f"{', '.join(sorted(PAPER))} (use profile=default)"
        )
    base, extra = PAPER[synthesizer], PAPER_DATASET.get((synthesizer, dataset), {})
    synth = {**base["synth"], **extra.get("synth", {})}
    groups = _DEFENSE_GROUPS.get(defense, ())
    values: dict[str, Any] = {}
    for g in groups:
        values.update({**base.get(g, {}), **extra.get(g, {})})
    return synth, values
