"""The synthetic ICU cohort: longitudinal chest X-rays, hourly EHR and outcomes, all driven by one
latent severity per patient (docs/model.md, "The synthetic cohort").

Generative model, per patient ``i`` in hospital ``h`` (all draws from one seeded numpy Generator
tree, so a seed fixes every byte), each part described where it is drawn:

- ``course``: the hospitals, demographics, the latent severity and its finding intensities, the
  radiographic course, the ICU stay and its outcomes, the CXR times, the progression labels and
  the patient-level splits; :func:`simulate_cohort` draws them all, in this order;
- ``xray``: each CXR's pixels and its region crops;
- ``ehr``: the 38 hourly EHR variables and when they are observed.

``cohort`` holds the settings (:class:`SyntheticConfig`) and the result (:class:`Cohort`);
``export`` turns a cohort into sample records and datasets.

Public API (also for the raw-MIMIC writer): :class:`SyntheticConfig`; :func:`simulate_cohort`
-> :class:`Cohort` (everything in memory: stays, full CXRs, boxes, times, finding intensities,
labels, hourly EHR, demographics, outcomes); :func:`cohort_records` (the sample records of one
task); :func:`write_synthetic_dataset` (all tasks as Parquet shards, see dipro.data.layout);
:func:`ensure_synthetic_data` (the dataset of a ``data`` config node, written when absent and
reused otherwise: what ``ray_jobs.synthetic``, the demo and the studies call).
"""

from dipro.data.synthetic.cohort import MAX_STAY_HOURS, Cohort, SyntheticConfig
from dipro.data.synthetic.course import AFFINITY, simulate_cohort
from dipro.data.synthetic.export import (
    GENERATOR_VERSION,
    SyntheticData,
    cohort_records,
    cxr_identifiers,
    ensure_synthetic_data,
    generator_info,
    write_synthetic_dataset,
)
from dipro.data.synthetic.xray import CANONICAL_BOXES

__all__ = [
    "AFFINITY",
    "CANONICAL_BOXES",
    "GENERATOR_VERSION",
    "MAX_STAY_HOURS",
    "Cohort",
    "SyntheticConfig",
    "SyntheticData",
    "cohort_records",
    "cxr_identifiers",
    "ensure_synthetic_data",
    "generator_info",
    "simulate_cohort",
    "write_synthetic_dataset",
]
