"""Input side: sources, triggers, poisoning, augmentations, tokenizer and Grain pipelines."""
