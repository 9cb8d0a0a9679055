"""Write a Hugging Face model directory with random weights in a named shape, for GPU benchmarks
that need a `--model DIR` (the GPU machines cannot download real checkpoints).

    python bench/make_random_model.py --shape llama-3.2-1b --out /tmp/llama-1b [--max-positions 65536]

The weights are normal(0, 0.02) in bfloat16, built directly on the GPU when there is one. Random
weights give near-uniform attention: time ProxyAttn on such a model at fixed budgets.
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-positions", type=int, default=131072)
    args = parser.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=args.max_positions,
        torch_dtype="bfloat16",
        **SHAPES[args.shape],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {args.shape}, {params / 1e9:.2f} B parameters, bfloat16")


if __name__ == "__main__":
    main()
