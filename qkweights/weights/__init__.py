"""Weight-only math: the query-key and value-output SVDs, LayerNorm folding, profiles, check and diff."""
