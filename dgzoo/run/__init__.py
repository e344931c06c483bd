"""What a run leaves behind: the run directory, results.json, the model card, and the Hub copy of them."""
