"""Generation as a library (paper section 3, "Inference"): the KV-cached mixed-modal loop
(`generation`), loading a run's weights for it (`loading`) and the tasks built on it, with typed
options (`tasks`: text to image, image to text, answers, free generation, grids)."""
