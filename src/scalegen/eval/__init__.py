"""Evaluation: the ADM metrics with the FID Inception, the Fashion-MNIST classifier, FLOPs and scaling-law fits."""
