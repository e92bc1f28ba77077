"""End to end on ~890 real chest X-rays (../shared/data/cxr-dev): prepare → train → evaluate.

Skipped on a user's machine without the shared data; required in CI (CI=true). Small images and few epochs keep
it to a few minutes on 2 CPU cores; the floor is far above chance (1/3) so a broken pipeline cannot pass.
"""

import pytest

from cxr_fast.config import resolve_config
from cxr_fast.data.manifest import prepare
from cxr_fast.evaluate import evaluate
from cxr_fast.train import train

LABELS = "Covid-19=COVID-19,No_findings=Normal,Pneumonia=Pneumonia"
FLOOR = 0.6


@pytest.mark.shared_data
@pytest.mark.slow
def test_train_on_real_xrays_beats_a_floor(shared_data, tmp_path):
    from cxr_fast.data.labels import parse_label_map

    # Patients kept within one split (cxr-dev's NIH films carry patient ids), so the floor is on unseen patients.
    prepare(shared_data / "cxr-dev", tmp_path / "data", label_map=parse_label_map(LABELS), cache_size=128,
            progress=False, patient_pattern="nih")
    cfg = resolve_config(arch="cxresnet", size=96, epochs=5, bs=32, lr=3e-3, class_weights=True)
    run = train(tmp_path / "data", cfg, out=tmp_path / "run", quiet=True)
    result = evaluate(run, n_boot=200, progress=False)
    assert result.metrics["n"] > 150
    assert result.metrics["balanced_accuracy"] >= FLOOR, result.metrics
    assert all(v["recall"] > 0 for v in result.metrics["per_class"].values()), result.metrics["per_class"]
