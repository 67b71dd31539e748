"""Data: rows to rendered, tokenized, masked examples; formats, sources, chat templates, batches and shapes."""
