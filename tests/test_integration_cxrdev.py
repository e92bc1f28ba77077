"""End to end on ~890 real chest X-rays (../shared/data/cxr-dev): prepare → train → evaluate.

Skipped on a user's machine without the shared data; required in CI (CI=true). Small images and few epochs keep
it to a few minutes on 2 CPU cores; the floors are far above chance (1/3) so a broken pipeline cannot pass.
Frozen ImageNet features (lite0, 128 px) and their ensemble with the trained network run here too.
"""

import pytest

from cxr_fast.config import resolve_config
from cxr_fast.data.manifest import prepare
from cxr_fast.evaluate import evaluate
from cxr_fast.train import train

LABELS = "Covid-19=COVID-19,No_findings=Normal,Pneumonia=Pneumonia"
FLOOR = 0.6
FROZEN_FLOOR = 0.7  # lite0 frozen at 128 px measured 0.826 here (cxresnet 0.768, their ensemble 0.854)


@pytest.fixture(scope="module")
def real_data(shared_data, tmp_path_factory):
    from cxr_fast.data.labels import parse_label_map

    # Patients kept within one split (cxr-dev's NIH films carry patient ids), so the floors are on unseen patients.
    out = tmp_path_factory.mktemp("cxrdev") / "data"
    prepare(shared_data / "cxr-dev", out, label_map=parse_label_map(LABELS), cache_size=128, progress=False,
            patient_pattern="nih")
    return out


@pytest.fixture(scope="module")
def real_run(real_data, tmp_path_factory):
    cfg = resolve_config(arch="cxresnet", size=96, epochs=5, bs=32, lr=3e-3, class_weights=True)
    return train(real_data, cfg, out=tmp_path_factory.mktemp("cxrdev-run") / "run", quiet=True)


@pytest.mark.shared_data
@pytest.mark.slow
def test_train_on_real_xrays_beats_a_floor(real_run):
    result = evaluate(real_run, n_boot=200, progress=False)
    assert result.metrics["n"] > 150
    assert result.metrics["balanced_accuracy"] >= FLOOR, result.metrics
    assert all(v["recall"] > 0 for v in result.metrics["per_class"].values()), result.metrics["per_class"]


@pytest.mark.shared_data
@pytest.mark.slow
def test_frozen_imagenet_features_and_their_ensemble_on_real_xrays(real_data, real_run, tmp_path):
    from cxr_fast.ensemble import build_ensemble

    # lite0's packaged ImageNet weights at 128 px: the shipped frozen_lite path at a fraction of its cost
    cfg = resolve_config("frozen_lite", size=128, arch_kwargs={"backbones": ["tf_efficientnet_lite0"], "sizes": [128]})
    frozen = train(real_data, cfg, out=tmp_path / "frozen", quiet=True)
    frozen_metrics = evaluate(frozen, n_boot=200, progress=False).metrics
    assert frozen_metrics["balanced_accuracy"] >= FROZEN_FLOOR, frozen_metrics
    ensemble = build_ensemble([real_run, frozen], tmp_path / "ensemble", progress=False)
    metrics = evaluate(ensemble, n_boot=200, progress=False).metrics
    assert metrics["n"] == frozen_metrics["n"]
    assert metrics["balanced_accuracy"] >= FLOOR, metrics
