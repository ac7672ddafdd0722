"""ToDRE's stage 2 on the quality harness's model: the cross-modal attention ratios it measures and
what dropping every visual token costs, per layer.

    python benchmarks/quality_todre_ratios.py --n 600 --keep 64

For each K in ``--layers``: runs ToDRE (``keep`` by stage 1) on the test split with a recording copy
of stage 2 and prints the distribution of ``alpha_t->v`` / ``alpha_v->t`` at layer K - 1 and the
share of rows under tau (``--threshold``, the paper's 0.10) — the rows ToDRE would drop; then the
accuracy when every row drops its visual tokens from layer K on (tau = 1).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

import torch

import tokenprune as tp
from tokenprune.bench.suites.quality import data, evaluate
from tokenprune.methods.todre import ToDREDiversity, ToDRERelevance


@dataclass
class RecordingRelevance(ToDRERelevance):
    """Stage 2 that also keeps the ratios it measured (rows with images and text only)."""

    seen: list = field(default_factory=list, compare=False, repr=False)

    def budget(self, view, scores, keep, sizes):
        image, text = self.partition(view)
        rows = text.any(dim=1) & image.any(dim=1)
        to_image = (scores * image).sum(dim=1)
        from_image = (view.attention_from(image, impl=self.impl) * text).sum(dim=1)
        self.seen += list(zip(to_image[rows].tolist(), from_image[rows].tolist()))
        return super().budget(view, scores, keep, sizes)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threshold", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, processor = evaluate.load(evaluate.DEFAULT_MODEL)
    samples = data.dataset("test", args.n, seed=0)
    batches = evaluate.prepare(processor, samples)
    base = evaluate.answer(model, processor, batches)
    base_acc = evaluate.score(samples, base)["accuracy"]
    print(f"unpruned accuracy {base_acc:.3f} (n={args.n}); stage 1 keeps {args.keep} of 576 tokens")
    for layer in args.layers:
        recorder = RecordingRelevance(layer=layer, threshold=args.threshold)
        preds = evaluate.answer(model, processor, batches, [ToDREDiversity(keep=args.keep), recorder])
        ratios = torch.tensor(recorder.seen)
        q = torch.quantile(ratios, torch.tensor([0.0, 0.5, 1.0]), dim=0)
        under = ((ratios < args.threshold).all(dim=1)).float().mean()
        acc = evaluate.score(samples, preds)["accuracy"]
        forced = evaluate.answer(model, processor, batches, tp.ToDRE(keep=args.keep, layer=layer, threshold=1.0))
        forced_acc = evaluate.score(samples, forced)["accuracy"]
        print(f"K={layer}: alpha_t->v at layer {layer - 1} min/median/max {q[0, 0]:.3f}/{q[1, 0]:.3f}/{q[2, 0]:.3f}, "
              f"alpha_v->t {q[0, 1]:.3f}/{q[1, 1]:.3f}/{q[2, 1]:.3f}; rows under tau={args.threshold}: {100 * under:.1f}%; "
              f"accuracy {acc:.3f}; every row dropped from layer {layer}: accuracy {forced_acc:.3f} "
              f"(retention {100 * forced_acc / base_acc:.1f}%)", flush=True)


if __name__ == "__main__":
    main()
