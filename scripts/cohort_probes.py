"""How much the synthetic cohort's CXRs and EHR say about the ICU outcomes, as linear probes.

A logistic regression (5-fold cross-validated, standardised inputs) on the true finding
intensities of an ICU sample's CXRs (those of the first ``icu_window_hours``, as the mortality
and length-of-stay samples hold them), on the mean of the same hours of EHR and on both,
predicting the length-of-stay class (Cohen's kappa and accuracy) and mortality (AUROC and
AUPRC). The comparison that matters for the longitudinal claim is "EHR + last CXR" against
"EHR + all CXRs": what the earlier CXRs add over the last one and the EHR. It reads the simulated
cohort in memory (``dipro.data.synthetic.simulate_cohort``), not images, so it measures what the
generator puts in, before rendering and cropping; a trained model sees less.

    python scripts/cohort_probes.py --patients 3000 --seed 0
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    roc_auc_score,
)
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dipro import vocab
from dipro.data.synthetic import AFFINITY, SyntheticConfig, simulate_cohort


def probe_inputs(patients: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The probes' inputs per patient, the length-of-stay classes and the mortality labels."""
    cohort = simulate_cohort(
        SyntheticConfig(seed=seed, num_patients=patients, image_size=32, crop_size=4)
    )
    window = cohort.config.icu_window_hours
    first = cohort.cxr_offsets[:-1]
    in_window = np.add.reduceat(cohort.cxr_times < window, first)
    last = first + in_window - 1
    first_cxr = cohort.intensities[first][:, AFFINITY]
    last_cxr = cohort.intensities[last][:, AFFINITY]
    both = np.concatenate([first_cxr, last_cxr], axis=1)
    ehr = cohort.ehr_values[:, :window].mean(axis=1)
    inputs = {
        "last CXR": last_cxr,
        "first and last CXR": both,
        f"EHR, first {window} h": ehr,
        "EHR + last CXR": np.concatenate([last_cxr, ehr], axis=1),
        "EHR + all CXRs": np.concatenate([both, ehr], axis=1),
    }
    los = np.digitize(cohort.los_days, vocab.LOS_BIN_EDGES[1:-1])
    return inputs, los, cohort.mortality.astype(int)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    inputs, los, mortality = probe_inputs(args.patients, args.seed)
    print(f"{args.patients} patients, seed {args.seed}, mortality rate {mortality.mean():.3f}")
    for name, x in inputs.items():
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        los_pred = cross_val_predict(model, x, los, cv=5)
        death = cross_val_predict(model, x, mortality, cv=5, method="predict_proba")[:, 1]
        print(
            f"{name:>20}: LOS kappa {cohen_kappa_score(los, los_pred):.3f} "
            f"accuracy {accuracy_score(los, los_pred):.3f}  "
            f"mortality AUROC {roc_auc_score(mortality, death):.3f} "
            f"AUPRC {average_precision_score(mortality, death):.3f}"
        )


if __name__ == "__main__":
    main()
