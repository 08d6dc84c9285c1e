"""The pair-conditioned (metadata matrix-factorisation) complexity model of extproc/evaluation/pairmf.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from extproc.evaluation import fitting, pairmf

ROOT = Path(__file__).resolve().parents[2]
METADATA = ROOT / "extproc" / "classifier" / "train" / "model_metadata.json"


def _model(params: float, released: str = "2024-01", hosted: bool = False) -> dict:
    return {
        "params_b": None if hosted else params,
        "active_b": None if hosted else params,
        "hosted": hosted,
        "instruct": True,
        "released": released,
        "price_in": 0.03 * params if params else 10.0,
        "price_out": 0.03 * params if params else 30.0,
        "specialist": None,
    }


def _world(seed: int, n: int = 1500):
    """Prompts whose features set a difficulty; models whose ability grows with log size: P(m answers
    x) = sigmoid(3 (ability(m) - difficulty(x)))."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12))
    difficulty = x[:, 0] + 0.5 * x[:, 1]
    sizes = {f"m{p}": p for p in (2, 4, 7, 13, 30, 70, 180)}
    metadata = {name: _model(p) for name, p in sizes.items()}

    def answers(name: str) -> np.ndarray:
        ability = np.log10(sizes[name]) * 2 - 2.2
        return (rng.random(n) < 1 / (1 + np.exp(-3 * (ability - difficulty)))).astype(float)

    return x, metadata, sizes, answers


def test_one_fit_serves_a_pair_it_never_saw():
    x, metadata, _, answers = _world(0)
    train_models = ("m2", "m7", "m30", "m180")
    y = np.stack([answers(m) for m in train_models], 1)
    block = pairmf.Block(np.arange(1000), train_models, y[:1000], np.ones((1000, len(train_models))))
    model = pairmf.fit(x, [block], metadata, pairmf.META_FEATURES["size"], l2=1e-3, rank=None)
    test = np.arange(1000, 1500)
    weak, strong = answers("m4")[test], answers("m70")[test]  # neither model was in training
    gain = model.score(x[test], metadata["m4"], metadata["m70"], "gain")
    assert fitting.routing(gain, weak, strong).apgr > 0.6
    # in this one-dimensional world the logit difference l_s - l_w is the same for every prompt (only
    # the abilities differ), so it cannot rank: the predicted gain is what carries the pair
    logit = model.score(x[test], metadata["m4"], metadata["m70"], "logit")
    assert np.std(logit) < 0.3 * np.std(model.logits(x[test], metadata["m4"]))
    assert fitting.routing(logit, weak, strong).apgr < fitting.routing(gain, weak, strong).apgr - 0.05
    # a random order recovers half of the gap, for comparison
    noise = np.random.default_rng(9).random(len(test))
    assert fitting.routing(noise, weak, strong).apgr < 0.56


def test_logit_score_is_a_linear_head_for_a_fixed_pair():
    x, metadata, _, answers = _world(1, 600)
    models = ("m2", "m13", "m70")
    y = np.stack([answers(m) for m in models], 1)
    model = pairmf.fit(x, [pairmf.Block(np.arange(600), models, y, np.ones_like(y))], metadata, ("log_params",))
    w = model.pair_weights(metadata["m4"], metadata["m30"])
    z = np.hstack([(x - model.mean) / model.scale, np.ones((len(x), 1))])
    np.testing.assert_allclose(z @ w, model.score(x, metadata["m4"], metadata["m30"], "logit"), atol=1e-9)
    # the pair's direction matters: swapping weak and strong negates the score
    np.testing.assert_allclose(
        model.score(x, metadata["m30"], metadata["m4"], "logit"),
        -model.score(x, metadata["m4"], metadata["m30"], "logit"),
    )


def test_hosted_models_without_a_published_size_get_the_training_mean():
    metas = [_model(7), _model(70), _model(0, hosted=True)]
    scaler = pairmf.MetaScaler.fit(("log_params", "hosted"), metas)
    v = scaler(metas[2])
    assert v[0] == 0.0 and v[-1] == 1.0 and np.isfinite(v).all()


def test_metadata_file_covers_every_scored_model():
    doc = json.loads(METADATA.read_text())
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import transfer
    finally:
        sys.path.remove(str(ROOT / "bench"))
    needed = {m for _, w, s, _ in transfer.PAIRS for m in (w, s)}
    needed |= {m for pairs in transfer.VAL_PAIRS.values() for p in pairs for m in p}
    assert needed <= set(doc["models"])
    for name, fields in doc["models"].items():
        raw = pairmf.raw_meta(fields)
        assert np.isfinite(raw["log_price"]) and 0 <= raw["released"] < 4, name
        assert set(fields["est"]) <= {"price", "released", "instruct"}, name
        assert fields["hosted"] == (fields["params_b"] is None), name
