"""The quality harness (docs/quality.md): a synthetic VQA task (``data``), a small LLaVA trained on it
(``train``) and shipped in ``model/`` as package data, and the accuracy of every visual method on it
(``evaluate``; ``tokenprune-bench quality``)."""
