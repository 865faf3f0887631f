"""bclip: backdoor poisoning and its mitigation in CLIP-style vision-language models."""
