"""Tasks the fine-tuning optimises: problems, prompts and rewards."""
