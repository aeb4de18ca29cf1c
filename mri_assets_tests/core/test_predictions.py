"""Which predictions get a saliency map (core/predictions.to_explain)."""

import pandas as pd

from mri_assets.core.predictions import to_explain


def frame(p_meningioma: list[float], flags: list[bool]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source_key": [f"inbox/{i}.png" for i in range(len(flags))],
            "sha256": [f"sha{i}" for i in range(len(flags))],
            "p_glioma": [1 - p for p in p_meningioma],
            "p_meningioma": p_meningioma,
            "ood_score": [float(10 - i) for i in range(len(flags))],
            "ood_flag": flags,
        }
    )


def test_flagged_first_then_the_least_confident():
    chosen = to_explain(frame([0.99, 0.55, 0.51, 0.95], [False, False, False, True]))
    assert list(chosen["sha256"]) == ["sha3", "sha2", "sha1"]


def test_every_scan_flagged_and_none_uncertain_explains_only_those():
    # Once gave a third row of NaN (sha256 nan), which failed the predictions asset.
    chosen = to_explain(frame([1.0, 1.0], [True, True]))
    assert list(chosen["sha256"]) == ["sha0", "sha1"]
