"""The accuracy harness (bench/accuracy.py, corpus.py, ruler.py) on a tiny random Llama."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import accuracy  # noqa: E402
import corpus  # noqa: E402
import ruler  # noqa: E402

from proxyprefill.kernels import ProxyAttnConfig, reference  # noqa: E402


def _encode(text: str) -> list[int]:
    """Byte-level ids: a tokenizer-free stand-in with a 256-token vocabulary."""
    return list(text.encode("utf-8"))


def test_retrieval_samples_are_seeded_and_hold_their_needles():
    paragraphs, _ = corpus.haystack_paragraphs()
    count = lambda s: len(s.split())
    for task in ruler.TASKS:
        first = ruler.make_sample(task, 600, 3, paragraphs, count)
        again = ruler.make_sample(task, 600, 3, paragraphs, count)
        other = ruler.make_sample(task, 600, 4, paragraphs, count)
        assert first.prompt == again.prompt and first.answer == again.answer
        assert first.prompt != other.prompt
        positions = [first.prompt.index(needle) for needle in first.needles]
        assert positions == sorted(positions)  # needles appear in the order the answer lists them
        assert count(first.prompt + first.answer) <= 600
        assert count(first.prompt + first.answer) >= 450
        assert first.answer.strip() and first.answer.strip() not in first.prompt.split("Question:")[-1]


def test_answers_follow_from_the_needles():
    paragraphs, _ = corpus.haystack_paragraphs()
    sample = ruler.make_sample("multi_value", 400, 0, paragraphs, lambda s: len(s.split()))
    values = [needle.split()[-1].rstrip(".") for needle in sample.needles]
    assert sample.answer == " " + ", ".join(values)
    sample = ruler.make_sample("variable_tracking", 400, 0, paragraphs, lambda s: len(s.split()))
    first, *rest = sample.needles
    value = first.split("=")[1].strip(" .")
    assert f"hold the value {value}" in sample.prompt
    names = [needle.split()[1] for needle in sample.needles]
    assert [needle.split()[-1].rstrip(".") for needle in rest] == names[:-1]  # each copies the previous
    assert sample.answer == " " + ", VAR ".join(names)


def test_corpus_texts_are_recorded():
    texts = corpus.nll_texts()
    assert texts and all(len(t.text) > 10_000 for t in texts)
    for t in texts:
        meta = t.describe()
        assert meta["license"] and meta["source"] and len(meta["sha256"]) == 64


def test_block_recall_against_a_full_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 96, 8)
    kept = torch.zeros(1, 4, 6, dtype=torch.bool)
    kept[:, :, [0, 3]] = True
    kept[:, 1] = True  # head 1 keeps everything: recall 1
    got = accuracy.block_recall(q, k, kept, block_size=16, q_offset=32, m=1, scale=0.5)
    for head in range(4):
        for row in range(16):
            position = 32 + 16 + row
            logits = q[0, head, 16 + row] @ k[0, head // 2, : position + 1].T * 0.5
            probs = torch.softmax(logits, dim=0)
            mask = kept[0, head].repeat_interleave(16)[: position + 1]
            assert math.isclose(float(got[0, head, row]), float(probs[mask].sum()), rel_tol=1e-5)
    assert torch.allclose(got[0, 1], torch.ones(16))


def test_probe_counts_the_index_sparsity():
    torch.manual_seed(1)
    config = ProxyAttnConfig(dense_below_tokens=0, block_size=16, gamma=0.5, min_budget_tokens=16)
    q, k = torch.randn(1, 4, 128, 8), torch.randn(1, 2, 128, 8)
    scores = reference.estimate_block_scores(q, k, config)
    index = reference.build_block_mask(scores, reference.head_budgets(q, k, config), config)
    probe = accuracy.AttentionProbe(num_layers=1, scale=8**-0.5, block_size=16)
    probe(0, q, k, k, type("Stats", (), {"index": index})(), 0)
    assert math.isclose(probe.sparsity()["overall"], float(index.causal_sparsity().mean()), rel_tol=1e-9)
    assert 0.0 < probe.recall()["overall"] < 1.0
    dense_probe = accuracy.AttentionProbe(num_layers=1, scale=8**-0.5, block_size=16)
    dense_probe(0, q, k, k, None, 0)
    assert dense_probe.sparsity()["overall"] == 0.0


@pytest.fixture(scope="module")
def tiny_engine():
    transformers = pytest.importorskip("transformers")
    from proxyprefill.workers.engine import PrefillEngine

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return PrefillEngine.from_model(model, model_id="tiny-llama")


def test_harness_end_to_end(tiny_engine, tmp_path):
    out = tmp_path / "accuracy.json"
    argv = ["--lengths", "512", "--samples", "1", "--nll-length", "512", "--chunk-size", "256"]
    argv += ["--block-size", "16", "--min-budget-tokens", "32", "--gamma", "0.5", "--out", str(out)]
    argv += ["--variants", "proxy", "estimator=meanpool", "gamma=0.99"]
    report = accuracy.main(argv, engine=tiny_engine, encode=_encode)
    saved = json.loads(out.read_text())
    assert saved["complete"] and [v["name"] for v in saved["variants"]] == [
        "dense",
        "proxy",
        "estimator=meanpool",
        "gamma=0.99",
    ]
    dense, proxy, meanpool, high_gamma = report["variants"]
    for text in dense["nll"].values():
        assert text["nll_delta"] == 0.0
    assert dense["sparsity"]["overall"] == 0.0 and dense["recall"]["rows"] == 0
    assert proxy["sparsity"]["overall"] > high_gamma["sparsity"]["overall"]
    assert proxy["sparsity"]["overall"] > 0.1
    for variant in (proxy, meanpool):
        assert 0.0 < variant["recall"]["overall"] < 1.0
        assert len(variant["recall"]["per_layer"]) == 2
        assert all("top1_agreement" in e for e in variant["nll"].values())
        assert variant["retrieval"]["all"]["n"] == len(ruler.TASKS)
    # same budgets, different block choices
    assert abs(meanpool["sparsity"]["overall"] - proxy["sparsity"]["overall"]) < 0.05
    assert "| proxy |" in accuracy.table(report["variants"])


@pytest.mark.parametrize("q_offset", [0, 64])
def test_masked_sdpa_attention_matches_the_reference(q_offset):
    torch.manual_seed(q_offset)
    config = ProxyAttnConfig(dense_below_tokens=0, block_size=16, gamma=0.6, min_budget_tokens=16)
    q = torch.randn(1, 6, 80, 16)
    k, v = torch.randn(1, 2, q_offset + 80, 16), torch.randn(1, 2, q_offset + 80, 16)
    scores = reference.estimate_block_scores(q, k, config, q_offset)
    index = reference.build_block_mask(
        scores, reference.head_budgets(q, k, config, q_offset), config, q_offset
    )
    want, _ = reference.block_sparse_attention(q, k, v, index, q_offset)
    got, _ = accuracy.masked_sdpa_block_sparse_attention(q, k, v, index, q_offset)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with accuracy.fast_cpu_attention():
        assert reference.block_sparse_attention is accuracy.masked_sdpa_block_sparse_attention
    assert reference.block_sparse_attention is not accuracy.masked_sdpa_block_sparse_attention


def test_answer_predictions_match_a_full_forward_in_dense_mode(tiny_engine):
    """Prefill + dense decode over the cache predicts what one forward over prompt + answer does."""
    torch.manual_seed(5)
    prompt, answer = torch.randint(0, 256, (300,)).tolist(), torch.randint(0, 256, (6,)).tolist()
    variant = accuracy.Variant("dense", "dense", ProxyAttnConfig(dense_below_tokens=0, block_size=16), "")
    predicted = accuracy.answer_predictions(tiny_engine, prompt, answer, variant, 128, None)
    with torch.no_grad():
        logits = tiny_engine.model(input_ids=torch.tensor([prompt + answer])).logits[0]
    assert predicted == logits[len(prompt) - 1 : -1].argmax(dim=-1).tolist()
