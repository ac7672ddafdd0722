"""RAG context pruning suite: the synthetic RAG set (``dataset``, stdlib only), random-weight scorer
checkpoints (``models``), the study and the ``tokenprune-bench --mode rag`` runner (``run``) and the
LLMLingua side by side (``llmlingua_side``, its own environment)."""
