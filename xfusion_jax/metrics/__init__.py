"""Model-independent metrics: BLEU of generated text, Fréchet distance of features."""
