"""The shipped model against fixed held-out slices and the training graph's reference outputs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from extproc.classifier import DOMAINS, PII_TYPES, Classifier
from extproc.classifier.classifier import MODEL_DIR, ModelError, run_graphs
from extproc.classifier.domain_head import model_domain_head

DATA = Path(__file__).parent / "data"
# Floors sit below what the shipped model measured on these slices (see MODEL_CARD.md), so a
# retrain that loses real accuracy fails here while noise does not.
DOMAIN_FLOOR = 0.70
PII_RECALL_FLOOR = 0.80
PII_PRECISION_FLOOR = 0.80


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def test_domain_accuracy_on_heldout_mmlu_pro_slice(classifier: Classifier):
    rows = _jsonl("heldout_domain.jsonl")
    results = classifier.classify([r["prompt"] for r in rows])
    accuracy = np.mean([c.domain == r["domain"] for c, r in zip(results, rows, strict=True)])
    assert accuracy >= DOMAIN_FLOOR


def test_outputs_are_well_formed(classifier: Classifier):
    [c] = classifier.classify(["What is the boiling point of water at 2 atm?"])
    assert set(c.domain_probs) == set(DOMAINS)
    assert abs(sum(c.domain_probs.values()) - 1.0) < 1e-4
    assert c.domain == max(c.domain_probs, key=c.domain_probs.get)
    assert 0.0 <= c.complexity <= 1.0


def test_domain_is_the_graphs_head_ensembled_with_the_embeddings(classifier: Classifier):
    # The shipped domain mixes the graph's domain_probs with a head over the same text's embedding
    # (model card, "Domain"); the graph alone would be a different, weaker answer.
    head = model_domain_head(MODEL_DIR)
    assert head is not None and head.head_weight > 0
    texts = ["why do leaves change color in the fall", "can my landlord keep my deposit?"]
    got = classifier.classify(texts, pii_tokens=0)
    graph_only = Classifier(
        classifier._session, MODEL_DIR, tagger=classifier._tagger, complexity_head=classifier._complexity_head
    ).classify(texts, pii_tokens=0)
    for c, g in zip(got, graph_only, strict=True):
        graph = np.array([[g.domain_probs[d] for d in DOMAINS]])
        want = head.combine(graph, g.embedding[None])[0]
        assert np.allclose([c.domain_probs[d] for d in DOMAINS], want, atol=1e-6)
        assert c.domain == DOMAINS[int(want.argmax())]


def test_domain_head_training_reads_the_graphs_domain_not_the_ensemble(classifier: Classifier):
    # train/domain_head.py caches features under the graph's hash and fits and weighs the head
    # against the graph's domain_probs; with a head installed, the runtime's answer is the ensemble,
    # which would count the head twice.
    from extproc.classifier.train.domain_head import features

    texts = ["how do vaccines train the immune system", "is a verbal contract binding?"]
    emb, dp = features(classifier, texts, None, "graph")
    graph_only = Classifier(
        classifier._session, MODEL_DIR, tagger=classifier._tagger, complexity_head=classifier._complexity_head
    ).classify(texts, pii_tokens=0)
    shipped = classifier.classify(texts, pii_tokens=0)
    for i, (g, c) in enumerate(zip(graph_only, shipped, strict=True)):
        assert np.array_equal(dp[i], np.array([g.domain_probs[d] for d in DOMAINS], np.float32))
        assert np.array_equal(emb[i], g.embedding)
        assert not np.allclose(dp[i], [c.domain_probs[d] for d in DOMAINS], atol=1e-3)


def test_a_broken_domain_head_fails_loading_clearly(tmp_path):
    for f in MODEL_DIR.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    z = dict(np.load(tmp_path / "domain_head.npz"))
    z["w0"] = z["w0"][:100]  # takes 100 inputs, not the embedding's 384
    np.savez(tmp_path / "domain_head.npz", **z)
    with pytest.raises(ModelError, match="layer 0 does not take 384 inputs"):
        Classifier.load(tmp_path)


def test_pii_on_heldout_presidio_slice(classifier: Classifier):
    rows = _jsonl("heldout_pii.jsonl")
    results = classifier.classify([r["text"] for r in rows])
    gold_hit = gold = pred_hit = pred = 0
    for r, c in zip(rows, results, strict=True):
        spans = [(s["start"], s["end"], s["type"]) for s in r["spans"]]
        found = [(s.start, s.end, s.type) for s in c.pii]
        overlap = lambda a, b: a[2] == b[2] and a[0] < b[1] and b[0] < a[1]  # noqa: E731
        gold += len(spans)
        gold_hit += sum(any(overlap(g, p) for p in found) for g in spans)
        pred += len(found)
        pred_hit += sum(any(overlap(p, g) for g in spans) for p in found)
    assert gold_hit / gold >= PII_RECALL_FLOOR
    assert pred_hit / pred >= PII_PRECISION_FLOOR


def _reference_run(ref) -> dict[str, np.ndarray]:
    out = run_graphs(MODEL_DIR, ref["input_ids"], ref["attention_mask"])
    head = model_domain_head(MODEL_DIR)
    if head is not None:  # the shipped domain: the graph's head ensembled with the embedding's
        out["domain_ensemble"] = head.combine(out["domain_probs"], out["embedding"])
    return out


def test_outputs_are_the_same_on_every_instruction_set():
    # graph_* were computed by the shipped graph on the training machine (AMD EPYC Zen 5,
    # AVX-512 VNNI). 7-bit weights make every MLAS int8 kernel (AVX2, AVX-512BW, VNNI, AMX) sum
    # the same integers, so only float rounding in the fp32 ops may differ: at most 6e-6 seen
    # (model card). With 8-bit weights an AVX2 machine was 0.22 away here, enough to flip routes.
    ref = np.load(DATA / "reference.npz")
    out = _reference_run(ref)
    for name, got in out.items():
        assert np.abs(got - ref[f"graph_{name}"]).max() < 1e-4, name
        assert (got.argmax(-1) == ref[f"graph_{name}"].argmax(-1)).all(), name


def test_onnx_matches_training_graph_reference_outputs():
    ref = np.load(DATA / "reference.npz")
    out = _reference_run(ref)
    domain, embedding, pii = out["domain_probs"], out["embedding"], out["pii_probs"]
    mask = ref["attention_mask"].astype(bool)
    # The shipped graph is int8 with activations quantized per run: against the fp32 training
    # graph its probabilities move on this batch's low-confidence texts (the empty text, the
    # card/IBAN line): 0.216 for the first domain branch, 0.285 for the chat-augmented one on a
    # text whose reference confidence is 0.39 (0.215 of it already in the fp32 export, which runs
    # the int8 trunk dequantized while the torch reference runs the base trunk). An export bug
    # moves far more; confident decisions must agree exactly.
    assert np.abs(domain - ref["domain_probs"]).max() < 0.3
    confident = ref["domain_probs"].max(-1) >= 0.5
    assert confident.sum() >= 3
    assert (domain.argmax(-1) == ref["domain_probs"].argmax(-1))[confident].all()
    # the trunk's mean (what complexity heads read): int8 against fp32, cosine 0.985 (the empty text) to 0.997
    cosine = (
        (embedding * ref["embedding"]).sum(-1)
        / np.linalg.norm(embedding, axis=-1)
        / np.linalg.norm(ref["embedding"], axis=-1)
    )
    assert cosine.min() > 0.98
    assert np.abs(pii - ref["pii_probs"])[mask].mean() < 0.01
    # int8 moves some boundary tokens of this PII-dense batch (95% agree for the shipped branch;
    # its F1 is measured on the int8 graph itself, see the model card)
    assert (pii.argmax(-1) == ref["pii_probs"].argmax(-1))[mask].mean() >= 0.93


@pytest.mark.parametrize("graph", ["classifier.onnx", "pii.onnx", "sentence.onnx"])
def test_int8_weights_cannot_saturate_16_bit_pair_sums(graph: str):
    # u8 x s8 kernels without VNNI add two products in a saturating int16: 2 * 255 * |w| must
    # stay below 32768, i.e. |w| <= 64 (7-bit weights). 8-bit weights made outputs CPU-dependent.
    model = onnx.load(str(MODEL_DIR / graph))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMulInteger" and n.input[1] in inits]
    assert weights, f"{graph} has no int8 MatMuls: update this test and the model card"
    for w in weights:
        assert w.dtype == np.int8 and int(np.abs(w.astype(np.int32)).max()) <= 64


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-user (.ci/run installs it)")
def test_outputs_match_on_an_emulated_avx2_cpu(tmp_path):
    # The same graph on a CPU without AVX-512 or VNNI (qemu's Haswell model: AVX2 + FMA), the
    # kind of machine whose int8 kernels once moved a domain probability by 0.22.
    out = tmp_path / "haswell.npz"
    subprocess.run(
        ["qemu-x86_64", "-cpu", "Haswell", sys.executable, str(Path(__file__).with_name("isa_probe.py")), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    emulated = np.load(out)
    native = _reference_run(np.load(DATA / "reference.npz"))
    for name, got in native.items():
        assert np.abs(got - emulated[name]).max() < 1e-4, name


def test_pii_late_in_a_long_prompt_is_found_within_the_taggers_budget(classifier: Classifier):
    filler = "The committee reviewed the quarterly results and discussed the roadmap. " * 300
    text = filler + "Please send the contract to maria.gonzalez@example.org and call 415-555-0132."
    # ~4,600 tokens: read whole with a budget that covers them (past a smaller one, the request's
    # structured scan finds the e-mail: tests/unit/test_pii_budget.py)
    [c] = classifier.classify([text], pii_tokens=8192)
    assert c.pii_chars == len(text)
    types = {s.type for s in c.pii}
    assert "EMAIL_ADDRESS" in types
    email = next(s for s in c.pii if s.type == "EMAIL_ADDRESS")
    assert text[email.start : email.end] == "maria.gonzalez@example.org"
    assert email.start > 10_000


def test_structured_pii_is_found_with_exact_offsets(classifier: Classifier):
    text = "hi, my card 4111 1111 1111 1111 was charged twice, ssn 460-89-9847, iban DE89 3704 0044 0532 0130 00"
    [c] = classifier.classify([text])
    found = {s.type: text[s.start : s.end] for s in c.pii}
    assert found.get("CREDIT_CARD") == "4111 1111 1111 1111"
    assert found.get("US_SSN") == "460-89-9847"
    assert found.get("IBAN_CODE") == "DE89 3704 0044 0532 0130 00"
    assert set(found) <= set(PII_TYPES)


@pytest.mark.parametrize(
    "text",
    [
        "pip install torch==2.13.0 && python -m pytest -q",
        "Order #88231977 shipped on 2024-03-05, tracking 1Z999AA10123456784.",
        "What is 4111 * 1111? Show the steps.",
        "for i in range(10):\n    print(i ** 2)",
    ],
)
def test_numbers_code_and_ids_are_not_pii(classifier: Classifier, text: str):
    [c] = classifier.classify([text])
    assert c.pii == ()


def test_a_texts_result_does_not_depend_on_its_batch_mates(classifier: Classifier):
    # Similar lengths, so a length-grouping batcher would put them in one padded run, where int8
    # dynamic quantization shares one activation scale between them.
    texts = [
        "Which of the following best describes the role of the Federal Reserve in setting interest rates?",
        "Solve for x: 3x + 7 = 22. Show steps. Solve for x: 3x + 7 = 22. Show steps. 12345 %%% ~~~ 99999999",
        "hey, email John Smith at john.smith@example.com or call 415-555-0132 about order 88231",
        "short one",
        "x " * 1200 + "end",
    ]
    batched = classifier.classify(texts)
    for t, b in zip(texts, batched, strict=True):
        [single] = classifier.classify([t])
        assert single == b  # exactly: same probabilities, complexity and spans


def test_empty_input_list_and_empty_text(classifier: Classifier):
    assert classifier.classify([]) == []
    [c] = classifier.classify([""])
    assert c.pii == () and c.domain in DOMAINS


def test_model_files_fit_the_size_budget():
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 40 * 1024 * 1024


def test_sentence_embeddings_are_unit_length_and_find_paraphrases(classifier: Classifier):
    texts = [
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "What is the capital of France?",
    ]
    results = classifier.classify(texts, embed=True)
    e = np.stack([r.sentence_embedding for r in results])
    assert e.shape == (3, 384) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > 0.8 > 0.3 > e[0] @ e[2]  # all-MiniLM-L6-v2 fp32: 0.894 and 0.075
    assert np.array_equal(classifier.embed(texts[:1])[0], e[0])
    plain = classifier.classify(texts)
    assert plain[0].sentence_embedding is None and plain[0] == results[0]  # the heads do not move
    assert np.array_equal(plain[0].embedding, results[0].embedding)


def test_shipped_complexity_is_the_default_head_over_embedding_and_form(classifier: Classifier):
    import json as _json

    from extproc.heads import parse_head

    head = parse_head(_json.loads((MODEL_DIR / "complexity_head.json").read_text()))
    text = "Prove that there are infinitely many primes, step by step."
    [c] = classifier.classify([text])
    assert c.complexity == pytest.approx(head.score(c.embedding, text), abs=1e-6)
    assert set(head.meta["models_left_out"]) == {"Meta-Llama-3_1-8B-Instruct", "Meta-Llama-3_1-70B-Instruct"}
