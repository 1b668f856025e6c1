"""Sample text from a trained checkpoint (or a packed export) with its quantized forward and its own tokenizer.

    python -m quest_pl.generate <run dir>/checkpoints/last.ckpt --prompt "ROMEO:" --max-new-tokens 100 \\
        --temperature 0.8 --top-k 50 --seed 0
    python -m quest_pl.generate <export dir> --prompt "ROMEO:"          # a `python -m quest_pl.export` directory

Sampling is deterministic for a given seed and device (a private ``torch.Generator``); ``--temperature 0`` is greedy.
The context is the last ``model.seq_len`` tokens (the positions the model was trained on). Generation stops after
``--max-new-tokens`` or at ``<|endoftext|>``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

from quest_pl.config import ConfigError


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """The new token ids sampled after ``prompt_ids`` (at least one id)."""
    device = model.lm_head.weight.device
    seq_len = model.cfg.seq_len
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(idx[:, -seq_len:])[0, -1].float()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            logits = (logits - logits.max()) / temperature  # max first: a tiny T gives 0 and -inf, never inf - inf
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        new.append(token)
        if token == eos_id:
            break
        idx = torch.cat((idx, torch.tensor([[token]], device=device)), dim=1)
    return new


def load_for_generation(path: str | Path, tokenizer: str | Path | None = None, device: str = "cpu"):
    """(model, tokenizer) of a checkpoint (its quantized forward) or of a packed export directory."""
    from quest_pl.data.run import find_tokenizer, load_tokenizer
    from quest_pl.export import module_from_checkpoint
    from quest_pl.saving import MODEL_FILE, TOKENIZER_FILE, load_packed

    path = Path(path)
    if path.is_dir() and (path / MODEL_FILE).is_file():
        model, _ = load_packed(path)
        tokenizer = tokenizer or (path / TOKENIZER_FILE if (path / TOKENIZER_FILE).is_file() else None)
    else:
        module, _ = module_from_checkpoint(path, key="checkpoint", kernel=None)
        model = module.model
        tokenizer = tokenizer or find_tokenizer(path)
    if tokenizer is None:
        raise ConfigError(f"checkpoint={str(path)!r}: no tokenizer found (pass --tokenizer PATH/tokenizer.json)")
    tok = load_tokenizer(tokenizer, f"checkpoint={str(path)!r}", model.cfg.vocab_size)
    return model.to(device).eval(), tok


def main(argv: list[str] | None = None) -> int:
    from quest_pl.data import EOS
    from quest_pl.export import check_paths

    p = argparse.ArgumentParser(prog="python -m quest_pl.generate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a .ckpt this project wrote, or a `python -m quest_pl.export` directory")
    p.add_argument("--prompt", default="", help="text to continue (empty: start after <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens={args.max_new_tokens}: expected an integer >= 1")
        if not math.isfinite(args.temperature) or args.temperature < 0:
            raise ConfigError(f"--temperature={args.temperature}: expected a finite number >= 0")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device={args.device}: CUDA is not available here; use --device cpu")
        if args.top_k is not None and args.top_k < 1:
            raise ConfigError(f"--top-k={args.top_k}: expected an integer >= 1")
        check_paths(tokenizer=args.tokenizer)
        model, tok = load_for_generation(args.checkpoint, args.tokenizer, args.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    eos = tok.token_to_id(EOS)
    prompt_ids = tok.encode(args.prompt).ids if args.prompt else []
    new = generate(model, prompt_ids or [eos], args.max_new_tokens, args.temperature, args.top_k, args.seed, eos)
    print(args.prompt + tok.decode([t for t in new if t != eos]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
