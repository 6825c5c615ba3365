"""Looking inside: attention to labels, saliency, the logit lens, direct logit attribution."""
