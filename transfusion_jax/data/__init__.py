"""Data: sources, tokenizer, packing into the batch contract, Grain pipeline."""
