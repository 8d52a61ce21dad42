"""The patient course of the synthetic cohort, and :func:`simulate_cohort`, which draws it with
the X-rays (``xray``) and the EHR (``ehr``) that follow it.

Per patient ``i`` in hospital ``h``, from the seeded streams of ``simulate_cohort``:

- demographics: age, sex, height, weight and categorical race / language / marital status, with
  a race mix that differs by hospital;
- latent severity ``s_i(t)`` over hourly steps ``t`` = 0 .. 263 (11 days): a piecewise-linear
  random walk with one knot a day, starting at a baseline that rises with age and with the
  hospital's case mix, with a patient-specific drift (improving or deteriorating stays);
- finding intensities ``a[t, r, k] = level[r, k] + w * s(t0) + resp[r, k] * (s(t) - s(t0)) +
  own[r, k](t) - own[r, k](t0)`` in [0, 1] for the anatomically plausible (region, finding)
  pairs of ``AFFINITY`` (``t0``: the patient's first CXR): a static per-patient level drawn wide
  and independently of the course, so that one image says little about a change; the severity
  the patient arrived with, which every image shows a little of (how sick the patient looks,
  which the ICU outcomes depend on, but which does not predict the direction of a later change);
  the change of severity, which the EHR follows, times the patient's response (a slow drift of
  every region at once); and the finding's own course in each region: a slow background drift
  plus local episodes in which a finding clearly worsens or improves in one region within a
  day. Only the images show where an episode happened; its direction follows that day's
  severity step against the patient's trend, which the EHR between two CXRs shows;
- the ICU stay: length of stay (days, in [2, 11)) and in-hospital mortality from the severity of
  the first 48 h, its slope, the peak severity of the stay and age; 2..6 CXRs at least
  ``min_gap_hours`` apart, the first two inside the first 48 h, all inside the stay;
- progression labels per consecutive CXR pair and (region, finding): worsened / improved / no
  change by thresholding the change of intensity (what a reader sees, not a latent logit),
  "not mentioned" for implausible pairs, regions without a box and at random; the finding-level
  label is that of the mentioned region with the largest change.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from dipro import vocab
from dipro.data.synthetic.cohort import MAX_STAY_HOURS, Cohort, SyntheticConfig
from dipro.data.synthetic.ehr import hourly_ehr
from dipro.data.synthetic.xray import render_cxrs

_KNOT_HOURS: Final[int] = 24

# Which findings can appear in which region, [R, K] in vocab orders. Columns: atelectasis,
# enlarged cardiac silhouette, consolidation, pulmonary edema, lung opacity, pleural effusion,
# pneumonia. Pairs outside it are never rendered and always labelled "not mentioned".
AFFINITY: Final[np.ndarray] = np.array(
    [
        (1, 0, 1, 1, 1, 0, 1),  # left lung
        (1, 0, 1, 1, 1, 0, 1),  # right lung
        (1, 0, 1, 1, 1, 1, 1),  # left lower lung zone
        (1, 0, 1, 1, 1, 1, 1),  # right lower lung zone
        (0, 0, 0, 1, 1, 0, 0),  # left hilar structures
        (0, 0, 0, 1, 1, 0, 0),  # right hilar structures
        (0, 0, 0, 0, 0, 1, 0),  # left costophrenic angle
        (0, 0, 0, 0, 0, 1, 0),  # right costophrenic angle
        (0, 1, 0, 0, 0, 0, 0),  # cardiac silhouette
        (0, 1, 0, 0, 0, 0, 0),  # mediastinum
    ],
    dtype=bool,
)

_LEVEL_LOW, _LEVEL_HIGH = 0.08, 0.92  # a finding's static per-patient intensity
_ARRIVAL: Final[float] = 0.06  # intensity per unit of the severity at the first CXR
_RESPONSE: Final[tuple[float, float]] = (0.003, 0.008)  # intensity per unit of severity change
_BACKGROUND_COURSE: Final[float] = 0.01  # daily step of a finding's slow drift (below a reader)
_EPISODE_RATE: Final[float] = 0.55  # daily chance of an episode of a finding, over its regions
_EPISODE_SIZE: Final[tuple[float, float]] = (0.04, 0.20)  # its change of intensity, either sign
_EPISODE_FOLLOWS_SEVERITY: Final[float] = 5.0  # logit of worsening per unit of the day's step
_EPISODE_TREND_SHARE: Final[float] = 0.9  # of the patient's mean daily step, taken off that step
# The radiographic course: a pleural effusion that builds up or clears after the first CXR, which
# no vital sign or lab follows and which the ICU outcomes depend on.
_COURSE_FINDING: Final[int] = vocab.FINDINGS.index("pleural effusion")
_COURSE_INTENSITY: Final[float] = 0.10  # change of intensity per unit of the course, once complete
_COURSE_HOURS: Final[float] = 12.0  # hours after the first CXR until the change is complete
_COURSE_MORTALITY: Final[float] = 1.5  # mortality logit per unit of the course
_COURSE_LOS: Final[float] = 0.5  # log of the stay beyond 2 days per unit of the course


def simulate_cohort(cfg: SyntheticConfig) -> Cohort:
    """Simulate the cohort of ``cfg``; the same config gives the same arrays, byte for byte."""
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(8)]
    rng_site, rng_demo, rng_sev, rng_stay, rng_find, rng_img, rng_ehr, rng_course = streams
    N = cfg.num_patients
    site = _hospitals(cfg, rng_site)
    hospital = site["hospital"]
    demo = _demographics(hospital, site["race_probs"], rng_demo)
    severity, slope = _severity(hospital, site["severity_shift"], demo["age"], rng_sev)
    course = rng_course.standard_normal(N)
    los_days, mortality = _outcomes(
        severity, slope, course, demo["age"], site["mortality_shift"][hospital], rng_stay
    )
    num_hours = np.ceil(los_days * 24.0).astype(np.int64)
    cxr_times, cxr_offsets = _cxr_times(cfg, num_hours, rng_stay)
    cxr_subject = np.repeat(np.arange(N), np.diff(cxr_offsets))

    intensities = _finding_intensity(
        hospital, site["finding_shift"], severity, slope, cxr_subject, cxr_times, rng_find
    ) + _radiographic_course(course, cxr_subject, cxr_times)
    intensities = np.where(AFFINITY, np.clip(intensities, 0.0, 1.0), 0.0)
    images, boxes, present, crops = render_cxrs(
        cfg, cxr_subject, hospital, site, intensities, rng_img
    )
    pair_first, region_labels, progression = _labels(
        cfg, cxr_offsets, intensities, present, rng_find
    )
    ehr_values, ehr_observed = hourly_ehr(severity, slope, num_hours, demo, rng_ehr)

    ids = np.arange(N, dtype=np.int64)
    return Cohort(
        config=cfg,
        subject_id=10_000_000 + ids,
        stay_id=30_000_000 + ids,
        hospital=hospital.astype(np.int32),
        split=_splits(cfg, hospital, rng_site),
        age=demo["age"],
        height=demo["height"],
        weight=demo["weight"],
        gender=demo["gender"],
        race=demo["race"],
        language=demo["language"],
        marital_status=demo["marital_status"],
        demographics=demo["vector"],
        severity=severity.astype(np.float32),
        los_days=los_days.astype(np.float32),
        mortality=mortality.astype(np.int8),
        num_hours=num_hours,
        ehr_values=ehr_values,
        ehr_observed=ehr_observed,
        cxr_offsets=cxr_offsets,
        cxr_subject=cxr_subject,
        cxr_times=cxr_times.astype(np.float32),
        images=images,
        boxes=boxes.astype(np.float32),
        region_present=present,
        intensities=intensities.astype(np.float32),
        crops=crops,
        pair_first=pair_first,
        pair_region_labels=region_labels,
        pair_progression=progression,
    )


def _hospitals(cfg: SyntheticConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Site sizes and the traits that make sites non-IID."""
    Hs, K = cfg.num_hospitals, vocab.NUM_FINDINGS
    weights = 1.0 / (1.0 + 0.5 * np.arange(Hs))
    hospital = rng.choice(Hs, size=cfg.num_patients, p=weights / weights.sum())
    spread = np.linspace(-1.0, 1.0, Hs) if Hs > 1 else np.zeros(1)
    base_race = np.array([0.04, 0.14, 0.05, 0.06, 0.06, 0.65])
    return {
        "hospital": hospital,
        "severity_shift": 0.5 * spread,
        "mortality_shift": 0.3 * rng.permutation(spread),
        "finding_shift": rng.normal(0.0, 0.5, (Hs, K)),
        "contrast": 1.0 + 0.2 * rng.permutation(spread),
        "brightness": rng.uniform(-0.08, 0.08, Hs),
        "race_probs": rng.dirichlet(base_race * 40.0, size=Hs),
    }


