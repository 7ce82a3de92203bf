"""Text data: a local file, or wikitext2 / c4 / pile through `datasets` (online), and token windows."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import FireqError

HUB_DATASETS = ("wikitext2", "c4", "pile")


def wikitext_rows_text(lines: list[str]) -> str:
    """The perplexity text of WikiText-2: rows (lines, with their newline) with blank rows emptied,
    joined by blank lines: "\\n\\n".join(l if l.strip() else "" for l in rows)."""
    return "\n\n".join(line if line.strip() else "" for line in lines)


def load_text(data: str, split: str = "test") -> str:
    """A text for calibration (split='train') or evaluation (split='test')."""
    p = Path(data).expanduser()
    if p.is_file():
        try:
            lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
        except UnicodeDecodeError:
            raise FireqError(f"{data}: not a UTF-8 text file") from None
        text = wikitext_rows_text(lines)
        if not text.strip():
            raise FireqError(f"{data}: the text file is empty")
        return text
    if data in HUB_DATASETS:
        return _hub_text(data, split)
    if p.exists():
        raise FireqError(f"{data}: not a text file")
    raise FireqError(f"{data}: no such file (or use one of: {', '.join(HUB_DATASETS)})")


def _hub_text(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise FireqError(f"{name} needs the `datasets` package (pip install datasets), or give a text file") from None
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return wikitext_rows_text(ds["text"])
        if name == "c4":
            ds = datasets.load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                                       "validation": "en/c4-validation.00000-of-00008.json.gz"},
                                       split="validation" if split == "test" else "train")
            return "\n\n".join(ds["text"][:20000])
        ds = datasets.load_dataset("NeelNanda/pile-10k", split="train")
        return "\n\n".join(ds["text"])
    except Exception as e:
        raise FireqError(f"cannot load {name} from the hub ({type(e).__name__}); give a local text file") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids, without BOS."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) windows at seeded random offsets."""
    if seqlen <= 0:
        raise FireqError(f"seqlen must be > 0, got {seqlen}")
    if ids.numel() < seqlen + 1:
        raise FireqError(f"calibration text has {ids.numel()} tokens, fewer than one sequence of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
