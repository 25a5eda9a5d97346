"""Image-caption datasets (TFDS ArrayRecord) and their Grain pipelines."""