def _demographics(
    hospital: np.ndarray, race_probs: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    N = hospital.shape[0]
    age = np.clip(rng.normal(64.0, 15.0, N), 18.0, 95.0)
    male = rng.random(N) < 0.56
    height = np.clip(np.where(male, 176.0, 162.0) + rng.normal(0.0, 7.0, N), 140.0, 205.0)
    weight = np.clip(np.where(male, 84.0, 71.0) + rng.normal(0.0, 16.0, N), 40.0, 200.0)
    cum = np.cumsum(race_probs[hospital], axis=1)
    race_idx = np.minimum((rng.random(N)[:, None] > cum).sum(1), len(vocab.RACES) - 1)
    lang_idx = (rng.random(N) < 0.9).astype(int)  # "?" or ENGLISH
    marital_idx = rng.choice(len(vocab.MARITAL_STATUSES), N, p=[0.12, 0.45, 0.28, 0.15])
    gender_idx = male.astype(int)  # GENDERS = (F, M)

    G = vocab.NUM_DEMOGRAPHICS
    vector = np.zeros((N, G), np.float32)
    vector[:, 0], vector[:, 1], vector[:, 2] = age, height, weight
    col = len(vocab.NUMERIC_DEMOGRAPHICS)
    for idx, values in (
        (gender_idx, vocab.GENDERS),
        (race_idx, vocab.RACES),
        (lang_idx, vocab.LANGUAGES),
        (marital_idx, vocab.MARITAL_STATUSES),
    ):
        vector[np.arange(N), col + idx] = 1.0
        col += len(values)
    return {
        "age": age.astype(np.float32),
        "height": height.astype(np.float32),
        "weight": weight.astype(np.float32),
        "gender": np.asarray(vocab.GENDERS, dtype=object)[gender_idx],
        "race": np.asarray(vocab.RACES, dtype=object)[race_idx],
        "language": np.asarray(vocab.LANGUAGES, dtype=object)[lang_idx],
        "marital_status": np.asarray(vocab.MARITAL_STATUSES, dtype=object)[marital_idx],
        "vector": vector,
    }


def _severity(
    hospital: np.ndarray, shift: np.ndarray, age: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Hourly latent severity [N, H] and its slope per day [N, H]: piecewise linear with one knot
    a day."""
    N, H = hospital.shape[0], MAX_STAY_HOURS
    days = H // _KNOT_HOURS
    baseline = shift[hospital] + 0.3 * (age - 64.0) / 15.0 + rng.normal(0.0, 0.9, N)
    drift = rng.normal(0.0, 0.5, N)
    steps = drift[:, None] + rng.normal(0.0, 0.8, (N, days))  # change per day
    knots = baseline[:, None] + np.concatenate([np.zeros((N, 1)), np.cumsum(steps, 1)], 1)
    hours = np.arange(H)
    day, frac = hours // _KNOT_HOURS, (hours % _KNOT_HOURS) / _KNOT_HOURS
    severity = knots[:, day] * (1.0 - frac) + knots[:, day + 1] * frac
    return severity, steps[:, day]


def _outcomes(
    severity: np.ndarray,
    slope: np.ndarray,
    course: np.ndarray,
    age: np.ndarray,
    site_shift: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """LOS in days within [2, 11) and in-hospital mortality, from severity, the radiographic
    course (``_radiographic_course``) and age."""
    N = severity.shape[0]
    early = severity[:, :48].mean(1)
    early_slope = slope[:, :48].mean(1)
    age_z = (age - 64.0) / 15.0
    extra = np.exp(
        0.7 + 0.45 * early + _COURSE_LOS * course + 0.15 * age_z + rng.normal(0.0, 0.6, N)
    )
    los_days = np.clip(2.0 + extra, 2.05, 10.95)
    stay_hours = np.ceil(los_days * 24.0).astype(int)
    peak = np.array([severity[i, : stay_hours[i]].max() for i in range(N)])
    logit = (
        -2.4
        + 0.9 * early
        + 0.6 * early_slope
        + 0.4 * peak
        + _COURSE_MORTALITY * course
        + 0.4 * age_z
        + site_shift
    )
    mortality = rng.random(N) < 1.0 / (1.0 + np.exp(-logit))
    return los_days, mortality


def _cxr_times(
    cfg: SyntheticConfig, num_hours: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """CXR times (hours) flat over patients and CSR offsets. The first two fall inside the ICU
    window, consecutive CXRs are at least min_gap_hours apart, all lie inside the stay."""
    N, n_max = num_hours.shape[0], cfg.max_cxrs
    window, gap_lo, gap_hi = cfg.icu_window_hours, cfg.min_gap_hours, cfg.max_gap_hours
    first = rng.uniform(0.0, window - gap_lo - 2.0, N)
    first_gap = gap_lo + rng.uniform(0.0, 1.0, N) * (window - 1.0 - first - gap_lo).clip(0.0)
    later = rng.uniform(gap_lo, gap_hi, (N, max(n_max - 2, 0)))
    times = np.cumsum(np.concatenate([first[:, None], first_gap[:, None], later], 1), 1)
    wanted = rng.integers(cfg.min_cxrs, n_max + 1, N)
    keep = (np.arange(n_max)[None, :] < wanted[:, None]) & (times < num_hours[:, None] - 1.0)
    keep[:, :2] = True
    counts = keep.sum(1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return np.round(times[keep], 2), offsets


def _finding_intensity(
    hospital: np.ndarray,
    finding_shift: np.ndarray,
    severity: np.ndarray,
    slope: np.ndarray,
    cxr_subject: np.ndarray,
    cxr_times: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Finding intensity [M, R, K] at each CXR, before the radiographic course is added and the
    result is clipped to [0, 1] off ``AFFINITY``: a static per-patient level, the severity the
    patient arrived with, the change of severity since the patient's first CXR, and the
    finding's own local course.

    ``a[t] = level + _ARRIVAL * s(t0) + resp * (s(t) - s(t0)) + own(t) - own(t0)``, with
    ``level`` drawn wide and independently of the course (the patient's static appearance
    dominates one image), ``s(t0)`` the severity at the first CXR (every image carries a little
    of it, so the CXRs say something about the ICU outcomes; it is independent of the later
    course, so it says nothing about the direction of a change), ``resp`` the patient's response
    to severity (small for a finding the patient does not have; a slow drift of every region at
    once, below what a reader calls a change) and ``own`` the finding's own course in
    each region: a slow background drift plus episodes, one region at a time, in which a finding
    the patient has clearly worsens or improves within a day (``_EPISODE_RATE`` a day, a change
    of ``_EPISODE_SIZE``). An episode is local, so only the images show where it happened; its
    direction follows that day's severity step against the patient's own trend
    (``_EPISODE_TREND_SHARE`` of the mean daily step taken off, so that a patient's trend, which
    the earlier episodes already show in one image, does not predict the next one): a patient
    who deteriorates more than usual that day tends to develop new opacities, one who improves
    to clear them, so the EHR between two CXRs says which way the changes went. The level is
    drawn inside [_LEVEL_LOW, _LEVEL_HIGH], away from the bounds that would make a level predict
    the direction of a change."""
    N, R, K = hospital.shape[0], vocab.NUM_REGIONS, vocab.NUM_FINDINGS
    has = rng.random((N, 1, K)) < 0.8  # the patient has the finding at all
    level = (
        rng.uniform(_LEVEL_LOW, _LEVEL_HIGH, (N, R, K)) + 0.05 * finding_shift[hospital][:, None, :]
    )
    resp = np.where(has, rng.uniform(*_RESPONSE, (N, R, K)), 0.002)
    days = MAX_STAY_HOURS // _KNOT_HOURS
    drift = _BACKGROUND_COURSE * rng.standard_normal((N, R, K, days))
    daily = slope[:, ::_KNOT_HOURS][:, :days]  # [N, days] severity step of each day
    surprise = (daily - _EPISODE_TREND_SHARE * daily.mean(1, keepdims=True))[:, None, None, :]
    worsens = rng.random((N, R, K, days)) < 1.0 / (
        1.0 + np.exp(-_EPISODE_FOLLOWS_SEVERITY * surprise)
    )
    per_region = 1.0 - (1.0 - _EPISODE_RATE) ** (1.0 / AFFINITY.sum(0))  # [K]
    episode = (rng.random((N, R, K, days)) < per_region[:, None]) & has[..., None]
    size = rng.uniform(*_EPISODE_SIZE, (N, R, K, days))
    steps = drift + np.where(episode, np.where(worsens, size, -size), 0.0)
    knots = np.concatenate([np.zeros((N, R, K, 1)), np.cumsum(steps, axis=3)], axis=3)
    hour = np.clip(np.floor(cxr_times).astype(int), 0, MAX_STAY_HOURS - 1)
    day, frac = hour // _KNOT_HOURS, ((hour % _KNOT_HOURS) / _KNOT_HOURS)[:, None, None]
    own = knots[cxr_subject, :, :, day] * (1.0 - frac) + knots[cxr_subject, :, :, day + 1] * frac
    starts = np.searchsorted(cxr_subject, np.arange(N))[cxr_subject]
    arrival = severity[cxr_subject, hour[starts]][:, None, None]
    s = severity[cxr_subject, hour][:, None, None] - arrival
    a = level[cxr_subject] + _ARRIVAL * arrival + resp[cxr_subject] * s + own - own[starts]
    return a + rng.normal(0.0, 0.005, a.shape)


def _radiographic_course(
    course: np.ndarray, cxr_subject: np.ndarray, cxr_times: np.ndarray
) -> np.ndarray:
    """The change of intensity [M, R, K] that the radiographic course adds to each CXR.

    ``course[i]`` (standard normal, independent of the severity and so of every EHR variable)
    is how far patient ``i``'s pleural effusion builds up (> 0) or clears (< 0) after the first
    CXR: ``_COURSE_INTENSITY * course * min(1, (t - t0) / _COURSE_HOURS)`` in every region where
    an effusion can show. Mortality and the length of stay rise with it (``_outcomes``), so a
    part of the outcome risk shows only in the images, and since a finding's static level is
    drawn wide, only in the change between the first CXR and a later one."""
    starts = np.searchsorted(cxr_subject, np.arange(course.shape[0]))[cxr_subject]
    done = np.clip((cxr_times - cxr_times[starts]) / _COURSE_HOURS, 0.0, 1.0)
    change = np.zeros((cxr_times.shape[0], vocab.NUM_REGIONS, vocab.NUM_FINDINGS))
    change[:, :, _COURSE_FINDING] = (_COURSE_INTENSITY * course[cxr_subject] * done)[:, None]
    return change


def _labels(
    cfg: SyntheticConfig,
    cxr_offsets: np.ndarray,
    intensities: np.ndarray,
    present: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive pairs of each stay; region-level codes [Q, R, K]; finding-level codes [Q, K]."""
    counts = np.diff(cxr_offsets)
    pair_first = np.concatenate(
        [np.arange(cxr_offsets[i], cxr_offsets[i + 1] - 1) for i in range(counts.shape[0])]
    ).astype(np.int64)
    delta = intensities[pair_first + 1] - intensities[pair_first]  # [Q, R, K]
    thr = cfg.change_threshold
    codes = np.where(
        delta > thr, vocab.WORSENED, np.where(delta < -thr, vocab.IMPROVED, vocab.NO_CHANGE)
    )
    both_present = present[pair_first] & present[pair_first + 1]
    mentioned = (
        AFFINITY[None]
        & both_present[:, :, None]
        & (rng.random(delta.shape) >= cfg.not_mentioned_rate)
    )
    codes = np.where(mentioned, codes, vocab.NOT_MENTIONED).astype(np.int8)
    strongest = np.argmax(np.where(mentioned, np.abs(delta), -1.0), axis=1)  # [Q, K]
    finding = np.take_along_axis(codes, strongest[:, None, :], axis=1)[:, 0, :]
    finding = np.where(mentioned.any(1), finding, vocab.NOT_MENTIONED).astype(np.int8)
    return pair_first, codes, finding


def _splits(cfg: SyntheticConfig, hospital: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Patient-level 70/10/20 split, stratified by hospital (every site has every split)."""
    split = np.empty(hospital.shape[0], dtype=object)
    train_frac, val_frac, _ = cfg.split_fractions
    for h in np.unique(hospital):
        members = rng.permutation(np.flatnonzero(hospital == h))
        n_train = int(round(train_frac * members.size))
        n_val = int(round(val_frac * members.size))
        split[members[:n_train]] = "train"
        split[members[n_train : n_train + n_val]] = "val"
        split[members[n_train + n_val :]] = "test"
    return split
