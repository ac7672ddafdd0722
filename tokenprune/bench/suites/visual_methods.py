"""Visual pruning methods x models on tiny offline fixtures: tokens reaching the decoder and
time-to-first-token ratios (HF generate, CPU, one thread).

    python -m tokenprune.bench.suites.visual_methods [--repeats 5] [--keep 64] [--out benchmarks/results/visual_methods_cpu]

Per model, every method and the unpatched baseline run interleaved ``repeats`` times; the ratio is
median(baseline TTFT) / median(method TTFT) from the same run. TTFT = ``generate(max_new_tokens=1)``
wall time, which includes the vision encoder (pre-LLM methods do not shorten it). Models:
LLaVA-1.5-shaped (336 px, 576 tokens), LLaVA-NeXT-shaped (112 px crops of 64 tokens, a 224x224 image:
base + 2x2 grid + newlines = 336 placeholders), Qwen2.5-VL-shaped (448x448 image, 256 tokens).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import tokenprune as tp  # noqa: E402
from tokenprune.fixtures import build_tiny_llava, build_tiny_llava_next, build_tiny_qwen2_5_vl, make_image  # noqa: E402


def methods(keep: int) -> dict:
    return {
        "divprune": tp.DivPrune(keep=keep),
        "random": tp.RandomPrune(keep=keep),
        "grid": tp.UniformGrid(keep=keep),
        "holov": tp.HoloV(keep=keep),
        "visionzip": tp.VisionZip(keep=keep),
        "flowcut": tp.FlowCut(keep=keep),
        "fastv": tp.FastV(layer=2, keep=keep),
    }


def models(root: Path) -> dict:
    return {
        "llava-1.5": (lambda p: build_tiny_llava(p, image_size=336, vision_layers=4, hidden_size=256), (336, 336)),
        "llava-next": (lambda p: build_tiny_llava_next(p, crop_size=112, hidden_size=256), (224, 224)),
        "qwen2.5-vl": (lambda p: build_tiny_qwen2_5_vl(p, hidden_size=256, max_pixels=448 * 448), (448, 448)),
    }


def ttft(model, inputs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/visual_methods_cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import transformers

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, size) in models(Path(tmp)).items():
            path = build(Path(tmp) / name)
            processor = AutoProcessor.from_pretrained(path)
            model = AutoModelForImageTextToText.from_pretrained(path).eval()
            content = [{"type": "image"}, {"type": "text", "text": "describe the red circle in the corner"}]
            prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            inputs = processor(text=[prompt], images=[make_image(64).resize(size)], return_tensors="pt")
            prompt_len = int(inputs["input_ids"].shape[1])
            candidates = methods(args.keep)
            times = {key: [] for key in ["baseline", *candidates]}
            stats = {}
            ttft(model, inputs)  # warm-up
            for _ in range(args.repeats):
                times["baseline"].append(ttft(model, inputs))
                for key, method in candidates.items():
                    with tp.patch(model, method) as handle:
                        times[key].append(ttft(model, inputs))
                    stats[key] = handle.stats.records
            base = statistics.median(times["baseline"])
            for key in times:
                records = stats.get(key, [])
                image = [r for r in records if r.image is not None]
                rows.append({
                    "model": name,
                    "method": key,
                    "keep": args.keep,
                    "prompt_tokens": prompt_len,
                    "image_tokens_before": image[0].before if image else None,
                    "image_tokens_after": image[0].after if image else None,
                    # tokens the method chose (NeXT: content tokens; "after" also counts kept row newlines)
                    "method_kept": len(image[0].kept) if image and image[0].kept is not None else None,
                    "ttft_median_s": round(statistics.median(times[key]), 5),
                    "ttft_speedup": round(base / statistics.median(times[key]), 3),
                })
                print(rows[-1])
    meta = {
        "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(), "threads": 1,
        "torch": torch.__version__, "transformers": transformers.__version__, "tokenprune": tp.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repeats": args.repeats,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *meta])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **meta})


if __name__ == "__main__":
    main()
