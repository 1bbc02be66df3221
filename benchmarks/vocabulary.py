"""What vocabulary trimming costs the teacher by itself, for several ways of choosing the kept ids.

The teacher at full depth, no healing: its vocabulary trimmed to the tokens of the default recipe's
vocabulary plays (``vocab.plays``, else all public plays), plus
public words in other spellings (``vocab.word_forms``), or plus the teacher's lowest (most frequent)
ids; each scored on held-out client text per *teacher* token (see compressor/report.py), as a
ratio to the untrimmed teacher in the same run.

    python benchmarks/vocabulary.py                # all 200 evaluation speeches, about 3 minutes idle
    python benchmarks/vocabulary.py --documents 8  # the first 8 evaluation documents only
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compressor.evaluate import score_documents  # noqa: E402
from compressor.recipe import load_recipe  # noqa: E402
from compressor.texts import client_eval_documents, encode_documents, public_texts  # noqa: E402
from compressor.vocab import trim_vocabulary, used_token_ids, word_form_ids  # noqa: E402
from shared.base_model import load_model, load_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "vocabulary.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=0, help="evaluation documents scored (0: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    torch.set_grad_enabled(False)
    recipe = load_recipe(None)
    teacher, tokenizer = load_model(recipe.teacher).to(torch.bfloat16), load_tokenizer(recipe.teacher)
    public = public_texts(recipe, recipe.vocab_plays)
    documents = client_eval_documents(recipe)
    documents = documents[: args.documents] if args.documents else documents
    teacher_tokens = sum(len(ids) - 1 for ids in encode_documents(tokenizer, documents))
    reference = score_documents(teacher, tokenizer, documents, reference_tokens=teacher_tokens).as_dict()
    used = used_token_ids(tokenizer, public)
    variants = [
        ("the public plays' tokens", used),
        ("+ public words as written (`as-is`)", used | word_form_ids(tokenizer, public, ["as-is"])),
        ("+ lower-case and capitalized forms", used | word_form_ids(tokenizer, public, ["as-is", "lower", "capitalized"])),
        ("+ every form (`as-is`, lower, capitalized, upper)", used | word_form_ids(tokenizer, public, ["as-is", "lower", "capitalized", "upper"])),
        ("+ the 4,000 lowest teacher ids", used | set(range(4000))),
        ("+ the 8,000 lowest teacher ids", used | set(range(8000))),
    ]
    rows = []
    for what, keep in variants:
        model, trimmed, kept = trim_vocabulary(teacher, tokenizer, keep)
        score = score_documents(model, trimmed, documents, reference_tokens=teacher_tokens).as_dict()
        rows.append((len(kept), what, score["ppl_per_teacher_token"] / reference["ppl_per_teacher_token"],
                     score["tokens"] / teacher_tokens - 1, len(kept) * teacher.config.hidden_size / 1e6))
        print(f"{len(kept):6d} ids  {rows[-1][2]:.3f}x  {what}", flush=True)
    speeches = sum(len(document) for document in documents)
    lines = [
        "# Vocabulary trimming alone", "",
        "The teacher at full depth, no healing, its vocabulary trimmed by `trim_vocabulary` to the ids named; "
        f"perplexity per teacher token on {speeches} held-out client speeches ({len(documents)} documents), "
        f"as a ratio to the untrimmed teacher (ppl {reference['ppl_per_teacher_token']:.2f}) in the same run. "
        "Written by `benchmarks/vocabulary.py`.", "",
        f"Command: `{' '.join(['python benchmarks/vocabulary.py', *(argv if argv is not None else sys.argv[1:])])}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{time.monotonic() - started:.0f} s", "",
        "| kept ids | which | embedding parameters | ppl / teacher | more tokens for client text |",
        "|---:|---|---:|---:|---:|",
        *[f"| {ids:,} | {what} | {params:.1f}M | {ratio:.3f}x | {more:.1%} |" for ids, what, ratio, more, params in rows],
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
