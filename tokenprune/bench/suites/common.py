"""What several suites share: the CLI model names they map to their own presets, and the config check
of suites that run one prompt at a time on CPU (spec, rag)."""

from __future__ import annotations

from tokenprune.bench.modes import BenchConfig

__all__ = ["SIZE_PRESETS", "check_config"]

# CLI preset -> the text, spec and rag suites' own model sizes (the CLI's default model is tiny-llava).
SIZE_PRESETS = {"tiny-llava": "tiny", "medium-llava": "medium", "tiny": "tiny", "medium": "medium"}


def check_config(config: BenchConfig, stage: str, example: str) -> None:
    """Methods of ``stage`` only, and none of the options the spec/rag suites have no use for.

    Raises:
        ValueError: a method of another stage, or ``--batch-size``/``--prompt-tokens``/``--image-size``/
            a non-CPU ``--device`` given.
    """
    wrong = [label for label, m in config.methods if m.stage != stage]
    if wrong:
        raise ValueError(f"{config.mode} mode measures {stage} methods (e.g. --methods {example}), "
                         f"not {', '.join(wrong)}")
    unused = {"--batch-size": config.batch_size != 1, "--prompt-tokens": config.prompt_tokens is not None,
              "--image-size": config.image_size is not None, "--device": config.device not in ("auto", "cpu")}
    given = [flag for flag, set_ in unused.items() if set_]
    if given:
        raise ValueError(f"{config.mode} mode runs one prompt at a time on CPU with the suite's prompts; "
                         f"drop {', '.join(given)}")
